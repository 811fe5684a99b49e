"""The Triton kernels run in Triton's CPU interpreter here (``TRITON_INTERPRET=1``, set by tests/conftest.py
before torch — which imports triton — is loaded). ``TRITON_INTERPRET=0`` on a CUDA machine runs the same tests
compiled, on the GPU. Without triton installed, every test here is skipped.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _interpreter_ready() -> bool:
    """triton's library functions (tl.sum, ...) are interpreter functions only if the env was set at import."""
    if "triton" not in sys.modules or os.environ["TRITON_INTERPRET"] != "1":
        return True
    import triton.language as tl  # noqa: PLC0415
    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    return not isinstance(tl.sum, JITFunction)


@pytest.fixture(scope="session", autouse=True)
def _interpreter_mode():
    if not _interpreter_ready():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: run these tests with TRITON_INTERPRET=1 "
                    "in the environment (tests/conftest.py sets it when pytest starts from the repository root)")


@pytest.fixture(scope="session")
def device() -> torch.device:
    if os.environ["TRITON_INTERPRET"] != "1" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_base():
    from lorafleet.base import load_base  # noqa: PLC0415

    return load_base("tiny")
