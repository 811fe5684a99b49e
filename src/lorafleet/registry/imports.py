"""Import PEFT adapter folders as registry revisions: one folder, a folder of many, any fsspec URL.

A PEFT folder is what ``peft.save_pretrained`` writes: ``adapter_config.json`` + ``adapter_model.safetensors``
(+ ``README.md``, which is ignored and listed, like any other non-weight file). Each folder is validated by
:func:`lorafleet.adapters.peft_io.parse_peft` — the same function an HTTP upload goes through — against the
resident base, re-encoded as a canonical blob and committed with provenance ``method="import"`` and
``hyperparams["source"]`` (the path or URL it came from).

Names: ``--as t/u/a`` names a single adapter; ``--as t/u`` puts every adapter found under user ``u`` of tenant
``t``, each named after its folder (lowercased, other characters -> ``-``); without ``--as`` the prefix is
:data:`DEFAULT_PREFIX`, the namespace bare vLLM-style adapter names live in too.

One bad adapter among many is reported and skipped, the others committed; ``strict=True`` stops at the first
error (those before it stay committed). Re-importing identical weights adds no revision (``unchanged``).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lorafleet.digest import digest_of

from .blobstore import fsspec_options
from .errors import InvalidNameError, RegistryError
from .names import CANDIDATE, check_alias, check_segment, parse_ref
from .records import Provenance

DEFAULT_PREFIX = "local/lora"  # tenant/user of adapters imported without --as (and of bare vLLM lora names)
MAX_FOLDERS = 10_000


@dataclass(frozen=True)
class Found:
    """One PEFT folder found under a path the user gave."""

    source: str  # as shown to the user (the URL for remote file systems)
    fs: object = field(repr=False, compare=False)
    path: str = ""
    name: str = ""  # derived adapter name segment


@dataclass
class ImportResult:
    source: str
    ref: str | None = None
    status: str = "pending"  # committed | unchanged | failed
    number: int | None = None
    digest: str | None = None
    size: int | None = None
    ignored: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return {"source": self.source, "ref": self.ref, "status": self.status, "number": self.number,
                "digest": self.digest, "size": self.size, "ignored_files": self.ignored, "error": self.error}


def derive_name(text: str) -> str:
    """A folder name as a valid name segment: ``My LoRA_v2`` -> ``my-lora_v2``."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", text.strip().lower())
    name = re.sub(r"^[^a-z0-9_]+", "", name).rstrip("-.")[:63].rstrip("-.")
    return name or "adapter"


def _adapter_error():
    from lorafleet.adapters.errors import AdapterError  # noqa: PLC0415 - defers torch

    return AdapterError


def _open(path: str):
    import fsspec  # noqa: PLC0415

    try:
        fs, root = fsspec.core.url_to_fs(str(path), **fsspec_options(str(path)))
    except (ValueError, ImportError) as exc:
        raise _adapter_error()(f"cannot open {path!r}: {exc}") from None
    return fs, root.rstrip("/") or "/"


def find_adapters(paths: Sequence[str], *, recursive: bool = False) -> list[Found]:
    """Every PEFT folder under ``paths``: a path that is one, else its sub-folders that are (any depth with
    ``recursive``). A path with none is an error naming it."""
    from lorafleet.adapters.peft_io import CONFIG_FILE  # noqa: PLC0415 - defers torch

    AdapterError = _adapter_error()  # noqa: N806
    out: list[Found] = []
    for path in paths:
        fs, root = _open(path)
        shown = str(path).rstrip("/") or str(path)
        if not fs.exists(root):
            raise AdapterError(f"{shown} does not exist")
        if not fs.isdir(root):
            raise AdapterError(f"{shown} is a file; give the adapter's folder (it holds {CONFIG_FILE})")
        if fs.isfile(posixpath.join(root, CONFIG_FILE)):
            out.append(Found(shown, fs, root, derive_name(posixpath.basename(root))))
            continue
        if recursive:
            configs = [p for p in fs.find(root) if posixpath.basename(p) == CONFIG_FILE]
            folders = sorted(posixpath.dirname(p.rstrip("/")) for p in configs)
        else:
            folders = sorted(p["name"].rstrip("/") for p in fs.ls(root, detail=True)
                             if p.get("type") == "directory" and fs.isfile(posixpath.join(p["name"], CONFIG_FILE)))
        if not folders:
            hint = "" if recursive else " (add --recursive to search deeper)"
            raise AdapterError(f"no PEFT adapter ({CONFIG_FILE}) in {shown} or its sub-folders{hint}")
        for folder in folders:
            rel = posixpath.relpath(folder, root)
            out.append(Found(f"{shown}/{rel}", fs, folder, derive_name(rel.replace("/", "-"))))
        if len(out) > MAX_FOLDERS:
            raise AdapterError(f"more than {MAX_FOLDERS} adapters under {shown}; import them in parts")
    return out


