"""Errors raised by evaluation, personas and the gate; each message names the problem and the fix."""

from __future__ import annotations

from lorafleet.errors import LorafleetError


class EvaluationError(LorafleetError, ValueError):
    """Bad input to evaluation or the gate: unknown persona or habit, bad parameter, missing metrics."""
