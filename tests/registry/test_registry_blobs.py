"""Blob store: content addressing, verification on read, full disks, and the S3 path (moto)."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
from registry_helpers import BASE, REF, blob, prov

from lorafleet.registry import (
    CorruptBlobError,
    InvalidNameError,
    MissingBlobError,
    NotFoundError,
    Registry,
    StorageFullError,
)
from lorafleet.registry import blobstore as blobstore_mod
from lorafleet.registry.blobstore import FsspecBlobStore, LocalBlobStore, open_blob_store


def test_local_layout_is_fanned_out_and_leaves_no_temp_files(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    data = b"x" * 10_000
    digest = hashlib.sha256(data).hexdigest()
    assert store.put(digest, data) is True
    assert store.put(digest, data) is False  # already there, intact
    path = tmp_path / "blobs" / digest[:2] / digest[2:]
    assert path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir()] == [digest[2:]]
    assert list(store.iter_digests()) == [digest]


def test_put_rewrites_a_corrupt_copy(tmp_path):
    store = LocalBlobStore(tmp_path)
    data = b"payload"
    digest = hashlib.sha256(data).hexdigest()
    store.put(digest, data)
    store.path(digest).write_bytes(b"PAYLOAD")  # same size, wrong bytes
    with pytest.raises(CorruptBlobError):
        store.get(digest)
    assert store.put(digest, data) is True
    assert store.get(digest) == data


CORRUPTIONS = [
    ("flipped", lambda b: bytes([b[0] ^ 1]) + b[1:]),
    ("truncated", lambda b: b[:-1]),
    ("extended", lambda b: b + b"\0"),
    ("emptied", lambda b: b""),
]


@pytest.mark.parametrize(("kind", "mutate"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_blob_is_detected_and_never_returned(registry, kind, mutate):
    rev = registry.commit(REF, blob(b"adapter weights " * 100), prov(), aliases=["live"])
    path = registry.blobs.path(rev.digest)
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(CorruptBlobError, match=f"blob {rev.digest} .* is corrupt: its .* bytes hash to"):
        registry.read_blob(rev.digest)
    with pytest.raises(CorruptBlobError, match="commit the adapter again"):
        registry.load(REF, base_fingerprint=BASE)
    # committing the same bytes again repairs the store
    registry.commit(REF, blob(b"adapter weights " * 100), prov())
    assert registry.load(REF, base_fingerprint=BASE)[1] == blob(b"adapter weights " * 100)


def test_missing_blob_is_a_clear_error(registry):
    rev = registry.commit(REF, blob(b"w"), prov(), aliases=["live"])
    os.unlink(registry.blobs.path(rev.digest))
    with pytest.raises(MissingBlobError, match=f"blob {rev.digest} is missing from the blob store"):
        registry.load(REF, base_fingerprint=BASE)


def test_read_blob_validates_digest(registry):
    with pytest.raises(InvalidNameError, match="invalid blob digest '../etc/passwd'"):
        registry.read_blob("../etc/passwd")
    with pytest.raises(MissingBlobError):
        registry.read_blob("0" * 64)


@pytest.mark.parametrize("partial", [False, True], ids=["immediately", "half-written"])
def test_enospc_during_blob_write_makes_nothing_visible(registry, monkeypatch, partial):
    registry.commit(REF, blob(b"first"), prov(), aliases=["live"])
    real = blobstore_mod._write_all

    def full_disk(fd, data):
        if partial:
            real(fd, data[: len(data) // 2])  # some bytes reach the disk, then it fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blobstore_mod, "_write_all", full_disk)
    with pytest.raises(StorageFullError, match="no space left .* free space there .* nothing was made visible"):
        registry.commit(REF, blob(b"second, bigger" * 1000), prov(), aliases=["live"])
    monkeypatch.undo()
    assert registry.get_adapter(REF).latest == 1
    assert registry.resolve(REF).number == 1
    assert len(registry.history(REF)) == 1
    blob_root = registry.blobs.root
    leftovers = [p for p in blob_root.rglob("*") if p.is_file()]
    assert [p.name for p in leftovers] == [registry.resolve(REF).digest[2:]]  # no temp or partial files
    # and the registry still works afterwards
    assert registry.commit(REF, blob(b"second, bigger" * 1000), prov()).number == 2


def test_database_full_makes_nothing_visible(sqlite_registry):
    """SQLITE_FULL on the metadata write becomes StorageFullError; the revision is not visible."""
    from sqlalchemy import event

    reg = sqlite_registry
    reg.commit(REF, blob(b"first"), prov())
    engine = reg.engine
    engine.dispose()
    with engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

    def cap(dbapi_conn, _record):
        dbapi_conn.execute(f"PRAGMA max_page_count={pages}")

    event.listen(engine, "connect", cap)
    engine.dispose()  # new connections get the cap
    try:
        with pytest.raises(StorageFullError, match="registry database .* is full"):
            for i in range(200):  # fill the remaining free pages, then hit the cap
                reg.commit(REF, blob(b"more"), prov(hyperparams={"pad": "x" * 2000, "i": i}))
    finally:
        event.remove(engine, "connect", cap)
        engine.dispose()
    latest = reg.get_adapter(REF).latest
    assert [r.number for r in reg.history(REF)] == list(range(1, latest + 1))
    with pytest.raises(NotFoundError):
        reg.resolve(f"{REF}#{latest + 1}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


def test_open_blob_store_dispatch(tmp_path):
    assert isinstance(open_blob_store(str(tmp_path / "a")), LocalBlobStore)
    assert isinstance(open_blob_store(f"file://{tmp_path / 'b'}"), LocalBlobStore)
    assert isinstance(open_blob_store("memory://lorafleet-test"), FsspecBlobStore)


def test_memory_fsspec_store_round_trip():
    store = open_blob_store("memory://lorafleet-roundtrip")
    data = b"abc"
    digest = hashlib.sha256(data).hexdigest()
    store.put(digest, data)
    assert store.get(digest) == data and list(store.iter_digests()) == [digest]
    store.delete(digest)
    with pytest.raises(MissingBlobError):
        store.get(digest)


# ---------------------------------------------------------------------------- S3 through moto


def _make_bucket(endpoint: str, bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir(bucket)


def test_s3_blob_store_end_to_end(s3_env, tmp_path):
    _make_bucket(s3_env, "lorafleet-test")
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}", "s3://lorafleet-test/blobs")
    try:
        rev = reg.commit(REF, blob(b"s3 weights"), prov(), aliases=["live"])
        again = reg.commit("acme/bob/x", blob(b"s3 weights"), prov())
        assert again.digest == rev.digest
        assert reg.load(REF, base_fingerprint=BASE)[1] == blob(b"s3 weights")
        assert list(reg.blobs.iter_digests()) == [rev.digest]
        fs = reg.blobs.fs
        key = reg.blobs.path(rev.digest)
        assert key == f"lorafleet-test/blobs/{rev.digest[:2]}/{rev.digest[2:]}"

        fs.pipe_file(key, b"S3 weights")  # corrupt the object behind the registry's back
        with pytest.raises(CorruptBlobError, match="is corrupt"):
            reg.load(REF, base_fingerprint=BASE)
        fs.rm_file(key)
        with pytest.raises(MissingBlobError, match="missing from the blob store s3://lorafleet-test/blobs"):
            reg.read_blob(rev.digest)

        # an orphan (as after a crash between blob and metadata) is removed by gc; referenced ones stay
        orphan = b"orphan"
        reg.blobs.put(hashlib.sha256(orphan).hexdigest(), orphan)
        kept = reg.commit(REF, blob(b"kept"), prov())
        report = reg.gc(keep_last=5, grace_s=0)
        assert report.deleted_blobs == [hashlib.sha256(orphan).hexdigest()]
        assert reg.read_blob(kept.digest) == blob(b"kept")
    finally:
        reg.close()
