"""Limits that rooms which do not import each other must agree on (the registry and the operator)."""

MAX_LEVELS = 3  # adapters in one stack, the requested one included: organisation, team, person
