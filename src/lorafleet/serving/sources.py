"""Where the engine fetches adapter blobs from: any callable ``fetch(digest) -> bytes``.

In production that is the registry (``registry.read_blob``, verified against the digest). These small
sources serve tests, benchmarks and embedded use: an in-memory dict and a directory of files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from lorafleet.adapters import LoraAdapter, to_bytes
from lorafleet.digest import check_digest, digest_of

Fetch = Callable[[str], bytes]


class BlobNotFoundError(LookupError):
    """The source has no blob with that digest."""


def _as_bytes(item: LoraAdapter | bytes) -> bytes:
    return to_bytes(item) if isinstance(item, LoraAdapter) else bytes(item)


class DictBlobs:
    """Blobs in a dict; ``put(adapter)`` returns its digest. Thread-safe for reads."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, item: LoraAdapter | bytes) -> str:
        data = _as_bytes(item)
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def __call__(self, digest: str) -> bytes:
        try:
            return self.blobs[digest]
        except KeyError:
            raise BlobNotFoundError(f"adapter blob {digest} is not in this in-memory source") from None


class DirBlobs:
    """Blobs as files ``<root>/<digest>`` (written to a temp name, then renamed)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / check_digest(digest)

    def put(self, item: LoraAdapter | bytes) -> str:
        data = _as_bytes(item)
        digest = digest_of(data)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path(digest))
        return digest

    def __call__(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(f"adapter blob {digest} is missing from {self.root}") from None


def registry_fetch(registry) -> Fetch:
    """The registry's verified blob reader as a fetch callable (raises Missing/CorruptBlobError)."""
    return registry.read_blob
