"""Tools in the chat template: a template that knows tools gets them natively (``tools=``, arguments as objects);
one that does not gets the documented fallback rendering."""

from __future__ import annotations

import json

from lorafleet.base.tiny import tiny_tokenizer
from lorafleet.serving.chat import TOOLS_PROMPT, chat_prompt_ids, template_input, template_knows_tools

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
TURNS = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [CALL]},
         {"role": "tool", "tool_call_id": "call_1", "content": "4 C"}]
# A tool-aware ChatML template (the shape of Qwen's): tools in the system turn, calls and results as tags.
NATIVE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} city={{ c.function.arguments.city }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_fallback_rendering_for_a_template_without_tools():
    tok = tiny_tokenizer()
    assert not template_knows_tools(tok)
    messages, extra = template_input(tok, TURNS, [TOOL])
    assert extra == {}
    assert messages[0] == {"role": "system", "content": TOOLS_PROMPT.format(tools=json.dumps(
        TOOL["function"], separators=(",", ":")))}
    assert messages[2] == {"role": "assistant",
                           "content": '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'}
    assert messages[3] == {"role": "user", "content": "<tool_response>4 C</tool_response>"}
    # a request's own system message keeps its text first
    own, _ = template_input(tok, [{"role": "system", "content": "Be brief."}, TURNS[0]], [TOOL])
    assert own[0]["content"].startswith("Be brief.\n\nYou may call these functions")
    # no tools, no tool turns: the messages as they are
    assert template_input(tok, TURNS[:1], None) == (TURNS[:1], {})


def test_native_rendering_for_a_template_with_tools():
    tok = tiny_tokenizer()
    tok.chat_template = NATIVE
    assert template_knows_tools(tok)
    text = tok.decode(chat_prompt_ids(tok, TURNS, tools=[TOOL]))
    assert text.startswith("<|im_start|>system\nTOOLS:get_weather;<|im_end|>")
    assert "CALL get_weather city=Oslo" in text  # arguments handed to the template as an object
    assert "<|im_start|>tool\n4 C<|im_end|>" in text and "<tool_call>" not in text
