"""What an adapter is: spec, weights, PEFT-format I/O, and the one multi-adapter LoRA operator."""

from lorafleet.adapters.errors import AdapterError
from lorafleet.adapters.operator import LoraHost, MultiLoraLinear, lora_delta, lora_delta_reference
from lorafleet.adapters.peft_io import decode_blob, from_bytes, load_peft, save_peft, to_bytes
from lorafleet.adapters.slots import SlotTable, StackedWeights
from lorafleet.adapters.spec import LoraSpec, expand_targets
from lorafleet.adapters.vera import VeraAdapter, VeraSpec, as_lora
from lorafleet.adapters.weights import LoraAdapter

__all__ = [
    "AdapterError",
    "LoraAdapter",
    "LoraHost",
    "LoraSpec",
    "MultiLoraLinear",
    "expand_targets",
    "from_bytes",
    "load_peft",
    "lora_delta",
    "lora_delta_reference",
    "save_peft",
    "SlotTable",
    "StackedWeights",
    "VeraAdapter",
    "VeraSpec",
    "as_lora",
    "decode_blob",
    "to_bytes",
]
