r"""Storage codecs for adapter weights: how an adapter's tensors are written into a blob, and read back.

An adapter blob is one safetensors file. Without a codec (the format of every blob written before codecs
existed) each tensor is stored under its PEFT name. With a codec, all tensors are *packed*: concatenated in
name order into one stream (plus one stream of scales), and a ``"storage"`` entry of the blob's adapter-config
metadata records the codec and the layout (names and shapes, zlib-compressed JSON, base64). One metadata key,
not two: safetensors writes its metadata map in hash order, and the same adapter must give the same bytes. Packing matters for tiny adapters: 240 named
tensors cost ~25 KB of safetensors header, more than a 4-bit VeRA adapter's numbers.

Codecs only change *storage*: on load every tensor is dequantized to float32 and validated (finite, shapes)
like any other adapter, so serving and training never see a quantized tensor.

=========  ===========================================================  ====================================
codec      stored tensors                                               bytes per value (+ scales)
=========  ===========================================================  ====================================
``fp32``   ``values``: float32 stream                                   4
``fp16``   ``values``: float16 stream                                   2
``int8``   ``q``: int8 stream; ``scale``: float16 absmax / 127 per row   1 (+ 2 per row)
           along each tensor's *longer* axis (a rank-1 LoRA B is one
           row, not ``out`` rows; a vector is one row)
``q4``     ``q``: uint8, two signed 4-bit values per byte (low nibble    0.5 (+ 2 per group)
           first) over the stream in groups of ``group`` (32 or 64);
           ``scale``: float16 absmax / 7 per group
=========  ===========================================================  ====================================
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import reprlib
import zlib

import torch
from torch import Tensor

from lorafleet.adapters.errors import AdapterError

STORAGE_KEY = "storage"  # inside the blob's adapter-config JSON
CODECS = ("fp32", "fp16", "int8", "q4")
Q4_GROUPS = (32, 64)
DEFAULT_Q4_GROUP = 64
MAX_LAYOUT_BYTES = 4 * 1024 * 1024  # decompressed layout JSON; refuses zip bombs in metadata
STREAMS = {"fp32": {"values": torch.float32}, "fp16": {"values": torch.float16},
           "int8": {"q": torch.int8, "scale": torch.float16}, "q4": {"q": torch.uint8, "scale": torch.float16}}


def check_codec(codec: str, group: int = DEFAULT_Q4_GROUP) -> None:
    if codec not in CODECS:
        raise AdapterError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if codec == "q4" and group not in Q4_GROUPS:
        raise AdapterError(f"q4 group size must be one of {Q4_GROUPS}, got {group!r}")


def _rows(shape: tuple[int, ...]) -> tuple[int, bool]:
    """int8 rows of a tensor: ``(count, transposed)``; rows run along the longer axis."""
    if len(shape) == 1:
        return 1, False
    return (shape[0], False) if shape[1] >= shape[0] else (shape[1], True)


# ----------------------------------------------------------------------------------------------- encode

def _int8(t: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric absmax per row: ``t ≈ q * scale``; returns flat ``q: (numel,)`` (row-major ``t``), ``scale: (rows,)``."""
    _, transposed = _rows(tuple(t.shape))
    rows = (t.T if transposed else t).reshape(-1, t.shape[0] if transposed else t.shape[-1])  # (rows, len)
    scale = (rows.abs().amax(dim=1) / 127.0).clamp(min=1e-12).half()  # (rows,)
    q = torch.round(rows / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (rows, len)
    q = (q.T if transposed else q).reshape(-1)  # back to row-major t
    return q, scale


def _q4(stream: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Symmetric absmax per group: ``q4 in [-7, 7]`` stored +8, two per byte; ``(G, group / 2)``, ``(G,)``."""
    n_groups = math.ceil(stream.numel() / group)
    padded = torch.zeros(n_groups * group, dtype=torch.float32)
    padded[: stream.numel()] = stream
    g = padded.view(n_groups, group)  # (G, group)
    scale = (g.abs().amax(dim=1) / 7.0).clamp(min=1e-12).half()  # (G,)
    q = torch.round(g / scale.float()[:, None]).clamp(-7, 7).to(torch.int16) + 8  # (G, group) in 1..15
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8), scale


def encode(tensors: dict[str, Tensor], codec: str, group: int = DEFAULT_Q4_GROUP) -> tuple[dict[str, Tensor], dict]:
    """``name -> float tensor`` into the packed streams of ``codec`` and the blob's ``storage`` metadata."""
    check_codec(codec, group)
    names = sorted(tensors)
    flat = [tensors[n].detach().float().contiguous().cpu() for n in names]
    layout = [[n, list(t.shape)] for n, t in zip(names, flat, strict=True)]
    packed = base64.b64encode(zlib.compress(json.dumps(layout, separators=(",", ":")).encode(), 9)).decode()
    meta: dict = {"codec": codec, "layout": packed}
    stream = torch.cat([t.reshape(-1) for t in flat]) if flat else torch.zeros(0)
    if codec == "fp32":
        return {"values": stream}, meta
    if codec == "fp16":
        return {"values": stream.half()}, meta
    if codec == "int8":
        parts = [_int8(t) for t in flat]
        return {"q": torch.cat([q for q, _ in parts]), "scale": torch.cat([s for _, s in parts])}, meta
    q, scale = _q4(stream, group)
    meta["group"] = group
    return {"q": q, "scale": scale}, meta


# ----------------------------------------------------------------------------------------------- decode

def _layout(packed) -> list[tuple[str, tuple[int, ...]]]:
    try:
        raw = zlib.decompressobj().decompress(base64.b64decode(packed, validate=True), MAX_LAYOUT_BYTES)
        layout = json.loads(raw)
    except (TypeError, ValueError, binascii.Error, zlib.error, RecursionError) as exc:
        raise AdapterError(f"adapter blob codec layout is malformed: {exc}") from exc
    if not isinstance(layout, list) or not layout:
        raise AdapterError("adapter blob codec layout must list at least one tensor")
    out, seen = [], set()
    for entry in layout:
        ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)
              and 1 <= len(entry[1]) <= 2 and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 2**24
                                                  for d in entry[1]))
        if not ok:
            raise AdapterError(f"adapter blob codec layout entry {reprlib.repr(entry)} is not [name, 1-D or 2-D shape]")
        if entry[0] in seen:
            raise AdapterError(f"adapter blob codec layout names {entry[0]!r} twice")
        seen.add(entry[0])
        out.append((entry[0], tuple(entry[1])))
    return out


