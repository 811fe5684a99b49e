"""Adapters on disk in the Hugging Face PEFT format, and their canonical bytes (the registry's blobs).

A PEFT directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``. It loads in ``peft``, in vLLM and here.

Untrusted input stops here: safetensors only (pickle files are refused, never opened), a size limit,
header and shape checks, finite values, only LoRA features we implement. Nothing is returned half-read.
"""

from __future__ import annotations

import json
import os
import reprlib
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lorafleet.adapters import codecs
from lorafleet.adapters.errors import AdapterError
from lorafleet.adapters.spec import LoraSpec
from lorafleet.adapters.vera import FORMAT as VERA_FORMAT
from lorafleet.adapters.vera import VeraAdapter, VeraSpec, as_lora
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
        raise AdapterError(f"peft_type {reprlib.repr(config.get('peft_type'))} is not supported; only LORA adapters "
                           "load here")
    for key, allowed in _UNSUPPORTED.items():
        if key in config and config[key] not in allowed:
            raise AdapterError(f"adapter_config.json: {key}={reprlib.repr(config[key])} is not supported (expected "
                               f"{allowed[0]!r})")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError("adapter_config.json: target_modules as a regex string is not supported; list the module names")
    if not targets:
        raise AdapterError("adapter_config.json: target_modules is missing or empty")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"adapter_config.json: target_modules must be a list of module names (strings), got "
                           f"{reprlib.repr(targets)}")
    name = config.get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        raise AdapterError(f"adapter_config.json: base_model_name_or_path must be a string, got {reprlib.repr(name)}")
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


def peft_weights_bytes(adapter: LoraAdapter | VeraAdapter) -> bytes:
    """The ``adapter_model.safetensors`` file of the PEFT format, as bytes."""
    tensors = _vera_tensors(adapter) if isinstance(adapter, VeraAdapter) else _weights_to_tensors(adapter)
    return st_save(tensors, metadata={"format": "pt"})


