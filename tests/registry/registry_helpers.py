"""Helpers shared by the registry tests, including the worker functions that
multiprocessing (spawn) children import by module name."""

from __future__ import annotations

import traceback

from lorafleet.registry import NotFoundError, Provenance, Registry

BASE = "base-fp-1"
REF = "acme/alice/assistant"


def blob(tag: bytes | str) -> bytes:
    """A canonical adapter blob (``Registry.commit`` accepts nothing else) standing for ``tag``: the same tag
    gives the same bytes, another tag other bytes, and a longer tag a bigger blob (one value per tag byte)."""
    import torch  # noqa: PLC0415

    from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes  # noqa: PLC0415

    raw = tag.encode() if isinstance(tag, str) else bytes(tag)
    a = torch.tensor([list(raw) or [0]], dtype=torch.float32)  # (1, len(tag))
    spec = LoraSpec(rank=1, alpha=1.0, target_modules=("q_proj",))
    return to_bytes(LoraAdapter(spec=spec, weights={"model.layers.0.self_attn.q_proj": (a, torch.zeros(1, 1))}))


def prov(**kwargs) -> Provenance:
    kwargs.setdefault("base_fingerprint", BASE)
    return Provenance(**kwargs)


def commit_worker(db_url: str, blob_url: str, ref: str, worker: int, count: int, start) -> list[int]:
    """Commit ``count`` distinct blobs to ``ref``; return the numbers received."""
    reg = Registry(db_url, blob_url)
    try:
        start.wait(timeout=120)  # every worker has opened the registry: go together
        numbers = []
        for i in range(count):
            rev = reg.commit(ref, blob(f"worker {worker} blob {i}".encode()), prov(), creator=f"w{worker}")
            numbers.append(rev.number)
        return numbers
    finally:
        reg.close()


def alias_worker(db_url: str, blob_url: str, ref: str, worker: int, moves: int, latest: int,
                 start) -> int:
    """Move ``live`` ``moves`` times to pseudo-random revisions (and roll back now and then)."""
    reg = Registry(db_url, blob_url)
    try:
        start.wait(timeout=120)  # every worker has opened the registry: go together
        done = 0
        for i in range(moves):
            target = (worker * 7 + i * 3) % latest + 1
            try:
                if i % 5 == 4:
                    reg.rollback(ref, actor=f"w{worker}", reason=f"rollback {i}")
                else:
                    reg.set_alias(ref, "live", target, actor=f"w{worker}", reason=f"move {i}")
                done += 1
            except NotFoundError:
                pass  # nothing to roll back to, or gc removed the target: refused, nothing recorded
        return done
    finally:
        reg.close()


def gc_worker(db_url: str, blob_url: str, rounds: int, start) -> int:
    reg = Registry(db_url, blob_url)
    try:
        start.wait(timeout=120)  # every worker has opened the registry: go together
        deleted = 0
        for _ in range(rounds):
            deleted += len(reg.gc(keep_last=1, grace_s=0).deleted_revisions)
        return deleted
    finally:
        reg.close()


def run_worker(fn, args: tuple, results, slot: int) -> None:
    """Process target: run ``fn(*args)`` and put ``(slot, ok, value)`` on the results queue."""
    try:
        results.put((slot, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - report any failure to the parent test
        results.put((slot, False, traceback.format_exc()))
