"""Adapter stacks: organisation, team and personal adapters applied together in one request.

An adapter may declare a *parent* (``adapters.parent_ref``)::

    acme/_org/support            (root: the department's jargon and workflow)
        └── acme/support/triage  (a team, optional)
              └── acme/alice/assistant   (alice's own habits)

A request for ``acme/alice/assistant`` applies the sum of the deltas of every level's revision. The
requested level resolves its address as usual (``live``, ``@alias`` or ``#N``); every parent resolves its own
``live`` alias, so promoting the team adapter moves every member at once. Rules, checked when a parent is
set (``create_adapter(parent=...)`` / :func:`set_parent`), with an error that names the problem and nothing
changed:

* the parent exists and belongs to the same tenant (a tenant's shared adapters live under a user such as
  ``_org``);
* no cycles (an adapter is never its own ancestor);
* at most :data:`MAX_LEVELS` levels, the adapter itself included (also for its existing members when it is
  re-parented).

Parent changes are audited (action ``parent.set``). These functions operate on a :class:`Registry`; the
registry's public methods (``resolve_stack``, ``load_stack``, ``set_parent``, ``stack_members``) call them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from lorafleet.limits import MAX_LEVELS

from . import db
from .errors import BaseMismatchError, InvalidArgumentError, NotFoundError, RegistryError
from .names import LIVE, parse_address, parse_ref
from .records import AdapterInfo, AuditEntry, RevisionInfo, utcnow
from .schema import adapters, audit

if TYPE_CHECKING:
    from .registry import Registry



class StackError(InvalidArgumentError):
    """A parent link would break a stack rule (other tenant, cycle, too deep); nothing was changed."""


def _row(reg: Registry, conn: Connection, ref: str, *, lock: bool = False):
    tenant, user, name = parse_ref(ref)
    return reg._adapter_row(conn, tenant, user, name, lock=lock)


def chain(reg: Registry, conn: Connection, ref: str, *, lock: bool = False) -> list[str]:
    """``ref`` and its ancestors, root first. Raises if a recorded parent vanished or links loop."""
    out: list[str] = []
    current: str | None = ref
    while current is not None:
        if current in out:
            raise RegistryError(f"the stack of {ref!r} loops through {current!r}; fix it with `lorafleet adapters parent`")
        row = _row(reg, conn, current, lock=lock)
        if row is None:
            what = f"parent {current!r} of {out[-1]!r}" if out else f"adapter {current!r}"
            raise NotFoundError(f"{what} does not exist")
        out.append(current)
        current = row.parent_ref
    return out[::-1]


def _height(conn: Connection, ref: str) -> int:
    """Levels in the subtree under ``ref``, ``ref`` included (1 = no members)."""
    frontier, height = [ref], 1
    while frontier and height <= MAX_LEVELS:
        rows = conn.execute(sa.select(adapters.c.tenant, adapters.c.username, adapters.c.name)
                            .where(adapters.c.parent_ref.in_(frontier))).all()
        frontier = [f"{t}/{u}/{n}" for t, u, n in rows]
        if frontier:
            height += 1
    return height


def check_parent(reg: Registry, conn: Connection, ref: str, parent: object, *, new: bool = False) -> str:
    """Validate ``parent`` as the parent of ``ref`` (inside the caller's write transaction); returns it."""
    if not isinstance(parent, str):
        raise StackError(f"parent must be an adapter ref 'tenant/user/adapter', got {parent!r}")
    try:
        ptenant, _, _ = parse_ref(parent)
    except InvalidArgumentError as exc:
        raise StackError(f"invalid parent: {exc}") from None
    tenant, _, _ = parse_ref(ref)
    if ptenant != tenant:
        raise StackError(
            f"parent {parent!r} belongs to tenant {ptenant!r}, but {ref!r} to {tenant!r}: a stack stays inside one "
            f"tenant (put shared adapters under a tenant-level user, e.g. {tenant}/_org/<name>)"
        )
    if parent == ref:
        raise StackError(f"adapter {ref!r} cannot be its own parent")
    try:
        ancestors = chain(reg, conn, parent, lock=True)
    except NotFoundError:
        raise NotFoundError(
            f"parent {parent!r} does not exist; create it first with `lorafleet adapters create {parent}`"
        ) from None
    if ref in ancestors:
        raise StackError(
            f"making {parent!r} the parent of {ref!r} would create a cycle ({' -> '.join([*ancestors, ref])})"
        )
    height = 1 if new else _height(conn, ref)
    if len(ancestors) + height > MAX_LEVELS:
        below = "" if height == 1 else f" (and {ref!r} already has {height - 1} level(s) of members below it)"
        raise StackError(
            f"stack too deep: {' -> '.join([*ancestors, ref])} would have {len(ancestors) + height} levels{below}; "
            f"at most {MAX_LEVELS} (organisation, team, person)"
        )
    return parent


def set_parent(reg: Registry, ref: str, parent: str | None, *, actor: str, reason: str) -> AuditEntry:
    """Point ``ref``'s parent at ``parent`` (None = no parent), validated, with an audit row."""
    parse_ref(ref)
    with db.write_tx(reg.engine) as conn:
        row = reg._require_adapter(conn, ref, lock=True)
        if parent is not None:
            parent = check_parent(reg, conn, ref, parent)
        conn.execute(sa.update(adapters).where(adapters.c.id == row.id).values(parent_ref=parent))
        values = dict(ref=ref, action="parent.set", alias=None, from_number=None, to_number=None, actor=actor,
                      reason=f"parent {row.parent_ref or '-'} -> {parent or '-'}" + (f": {reason}" if reason else ""),
                      at=utcnow())
        result = conn.execute(sa.insert(audit).values(adapter_id=row.id, **values))
        return AuditEntry(id=result.inserted_primary_key[0], **values)


def resolve_stack(reg: Registry, address: str) -> list[RevisionInfo]:
    """Resolve ``address`` and each ancestor's ``live`` revision; root first, the requested revision last."""
    addr = parse_address(address)
    with db.read_once(reg.engine) as conn:
        rev, parent = reg._find_revision_and_parent(conn, addr)
        out = [rev]
        while parent is not None:
            if len(out) >= MAX_LEVELS:
                raise RegistryError(f"the stack of {addr.ref!r} is deeper than {MAX_LEVELS} levels")
            try:
                rev, next_parent = reg._find_revision_and_parent(conn, parse_address(f"{parent}@{LIVE}"))
            except NotFoundError as exc:
                raise NotFoundError(
                    f"{addr.ref!r} is stacked on {parent!r}, which cannot be resolved: {exc}. A stacked adapter is "
                    "served on its parents' live revisions"
                ) from None
            if any(r.ref == rev.ref for r in out):
                raise RegistryError(f"the stack of {addr.ref!r} loops through {rev.ref!r}")
            out.append(rev)
            parent = next_parent
    return out[::-1]


def load_stack(reg: Registry, address: str, *, base_fingerprint: str) -> list[tuple[RevisionInfo, bytes]]:
    """Every level of ``address``'s stack with its verified bytes, root first; refuses another base's level."""
    revs = resolve_stack(reg, address)
    for rev in revs:
        if rev.provenance.base_fingerprint != base_fingerprint:
            raise BaseMismatchError(
                f"{rev.address} (level of the stack of {address!r}) was trained for base "
                f"{rev.provenance.base_fingerprint!r}, not the loaded base {base_fingerprint!r}"
            )
    return [(rev, reg.read_blob(rev.digest)) for rev in revs]


def members(reg: Registry, ref: str) -> list[AdapterInfo]:
    """Adapters stacked on ``ref``: its children, then their children (up to ``MAX_LEVELS - 1`` levels below)."""
    parse_ref(ref)
    out = []
    with db.read_tx(reg.engine) as conn:
        reg._require_adapter(conn, ref)
        frontier = [ref]
        for _ in range(MAX_LEVELS - 1):
            rows = conn.execute(
                sa.select(adapters).where(adapters.c.parent_ref.in_(frontier))
                .order_by(adapters.c.tenant, adapters.c.username, adapters.c.name)
            ).all()
            if not rows:
                break
            alias_maps = reg._aliases_of_adapter(conn, [r.id for r in rows])
            out.extend(reg._adapter_info(r, alias_maps[r.id]) for r in rows)
            frontier = [f"{r.tenant}/{r.username}/{r.name}" for r in rows]
    return out


def stack_record(revs: list[RevisionInfo]) -> list[dict]:
    """The JSON form of a resolved stack (what provenance and response metadata carry): address + digest."""
    return [{"ref": r.ref, "number": r.number, "address": r.address, "digest": r.digest} for r in revs]