def plan_refs(found: Sequence[Found], as_ref: str | None = None) -> list[str]:
    """The ref each found adapter goes to (see the module docstring); duplicates are an error."""
    prefix = as_ref or DEFAULT_PREFIX
    parts = prefix.split("/")
    if len(parts) == 3:
        parse_ref(prefix)
        if len(found) != 1:
            raise InvalidNameError(f"--as {prefix} names one adapter, but {len(found)} were found; "
                                   f"give --as {parts[0]}/{parts[1]} to name each after its folder")
        return [prefix]
    if len(parts) != 2:
        raise InvalidNameError(f"--as {prefix!r}: expected 'tenant/user/adapter' (one adapter) or 'tenant/user'")
    check_segment(parts[0], "tenant", prefix)
    check_segment(parts[1], "user", prefix)
    refs = [f"{prefix}/{f.name}" for f in found]
    seen: dict[str, str] = {}
    for f, ref in zip(found, refs, strict=True):
        if ref in seen:
            raise InvalidNameError(f"{seen[ref]} and {f.source} would both import as {ref}; rename a folder or "
                                   "import them separately with --as")
        seen[ref] = f.source
    return refs


def read_adapter(found: Found, base, *, max_bytes: int | None = None):
    """Validate one PEFT folder on any file system, exactly like an upload; ``meta["ignored"]`` lists the rest."""
    from lorafleet.adapters import peft_io  # noqa: PLC0415 - defers torch

    fs, limit = found.fs, max_bytes or peft_io.MAX_ADAPTER_BYTES
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(found.path, detail=False)]
    ignored = peft_io.peft_folder_files(names, found.source)
    weights = posixpath.join(found.path, peft_io.WEIGHTS_FILE)
    size = fs.size(weights)
    if size is not None and size > limit:
        raise _adapter_error()(f"{found.source}/{peft_io.WEIGHTS_FILE} is {size} bytes, over the limit of {limit}")
    config = fs.cat_file(posixpath.join(found.path, peft_io.CONFIG_FILE))
    adapter = peft_io.parse_peft(config, fs.cat_file(weights), base, max_bytes=limit, where=found.source)
    adapter.meta["ignored"] = ignored
    return adapter


def commit_adapter(registry, base, ref: str, adapter, *, source: str, alias: str = CANDIDATE,
                   creator: str = "cli", method: str = "import") -> tuple[str, object]:
    """Commit a validated adapter as the next revision of ``ref`` (created if new) unless the latest revision
    already holds the same bytes; point ``alias`` at it. Returns ``(status, revision)``."""
    from lorafleet.adapters import to_bytes  # noqa: PLC0415 - defers torch

    check_alias(alias)
    blob = to_bytes(adapter)
    info = registry.create_adapter(ref, creator=creator, exist_ok=True)
    if info.latest is not None:
        latest = registry.resolve(f"{ref}#{info.latest}")
        if latest.digest == digest_of(blob) and latest.provenance.base_fingerprint == base.fingerprint:
            if info.aliases.get(alias) != latest.number:
                registry.set_alias(ref, alias, latest.number, actor=creator, reason=f"re-import of {source}")
                latest = registry.resolve(f"{ref}#{latest.number}")
            return "unchanged", latest
    hyper = {**adapter.spec.to_dict(), "source": source, "ignored_files": list(adapter.meta.get("ignored", []))}
    prov = Provenance(base_fingerprint=base.fingerprint, method=method, hyperparams=hyper, creator=creator)
    return "committed", registry.commit(ref, blob, prov, creator=creator, aliases=(alias,), create=False)


