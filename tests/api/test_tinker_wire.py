"""lorafleet's protobuf schema (built with ``protobuf`` alone) against the SDK's own generated module.

Every message and field lorafleet declares must have the SDK's field number, type and cardinality; bodies
the SDK encodes decode here, and what we encode the SDK decodes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto import tinker_public_pb2 as sdk_pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from lorafleet.api.tinker import wire

OPAQUE = {("Chunk", "image"), ("Chunk", "dmel")}  # messages on the SDK side, opaque bytes here (refused by name)


def _fields(descriptor) -> dict[str, dict]:
    out = {}
    for msg in [descriptor, *descriptor.nested_types]:
        out[msg.name] = {f.name: (f.number, f.type, f.is_repeated) for f in msg.fields}
    return out


@pytest.mark.parametrize("name", sorted(n for n in wire._SCHEMA if "." not in n))
def test_schema_matches_the_sdk(name):
    ours = _fields(wire.message_class(name).DESCRIPTOR)
    theirs = _fields(sdk_pb.DESCRIPTOR.message_types_by_name[name])
    for msg, fields in ours.items():
        for field_name, spec in fields.items():
            assert field_name in theirs[msg], f"{msg}.{field_name} is not in the SDK's schema"
            if (msg, field_name) in OPAQUE:
                assert theirs[msg][field_name][0] == spec[0]
                continue
            assert theirs[msg][field_name] == spec, f"{msg}.{field_name}: ours {spec}, SDK {theirs[msg][field_name]}"


def test_sdk_request_decodes_dense_and_sparse():
    d1 = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                     loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [0.0, 1.0, 1.0]})
    # 2-D torch tensors are sent as sparse CSR by the SDK.
    d2 = types.Datum(model_input=types.ModelInput.from_ints([5, 6]),
                     loss_fn_inputs={"target_tokens": torch.tensor([[6, 0], [0, 7]]),
                                     "weights": torch.tensor([1.0, 0.5])})
    req = types.ForwardBackwardRequest(model_id="m", seq_id=3, forward_backward_input=types.ForwardBackwardInput(
        data=[d1, d2], loss_fn="cross_entropy", loss_fn_config={"clip": 0.2, "mode": "x"}))
    got = wire.decode_forward_backward(forward_backward_request_to_proto(req).SerializeToString())
    assert (got["model_id"], got["seq_id"], got["loss_fn"]) == ("m", 3, "cross_entropy")
    assert got["loss_fn_config"] == {"clip": pytest.approx(0.2), "mode": "x"}
    assert got["data"][0]["tokens"] == [1, 2, 3] and got["data"][1]["tokens"] == [5, 6]
    np.testing.assert_array_equal(got["data"][0]["inputs"]["weights"], [0, 1, 1])
    np.testing.assert_array_equal(got["data"][1]["inputs"]["target_tokens"], [[6, 0], [0, 7]])


def test_image_chunks_and_garbage_are_refused_by_name():
    msg = sdk_pb.ForwardBackwardRequest(model_id="m", loss_fn="cross_entropy")
    msg.data.add().model_input.add().image.data = b"\x89PNG"
    with pytest.raises(wire.WireError, match=r"data\[0\].model_input.chunks\[0\]: image chunks are not supported"):
        wire.decode_forward_backward(msg.SerializeToString())
    with pytest.raises(wire.WireError, match="not a ForwardBackwardRequest protobuf"):
        wire.decode_forward_backward(b"\xff\xff\xff")


def test_outputs_decode_in_the_sdk():
    out = deserialize_forward_backward_output(wire.encode_forward_backward_output(
        [{"logprobs": np.array([-1.0, -2.0]), "elementwise_loss": np.array([1.0, 2.0])},
         {"logprobs": np.array([-3.0]), "elementwise_loss": np.array([3.0])}], {"loss:sum": 6.0}))
    assert out.metrics == {"loss:sum": 6.0} and len(out.loss_fn_outputs) == 2
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -2.0]
    assert out.loss_fn_outputs[1]["elementwise_loss"].tolist() == [3.0]
    with pytest.raises(ValueError, match="exactly one ':'"):
        wire.encode_forward_backward_output([], {"loss": 1.0})
    sample = deserialize_sample_response(wire.encode_sample_response([([1, 2], "stop", None), ([3], "length", [-0.5])]))
    assert [list(s.tokens) for s in sample.sequences] == [[1, 2], [3]]
    assert [s.stop_reason for s in sample.sequences] == ["stop", "length"]
    assert sample.sequences[1].logprobs == [-0.5] and sample.sequences[0].logprobs is None
