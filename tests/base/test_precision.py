"""The base's precision (lorafleet.base.precision): each choice loads, stays close to fp32, trains and serves.

Tolerances (max |logit - fp32 logit| on the tiny random base, measured 0.06 / 0.008 / 0.002): int4 0.15,
int8 0.03, bf16 0.01. The real-base agreement (native Q4_1 vs fp32) is the slow test at the end.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lorafleet.adapters import LoraAdapter, LoraSpec
from lorafleet.base import BasePrecisionError, load_base
from lorafleet.base import precision as P
from lorafleet.base.precision import QuantEmbedding, QuantLinear, apply_precision, q4_1_blocks

TOL = {"int4": 0.15, "int8": 0.03, "bf16": 0.01}
PROMPT = [5, 17, 99, 3, 200, 41, 7, 150, 66, 12, 90, 33]


def _logits(base, ids):
    with torch.no_grad():
        return base.model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def fp32():
    return load_base("tiny")


@pytest.mark.parametrize("precision", ["int4", "int8", "bf16"])
def test_each_precision_loads_close_to_fp32(fp32, precision):
    base = load_base("tiny", precision=precision)
    info = base.info()
    assert info["precision"] == precision and info["fingerprint"] == fp32.fingerprint
    assert info["parameters"] == fp32.num_parameters
    assert info["weight_bytes"] < fp32.info()["weight_bytes"]
    quant = [m for m in base.model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 2 * 7 + 1 and not any(p.requires_grad for p in base.model.parameters())  # + lm_head
    assert isinstance(base.model.get_input_embeddings(), QuantEmbedding)
    ref = _logits(fp32, PROMPT)
    for ids in (PROMPT, PROMPT[:3]):  # many rows (the dequantized GEMM for bf16) and few rows (the op)
        diff = float((_logits(base, ids) - ref[: len(ids)]).abs().max())
        assert 0 < diff < TOL[precision], (precision, len(ids), diff)


def test_native_on_a_float_base_means_fp32_and_says_so(fp32):
    base = load_base("tiny", precision="native")
    assert base.info()["precision"] == "native (fp32)"
    assert not any(isinstance(m, QuantLinear) for m in base.model.modules())
    assert torch.equal(_logits(base, PROMPT), _logits(fp32, PROMPT))


def test_env_var_sets_the_default(monkeypatch):
    monkeypatch.setenv(P.ENV_VAR, "int8")
    assert load_base("tiny").precision == "int8"
    monkeypatch.setenv(P.ENV_VAR, "int3")
    with pytest.raises(BasePrecisionError, match=r"unknown base precision 'int3' \(from \$LORAFLEET_BASE_DTYPE\)"):
        load_base("tiny")


def test_bad_precision_lists_the_choices():
    with pytest.raises(BasePrecisionError, match="choose one of: auto, native, int4, int8, bf16, fp32"):
        load_base("tiny", precision="fp8")


def test_cpu_only_precisions_refuse_another_device(fp32):
    model = copy.deepcopy(fp32.model)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(BasePrecisionError, match="CPU only"):
        apply_precision(model, "int4", source_kind="tiny", device="cuda")
    assert {n: type(m) for n, m in model.named_modules()} == before


@pytest.mark.parametrize("kind", ["int4", "int8", "bf16"])
def test_op_and_dequantized_paths_agree(kind):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64, bias=True)
    q = QuantLinear.from_linear(lin, kind)
    w = q.dequantize()
    assert float((w - lin.weight.detach()).abs().max()) < {"int4": 0.02, "int8": 2e-3, "bf16": 2e-3}[kind]
    assert torch.equal(q.dequantize(torch.bfloat16), w.bfloat16())  # computed in fp32, then rounded once
    x = torch.randn(P.OP_MAX_ROWS.get(kind, 0) + 3, 96)
    big = q(x)  # above the threshold: a bf16 GEMM over the weight dequantized in bf16
    small = torch.cat([q(x[i : i + 1]) for i in range(x.shape[0])])  # the op, one row at a time
    # bf16 activations, the weight as quantized, a bf16-rounded result: both paths within one bf16 ulp of it
    exact = F.linear(x.bfloat16().float(), w).bfloat16().float() + lin.bias.detach()
    for got in (big, small):
        assert float((got - exact).abs().max()) <= 2**-7 * float(exact.abs().max())
    assert torch.equal(big, F.linear(x.bfloat16(), w.bfloat16()).float() + lin.bias.detach())


def test_int4_unpack_is_the_packed_layout():
    codes = torch.randint(0, 16, (96, 64), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(P._unpack_int4(packed, 96, 64).int(), codes)


@pytest.mark.parametrize("kind", ["int4", "int8", "bf16"])
def test_backward_matches_the_dequantized_linear(kind):
    torch.manual_seed(1)
    q = QuantLinear.from_linear(torch.nn.Linear(64, 32, bias=False), kind)
    for rows in (2, 40):
        x = torch.randn(rows, 64, requires_grad=True)
        g = torch.randn(rows, 32)
        (q(x) * g).sum().backward()
        x2 = x.detach().clone().requires_grad_(True)
        (F.linear(x2, q.dequantize()) * g).sum().backward()
        # the input gradient is a bf16 GEMM (g and the weight in bf16, fp32 accumulation) as in the forward
        assert torch.equal(x.grad, (g.bfloat16() @ q.dequantize(torch.bfloat16)).float())
        assert float((x.grad - x2.grad).abs().max()) <= 2**-6 * float(x2.grad.abs().max())
    assert list(q.parameters()) == []  # frozen: nothing for an optimizer


def _q4_1_tensor(w: np.ndarray):
    import gguf  # noqa: PLC0415

    return gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType.Q4_1)


def test_q4_1_blocks_decode_the_shipped_codes_exactly():
    import gguf  # noqa: PLC0415

    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    raw = _q4_1_tensor(w)
    codes, d, m = q4_1_blocks(raw, 64, 96)
    exact = (codes.float().view(64, 3, 32) * d[..., None] + m[..., None]).view(64, 96)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1))
    assert torch.equal(exact, ref)
    q = QuantLinear.from_q4_1(codes, d, m)
    # the op keeps d and m + 8d in bf16: the only deviation from the file, < 2^-8 of the group's range
    span = (d * 15).repeat_interleave(32, dim=1)
    assert float(((q.dequantize() - exact).abs() / span).max()) < 2**-7


def test_damaged_q4_1_data_is_a_clear_error():
    raw = _q4_1_tensor(np.ones((32, 64), np.float32))
    with pytest.raises(BasePrecisionError, match="damaged or truncated"):
        q4_1_blocks(raw.reshape(-1)[:-5], 32, 64, "blk.0.attn_q.weight")
    bad = raw.copy()
    bad[0, 0:2] = np.array([np.nan], np.float16).view(np.uint8)
    with pytest.raises(BasePrecisionError, match="non-finite"):
        q4_1_blocks(bad, 32, 64)


def _write_tiny_gguf(path, model):
    """The tiny model's block linears as a Q4_1 GGUF (llama.cpp's q/k row order), and the model's weights set to
    exactly their dequantized values — what the loader's verified fp32 cache of a GGUF holds."""
    import gguf  # noqa: PLC0415

    writer = gguf.GGUFWriter(str(path), "llama")
    cfg = model.config
    for name, lin in P._block_linears(model).items():
        w = lin.weight.detach().numpy()
        n = w.shape[0]
        if name.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads
            perm = P._reverse_permute_rows(n, heads)
            g = np.empty_like(w)
            g[perm] = w  # hf[i] = gguf[perm[i]]
            w = g
        raw = _q4_1_tensor(w)
        writer.add_tensor(P._hf_to_gguf_name(name), raw, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        codes, d, m = q4_1_blocks(raw, *w.shape)
        deq = (codes.float().view(n, -1, 32) * d[..., None] + m[..., None]).view(w.shape)
        if name.endswith(("q_proj", "k_proj")):
            deq = deq[torch.from_numpy(perm)]
        with torch.no_grad():
            lin.weight.copy_(deq)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_native_gguf_runs_the_shipped_blocks_and_refuses_a_damaged_file(tmp_path, fp32):
    model = copy.deepcopy(fp32.model)
    path = tmp_path / "tiny.Q4_1.gguf"
    _write_tiny_gguf(path, model)
    reference = copy.deepcopy(model)
    summary = apply_precision(copy.deepcopy(model), "native", source_kind="gguf", source_path=path)
    assert summary["modules"]["int4 (Q4_1 codes as shipped)"] == 14

    native = copy.deepcopy(model)
    apply_precision(native, "native", source_kind="gguf", source_path=path)
    with torch.no_grad():
        a = native(torch.tensor([PROMPT])).logits
        b = reference(torch.tensor([PROMPT])).logits
    assert float((a - b).abs().max()) < 0.05  # bf16 scales + the int8 embedding

    # flip the codes of one tensor: they no longer match the verified weights -> error, model untouched
    import gguf  # noqa: PLC0415

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_up.weight")
    data = bytearray(path.read_bytes())
    off = int(t.data_offset) + 4 + 20 * 3  # past block 3's d and m: its nibbles
    data[off : off + 8] = bytes(b ^ 0x5A for b in data[off : off + 8])
    path.write_bytes(bytes(data))
    victim = copy.deepcopy(model)
    before = {n: type(m) for n, m in victim.named_modules()}
    with pytest.raises(BasePrecisionError, match="blk.1.ffn_up.weight.*damaged"):
        apply_precision(victim, "native", source_kind="gguf", source_path=path)
    assert {n: type(m) for n, m in victim.named_modules()} == before

    path.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(BasePrecisionError, match="cannot read the GGUF"):
        apply_precision(copy.deepcopy(model), "native", source_kind="gguf", source_path=path)


def test_auto_is_native_where_the_base_can_run_it_else_fp32(tmp_path, fp32, monkeypatch):
    """The default precision: native on a Q4_1 GGUF on the CPU; fp32 for a float base, a GGUF with other block
    types (native itself refuses those) or another device, with the reason; the label says which it took."""
    monkeypatch.delenv(P.ENV_VAR, raising=False)
    assert P.resolve_precision(None) == "auto"
    assert load_base("tiny").precision_label == "auto (fp32)"
    model = copy.deepcopy(fp32.model)
    path = tmp_path / "tiny.Q4_1.gguf"
    _write_tiny_gguf(path, model)
    assert P.auto_native_reason("gguf", path) is None
    summary = apply_precision(copy.deepcopy(model), "auto", source_kind="gguf", source_path=path)
    assert summary["effective"] == "native" and summary["modules"]["int4 (Q4_1 codes as shipped)"] == 14
    assert "CPU only" in P.auto_native_reason("gguf", path, device="cuda")
    assert "float weights" in P.auto_native_reason("hf", None)

    import gguf  # noqa: PLC0415

    other = tmp_path / "tiny.Q5_0.gguf"  # one block weight in a type native cannot run
    writer = gguf.GGUFWriter(str(other), "llama")
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == "blk.0.ffn_down.weight":
            raw = gguf.quants.quantize(np.zeros((t.shape[1], t.shape[0]), np.float32), gguf.GGMLQuantizationType.Q5_0)
            writer.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType.Q5_0)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "Q5_0" in P.auto_native_reason("gguf", other)
    victim = copy.deepcopy(model)
    assert apply_precision(victim, "auto", source_kind="gguf", source_path=other)["effective"] == "fp32"
    assert not any(isinstance(m, QuantLinear) for m in victim.modules())
    with pytest.raises(BasePrecisionError, match="Q5_0"):
        apply_precision(copy.deepcopy(model), "native", source_kind="gguf", source_path=other)


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_lora_training_over_a_quantized_base_reduces_loss_like_fp32(precision):
    """QLoRA-style: frozen quantized base, fp32 adapter; the loss falls and ends within 5% of the fp32 base's."""
    from lorafleet.training.data import dataset_from_records  # noqa: PLC0415
    from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig  # noqa: PLC0415

    records = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"answer {i}!"}]}
               for i in range(4)]
    final = {}
    for p in ("fp32", precision):
        base = load_base("tiny", precision=p)
        trainer = MultiTenantTrainer(base)
        adapter = LoraAdapter.create(base, LoraSpec(rank=4, alpha=8, target_modules="all"), seed=0)
        trainer.add("u", adapter, dataset_from_records(records, "sft"), TrainConfig(steps=12, lr=0.05, batch_size=4))
        losses = [trainer.step()["u"] for _ in range(12)]
        assert losses[-1] < losses[0] - 0.2, (p, losses)
        final[p] = losses[-1]
    assert abs(final[precision] - final["fp32"]) < 0.05 * final["fp32"], final


