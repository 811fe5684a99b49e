"""Export a revision to a folder: PEFT (``peft``, vLLM, this project) or a llama.cpp GGUF LoRA file.

The revision is loaded for the resident base (a revision made for another base is refused), decoded like any
blob (quantized codecs dequantized, tiny formats expanded to their equivalent LoRA) and written. A folder that
exists and is not empty is never written into without ``force``.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InvalidArgumentError

FORMATS = ("peft", "gguf")


def check_target(directory: str | Path, *, force: bool = False) -> Path:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InvalidArgumentError(f"{directory} is a file; export writes a folder")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise InvalidArgumentError(f"{directory} is not empty; pass --force to write into it")
    return directory


def export_revision(registry, base, address: str, directory: str | Path, *, fmt: str = "peft",
                    force: bool = False) -> dict:
    """Write ``address`` (``t/u/a``, ``@alias`` or ``#N``) into ``directory``; returns what was written."""
    from lorafleet.adapters import from_bytes, save_peft  # noqa: PLC0415 - defers torch
    from lorafleet.adapters.gguf_io import GGUF_FILE, save_gguf_lora  # noqa: PLC0415 - defers torch

    if fmt not in FORMATS:
        raise InvalidArgumentError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    directory = check_target(directory, force=force)
    rev, data = registry.load(address, base_fingerprint=base.fingerprint)
    adapter = from_bytes(data, base)
    adapter.base_name = base.name
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "peft":
        save_peft(adapter, directory)
        files = ["adapter_config.json", "adapter_model.safetensors"]
    else:
        save_gguf_lora(adapter, directory / GGUF_FILE, base.config, name=rev.address)
        files = [GGUF_FILE]
    return {"address": rev.address, "digest": rev.digest, "format": fmt, "directory": str(directory),
            "files": files, "rank": adapter.spec.rank, "alpha": adapter.spec.alpha, "modules": len(adapter.weights)}
