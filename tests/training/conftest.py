import pytest

from lorafleet.base import load_base


@pytest.fixture(scope="module")
def tiny_base():
    return load_base("tiny")
