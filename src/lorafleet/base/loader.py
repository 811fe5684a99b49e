"""Load the shared base: a causal LM (float32, or the precision asked: see ``base/precision.py``) + tokenizer with its chat template, and a fingerprint.

The fingerprint is sha256 over the weight file(s) and the architecture part of the config; an adapter
made for one base is refused on another. GGUF bases are dequantized once and cached as safetensors
under ``<data_dir>/bases/<source digest>/``; a later load verifies the cache against its manifest
(weights digest and fingerprint) and rebuilds it if anything does not match.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lorafleet.base.precision import QuantLinear, apply_precision, logical_numel, resolve_precision
from lorafleet.base.sources import BaseSource, resolve_source
from lorafleet.base.tiny import tiny_model
from lorafleet.config import data_dir

log = logging.getLogger(__name__)

# Architecture fields that define the shape of the base; other config fields (library version, defaults
# that move between transformers releases) must not change the fingerprint.
ARCH_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def arch_of(config) -> dict:
    return {k: getattr(config, k, None) for k in ARCH_FIELDS}


def fingerprint_of(weight_digests: list[str], config) -> str:
    """sha256 over the weights' digests (in order) and the canonical architecture JSON."""
    h = hashlib.sha256()
    for digest in weight_digests:
        h.update(digest.encode() + b"\0")
    h.update(json.dumps(arch_of(config), sort_keys=True).encode())
    return h.hexdigest()


def state_dict_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode() + b"\0")
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class BaseModel:
    """The resident shared base. ``model`` is a transformers causal LM in eval mode, frozen."""

    name: str
    source: BaseSource
    model: nn.Module
    tokenizer: object
    fingerprint: str
    load_seconds: float
    from_cache: bool
    extra: dict = field(default_factory=dict)
    precision: str = "auto"  # as asked (see lorafleet.base.precision); part of the serving configuration
    precision_info: dict = field(default_factory=dict)  # what apply_precision did (effective precision, modules)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_parameters(self) -> int:
        # Tied embeddings share storage; count each tensor once. Quantized modules count their logical weights.
        return logical_numel(self.model)

    @property
    def precision_label(self) -> str:
        """``native``, ``int8``, … or ``native (fp32)`` where the asked precision means another one for this base."""
        effective = self.precision_info.get("effective", self.precision)
        return self.precision if effective == self.precision else f"{self.precision} ({effective})"

    def linear_modules(self) -> dict[str, nn.Linear]:
        """Targetable linear layers inside the transformer blocks, by full module name."""
        out = {}
        for name, module in self.model.named_modules():
            if ".layers." not in name or name.endswith(".base"):
                continue  # ".base" is the inner linear of a LoRA wrapper, reported under the wrapper's name
            linear = getattr(module, "base", module)
            if isinstance(linear, (nn.Linear, QuantLinear)):
                out[name] = linear
        return out

    def info(self) -> dict:
        cfg = self.config
        return {
            "name": self.name,
            "kind": self.source.kind,
            "path": str(self.source.path) if self.source.path else None,
            "parameters": self.num_parameters,
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "attention_heads": cfg.num_attention_heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
            "vocab_size": cfg.vocab_size,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": str(self.device),
            "precision": self.precision_label,
            "precision_modules": dict(self.precision_info.get("modules", {})),
            "weight_bytes": self.precision_info.get("weight_bytes"),
            "fingerprint": self.fingerprint,
            "load_seconds": round(self.load_seconds, 3),
            "from_cache": self.from_cache,
        }