def peft_vera_config(adapter: VeraAdapter) -> dict:
    """The adapter_config.json ``peft`` reads for a VeRA adapter (projections regenerated from the key)."""
    return {
        "peft_type": "VERA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_name,
        "r": adapter.spec.rank,
        "target_modules": list(adapter.spec.target_modules),
        "projection_prng_key": adapter.spec.projection_seed,
        "save_projection": False,
        "vera_dropout": adapter.spec.dropout,
        "d_initial": adapter.spec.d_initial,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_peft(adapter: LoraAdapter | VeraAdapter, directory: str | Path) -> Path:
    """Write the adapter as a PEFT directory; files are written to temp names and renamed (no torn files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        WEIGHTS_FILE: peft_weights_bytes(adapter),
        CONFIG_FILE: (json.dumps(peft_vera_config(adapter) if isinstance(adapter, VeraAdapter) else peft_config(adapter),
                                 indent=2, sort_keys=True) + "\n").encode(),
    }
    for name, data in payload.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    return directory


def peft_folder_files(names, where: str) -> list[str]:
    """Check the file names of a PEFT folder (as ``peft.save_pretrained`` writes it); return those ignored.

    ``adapter_config.json`` and ``adapter_model.safetensors`` are read; everything else (``README.md``,
    ``training_args.bin``, tokenizer files, sub-folders) is ignored and never opened — the caller lists it.
    Pickle weights without a safetensors file are refused by name (never unpickled).
    """
    names = set(names)
    if WEIGHTS_FILE not in names:
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise AdapterError(
                f"{where} holds pickle weights ({', '.join(pickles)}), which are never loaded (unsafe); "
                f"convert them to {WEIGHTS_FILE}"
            )
        raise AdapterError(f"{where} has no {WEIGHTS_FILE} (missing file)")
    if CONFIG_FILE not in names:
        raise AdapterError(f"{where} has no {CONFIG_FILE} (missing file)")
    return sorted(names - {CONFIG_FILE, WEIGHTS_FILE})


def parse_peft(config_bytes: bytes, weights_bytes: bytes, base=None, *, max_bytes: int = MAX_ADAPTER_BYTES,
               where: str = "the adapter") -> LoraAdapter:
    """Validate a PEFT adapter given its two files' bytes; with ``base``, also check that it fits that base.

    The one validation every way in shares: a directory (:func:`load_peft`), an HTTP upload, an import
    from any fsspec URL (:mod:`lorafleet.registry.imports`).
    """
    try:
        config = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{where}/{CONFIG_FILE} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise AdapterError(f"{where}/{CONFIG_FILE} is nested too deeply to be an adapter config") from None
    spec = spec_from_config(config)
    if len(weights_bytes) > max_bytes:
        raise AdapterError(f"{where}/{WEIGHTS_FILE} is {len(weights_bytes)} bytes, over the limit of {max_bytes}")
    tensors = _read_safetensors(weights_bytes, f"{where}/{WEIGHTS_FILE}")
    adapter = LoraAdapter(spec=spec, weights=_tensors_to_weights(tensors, spec),
                          base_name=config.get("base_model_name_or_path"))
    if base is not None:
        adapter.check_fits(base)
    return adapter


def load_peft(directory: str | Path, base=None, *, max_bytes: int = MAX_ADAPTER_BYTES) -> LoraAdapter:
    """Read and validate a PEFT adapter directory; with ``base``, also check that it fits that base.

    Files other than the config and the weights are ignored; their names are in ``adapter.meta["ignored"]``.
    """
    directory = Path(directory)
    if not directory.exists():
        raise AdapterError(f"adapter directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise AdapterError(f"{str(directory)!r} is not a directory; an adapter is a PEFT directory")
    ignored = peft_folder_files((p.name for p in directory.iterdir()), str(directory))
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(f"{weights_path} is not a file")
    size = weights_path.stat().st_size
    if size > max_bytes:
        raise AdapterError(f"{weights_path} is {size} bytes, over the limit of {max_bytes}")
    adapter = parse_peft((directory / CONFIG_FILE).read_bytes(), weights_path.read_bytes(), base,
                         max_bytes=max_bytes, where=str(directory))
    adapter.meta["ignored"] = ignored
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


def _vera_tensors(adapter: VeraAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for module, (d, b) in adapter.weights.items():
        out[f"{PEFT_PREFIX}{module}.vera_lambda_d"] = d.detach().contiguous().cpu()
        out[f"{PEFT_PREFIX}{module}.vera_lambda_b"] = b.detach().contiguous().cpu()
    return out


def to_bytes(adapter: LoraAdapter | VeraAdapter, codec: str | None = None, *, group: int = codecs.DEFAULT_Q4_GROUP) -> bytes:
    """Canonical bytes: one safetensors file, tensors by name, the spec as canonical JSON metadata.

    The same weights, spec and codec always give the same bytes, hence the same sha256 digest. ``codec``
    (``fp32``/``fp16``/``int8``/``q4``, see :mod:`lorafleet.adapters.codecs`) is recorded in the metadata;
    ``None`` writes the tensors as they are with no codec entry (the format of blobs written before codecs).
    """
    if isinstance(adapter, VeraAdapter):
        adapter.check_shapes()
        tensors = _vera_tensors(adapter)
        config = {**adapter.spec.to_dict(), "dims": {k: list(v) for k, v in sorted(adapter.dims.items())}}
    else:
        tensors = _weights_to_tensors(adapter)
        config = adapter.spec.to_dict()
    if codec is not None:
        tensors, config[codecs.STORAGE_KEY] = codecs.encode(tensors, codec, group)
    # One metadata key: safetensors writes the metadata map in hash order (two keys = two possible byte strings).
    return st_save(tensors, metadata={META_KEY: json.dumps(config, sort_keys=True, separators=(",", ":"))})


def _vera_from(tensors: dict[str, torch.Tensor], cfg: dict) -> VeraAdapter:
    try:
        spec = VeraSpec(rank=cfg["rank"], target_modules=tuple(cfg["target_modules"]),
                        projection_seed=cfg["projection_seed"], d_initial=cfg["d_initial"], dropout=cfg["dropout"])
        dims = {str(k): (int(v[0]), int(v[1])) for k, v in cfg["dims"].items()}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise AdapterError(f"VeRA adapter blob metadata is malformed: {exc!r}") from exc
    if any(i < 1 or o < 1 for i, o in dims.values()):
        raise AdapterError("VeRA adapter blob metadata: dims must be positive")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".vera_lambda_d", ".vera_lambda_b")):
            raise AdapterError(f"unexpected tensor {key!r} in a VeRA blob: only '<module>.vera_lambda_d/b' are stored")
        if tensor.dtype not in FLOAT_DTYPES or tensor.dim() != 1:
            raise AdapterError(f"VeRA tensor {key!r}: expected a 1-D float vector, got {tensor.dtype} {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"tensor {key!r} contains NaN or Inf values")
        module, _, part = key[len(PEFT_PREFIX):].rpartition(".vera_lambda_")
        pairs.setdefault(module, {})[part] = tensor.float()
    if not pairs:
        raise AdapterError("the adapter contains no tensors")
    weights = {}
    for module, db in sorted(pairs.items()):
        if set(db) != {"d", "b"}:
            raise AdapterError(f"VeRA module {module!r} needs both vera_lambda_d and vera_lambda_b")
        weights[module] = (db["d"], db["b"])
    adapter = VeraAdapter(spec=spec, weights=weights, dims=dims)
    adapter.check_shapes()
    return adapter


def decode_blob(data: bytes, base=None, *, max_bytes: int = MAX_ADAPTER_BYTES) -> LoraAdapter | VeraAdapter:
    """Parse canonical bytes into the *stored* format (LoRA or VeRA), dequantized and validated."""
    if len(data) > max_bytes:
        raise AdapterError(f"adapter blob is {len(data)} bytes, over the limit of {max_bytes}")
    tensors = _read_safetensors(data, "adapter blob")
    metadata = _metadata(data)
    raw = metadata.get(META_KEY)
    if raw is None:
        raise AdapterError(f"adapter blob has no {META_KEY!r} metadata; it was not written by lorafleet")
    try:
        cfg = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise AdapterError(f"adapter blob metadata is malformed: {exc}") from exc
    except RecursionError:
        raise AdapterError("adapter blob metadata is malformed: nested too deeply") from None
    if not isinstance(cfg, dict):
        raise AdapterError("adapter blob metadata is malformed: the adapter config is not a JSON object")
    codec_meta = codecs.parse_metadata(cfg.pop(codecs.STORAGE_KEY, None))
    if codec_meta["codec"] is not None:
        tensors = codecs.decode(tensors, codec_meta)
    try:
        if cfg.get("format", "lora") == VERA_FORMAT:
            adapter = _vera_from(tensors, cfg)
        else:
            spec = LoraSpec(rank=cfg["rank"], alpha=cfg["alpha"], dropout=cfg["dropout"],
                            target_modules=tuple(cfg["target_modules"]))
            adapter = LoraAdapter(spec=spec, weights=_tensors_to_weights(tensors, spec))
    except (KeyError, TypeError) as exc:
        raise AdapterError(f"adapter blob metadata is malformed: {exc}") from exc
    adapter.meta = {"codec": codec_meta["codec"] or "none", "stored_bytes": len(data)}
    if base is not None:
        adapter.check_fits(base)
    return adapter


def from_bytes(data: bytes, base=None, *, max_bytes: int = MAX_ADAPTER_BYTES) -> LoraAdapter:
    """Parse canonical bytes (validated like a PEFT directory) into the LoRA adapter the operator serves:
    quantized blobs are dequantized, tiny formats (VeRA) expanded to their equivalent LoRA."""
    return as_lora(decode_blob(data, base, max_bytes=max_bytes))


def _metadata(data: bytes) -> dict:
    """The ``__metadata__`` map of safetensors bytes already parsed (so the header is known sane)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}
