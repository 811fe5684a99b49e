import copy

import pytest

from lorafleet.base import load_base


@pytest.fixture(scope="module")
def tiny_base():
    """A tiny random-init Llama base (already wrapped by the LoRA host once any test attaches it)."""
    return load_base("tiny")


@pytest.fixture(scope="module")
def plain_tiny_model():
    """An unwrapped copy of the same tiny model, for peft to wrap."""
    return copy.deepcopy(load_base("tiny").model)
