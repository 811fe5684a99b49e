"""Configuration and request validation: each error names the field."""

from __future__ import annotations

import dataclasses

import pytest

from lorafleet.serving.engine import EngineConfig, SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_active": 0}, r"EngineConfig.max_active must be an integer >= 1"),
        ({"max_batch": 0}, r"EngineConfig.max_batch must be an integer >= 1"),
        ({"max_active": 8, "max_cached": 4}, r"EngineConfig.max_cached must be >= max_active \(8\), got 4"),
        ({"max_rank": 65}, r"EngineConfig.max_rank must be <= 64"),
        ({"max_rank": 2.5}, r"EngineConfig.max_rank must be an integer"),
        ({"max_prefill_tokens": 0}, r"EngineConfig.max_prefill_tokens"),
        ({"load_workers": True}, r"EngineConfig.load_workers"),
        ({"max_seq_len": 1}, r"EngineConfig.max_seq_len"),
        ({"cache_policy": "lfu"}, r"EngineConfig.cache_policy must be one of"),
        ({"protected_fraction": 1.0}, r"EngineConfig.protected_fraction must be in \(0, 1\)"),
        ({"device": 0}, r"EngineConfig.device"),
    ],
)
def test_engine_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_engine_config_is_frozen_and_documented():
    cfg = EngineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_active = 3
    assert all(f.metadata.get("help") for f in dataclasses.fields(EngineConfig))
    assert all(f.metadata.get("help") for f in dataclasses.fields(SamplingParams))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.1}, r"SamplingParams.temperature"),
        ({"top_p": 0.0}, r"SamplingParams.top_p must be in \(0, 1\]"),
        ({"max_tokens": 0}, r"SamplingParams.max_tokens must be an integer >= 1"),
        ({"stop": ("",)}, r"SamplingParams.stop must be up to 16 non-empty strings"),
        ({"seed": -1}, r"SamplingParams.seed"),
    ],
)
def test_sampling_params_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_stop_string_becomes_tuple():
    assert SamplingParams(stop="\n").stop == ("\n",)


@pytest.mark.parametrize(
    ("prompt", "adapter", "match"),
    [
        ("hi", "not-a-digest", "64 lowercase hex"),
        ("", None, "prompt is empty"),
        ([], None, "prompt is empty"),
        ([1, 99999], None, "prompt token ids must be in"),
        (list(range(3, 250)) * 3, None, "at most 511 fit"),
        (3.5, None, "prompt must be text, token ids or chat messages"),
    ],
)
def test_submit_errors(blobs, make_engine, prompt, adapter, match):
    with pytest.raises(ValueError, match=match):
        make_engine(blobs).submit(prompt, adapter)


def test_device_must_match_the_base(blobs, make_engine):
    with pytest.raises(ValueError, match="EngineConfig.device is 'meta'"):
        make_engine(blobs, device="meta")
    assert make_engine(blobs, device="cpu").device.type == "cpu"


def test_chat_messages_use_the_template(blobs, make_engine, base):
    engine = make_engine(blobs)
    res = engine.generate([[{"role": "user", "content": "hi"}]], None, SamplingParams(max_tokens=3))[0]
    want = base.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              tokenize=False)
    assert res.prompt_tokens == len(base.tokenizer(want, add_special_tokens=False)["input_ids"])
