"""Content-addressed blob stores: bytes in, sha256 digest as the key, verified on every read.

Layout: ``<root>/<digest[:2]>/<digest[2:]>`` (256 fan-out directories keep directories small).

* :class:`LocalBlobStore` — a directory. Writes go to a temp file in the target directory,
  are fsynced, then atomically renamed into place (and the directory fsynced), so a blob is
  either absent or complete, never torn.
* :class:`FsspecBlobStore` — any fsspec URL, in practice ``s3://bucket/prefix`` through s3fs
  (endpoint from ``$LORAFLEET_S3_ENDPOINT`` or the storage options). An S3 PUT is atomic.

The registry writes a blob *before* the metadata transaction that references it; a crash in
between leaves an unreferenced blob, which ``Registry.gc`` removes.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafleet.config import Settings
from lorafleet.digest import digest_of, is_digest

from . import faults
from .errors import CorruptBlobError, MissingBlobError, RegistryError, StorageFullError
from .names import check_digest

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


def _verify(digest: str, data: bytes, where: str) -> bytes:
    actual = digest_of(data)
    if actual != digest:
        raise CorruptBlobError(
            f"blob {digest} at {where} is corrupt: its {len(data)} bytes hash to {actual}; it was not returned. "
            "Restore the file from a backup, or commit the adapter again (the registry rewrites a corrupt blob "
            "when the same bytes are committed)"
        )
    return data


def _full(digest: str, where: str) -> StorageFullError:
    return StorageFullError(
        f"no space left on the device while writing blob {digest} to {where}; free space there (or point "
        "LORAFLEET_BLOB_URL / LORAFLEET_HOME elsewhere) and retry — nothing was made visible"
    )


class BlobStore:
    """Interface of a content-addressed blob store."""

    url: str

    def put(self, digest: str, data: bytes) -> bool:
        """Store ``data`` under ``digest`` unless an intact copy exists; return True if written."""
        raise NotImplementedError

    def get(self, digest: str) -> bytes:
        """Return the bytes of ``digest``, verified; raise Missing/CorruptBlobError."""
        raise NotImplementedError

    def exists(self, digest: str) -> bool:
        raise NotImplementedError

    def size(self, digest: str) -> int | None:
        """Size in bytes, or None if absent."""
        raise NotImplementedError

    def stat(self, digest: str) -> tuple[int, float] | None:
        """(size in bytes, last-write time as a Unix timestamp), or None if absent."""
        raise NotImplementedError

    def delete(self, digest: str) -> None:
        raise NotImplementedError

    def iter_digests(self) -> Iterator[str]:
        """Every digest present in the store (any order)."""
        raise NotImplementedError

    def clean_temp(self, older_than_s: float) -> int:
        """Remove temp files left by crashed writers; return how many."""
        return 0


def _write_all(fd: int, data: memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (a seam for tests that simulate a full disk)."""
    while data:
        written = os.write(fd, data)
        data = data[written:]


