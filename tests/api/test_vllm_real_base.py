"""vLLM-format loading on the real base (SmolLM2-135M-Instruct): a folder exactly as ``peft.save_pretrained``
writes it for SmolLM2, loaded through ``POST /v1/load_lora_adapter`` over real HTTP, answers the official ``openai``
client's greedy chat with the tokens ``peft`` itself generates — and not the base's."""

from __future__ import annotations

import copy

import httpx
import openai
import pytest
import torch

from lorafleet.api.service import Service
from lorafleet.base import load_base
from lorafleet.registry import Registry
from lorafleet.serving.chat import chat_prompt_ids
from lorafleet.serving.engine import Engine
from lorafleet.serving.params import EngineConfig, SamplingParams
from lorafleet.serving.sources import registry_fetch
from lorafleet.testing.harness import LoopbackServer

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Name three colours of the rainbow."}]
N = 12


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-real")
    reg = Registry(f"sqlite:///{tmp / 'reg.db'}", str(tmp / "blobs"))
    base = load_base(None, precision="fp32")
    engine = Engine(base, registry_fetch(reg), EngineConfig(max_batch=2, max_active=2, max_cached=2, max_rank=16))
    service = Service(reg, base, engine)
    _, admin = service.keys.create(admin=True, name="admin")
    with LoopbackServer(service) as srv:
        srv.admin, srv.registry, srv.base, srv.engine, srv.tmp = admin, reg, base, engine, tmp
        yield srv
    reg.close()


def test_load_lora_adapter_with_a_smollm2_peft_folder(real):
    from peft import LoraConfig, get_peft_model  # peft wraps a second copy of the base (only this test needs it)

    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(load_base(None, precision="fp32").model), LoraConfig(
        r=8, lora_alpha=16, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.mul_(20.0)  # peft's non-default init is small; make it change greedy text
    folder = real.tmp / "smol-lora"
    peft_model.save_pretrained(folder)
    ids = chat_prompt_ids(real.base.tokenizer, MSGS)
    with torch.no_grad():
        out = peft_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=N, do_sample=False, pad_token_id=0)
    want = out[0, len(ids):].tolist()

    r = httpx.post(f"{real.url}/v1/load_lora_adapter", headers={"authorization": f"Bearer {real.admin}"},
                   json={"lora_name": "smol-lora", "lora_path": str(folder)}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "committed" and "README.md" in r.json()["ignored_files"]
    rev = real.registry.resolve("local/lora/smol-lora")
    assert rev.provenance.base_fingerprint == real.base.fingerprint and rev.provenance.method == "import"

    client = openai.OpenAI(base_url=f"{real.url}/v1", api_key=real.admin, max_retries=0, timeout=120)
    ask = dict(messages=MSGS, max_tokens=N, temperature=0)
    lora = client.chat.completions.create(model="smol-lora", **ask).choices[0].message.content
    plain = client.chat.completions.create(model=real.base.name, **ask).choices[0].message.content
    # what the route answered is what the engine serves for that revision, and its tokens are peft's own
    assert lora == real.engine.generate([MSGS], [rev.digest], SamplingParams(max_tokens=N))[0].text
    assert real.engine.generate([ids], [rev.digest], SamplingParams(max_tokens=N, ignore_eos=True))[0].token_ids == want
    assert lora != plain  # the adapter changes SmolLM2's answer
