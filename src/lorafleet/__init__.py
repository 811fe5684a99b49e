"""lorafleet — one shared base LLM, many persistent personal models (adapters) on top of it."""

__version__ = "0.1.0"
