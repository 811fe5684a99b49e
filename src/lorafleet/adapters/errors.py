"""Errors raised for bad adapters. Each message names the problem and, where possible, the fix."""


class AdapterError(ValueError):
    """An adapter (spec, weights or files) is invalid; nothing was loaded."""
