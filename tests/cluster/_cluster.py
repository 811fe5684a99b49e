"""Helpers shared by the cluster tests and their fixture."""

from __future__ import annotations

TENANT = "acme"
N_ADAPTERS = 20


def adapter_refs() -> list[str]:
    return [f"{TENANT}/u{i:02d}/style" for i in range(N_ADAPTERS)]


def commit_live(registry, base, ref: str, seed: int) -> str:
    """Commit a random rank-4 adapter strong enough to change the tiny model's greedy output; point live at it."""
    from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
    from lorafleet.registry import Provenance

    adapter = LoraAdapter.create(base, LoraSpec(rank=4, alpha=8, target_modules="all"), seed=seed, init="random")
    for _, B in adapter.weights.values():
        B.mul_(100.0)
    registry.create_adapter(ref, exist_ok=True)
    rev = registry.commit(ref, to_bytes(adapter), Provenance(base_fingerprint=base.fingerprint, method="test"),
                          aliases=("candidate",))
    registry.set_alias(ref, "live", rev.number, reason="test")
    return rev.digest
