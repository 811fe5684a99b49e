"""The one engine-backed evaluation backend: named blobs are served as stored, other adapters by their bytes."""

from __future__ import annotations

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.digest import digest_of
from lorafleet.evaluation.engine_backend import EngineBackend
from lorafleet.evaluation.generation import generate_responses
from lorafleet.serving.params import EngineConfig, SamplingParams


def test_engine_backend_serves_known_blobs_and_serialises_the_rest(tiny_base):
    spec = LoraSpec(rank=2, target_modules="attention")
    stored, fresh = (LoraAdapter.create(tiny_base, spec, seed=s, init="random") for s in (1, 2))
    blob = to_bytes(stored)
    store = {digest_of(blob): blob}
    asked = []

    def fetch(digest: str) -> bytes:
        asked.append(digest)
        return store[digest]

    with EngineBackend(tiny_base, fetch, EngineConfig(max_batch=4, max_active=4, max_rank=4)) as backend:
        backend.known(stored, digest_of(blob))
        prompts = ["Hi?", "Hi?", "Hi?"]
        texts = generate_responses(tiny_base, prompts, [stored, fresh, None], max_new_tokens=3, backend=backend)
        assert asked == [digest_of(blob)]  # the named adapter came from the fetch, by its digest
        assert digest_of(to_bytes(fresh)) in backend.blobs and digest_of(blob) not in backend.blobs
        # the same rows straight through the engine give the same greedy text
        direct = backend.engine.generate([[{"role": "user", "content": p}] for p in prompts],
                                         [digest_of(blob), digest_of(to_bytes(fresh)), None], SamplingParams(max_tokens=3))
        assert texts == [r.raise_for_error().text for r in direct]
        backend.forget()
        assert backend.add(stored) == digest_of(blob) and digest_of(blob) in backend.blobs