def import_adapters(registry, base, paths: Sequence[str], *, as_ref: str | None = None, alias: str = CANDIDATE,
                    recursive: bool = False, strict: bool = False, creator: str = "cli",
                    max_bytes: int | None = None,
                    progress: Callable[[ImportResult], None] | None = None) -> list[ImportResult]:
    """Import every PEFT folder under ``paths`` (see the module docstring); one result per folder, in order.

    Finding and naming errors (nothing found, a bad ``--as``, two folders with one name) raise before anything
    is committed. Per-adapter errors are recorded in the result and skipped; with ``strict`` they raise.
    """
    AdapterError = _adapter_error()  # noqa: N806
    check_alias(alias)
    found = find_adapters(paths, recursive=recursive)
    refs = plan_refs(found, as_ref)
    results = []
    for f, ref in zip(found, refs, strict=True):
        result = ImportResult(source=f.source, ref=ref)
        try:
            adapter = read_adapter(f, base, max_bytes=max_bytes)
            result.ignored = list(adapter.meta.get("ignored", []))
            result.status, rev = commit_adapter(registry, base, ref, adapter, source=f.source, alias=alias,
                                                creator=creator)
            result.number, result.digest, result.size = rev.number, rev.digest, rev.size
        except (AdapterError, RegistryError, OSError) as exc:
            if strict:
                if isinstance(exc, AdapterError) and f.source not in str(exc):
                    raise AdapterError(f"{f.source}: {exc}") from None
                raise
            result.status, result.error = "failed", str(exc)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def lora_ref(lora_name: str) -> str:
    """The ref a vLLM-style ``lora_name`` stands for: a full ``t/u/a`` as is, a bare name under
    :data:`DEFAULT_PREFIX` (so ``model="sql-lora"`` works like in vLLM)."""
    if "/" in lora_name:
        parse_ref(lora_name)
        return lora_name
    check_segment(lora_name, "adapter", lora_name)
    return f"{DEFAULT_PREFIX}/{lora_name}"


def import_path(registry, base, path: str, ref: str, *, alias: str = CANDIDATE, creator: str = "cli",
                max_bytes: int | None = None) -> ImportResult:
    """Import the one PEFT folder at ``path`` (local or an fsspec URL) as ``ref``; errors raise."""
    parse_ref(ref)
    found = find_adapters([path])
    if len(found) != 1:
        raise InvalidNameError(f"{path} holds {len(found)} adapters; give the folder of one")
    adapter = read_adapter(found[0], base, max_bytes=max_bytes)
    status, rev = commit_adapter(registry, base, ref, adapter, source=found[0].source, alias=alias, creator=creator)
    return ImportResult(source=found[0].source, ref=ref, status=status, number=rev.number, digest=rev.digest,
                        size=rev.size, ignored=list(adapter.meta.get("ignored", [])))


def parse_lora_module(text: str) -> tuple[str, str]:
    """One ``--lora-modules`` value, as vLLM takes it: ``name=path`` or JSON ``{"name": ..., "path": ...}``."""
    import json  # noqa: PLC0415

    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidNameError(f"--lora-modules {text!r}: invalid JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get("path"), str):
            raise InvalidNameError(f"--lora-modules {text!r}: JSON needs string fields 'name' and 'path'")
        name, path = obj["name"], obj["path"]
    else:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise InvalidNameError(f"--lora-modules {text!r}: expected name=path or a JSON object")
    return name, path