@pytest.mark.parametrize("precision", ["native", "int4", "int8", "bf16"])
def test_mixed_batch_on_a_low_precision_base_equals_each_row_alone(precision):
    from lorafleet.serving.engine import Engine, EngineConfig, SamplingParams  # noqa: PLC0415
    from lorafleet.serving.sources import DictBlobs  # noqa: PLC0415

    base = load_base("tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # sharp logits (as tests/serving does): greedy tokens vary, so equality can fail
        for p in base.model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15, generator=g)
    base.precision = precision
    base.precision_info = apply_precision(base.model, precision, source_kind="tiny")
    blobs = DictBlobs()
    adapters = []
    for rank, targets, seed in ((2, "attention", 1), (4, "mlp", 2), (8, "all", 3)):
        a = LoraAdapter.create(base, LoraSpec(rank=rank, alpha=2 * rank, target_modules=targets), seed=seed,
                               init="random")
        a.weights = {k: (A, B * 10.0) for k, (A, B) in a.weights.items()}
        adapters.append(blobs.put(a))
    choice = [adapters[0], None, adapters[2], adapters[1], None, adapters[2], adapters[0], adapters[1]]
    prompts = [PROMPT[: 3 + i] for i in range(len(choice))]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    with Engine(base, blobs, EngineConfig(max_batch=8, max_active=3, max_rank=8)) as engine:
        together = engine.generate(prompts, choice, params)
    with Engine(base, blobs, EngineConfig(max_batch=1, max_active=1, max_rank=8)) as engine:
        alone = [engine.generate([p], [c], params)[0] for p, c in zip(prompts, choice, strict=True)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert together[2].token_ids != together[1].token_ids  # adapters change the output


@pytest.mark.slow
def test_real_base_native_q4_1_agrees_with_fp32_greedy():
    """SmolLM2's shipped Q4_1 blocks vs the fp32 dequantized reference: teacher-forced greedy agreement."""
    ref = load_base("smollm2-135m-instruct", precision="fp32")
    native = load_base("smollm2-135m-instruct", precision="native")
    assert native.fingerprint == ref.fingerprint and native.info()["weight_bytes"] < 120e6
    tok = ref.tokenizer
    prompts = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
               "Explain photosynthesis in one sentence."]
    agree = total = 0
    for text in prompts:
        chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        ids = tok(chat, add_special_tokens=False).input_ids
        with torch.no_grad():
            cont = ref.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0]
            a = ref.model(cont[None]).logits[0, len(ids) - 1 : -1].argmax(-1)
            b = native.model(cont[None]).logits[0, len(ids) - 1 : -1].argmax(-1)
        agree += int((a == b).sum())
        total += a.numel()
    assert agree / total >= 0.9, f"{agree}/{total}"


