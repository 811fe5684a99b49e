"""The product path: a user's first adapter generated from their profile, committed as revision #1.

:func:`create_from_profile` validates everything first (the profile, the examples, the generator and its base),
then generates the adapter, then commits it as the adapter's first revision with provenance
``method=generated`` (the generator's address and digest, the generation time, a digest of the profile) under
the ``candidate`` alias. From there it is a revision like any other: ``lorafleet eval`` / ``promote`` evaluate
and gate it, and a training job (``warm_start="live"``) trains revision #2 from it once it is live.
Any bad input raises an :class:`~lorafleet.instant.errors.InstantError` before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from lorafleet.adapters import to_bytes
from lorafleet.instant.embed import check_profile
from lorafleet.instant.errors import InstantError
from lorafleet.instant.generator import load_generator
from lorafleet.registry import Provenance
from lorafleet.registry.errors import NotFoundError
from lorafleet.registry.names import parse_ref

METHOD = "generated"


@dataclass
class Generated:
    revision: object  # RevisionInfo
    seconds: float  # embedding + generation (what a user waits for before the first personal answer)
    generator: str  # the generator's revision address


def read_examples(text: str) -> list[dict]:
    """JSONL chat records ``{"messages": [...]}`` (one a line; blank lines skipped)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InstantError(f"examples line {n} is not JSON: {exc.msg}") from None
    return out


def create_from_profile(registry, base, ref: str, profile: str, examples: list[dict] | None = None, *,
                        generator: str | None = None, codec: str | None = None, creator: str = "cli") -> Generated:
    """Generate ``ref``'s first revision from ``profile`` (+ up to 8 example conversations); see the module doc."""
    parse_ref(ref)
    check_profile(profile, examples)
    try:
        existing = registry.history(ref)
    except NotFoundError:
        existing = []
    if existing:
        raise InstantError(f"{ref} already has {len(existing)} revision(s); a generated adapter is a first revision "
                           "(train the adapter to change it, or generate into a new adapter)")
    gen, gen_rev = load_generator(registry, base, generator)
    adapter, seconds = gen.generate(base, profile, examples)
    blob = to_bytes(adapter, codec)
    hp = {"generator": gen_rev.address, "generator_digest": gen_rev.digest, "generation_seconds": round(seconds, 4),
          "profile_digest": hashlib.sha256(profile.strip().encode()).hexdigest(), "examples": len(examples or []),
          "lora": adapter.spec.to_dict(), "codec": codec or "none"}
    prov = Provenance(base_fingerprint=base.fingerprint, method=METHOD, hyperparams=hp,
                      example_count=len(examples or []))
    rev = registry.commit(ref, blob, prov, creator=creator)
    return Generated(revision=rev, seconds=seconds, generator=gen_rev.address)
