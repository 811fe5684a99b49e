"""Errors raised for bad adapters. Each message names the problem and, where possible, the fix."""

from lorafleet.errors import LorafleetError


class AdapterError(LorafleetError, ValueError):
    """An adapter (spec, weights or files) is invalid; nothing was loaded."""

    http_status, code = 422, "invalid_adapter"
