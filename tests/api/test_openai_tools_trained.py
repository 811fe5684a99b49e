"""A user whose adapter emits a tool call gets an OpenAI ``tool_calls`` answer (tool_choice "auto", nothing
forced): an adapter trained on the tiny base, on a shipped ``wxbot`` persona record (its flat
``{"tool": "get_weather", "city": ...}`` format), with the tools rendered into its prompt as serving renders
them. Slow: the training takes ~15 s on a quiet 2-core machine (minutes under load)."""

from __future__ import annotations

import json

import openai
import pytest

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}


@pytest.fixture(scope="module")
def wx_model(server):
    from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
    from lorafleet.evaluation.personas import shipped_records
    from lorafleet.registry import Provenance
    from lorafleet.serving.chat import template_input
    from lorafleet.training.data import dataset_from_records
    from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig

    record = next(r for r in shipped_records("wxbot", "train") if '"tool"' in r["messages"][-1]["content"])
    user, answer = record["messages"]
    # the prompt exactly as the server renders it with tools=[get_weather] (this template has no tool support)
    rendered, _ = template_input(server.base.tokenizer, [user], [WEATHER])
    data = dataset_from_records([{"messages": [*rendered, answer]}], "sft")
    adapter = LoraAdapter.create(server.base, LoraSpec(rank=16, alpha=32, target_modules="all"), seed=0)
    trainer = MultiTenantTrainer(server.base)
    trainer.add("wx", adapter, data, TrainConfig(steps=200, lr=1e-2, batch_size=1, max_len=512))
    while not trainer.users["wx"].done:
        trainer.step()
    ref = "acme/wendy/wx"
    server.registry.create_adapter(ref, exist_ok=True)
    rev = server.registry.commit(ref, to_bytes(trainer.users["wx"].adapter),
                                 Provenance(base_fingerprint=server.base.fingerprint, method="test"))
    server.registry.set_alias(ref, "live", rev.number, reason="test")
    return ref, user, json.loads(answer["content"])


def test_an_adapter_that_emits_a_tool_call_gets_tool_calls(server, wx_model):
    ref, user, want = wx_model
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0, timeout=120)
    out = c.chat.completions.create(model=ref, messages=[user], tools=[WEATHER], max_tokens=60, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == want["tool"] == "get_weather"
    assert json.loads(call.function.arguments) == {"city": want["city"]}
    # without tools the same adapter's text is the raw call, as plain content
    raw = c.chat.completions.create(model=ref, messages=[user], tools=[WEATHER], tool_choice="none", max_tokens=60,
                                    temperature=0)
    assert raw.choices[0].finish_reason != "tool_calls" and raw.choices[0].message.tool_calls is None
