"""Adapters on disk in the Hugging Face PEFT format, and their canonical bytes (the registry's blobs).

A PEFT directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``. It loads in ``peft``, in vLLM and here.

Untrusted input stops here: safetensors only (pickle files are refused, never opened), a size limit,
header and shape checks, finite values, only LoRA features we implement. Nothing is returned half-read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lorafleet.adapters.errors import AdapterError
from lorafleet.adapters.spec import LoraSpec
from lorafleet.adapters.weights import LoraAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PEFT_PREFIX = "base_model.model."
MAX_ADAPTER_BYTES = 512 * 1024 * 1024  # refuse larger files before reading them
META_KEY = "lorafleet.adapter_config"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# PEFT config fields that change the math; we refuse any we do not implement rather than serve wrong outputs.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "use_rslora": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, [], ()),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "layers_to_transform": (None,),
    "bias": ("none", None),
}


def peft_config(adapter: LoraAdapter) -> dict:
    """The adapter_config.json that ``peft`` reads for this adapter."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_name,
        "r": adapter.spec.rank,
        "lora_alpha": adapter.spec.alpha,
        "lora_dropout": adapter.spec.dropout,
        "target_modules": list(adapter.spec.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def spec_from_config(config: dict) -> LoraSpec:
    """Parse a PEFT adapter_config dict into a :class:`LoraSpec`, refusing what we do not implement."""
    if not isinstance(config, dict):
        raise AdapterError("adapter_config.json must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {config.get('peft_type')!r} is not supported; only LORA adapters load here")
    for key, allowed in _UNSUPPORTED.items():
        if key in config and config[key] not in allowed:
            raise AdapterError(f"adapter_config.json: {key}={config[key]!r} is not supported (expected {allowed[0]!r})")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError("adapter_config.json: target_modules as a regex string is not supported; list the module names")
    if not targets:
        raise AdapterError("adapter_config.json: target_modules is missing or empty")
    rank = config.get("r")
    return LoraSpec(
        rank=rank,
        alpha=config.get("lora_alpha", 8),
        dropout=config.get("lora_dropout", 0.0),
        target_modules=tuple(targets),
    )


def _tensors_to_weights(tensors: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, tuple]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise AdapterError(
                f"unexpected tensor {key!r}: only LoRA A/B weights named '{PEFT_PREFIX}<module>.lora_A.weight' "
                "are supported (DoRA magnitudes, biases, embeddings and modules_to_save are not)"
            )
        module, _, part = key[len(PEFT_PREFIX):].rpartition(".lora_")
        if tensor.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"tensor {key!r} has dtype {tensor.dtype}; expected float32, float16 or bfloat16")
        if tensor.dim() != 2:
            raise AdapterError(f"tensor {key!r} has shape {tuple(tensor.shape)}; LoRA weights are 2-D")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"tensor {key!r} contains NaN or Inf values")
        pairs.setdefault(module, {})[part[0]] = tensor
    if not pairs:
        raise AdapterError("the adapter contains no tensors")
    weights = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"module {module!r} has only lora_{''.join(ab)}; both lora_A and lora_B are needed")
        A, B = ab["A"], ab["B"]
        if A.shape[0] != spec.rank or B.shape[1] != spec.rank or A.shape[0] != B.shape[1]:
            raise AdapterError(
                f"module {module!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not match rank r={spec.rank}"
            )
        weights[module] = (A, B)
    return weights


def _weights_to_tensors(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for module, (A, B) in adapter.weights.items():
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.detach().contiguous().cpu()
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.detach().contiguous().cpu()
    return out


def peft_weights_bytes(adapter: LoraAdapter) -> bytes:
    """The ``adapter_model.safetensors`` file of the PEFT format, as bytes."""
    return st_save(_weights_to_tensors(adapter), metadata={"format": "pt"})


def save_peft(adapter: LoraAdapter, directory: str | Path) -> Path:
    """Write the adapter as a PEFT directory; files are written to temp names and renamed (no torn files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        WEIGHTS_FILE: peft_weights_bytes(adapter),
        CONFIG_FILE: (json.dumps(peft_config(adapter), indent=2, sort_keys=True) + "\n").encode(),
    }
    for name, data in payload.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    return directory


def load_peft(directory: str | Path, base=None, *, max_bytes: int = MAX_ADAPTER_BYTES) -> LoraAdapter:
    """Read and validate a PEFT adapter directory; with ``base``, also check that it fits that base."""
    directory = Path(directory)
    if not directory.exists():
        raise AdapterError(f"adapter directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise AdapterError(f"{str(directory)!r} is not a directory; an adapter is a PEFT directory")
    weights_path, config_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterError(
                f"{directory} holds pickle weights ({', '.join(pickles)}), which are never loaded (unsafe); "
                f"convert them to {WEIGHTS_FILE}"
            )
        raise AdapterError(f"{directory} has no {WEIGHTS_FILE} (missing file)")
    if not config_path.is_file():
        raise AdapterError(f"{directory} has no {CONFIG_FILE} (missing file)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_path} is not valid JSON: {exc}") from exc
    spec = spec_from_config(config)
    size = weights_path.stat().st_size
    if size > max_bytes:
        raise AdapterError(f"{weights_path} is {size} bytes, over the limit of {max_bytes}")
    tensors = _read_safetensors(weights_path.read_bytes(), str(weights_path))
    adapter = LoraAdapter(spec=spec, weights=_tensors_to_weights(tensors, spec),
                          base_name=config.get("base_model_name_or_path"))
    if base is not None:
        adapter.check_fits(base)
    return adapter


def _read_safetensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    if len(data) < 8 or data[8:9] != b"{":
        raise AdapterError(f"{what} is not a safetensors file (bad header)")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{what} is truncated or malformed safetensors: {exc}") from exc


def canonical_config(spec: LoraSpec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))


def to_bytes(adapter: LoraAdapter) -> bytes:
    """Canonical bytes: one safetensors file, tensors by name, the spec as canonical JSON metadata.

    The same weights and spec always give the same bytes, hence the same sha256 digest.
    """
    return st_save(_weights_to_tensors(adapter), metadata={META_KEY: canonical_config(adapter.spec)})


def from_bytes(data: bytes, base=None, *, max_bytes: int = MAX_ADAPTER_BYTES) -> LoraAdapter:
    """Parse canonical bytes (validated like a PEFT directory)."""
    if len(data) > max_bytes:
        raise AdapterError(f"adapter blob is {len(data)} bytes, over the limit of {max_bytes}")
    tensors = _read_safetensors(data, "adapter blob")
    raw = _metadata(data).get(META_KEY)
    if raw is None:
        raise AdapterError(f"adapter blob has no {META_KEY!r} metadata; it was not written by lorafleet")
    try:
        cfg = json.loads(raw)
        spec = LoraSpec(rank=cfg["rank"], alpha=cfg["alpha"], dropout=cfg["dropout"],
                        target_modules=tuple(cfg["target_modules"]))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AdapterError(f"adapter blob metadata is malformed: {exc}") from exc
    adapter = LoraAdapter(spec=spec, weights=_tensors_to_weights(tensors, spec))
    if base is not None:
        adapter.check_fits(base)
    return adapter


def _metadata(data: bytes) -> dict:
    """The ``__metadata__`` map of safetensors bytes already parsed (so the header is known sane)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}
