"""The instant room's user errors."""

from __future__ import annotations

from lorafleet.errors import LorafleetError


class InstantError(LorafleetError, ValueError):
    """Bad input to the generator or the generated-adapter path (an empty profile, too many examples, ...)."""

    http_status, code = 422, "invalid_profile"


class GeneratorMismatchError(InstantError):
    """The generator was made for another base (its fingerprint differs) or another adapter layout."""

    http_status, code = 409, "generator_base_mismatch"


class NoGeneratorError(InstantError):
    """No generator revision exists for this base: build one first (``benchmarks/instant.py`` / ``fit_generator``)."""

    http_status, code = 404, "no_generator"
