"""The protobuf half of the Tinker wire protocol (SDK 0.38.0), built with the ``protobuf`` package alone.

The SDK sends ``forward_backward`` as ``tinker_public.ForwardBackwardRequest`` and reads forward_backward and
sample results only as ``ForwardBackwardOutput`` / ``SampleResponse``. The schema below is the subset of the
SDK's ``tinker_public.proto`` those messages need, with the SDK's field numbers and types (checked against the
SDK's own generated module in tests/api/tinker/test_wire.py). It lives in its own descriptor pool and package,
so it never collides with the SDK's module when both are loaded in one process.

Fields we do not model (provenance spans, top-k logprobs, image/audio payloads) are skipped on parse as
unknown fields; image and dmel chunks are declared as opaque bytes only so that we can refuse them by name.
"""

from __future__ import annotations

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
PACKAGE = "lorafleet_tinker_wire"

# message -> [(number, name, type, label, type_name or None, oneof index or None)]
# type_name is relative to PACKAGE; "opt" marks proto3 `optional` (a synthetic oneof named "_<field>").
_OPT, _REP, _ONE = "opt", "rep", "one"
_SCHEMA: dict[str, list[tuple]] = {
    # ---- requests
    "ForwardBackwardRequest": [
        (1, "model_id", _F.TYPE_STRING, None, None),
        (2, "seq_id", _F.TYPE_INT32, None, None),
        (3, "data", _F.TYPE_MESSAGE, _REP, "Datum"),
        (4, "loss_fn", _F.TYPE_STRING, None, None),
        (5, "loss_fn_config", _F.TYPE_MESSAGE, _REP, "ForwardBackwardRequest.LossFnConfigEntry"),
        (6, "forward_only", _F.TYPE_BOOL, None, None),
        (7, "loss_fn_config_v2", _F.TYPE_MESSAGE, _REP, "ForwardBackwardRequest.LossFnConfigV2Entry"),
    ],
    "ForwardBackwardRequest.LossFnConfigEntry": [
        (1, "key", _F.TYPE_STRING, None, None), (2, "value", _F.TYPE_DOUBLE, None, None)],
    "ForwardBackwardRequest.LossFnConfigV2Entry": [
        (1, "key", _F.TYPE_STRING, None, None), (2, "value", _F.TYPE_MESSAGE, None, "LossConfigValue")],
    "LossConfigValue": [(1, "number", _F.TYPE_DOUBLE, _ONE, None), (2, "text", _F.TYPE_STRING, _ONE, None)],
    "Datum": [
        (1, "model_input", _F.TYPE_MESSAGE, _REP, "Chunk"),
        (2, "loss_fn_inputs", _F.TYPE_MESSAGE, _REP, "Datum.LossFnInputsEntry"),
    ],
    "Datum.LossFnInputsEntry": [
        (1, "key", _F.TYPE_STRING, None, None), (2, "value", _F.TYPE_MESSAGE, None, "Tensor")],
    "Chunk": [
        (1, "encoded_text", _F.TYPE_MESSAGE, _ONE, "EncodedTextChunk"),
        (2, "image", _F.TYPE_BYTES, _ONE, None),  # an ImageChunk message on the SDK side; opaque here
        (3, "dmel", _F.TYPE_BYTES, _ONE, None),  # a DmelChunk message on the SDK side; opaque here
    ],
    "EncodedTextChunk": [(1, "tokens", _F.TYPE_BYTES, None, None)],  # little-endian int32
    "Tensor": [
        (1, "dense", _F.TYPE_BYTES, _ONE, None),
        (2, "sparse_csr", _F.TYPE_MESSAGE, _ONE, "SparseCsr"),
        (3, "dtype", _F.TYPE_ENUM, None, "DType"),
        (4, "shape", _F.TYPE_INT64, _REP, None),
    ],
    "SparseCsr": [
        (1, "values", _F.TYPE_BYTES, None, None),
        (2, "crow_indices", _F.TYPE_BYTES, None, None),  # int64
        (3, "col_indices", _F.TYPE_BYTES, None, None),  # int64
    ],
    # ---- responses
    "ForwardBackwardOutput": [
        (1, "loss_fn_output_type", _F.TYPE_STRING, None, None),
        (2, "loss_fn_outputs", _F.TYPE_MESSAGE, _REP, "ArrayRecord"),
        (3, "metrics", _F.TYPE_MESSAGE, _REP, "ForwardBackwardOutput.MetricsEntry"),
    ],
    "ForwardBackwardOutput.MetricsEntry": [
        (1, "key", _F.TYPE_STRING, None, None), (2, "value", _F.TYPE_DOUBLE, None, None)],
    "ArrayRecord": [
        (1, "type_tag", _F.TYPE_STRING, None, None),
        (2, "fields", _F.TYPE_MESSAGE, _REP, "ArrayRecord.FieldsEntry"),
        (3, "num_datums", _F.TYPE_INT64, None, None),
    ],
    "ArrayRecord.FieldsEntry": [
        (1, "key", _F.TYPE_STRING, None, None), (2, "value", _F.TYPE_MESSAGE, None, "BatchedTensor")],
    "BatchedTensor": [
        (1, "data", _F.TYPE_BYTES, None, None),
        (2, "offsets", _F.TYPE_BYTES, None, None),  # int64 byte offsets, num_datums + 1 of them
        (3, "dtype", _F.TYPE_ENUM, None, "DType"),
        (4, "trailing_shape", _F.TYPE_INT64, _REP, None),
    ],
    "SampleResponse": [
        (1, "sequences", _F.TYPE_MESSAGE, _REP, "SampledSequence"),
        (2, "prompt_logprobs", _F.TYPE_BYTES, _OPT, None),
        (4, "prompt_cache_hit_tokens", _F.TYPE_INT32, None, None),
    ],
    "SampledSequence": [
        (1, "stop_reason", _F.TYPE_ENUM, None, "StopReason"),
        (2, "tokens", _F.TYPE_BYTES, None, None),  # little-endian int32
        (3, "logprobs", _F.TYPE_BYTES, _OPT, None),  # float32, one per token when present
    ],
}
_ENUMS = {
    "StopReason": [("STOP_REASON_STOP", 0), ("STOP_REASON_LENGTH", 1)],
    "DType": [("DTYPE_UNSPECIFIED", 0), ("DTYPE_FLOAT32", 1), ("DTYPE_INT64", 2), ("DTYPE_INT32", 3),
              ("DTYPE_BFLOAT16", 4)],
}
MAP_ENTRIES = {"ForwardBackwardRequest.LossFnConfigEntry", "ForwardBackwardRequest.LossFnConfigV2Entry",
               "Datum.LossFnInputsEntry", "ForwardBackwardOutput.MetricsEntry", "ArrayRecord.FieldsEntry"}

DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32 = 1, 2, 3
STOP_REASON_STOP, STOP_REASON_LENGTH = 0, 1


def _message_proto(name: str) -> descriptor_pb2.DescriptorProto:
    short = name.rsplit(".", 1)[-1]
    msg = descriptor_pb2.DescriptorProto(name=short)
    oneofs: dict[str, int] = {}
    for number, field_name, ftype, kind, type_name in _SCHEMA[name]:
        f = msg.field.add(name=field_name, number=number, type=ftype,
                          label=_F.LABEL_REPEATED if kind == _REP else _F.LABEL_OPTIONAL)
        if type_name:
            f.type_name = f".{PACKAGE}.{type_name}"
        if kind in (_ONE, _OPT):
            group = "kind" if kind == _ONE else f"_{field_name}"  # one real oneof per message at most
            if group not in oneofs:
                oneofs[group] = len(msg.oneof_decl)
                msg.oneof_decl.add(name=group)
            f.oneof_index = oneofs[group]
            f.proto3_optional = kind == _OPT
    if name in MAP_ENTRIES:
        msg.options.map_entry = True
    for nested in sorted(n for n in _SCHEMA if n.startswith(name + ".")):
        msg.nested_type.append(_message_proto(nested))
    return msg


def _build_pool() -> descriptor_pool.DescriptorPool:
    fd = descriptor_pb2.FileDescriptorProto(name="lorafleet_tinker_wire.proto", package=PACKAGE, syntax="proto3")
    for enum_name, values in _ENUMS.items():
        enum = fd.enum_type.add(name=enum_name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    for name in _SCHEMA:
        if "." not in name:
            fd.message_type.append(_message_proto(name))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return pool


_POOL = _build_pool()


def message_class(name: str):
    """The generated message class of ``name`` (e.g. ``"ForwardBackwardRequest"``)."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ForwardBackwardRequest = message_class("ForwardBackwardRequest")
ForwardBackwardOutput = message_class("ForwardBackwardOutput")
SampleResponse = message_class("SampleResponse")


# ---------------------------------------------------------------------------------------------- decoding

class WireError(ValueError):
    """A protobuf body does not decode into what the SDK would send; the message names the part."""


_NP = {DTYPE_FLOAT32: np.float32, DTYPE_INT64: np.int64, DTYPE_INT32: np.int32}


def decode_tensor(msg, where: str) -> np.ndarray:
    """A ``Tensor`` message as a dense numpy array of its declared shape (CSR entries not listed are 0)."""
    np_dtype = _NP.get(msg.dtype)
    if np_dtype is None:
        raise WireError(f"{where}: unsupported tensor dtype {msg.dtype} (float32, int64 or int32 only)")
    shape = [int(s) for s in msg.shape]
    if msg.WhichOneof("kind") == "sparse_csr":
        csr = msg.sparse_csr
        if len(shape) != 2:
            raise WireError(f"{where}: a sparse CSR tensor needs a 2-D shape, got {shape}")
        values = np.frombuffer(csr.values, dtype=np_dtype)
        crow = np.frombuffer(csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(csr.col_indices, dtype=np.int64)
        if len(crow) != shape[0] + 1 or len(col) != len(values) or (len(col) and (col.min() < 0 or col.max() >= shape[1])):
            raise WireError(f"{where}: inconsistent sparse CSR indices for shape {shape}")
        dense = np.zeros(shape, dtype=np_dtype)
        for r in range(shape[0]):
            lo, hi = int(crow[r]), int(crow[r + 1])
            dense[r, col[lo:hi]] = values[lo:hi]
        return dense
    data = np.frombuffer(msg.dense, dtype=np_dtype)
    if shape and int(np.prod(shape)) != data.size:
        raise WireError(f"{where}: {data.size} values do not fill the declared shape {shape}")
    return data.reshape(shape) if shape else data


def decode_tokens(raw: bytes, where: str) -> list[int]:
    if len(raw) % 4:
        raise WireError(f"{where}: token bytes must be little-endian int32 (a multiple of 4 bytes)")
    return np.frombuffer(raw, dtype="<i4").tolist()


def decode_forward_backward(body: bytes) -> dict:
    """``{"model_id", "seq_id", "loss_fn", "loss_fn_config", "forward_only", "data": [{"tokens", "inputs"}]}``."""
    msg = ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # DecodeError and friends
        raise WireError(f"forward_backward: the body is not a ForwardBackwardRequest protobuf ({exc})") from None
    config: dict = {k: v for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        config[k] = v.number if v.WhichOneof("kind") == "number" else v.text
    data = []
    for i, datum in enumerate(msg.data):
        tokens: list[int] = []
        for j, chunk in enumerate(datum.model_input):
            kind = chunk.WhichOneof("kind")
            if kind != "encoded_text":
                raise WireError(f"data[{i}].model_input.chunks[{j}]: {kind or 'empty'} chunks are not supported "
                                "(lorafleet bases are text-only: send encoded_text chunks)")
            tokens.extend(decode_tokens(chunk.encoded_text.tokens, f"data[{i}].model_input.chunks[{j}]"))
        inputs = {name: decode_tensor(t, f"data[{i}].loss_fn_inputs[{name!r}]") for name, t in datum.loss_fn_inputs.items()}
        data.append({"tokens": tokens, "inputs": inputs})
    return {"model_id": msg.model_id, "seq_id": msg.seq_id, "loss_fn": msg.loss_fn, "loss_fn_config": config,
            "forward_only": msg.forward_only, "data": data}


# ---------------------------------------------------------------------------------------------- encoding

def encode_forward_backward_output(outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    """Per-datum float32 arrays (same keys in every datum) as one batched ``ArrayRecord``.

    Every metric key must hold exactly one ``:`` (``loss:sum``): the SDK's chunk combiner splits on it.
    """
    for key in metrics:
        if key.count(":") != 1:
            raise ValueError(f"metric key {key!r} must contain exactly one ':' (e.g. 'loss:sum')")
    msg = ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(outputs))
    for name in (outputs[0] if outputs else {}):
        arrays = [np.ascontiguousarray(o[name], dtype=np.float32).reshape(-1) for o in outputs]
        offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64)
        bt = record.fields[name]
        bt.data = b"".join(a.tobytes() for a in arrays)
        bt.offsets = offsets.tobytes()
        bt.dtype = DTYPE_FLOAT32
    for key, value in metrics.items():
        msg.metrics[key] = float(value)
    return msg.SerializeToString()


def encode_sample_response(sequences: list[tuple[list[int], str, list[float] | None]]) -> bytes:
    """``[(tokens, "stop" | "length", logprobs or None)]`` as a ``SampleResponse``."""
    msg = SampleResponse()
    for tokens, reason, logprobs in sequences:
        seq = msg.sequences.add(stop_reason=STOP_REASON_LENGTH if reason == "length" else STOP_REASON_STOP,
                                tokens=np.asarray(tokens, dtype="<i4").tobytes())
        if logprobs is not None:
            seq.logprobs = np.asarray(logprobs, dtype="<f4").tobytes()
    return msg.SerializeToString()