def _freeze(model: nn.Module, device: str | torch.device) -> nn.Module:
    model = model.to(device=device, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_tiny(source: BaseSource) -> tuple[nn.Module, object, str]:
    model, tokenizer = tiny_model(source.seed)
    return model, tokenizer, fingerprint_of([state_dict_digest(model)], model.config)


def _load_hf_dir(path: Path) -> tuple[nn.Module, object, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - heavy import

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    digests = [sha256_file(p) for p in sorted(path.glob("*.safetensors"))]
    return model, tokenizer, fingerprint_of(digests, model.config)


def _load_gguf(source: BaseSource, use_cache: bool) -> tuple[nn.Module, object, str, bool]:
    """Dequantize a GGUF once; later loads read the verified safetensors cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - heavy import

    gguf_digest = sha256_file(source.path)
    cache = data_dir() / "bases" / gguf_digest[:32]
    manifest_path = cache / "lorafleet-manifest.json"
    if use_cache and manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            weights = cache / "model.safetensors"
            if sha256_file(weights) != manifest["weights_sha256"]:
                raise ValueError("cached weights do not match their manifest digest")
            model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(cache)
            fingerprint = fingerprint_of([gguf_digest], model.config)
            if fingerprint != manifest["fingerprint"]:
                raise ValueError("cached base fingerprint does not match the GGUF")
            return model, tokenizer, fingerprint, True
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("base cache at %s is unusable (%s); rebuilding it from the GGUF", cache, exc)
            shutil.rmtree(cache, ignore_errors=True)

    directory, filename = source.path.parent, source.path.name
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    # The GGUF quantization note would make from_pretrained of the cache look for a GGUF again.
    # It is dequantized to float32 already; drop the quantizer so the cache saves as plain weights.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    fingerprint = fingerprint_of([gguf_digest], model.config)
    if use_cache:
        _write_cache(cache, model, tokenizer, fingerprint, source)
    return model, tokenizer, fingerprint, False


def _write_cache(cache: Path, model, tokenizer, fingerprint: str, source: BaseSource) -> None:
    """Write into a temp dir beside the cache and rename: a crash never leaves a half cache."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        weights = tmp / "model.safetensors"
        manifest = {"fingerprint": fingerprint, "weights_sha256": sha256_file(weights), "source": str(source.path)}
        (tmp / "lorafleet-manifest.json").write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, cache) if not cache.exists() else shutil.rmtree(tmp)
    except OSError as exc:
        log.warning("could not write the base cache (%s); continuing without it", exc)
        shutil.rmtree(tmp, ignore_errors=True)


# Gemma 3's turn format (as in Google's template; a system message opens the first user turn). The packaged
# Gemma-3-270M GGUF is the *pretrained* model and carries no chat template, so chat data could not be rendered.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ (first_user_prefix if loop.first else '') + (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _ensure_chat_template(model: nn.Module, tokenizer) -> None:
    """A Gemma 3 base without a chat template gets Gemma's turn format, and ``<end_of_turn>`` ends generation."""
    if getattr(tokenizer, "chat_template", None) or not str(model.config.model_type).startswith("gemma3"):
        return
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if end_of_turn is None or end_of_turn == tokenizer.unk_token_id:
        return  # not Gemma's vocabulary: leave it (rendering chat data will say there is no template)
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    gen = model.generation_config
    if gen is not None:
        eos = gen.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        gen.eos_token_id = [*eos, end_of_turn] if end_of_turn not in eos else eos


def _detach_from_file(model: nn.Module) -> None:
    """Give the tensors a low-precision base still holds in float (norms, rotary buffers) their own memory.

    The fp32 weights are read as one memory map of the safetensors file, each tensor a view into it: while any
    of them (a 576-float norm) stays, the whole mapping stays and every page the quantization read stays resident
    (SmolLM2 native: +513 MB RSS). Copies of the few float tensors left release the file. Shared tensors stay
    shared (one copy per storage)."""
    copies: dict[int, Tensor] = {}

    def own(t: Tensor) -> Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in copies:
            copies[key] = t.detach().clone()
        return copies[key]

    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                p.data = own(p.data)  # the same Parameter object (ties by object stay tied), its own storage
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = own(b)


def _return_freed_memory() -> None:
    """Hand the heap the load freed (the fp32 weights' transient copies) back to the OS: glibc keeps freed chunks
    below its mmap threshold in the process (~200 MB after a native SmolLM2 load). Best effort; other libcs skip."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
HEAP_MMAP_THRESHOLD = 4 << 20  # bytes


def bound_heap_retention(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own mapping, returned on free.

    By default glibc raises that threshold as large blocks are freed (up to 32 MB), so a training step's tensors
    come from the heap and, freed, stay in the process: a packed 8-user SmolLM2 step held 1.6 GB of free heap
    (peak RSS 2.9 GB for 0.55 GB live). A fixed 4 MB threshold gave 1.46 GB at no measured cost in step time
    (docs/results/training.md). Process-wide; True if applied, False where the C library is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def load_base(name_or_path: str | None = None, *, device: str | torch.device = "cpu", use_cache: bool = True,
              precision: str | None = None) -> BaseModel:
    """Load a base by name or path (see :func:`resolve_source`), frozen, in eval mode.

    ``precision`` (default ``$LORAFLEET_BASE_DTYPE``, else ``auto``: native where the base can run it, else fp32): one of
    :data:`lorafleet.base.precision.PRECISIONS`; an unknown one or one this base cannot take raises
    :class:`lorafleet.base.precision.BasePrecisionError` before anything loads (or, for a damaged GGUF, before the
    model is returned). The fingerprint is the shipped weights' whatever the precision.
    """
    start = time.perf_counter()
    precision = resolve_precision(precision)
    source = resolve_source(name_or_path)
    from_cache = False
    if source.kind == "tiny":
        model, tokenizer, fingerprint = _load_tiny(source)
    elif source.kind == "hf":
        model, tokenizer, fingerprint = _load_hf_dir(source.path)
    else:
        model, tokenizer, fingerprint, from_cache = _load_gguf(source, use_cache)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _ensure_chat_template(model, tokenizer)
    model = _freeze(model, device)
    precision_info = apply_precision(model, precision, source_kind=source.kind, source_path=source.path, device=device)
    if precision_info["effective"] != "fp32":  # the fp32 weights were replaced: let go of what held them
        _detach_from_file(model)
        gc.collect()
        _return_freed_memory()
    return BaseModel(
        precision=precision,
        precision_info=precision_info,
        name=source.name,
        source=source,
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint,
        load_seconds=time.perf_counter() - start,
        from_cache=from_cache,
    )
