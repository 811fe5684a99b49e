"""The shared base model: loading (packaged GGUF, HF directory, tiny test model), caching, fingerprint."""

from lorafleet.base.loader import BaseModel, load_base
from lorafleet.base.precision import PRECISIONS, BasePrecisionError, resolve_precision
from lorafleet.base.sources import DEFAULT_BASE, BaseSourceError, resolve_source

__all__ = ["DEFAULT_BASE", "PRECISIONS", "BaseModel", "BasePrecisionError", "BaseSourceError", "load_base",
           "resolve_precision", "resolve_source"]
