"""A LoRA adapter as a llama.cpp GGUF LoRA file (``llama-server --lora FILE``), written with the ``gguf`` library.

The layout is the one llama.cpp's ``convert_lora_to_gguf.py`` writes: ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, and per target module two tensors named after the base GGUF's
weight, ``blk.N.attn_q.weight.lora_a`` (``A``, torch shape ``(r, in)``) and ``.lora_b`` (``B``, ``(out, r)``);
llama.cpp scales by ``alpha / r`` like PEFT.

Llama-family GGUF bases store ``attn_q`` / ``attn_k`` with their rows permuted for llama.cpp's RoPE
(``LlamaModel.permute`` in the converter); the delta must be permuted the same way, which for a LoRA is a
permutation of ``B``'s rows. Gemma 3 weights are not permuted.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from lorafleet.adapters.errors import AdapterError
from lorafleet.adapters.weights import LoraAdapter

GGUF_FILE = "adapter_model.gguf"
# HF projection -> GGUF tensor (gguf.constants.TENSOR_NAMES for the llama / gemma3 architectures)
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
ARCHS = {"llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}  # HF model_type -> GGUF architecture
PERMUTED = {"llama"}  # architectures whose q/k rows llama.cpp's converter permutes
_MODULE = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$")


def permute_rows(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` along dim 0 (``n_head`` = the heads of that projection)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensors(adapter: LoraAdapter, config) -> dict[str, torch.Tensor]:
    """``name -> float32 tensor`` of the GGUF LoRA file for a base with HF ``config``."""
    arch = ARCHS.get(getattr(config, "model_type", None))
    if arch is None:
        raise AdapterError(f"GGUF export supports the llama and gemma3 architectures, not {config.model_type!r}")
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    out = {}
    for module, (A, B) in sorted(adapter.weights.items()):
        m = _MODULE.match(module)
        if m is None:
            raise AdapterError(f"module {module!r} has no GGUF tensor name (expected model.layers.N.<projection>)")
        name = f"blk.{m.group(1)}.{GGUF_NAMES[m.group(2)]}.weight"
        B = B.detach().float().cpu()
        if arch in PERMUTED and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj"):
            B = permute_rows(B, n_head if m.group(2) == "self_attn.q_proj" else n_kv)
        out[f"{name}.lora_a"] = A.detach().float().cpu().contiguous()
        out[f"{name}.lora_b"] = B.contiguous()
    return out


def save_gguf_lora(adapter: LoraAdapter, path: str | Path, config, *, name: str = "lorafleet adapter") -> Path:
    """Write ``adapter`` as a GGUF LoRA file at ``path`` (written to a temp name, then renamed)."""
    import gguf  # noqa: PLC0415

    path = Path(path)
    arch = ARCHS.get(getattr(config, "model_type", None))
    tensors = gguf_tensors(adapter, config)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.spec.alpha))
    writer.add_name(name)
    for key, tensor in tensors.items():
        writer.add_tensor(key, tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def read_gguf_lora(path: str | Path) -> dict:
    """Read a GGUF LoRA file back (``gguf.GGUFReader``): its metadata and ``name -> tensor`` (torch layout)."""
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(path))

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    tensors = {t.name: torch.from_numpy(np.array(t.data)).reshape(tuple(int(d) for d in reversed(t.shape)))
               for t in reader.tensors}
    return {"architecture": field("general.architecture"), "type": field("general.type"),
            "adapter_type": field("adapter.type"), "alpha": field("adapter.lora.alpha"), "tensors": tensors}