def parse_metadata(meta: object) -> dict:
    """The blob's ``storage`` metadata (absent = per-tensor layout, no codec); refused when malformed or unknown."""
    if meta is None:
        return {"codec": None}
    if not isinstance(meta, dict) or meta.get("codec") not in CODECS:
        shown = meta.get("codec") if isinstance(meta, dict) else meta
        raise AdapterError(f"adapter blob codec {shown!r} is unknown; known: {', '.join(CODECS)}")
    if meta["codec"] == "q4" and meta.get("group") not in Q4_GROUPS:
        raise AdapterError(f"q4 adapter blob: group must be one of {Q4_GROUPS}, got {meta.get('group')!r}")
    return {**meta, "layout": _layout(meta.get("layout"))}


def decode(stored: dict[str, Tensor], meta: dict) -> dict[str, Tensor]:
    """Packed streams back to ``name -> float32 tensor``; every size is checked before anything is sliced
    (finiteness is checked by the adapter parsers, as for any blob)."""
    codec, layout = meta["codec"], meta["layout"]
    want = STREAMS[codec]
    if set(stored) != set(want):
        raise AdapterError(f"{codec} adapter blob must hold exactly the tensors {sorted(want)}, got {sorted(stored)[:4]}")
    for key, dtype in want.items():
        if stored[key].dtype != dtype or stored[key].dim() not in (1, 2):
            raise AdapterError(f"{codec} adapter blob: {key!r} is {stored[key].dtype} {tuple(stored[key].shape)}, "
                               f"expected {dtype}")
    sizes = [math.prod(shape) for _, shape in layout]
    total = sum(sizes)
    if codec == "q4":
        group = meta["group"]
        n_groups = math.ceil(total / group)
        q, scale = stored["q"], stored["scale"]
        if tuple(q.shape) != (n_groups, group // 2) or tuple(scale.shape) != (n_groups,):
            raise AdapterError(f"q4 adapter blob: packed {tuple(q.shape)} / scales {tuple(scale.shape)} do not hold "
                               f"{total} values in groups of {group}")
        p = q.to(torch.int16)
        vals = torch.empty(n_groups, group, dtype=torch.int16)
        vals[:, 0::2], vals[:, 1::2] = p & 0xF, p >> 4
        stream = ((vals - 8).float() * scale.float()[:, None]).reshape(-1)[:total]
    elif codec == "int8":
        n_scales = sum(_rows(shape)[0] for _, shape in layout)
        if stored["q"].numel() != total or stored["scale"].numel() != n_scales:
            raise AdapterError(f"int8 adapter blob: {stored['q'].numel()} values / {stored['scale'].numel()} scales do "
                               f"not fit the layout ({total} values, {n_scales} rows)")
        stream = stored["q"].reshape(-1).float()
        scales = stored["scale"].reshape(-1).float()
    else:
        if stored["values"].numel() != total:
            raise AdapterError(f"{codec} adapter blob: {stored['values'].numel()} values do not fit the layout ({total})")
        stream = stored["values"].reshape(-1).float()
    out, pos, spos = {}, 0, 0
    for (name, shape), n in zip(layout, sizes, strict=True):
        t = stream[pos : pos + n].reshape(shape)
        pos += n
        if codec == "int8":
            rows, transposed = _rows(shape)
            s = scales[spos : spos + rows]
            spos += rows
            t = t * (s[None, :] if transposed else (s[:, None] if len(shape) == 2 else s))
        out[name] = t.clone()
    return out


def stored_bytes(tensors: dict[str, Tensor]) -> int:
    """Bytes of the tensors' payload (what a blob of them costs, header aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
