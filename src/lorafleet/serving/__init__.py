"""Serving: generation over the resident base with per-row adapters."""
