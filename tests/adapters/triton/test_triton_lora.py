"""The Triton kernels equal the operator's plain-loop reference (in Triton's CPU interpreter here).

Random shapes, mixed ranks, ``-1`` rows, empty segments and stacks; fp32 to 1e-5, bf16 to 1e-2 relative.
"""

import random

import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable (pip install -e '.[dev]' on linux x86_64)",
                    exc_type=ImportError)

from lorafleet.adapters import LoraAdapter, LoraHost, LoraSpec, SlotTable, StackedWeights  # noqa: E402
from lorafleet.adapters import triton_lora as tk  # noqa: E402
from lorafleet.adapters.operator import lora_delta, lora_delta_reference  # noqa: E402


def random_case(seed: int, *, T: int, levels: int, dtype=torch.float32, device="cpu", max_s: int = 7):
    """A random slot table with mixed ranks and a random routing (some rows -1, some slots unused)."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    S = rnd.randint(2, max_s)
    d_in, d_out = rnd.randint(8, 72), rnd.randint(8, 72)
    ranks = [rnd.choice([1, 2, 3, 4, 8, 13, 16]) for _ in range(S)]
    r_max = max(ranks) + rnd.choice([0, 3])  # sometimes padding beyond every adapter's rank
    A = torch.zeros(S, r_max, d_in)
    B = torch.zeros(S, d_out, r_max)
    for s, r in enumerate(ranks):
        A[s, :r] = torch.randn(r, d_in, generator=g)
        B[s, :, :r] = torch.randn(d_out, r, generator=g) / r**0.5
    scaling = torch.rand(S, generator=g) + 0.5
    bsz = rnd.randint(1, 9)
    used = rnd.sample(range(S), k=rnd.randint(1, S))  # the other slots are empty segments
    slots = torch.tensor([[rnd.choice([*used, -1]) for _ in range(levels)] for _ in range(bsz)])
    x = torch.randn(bsz, T, d_in, generator=g)
    to = dict(device=device, dtype=dtype)
    return x.to(**to), A.to(**to), B.to(**to), scaling.to(**to), slots.to(device), torch.tensor(ranks, device=device)


def reference(x, A, B, scaling, slots):
    """The plain loop in fp32 on the same (possibly bf16-rounded) inputs."""
    return lora_delta_reference(x.float(), A.float(), B.float(), scaling.float(), slots)


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("seed,T,levels", [(0, 1, 1), (1, 1, 2), (2, 3, 1), (3, 5, 3)])
def test_fp32_matches_reference(device, path, seed, T, levels):
    x, A, B, scaling, slots, ranks = random_case(seed, T=T, levels=levels, device=device)
    # odd seeds: per-slot ranks and the default tiles; even seeds: no ranks, and small tiles, so that the K loop,
    # split-K, several blocks per segment and several output blocks all run
    small = None if seed % 2 else (16, 16, 16)
    got = tk.lora_delta_triton(x, A, B, scaling, slots, ranks if seed % 2 else None, path=path, blocks=small)
    torch.testing.assert_close(got, reference(x, A, B, scaling, slots), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("seed,T,levels", [(10, 1, 1), (11, 4, 2)])
def test_bf16_within_one_percent(device, path, seed, T, levels):
    x, A, B, scaling, slots, ranks = random_case(seed, T=T, levels=levels, dtype=torch.bfloat16, device=device)
    got = tk.lora_delta_triton(x, A, B, scaling, slots, ranks, path=path)
    ref = reference(x, A, B, scaling, slots)
    assert got.dtype == torch.bfloat16
    rel = ((got.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    assert rel <= 1e-2, rel
    assert (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max() + 1e-3


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_accumulates_into_base_output_and_leaves_base_rows(device, path):
    x, A, B, scaling, _, ranks = random_case(20, T=2, levels=1, device=device)
    slots = torch.tensor([-1] * x.shape[0], device=device)
    slots[0] = 1
    y0 = torch.randn(x.shape[0], x.shape[1], B.shape[1], device=device)
    y = tk.lora_add_(y0.clone(), x, A, B, scaling, slots, ranks, path=path)
    torch.testing.assert_close(y, y0 + reference(x, A, B, scaling, slots), atol=1e-5, rtol=1e-5)
    assert torch.equal(y[1:], y0[1:])  # rows without an adapter: the base output, bit for bit


def test_all_rows_without_adapter_and_empty_batch(device):
    x, A, B, scaling, _, _ = random_case(21, T=3, levels=2, device=device)
    none = torch.full((x.shape[0], 2), -1, device=device)
    for path in ("decode", "prefill"):
        assert torch.equal(tk.lora_delta_triton(x, A, B, scaling, none, path=path), torch.zeros_like(x[..., :1]).expand(
            *x.shape[:2], B.shape[1]))
    empty = tk.lora_delta_triton(x[:0], A, B, scaling, none[:0])
    assert empty.shape == (0, 3, B.shape[1])


def test_segment_plan_covers_each_row_once_and_skips_empty_segments():
    slots = torch.tensor([4, -1, 0, 4, 4, 2, -1, 0, 4])  # slots 1, 3, 5 unused: empty segments
    T, S, block_m = 3, 6, 4
    order, blk_slot, row0, row1 = tk.segment_plan(slots, T, S, block_m)
    tok_slot = slots.repeat_interleave(T)
    seen = []
    for s, a, b in zip(blk_slot.tolist(), row0.tolist(), row1.tolist(), strict=True):
        if s < 0:
            assert a == b == 0
            continue
        assert 0 < b - a <= block_m
        rows = order[a:b].tolist()
        assert all(tok_slot[r] == s for r in rows)
        seen += rows
    assert sorted(seen) == [r for r in range(len(tok_slot)) if tok_slot[r] >= 0]
    assert set(blk_slot.tolist()) - {-1} == {0, 2, 4}


def test_segment_plan_reuse_follows_in_place_edits(device):
    """The per-forward plan cache: the same routing tensor edited in place must not reuse a stale plan."""
    x, A, B, scaling, _, ranks = random_case(24, T=4, levels=1, device=device)
    slots = torch.zeros(x.shape[0], 1, dtype=torch.long, device=device)  # (Bsz, 1), every row slot 0
    first = tk.lora_delta_triton(x, A, B, scaling, slots, ranks, path="prefill")
    torch.testing.assert_close(first, reference(x, A, B, scaling, slots), atol=1e-5, rtol=1e-5)
    slots[0, 0] = -1
    slots[-1, 0] = A.shape[0] - 1
    second = tk.lora_delta_triton(x, A, B, scaling, slots, ranks, path="prefill")
    torch.testing.assert_close(second, reference(x, A, B, scaling, slots), atol=1e-5, rtol=1e-5)


def test_bad_shapes_name_the_problem(device):
    x, A, B, scaling, slots, _ = random_case(22, T=1, levels=1, device=device)
    with pytest.raises(ValueError, match="shapes do not chain"):
        tk.lora_delta_triton(x[..., :-1], A, B, scaling, slots)
    with pytest.raises(ValueError, match="slots must be"):
        tk.lora_delta_triton(x, A, B, scaling, slots[:-1] if slots.shape[0] > 1 else slots.repeat(2, 1))
    with pytest.raises(ValueError, match="path must be"):
        tk.lora_delta_triton(x, A, B, scaling, slots, path="sideways")


def test_dispatch_policy(monkeypatch):
    x, A, B, scaling, slots, _ = random_case(23, T=1, levels=1)
    monkeypatch.setenv(tk.ENV, "auto")
    assert not tk.wants_triton(x, A, B)  # CPU tensors: the torch path, unless forced
    monkeypatch.setenv(tk.ENV, "triton")
    assert tk.wants_triton(x, A, B)  # forced, under the interpreter
    assert not tk.wants_triton(x, A, B, dropout=torch.zeros(A.shape[0]))  # training: torch
    assert not tk.wants_triton(x, A.clone().requires_grad_(), B)  # autograd: torch
    assert not tk.wants_triton(x.double(), A.double(), B.double())  # unsupported dtype: torch
    with torch.no_grad():
        assert tk.wants_triton(x, A.clone().requires_grad_(), B)
    # lora_delta, the operator's public entry, takes the kernels when forced and still equals the reference
    torch.testing.assert_close(lora_delta(x, A, B, scaling, slots), lora_delta_reference(x, A, B, scaling, slots),
                               atol=1e-5, rtol=1e-5)
    monkeypatch.setenv(tk.ENV, "torch")
    assert not tk.wants_triton(x, A, B)
    monkeypatch.setenv(tk.ENV, "fast please")
    with pytest.raises(ValueError, match="LORAFLEET_LORA_KERNEL must be"):
        tk.wants_triton(x, A, B)


def _adapters(base, ranks_targets, scale=10.0):
    out = []
    for i, (rank, targets) in enumerate(ranks_targets):
        a = LoraAdapter.create(base, LoraSpec(rank=rank, alpha=2 * rank, target_modules=targets), seed=i,
                               init="random")
        a.weights = {k: (A, B * scale) for k, (A, B) in a.weights.items()}
        out.append(a)
    return out


def test_model_forward_through_the_hook_equals_torch_path(tiny_base, monkeypatch):
    """Whole tiny model, slot table with mixed ranks and targets: logits via the kernels == via torch."""
    host = LoraHost.attach(tiny_base.model)
    table = SlotTable(host, num_slots=4, max_rank=8)
    adapters = _adapters(tiny_base, [(2, "attention"), (8, "all"), (4, "mlp")])
    for s, a in enumerate(adapters):
        table.load(s, a)
    ids = torch.randint(3, 250, (5, 6), generator=torch.Generator().manual_seed(0))
    slots = torch.tensor([[0, 2], [1, -1], [-1, -1], [2, 1], [1, 1]])  # mixed ranks, a base row, stacks
    for t in (6, 1):  # prefill-shaped and decode-shaped forwards
        with torch.inference_mode():
            monkeypatch.setenv(tk.ENV, "torch")
            with host.route(table, slots):
                want = tiny_base.model(ids[:, :t]).logits
            monkeypatch.setenv(tk.ENV, "triton")
            with host.route(table, slots):
                got = tiny_base.model(ids[:, :t]).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got[0], got[2])  # the adapters do change the output
    # training keeps the torch path (autograd), even when the kernels are forced
    for a in adapters[:2]:
        a.weights = {k: (A.requires_grad_(), B.requires_grad_()) for k, (A, B) in a.weights.items()}
    with host.route(StackedWeights(adapters[:2]), [0, 1, -1]):
        tiny_base.model(ids[:3, :2]).logits.sum().backward()
    assert all(B.grad is not None and B.grad.abs().sum() > 0 for _, B in adapters[0].weights.values())


def test_engine_generates_the_same_tokens_with_the_kernels(tiny_base, monkeypatch):
    """The serving engine end to end (prefill + decode, mixed adapters, a base row) on the kernels."""
    from lorafleet.serving.engine import Engine, EngineConfig, SamplingParams  # noqa: PLC0415
    from lorafleet.serving.sources import DictBlobs  # noqa: PLC0415

    blobs = DictBlobs()
    digests = [blobs.put(a) for a in _adapters(tiny_base, [(2, "attention"), (8, "all"), (4, "mlp")])]
    prompts = ["hello there", "the cat", "a b c d e f", "xyz"]
    which = [digests[0], digests[1], None, digests[2]]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv(tk.ENV, mode)
        with Engine(tiny_base, blobs, EngineConfig(max_batch=4, max_active=4, max_rank=8)) as engine:
            results[mode] = [r.raise_for_error().token_ids for r in engine.generate(prompts, which, params)]
    assert results["triton"] == results["torch"]
    assert len({tuple(t) for t in results["torch"]}) > 1  # the adapters make a difference


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 120))
def test_sweep_larger_shapes(seed, device):
    rnd = random.Random(seed)
    T, levels = rnd.choice([1, 1, 2, 7, 16]), rnd.choice([1, 1, 2, 3])
    x, A, B, scaling, slots, ranks = random_case(seed, T=T, levels=levels, device=device, max_s=24)
    for path in ("decode", "prefill"):
        small = (16, 16, 16) if seed % 3 == 0 and T <= 2 else None  # small tiles: many programs, keep T small
        got = tk.lora_delta_triton(x, A, B, scaling, slots, ranks if seed % 2 else None, path=path, blocks=small)
        torch.testing.assert_close(got, reference(x, A, B, scaling, slots), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_kernels_compile_for_h200_without_a_gpu():
    """The kernels lower to sm_90 code (ptxas included) — what the interpreter cannot check."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_compile.py")), "90"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok   ") == 8, out.stdout
