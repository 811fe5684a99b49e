"""Turning user input into token ids with the base's chat template, tool definitions and tool turns included.

Messages are OpenAI-shaped dicts: ``{"role", "content"}``, plus ``tool_calls`` on an assistant turn (OpenAI's
``[{"id", "type": "function", "function": {"name", "arguments": "<JSON string>"}}]``) and ``tool_call_id`` on a
``tool`` turn. Tools are OpenAI's ``[{"type": "function", "function": {"name", "description", "parameters"}}]``.

A chat template that knows tools (it refers to ``tools`` or ``tool_calls``, as Qwen's, Llama 3.1's or SmolLM3's
do) gets them the way ``transformers`` passes them: ``tools=`` and assistant ``tool_calls`` with ``arguments`` as
an object. A template that does not (SmolLM2's, the tiny test model's) gets the **fallback rendering**:

- :data:`TOOLS_PROMPT` with the tools (each one's ``function`` object, one compact JSON line each, inside
  ``<tools></tools>``) as a system message
  (appended to the request's own first system message, or a new first one; short, for small contexts);
- an assistant turn's calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` lines after its text;
- a ``tool`` turn as a ``user`` turn ``<tool_response>{content}</tool_response>`` (roles every template knows).
"""

from __future__ import annotations

import json

TOOLS_PROMPT = (  # {tools}: one compact JSON definition a line
    "You may call these functions:\n<tools>\n{tools}\n</tools>\nTo call one, answer with only "
    '<tool_call>{{"name": <function-name>, "arguments": <arguments-object>}}</tool_call>'
)


def template_knows_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tools itself (else the fallback rendering is used)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one, or a "tool_use" one
        template = "".join(str(t) for t in template.values())
    return isinstance(template, str) and ("tools" in template or "tool_calls" in template)


def _arguments(call: dict) -> dict:
    args = call["function"].get("arguments") or "{}"
    return json.loads(args) if isinstance(args, str) else dict(args)


def _native(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("tool_calls"):
            m["content"] = m.get("content") or ""
            m["tool_calls"] = [{"id": c.get("id"), "type": "function",
                                "function": {"name": c["function"]["name"], "arguments": _arguments(c)}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def _fallback(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)}) for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + [f"<tool_call>{c}</tool_call>" for c in calls])
        elif role == "tool":
            role, content = "user", f"<tool_response>{content}</tool_response>"
        out.append({"role": role, "content": content})
    if tools:
        text = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t.get("function", t), separators=(",", ":"))
                                                   for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def template_input(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[dict], dict]:
    """What ``apply_chat_template`` is given for these messages and tools: ``(messages, extra keyword args)`` —
    the native form for a template that knows tools, else the fallback rendering (see the module docstring)."""
    if template_knows_tools(tokenizer):
        return _native(messages), ({"tools": tools} if tools else {})
    if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        return _fallback(messages, tools), {}
    return messages, {}


def chat_prompt_ids(tokenizer, prompt: str | list[dict], *, system: str | None = None,
                    tools: list[dict] | None = None) -> list[int]:
    """Token ids of a chat prompt ending with the assistant turn's opening (generation prompt).

    ``prompt`` is a user message or a list of OpenAI-shaped messages; ``tools`` OpenAI tool definitions.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and (not messages or messages[0].get("role") != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    messages, extra = template_input(tokenizer, messages, tools)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