class LocalBlobStore(BlobStore):
    """Blobs in a local directory (the embedded default: ``<data dir>/blobs``)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / digest[:2] / digest[2:]

    def put(self, digest: str, data: bytes) -> bool:
        path = self.path(digest)
        try:
            if path.stat().st_size == len(data):
                try:
                    _verify(digest, path.read_bytes(), str(path))
                    os.utime(path)  # "recently written": gc's grace period protects it again
                    return False
                except CorruptBlobError:
                    logger.warning("blob %s on disk is corrupt; rewriting it from the committed bytes", digest)
        except FileNotFoundError:
            pass
        parent = path.parent
        try:
            if not parent.is_dir():
                parent.mkdir(exist_ok=True)
                _fsync_dir(self.root)
            tmp = parent / f"{TMP_PREFIX}{digest[2:10]}-{os.getpid()}-{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                try:
                    view, half = memoryview(data), len(data) // 2
                    _write_all(fd, view[:half])
                    faults.checkpoint("blob_mid_write")  # tests: a crash while a blob is half written
                    _write_all(fd, view[half:])
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(parent)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _full(digest, str(self.root)) from exc
            raise RegistryError(f"could not write blob {digest} under {self.root}: {exc}") from exc
        return True

    def get(self, digest: str) -> bytes:
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MissingBlobError(
                f"blob {digest} is missing from the blob store {self.root} (expected at {path}); restore it from a "
                "backup or commit the adapter again"
            ) from None
        return _verify(digest, data, str(path))

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def stat(self, digest: str) -> tuple[int, float] | None:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def iter_digests(self) -> Iterator[str]:
        for sub in os.scandir(self.root):
            if not (sub.is_dir() and len(sub.name) == 2):
                continue
            for entry in os.scandir(sub.path):
                digest = sub.name + entry.name
                if is_digest(digest) and entry.is_file():
                    yield digest

    def clean_temp(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        removed = 0
        for sub in os.scandir(self.root):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.name.startswith(TMP_PREFIX) and entry.stat().st_mtime < cutoff:
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
        return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsspec_options(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for ``url``: for S3, the endpoint from the settings (``$LORAFLEET_S3_ENDPOINT``) and no listing cache
    (shared by the blob store and ``lorafleet adapters import s3://…``)."""
    options = dict(storage_options or {})
    if url.split("://", 1)[0] in ("s3", "s3a"):
        endpoint = Settings.from_env().s3_endpoint
        if endpoint and "endpoint_url" not in options:
            options["endpoint_url"] = endpoint
        # Always ask the server: a cached listing could make gc or exists() lie.
        options.setdefault("use_listings_cache", False)
        options.setdefault("skip_instance_cache", True)
    return options


class FsspecBlobStore(BlobStore):
    """Blobs behind an fsspec URL such as ``s3://bucket/prefix`` (or ``memory://x`` in tests)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        import fsspec

        options = fsspec_options(url, storage_options)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as exc:
            raise RegistryError(f"blob store {url!r} needs an fsspec driver: {exc} (for S3: pip install 's3fs')") from exc
        self.root = root.rstrip("/")
        self.url = url

    def path(self, digest: str) -> str:
        check_digest(digest)
        return f"{self.root}/{digest[:2]}/{digest[2:]}"

    def _refresh(self, path: str) -> None:
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate(path)

    def put(self, digest: str, data: bytes) -> bool:
        if self.size(digest) == len(data):
            return False
        path = self.path(digest)
        try:
            self.fs.pipe_file(path, bytes(data))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _full(digest, self.url) from exc
            raise RegistryError(f"could not write blob {digest} to {self.url}: {exc}") from exc
        finally:
            self._refresh(path)
        return True

    def get(self, digest: str) -> bytes:
        path = self.path(digest)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise MissingBlobError(
                f"blob {digest} is missing from the blob store {self.url} (expected at {path}); restore it from a "
                "backup or commit the adapter again"
            ) from None
        return _verify(digest, data, f"{self.url} ({path})")

    def exists(self, digest: str) -> bool:
        return self.size(digest) is not None

    def _info(self, digest: str) -> dict | None:
        path = self.path(digest)
        self._refresh(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        return info if info.get("type", "file") == "file" else None

    def size(self, digest: str) -> int | None:
        info = self._info(digest)
        return None if info is None else int(info["size"])

    def stat(self, digest: str) -> tuple[int, float] | None:
        info = self._info(digest)
        if info is None:
            return None
        when = info.get("LastModified") or info.get("mtime") or info.get("created")
        if hasattr(when, "timestamp"):
            when = when.timestamp()
        return int(info["size"]), float(when or 0.0)  # unknown age counts as old

    def delete(self, digest: str) -> None:
        path = self.path(digest)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        self._refresh(path)

    def iter_digests(self) -> Iterator[str]:
        self._refresh(self.root)
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return
        for path in found:
            parts = path.rstrip("/").split("/")
            if len(parts) >= 2 and len(parts[-2]) == 2 and is_digest(parts[-2] + parts[-1]):
                yield parts[-2] + parts[-1]


def open_blob_store(url: str, storage_options: dict[str, Any] | None = None) -> BlobStore:
    """A local path or ``file://`` URL gives a :class:`LocalBlobStore`; anything else goes through fsspec."""
    if "://" not in url:
        return LocalBlobStore(url)
    if url.startswith("file://"):
        return LocalBlobStore(url[len("file://"):])
    return FsspecBlobStore(url, storage_options)
