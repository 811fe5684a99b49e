"""A VeRA user and quantized LoRA users are served in the same batch as a plain LoRA user, through the same
operator, and each row equals that user's adapter alone in transformers + peft."""

from __future__ import annotations

import torch

from lorafleet.adapters import VeraAdapter, VeraSpec, from_bytes, to_bytes
from lorafleet.serving.engine import SamplingParams
from lorafleet.serving.sources import DictBlobs


def test_vera_and_codecs_share_a_batch_with_lora(base, adapters, make_engine, reference):
    vera = VeraAdapter.create(base, VeraSpec(rank=8, target_modules="all", projection_seed=3))
    g = torch.Generator().manual_seed(0)
    vera.weights = {n: (d + 1.0, torch.randn(b.shape, generator=g) * 2.0) for n, (d, b) in vera.weights.items()}
    blobs = DictBlobs()
    q4 = to_bytes(adapters[2], "q4")
    rows = [blobs.put(adapters[0]), blobs.put(to_bytes(vera, "int8")), blobs.put(q4), None]
    engine = make_engine(blobs, max_batch=4, max_active=4)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 250, (7,), generator=g).tolist() for _ in rows]
    results = engine.generate(prompts, rows, SamplingParams(max_tokens=10))
    served_vera = from_bytes(to_bytes(vera, "int8"), base)  # reference: the stored (int8) vectors, expanded
    # Held in names: the reference fixture caches peft models by id(), and a freed temporary's id can be reused.
    stored_vera, served_q4 = _stored(vera), from_bytes(q4, base)
    wants = [reference(prompts[0], adapters[0], 10), reference(prompts[1], stored_vera, 10),
             reference(prompts[2], served_q4, 10), reference(prompts[3], None, 10)]
    for i, (res, want) in enumerate(zip(results, wants, strict=True)):
        assert res.ok, res.error
        assert res.token_ids == want, f"row {i}"
    assert wants[1] != reference(prompts[1], None, 10)  # VeRA changes the output: the check can fail
    assert served_vera.spec.rank == 8


def _stored(vera: VeraAdapter) -> VeraAdapter:
    """The VeRA adapter as stored in int8 (peft loads it as VeRA with the same projection key)."""
    from lorafleet.adapters import decode_blob  # noqa: PLC0415

    return decode_blob(to_bytes(vera, "int8"))