def test_cli_base_dtype(monkeypatch, tmp_path):
    import json  # noqa: PLC0415

    from typer.testing import CliRunner  # noqa: PLC0415

    from lorafleet.cli import app  # noqa: PLC0415

    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(P.ENV_VAR, "fp32")  # the flag sets it for the process: restored after the test
    runner = CliRunner()
    result = runner.invoke(app, ["base", "info", "--base", "tiny", "--base-dtype", "int8", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["precision"] == "int8" and info["precision_modules"]
    result = runner.invoke(app, ["base", "info", "--base", "tiny", "--base-dtype", "fp4"])
    assert result.exit_code == 2 and "error: unknown base precision 'fp4'" in result.output
    assert "auto, native, int4, int8, bf16, fp32" in result.output
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    result = runner.invoke(app, ["train", "t/u/a", "--data", str(data), "--create", "--base-dtype", "q2"])
    assert result.exit_code == 2 and "unknown base precision" in result.output, result.output
    listed = runner.invoke(app, ["jobs", "ls", "--json"])
    assert listed.exit_code == 0 and json.loads(listed.output) == []  # nothing queued, nothing created


@pytest.mark.parametrize("n,k", [(32, 64), (64, 64), (96, 64), (128, 96)])
def test_int4_unpack_reads_torchs_pack_back_on_this_cpu(n, k):
    """torch's CPU int4 pack layout differs by CPU; the probed decoder (structural or the position map) reads
    back exactly what was packed, and the position map agrees with it."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(n + k))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(P._unpack_int4(packed, n, k).to(torch.int32), codes)
    flat = packed.view(torch.uint8).reshape(-1)
    by_map = torch.empty(n * k, dtype=torch.uint8)
    by_map[P._int4_layout(n, k)] = torch.stack((flat & 15, flat >> 4), dim=-1).reshape(-1)
    assert torch.equal(by_map.view(n, k).to(torch.int32), codes)
