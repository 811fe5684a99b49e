"""Importing PEFT folders (as ``peft.save_pretrained`` writes them) as revisions: one, many, an fsspec URL."""

from __future__ import annotations

import copy

import fsspec
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from lorafleet.adapters import AdapterError, decode_blob, load_peft
from lorafleet.base import load_base
from lorafleet.registry import InvalidNameError, NotFoundError, Registry
from lorafleet.registry.imports import DEFAULT_PREFIX, derive_name, import_adapters


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


@pytest.fixture
def reg(tmp_path):
    r = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "blobs"))
    yield r
    r.close()


def save_peft_folder(base, path, seed: int, targets=("q_proj", "v_proj")):
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base.model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False))
    model.save_pretrained(path)
    return path


def test_import_one_save_pretrained_folder(base, reg, tmp_path):
    folder = save_peft_folder(base, tmp_path / "My Adapter", 1)
    assert (folder / "README.md").exists()  # what save_pretrained writes, README included
    [res] = import_adapters(reg, base, [str(folder)], as_ref="acme/alice/notes", creator="cli:test")
    assert res.status == "committed" and res.ref == "acme/alice/notes" and res.number == 1
    assert res.ignored == ["README.md"]
    rev = reg.resolve("acme/alice/notes@candidate")
    prov = rev.provenance
    assert prov.method == "import" and prov.hyperparams["source"] == str(folder)
    assert prov.hyperparams["rank"] == 4 and prov.base_fingerprint == base.fingerprint
    stored = decode_blob(reg.read_blob(rev.digest), base)
    original = load_peft(folder, base)
    assert stored.weights.keys() == original.weights.keys()
    for name, (A, B) in original.weights.items():
        assert torch.equal(stored.weights[name][0], A) and torch.equal(stored.weights[name][1], B)
    # the same weights again: no new revision
    [again] = import_adapters(reg, base, [str(folder)], as_ref="acme/alice/notes", alias="live")
    assert again.status == "unchanged" and again.number == 1
    assert reg.get_adapter("acme/alice/notes").aliases == {"candidate": 1, "live": 1}


def _nan(folder):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)


def test_folder_of_many_one_bad_is_skipped(base, reg, tmp_path):
    for i, name in enumerate(["Alice", "bob", "carol"]):
        save_peft_folder(base, tmp_path / "many" / name, i)
    _nan(tmp_path / "many" / "bob")
    (tmp_path / "many" / "notes.txt").write_text("not an adapter")
    results = import_adapters(reg, base, [str(tmp_path / "many")], as_ref="acme/team")
    assert [(r.ref, r.status) for r in results] == [
        ("acme/team/alice", "committed"), ("acme/team/bob", "failed"), ("acme/team/carol", "committed")]
    assert "NaN or Inf" in results[1].error
    with pytest.raises(NotFoundError):
        reg.get_adapter("acme/team/bob")  # nothing committed for the refused adapter
    assert reg.resolve("acme/team/carol@candidate").provenance.hyperparams["source"].endswith("many/carol")


def test_strict_stops_at_the_first_bad(base, reg, tmp_path):
    for i, name in enumerate(["a1", "b2", "c3"]):
        save_peft_folder(base, tmp_path / "many" / name, i)
    _nan(tmp_path / "many" / "b2")
    with pytest.raises(AdapterError, match="b2.*NaN or Inf"):
        import_adapters(reg, base, [str(tmp_path / "many")], as_ref="acme/team", strict=True)
    assert reg.get_adapter("acme/team/a1").latest == 1
    for ref in ("acme/team/b2", "acme/team/c3"):
        with pytest.raises(NotFoundError):
            reg.get_adapter(ref)


def test_recursive_and_default_names(base, reg, tmp_path):
    save_peft_folder(base, tmp_path / "root" / "org" / "Sales Bot", 1)
    with pytest.raises(AdapterError, match="add --recursive"):
        import_adapters(reg, base, [str(tmp_path / "root")])
    [res] = import_adapters(reg, base, [str(tmp_path / "root")], recursive=True)
    assert res.ref == f"{DEFAULT_PREFIX}/org-sales-bot" and res.status == "committed"


def test_fsspec_urls(base, reg, tmp_path):
    folder = save_peft_folder(base, tmp_path / "src", 3)
    mem = fsspec.filesystem("memory")
    for f in folder.iterdir():
        mem.pipe(f"/bucket/adapters/remote/{f.name}", f.read_bytes())
    [res] = import_adapters(reg, base, ["memory://bucket/adapters"], as_ref="acme/mem", alias="live")
    assert res.source == "memory://bucket/adapters/remote" and res.ref == "acme/mem/remote"
    assert reg.resolve("acme/mem/remote").provenance.hyperparams["source"] == "memory://bucket/adapters/remote"
    [res] = import_adapters(reg, base, [f"file://{folder}"], as_ref="acme/file/x")
    assert res.status == "committed" and res.digest == reg.resolve("acme/mem/remote").digest
    mem.rm("/bucket", recursive=True)


def test_naming_and_finding_errors_commit_nothing(base, reg, tmp_path):
    save_peft_folder(base, tmp_path / "many" / "x", 1)
    save_peft_folder(base, tmp_path / "many" / "X ", 2)
    with pytest.raises(InvalidNameError, match="would both import as acme/u/x"):
        import_adapters(reg, base, [str(tmp_path / "many")], as_ref="acme/u")
    with pytest.raises(InvalidNameError, match="names one adapter, but 2 were found"):
        import_adapters(reg, base, [str(tmp_path / "many")], as_ref="acme/u/a")
    with pytest.raises(AdapterError, match="does not exist"):
        import_adapters(reg, base, [str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no PEFT adapter"):
        import_adapters(reg, base, [str(tmp_path / "empty")], recursive=True)
    save_peft_folder(base, tmp_path / "wrongbase", 1, targets=("q_proj",))
    cfg = tmp_path / "wrongbase" / "adapter_model.safetensors"
    tensors = {k: torch.zeros(v.shape[0], v.shape[1] + 1) if "lora_A" in k else v for k, v in load_file(cfg).items()}
    save_file(tensors, cfg)
    [res] = import_adapters(reg, base, [str(tmp_path / "wrongbase")], as_ref="acme/u/w")
    assert res.status == "failed" and "do not fit base" in res.error
    assert reg.list_adapters()[0] == []


@pytest.mark.parametrize(("text", "name"), [("My LoRA_v2", "my-lora_v2"), ("--x--", "x"), ("Ünïcode!", "n-code"),
                                            ("...", "adapter"), ("a" * 80, "a" * 63)])
def test_derive_name(text, name):
    assert derive_name(text) == name


def test_import_from_s3(base, reg, tmp_path, s3_env):
    """An s3:// URL (moto's S3 on loopback, endpoint from $LORAFLEET_S3_ENDPOINT like the blob store's)."""
    import s3fs

    folder = save_peft_folder(base, tmp_path / "src", 5)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env}, skip_instance_cache=True)
    fs.mkdir("adapters-in")
    for f in folder.iterdir():
        fs.pipe_file(f"adapters-in/team/alice/{f.name}", f.read_bytes())
    results = import_adapters(reg, base, ["s3://adapters-in/team"], as_ref="acme/s3")
    assert [(r.ref, r.status, r.ignored) for r in results] == [("acme/s3/alice", "committed", ["README.md"])]
    assert reg.resolve("acme/s3/alice@candidate").provenance.hyperparams["source"] == "s3://adapters-in/team/alice"
