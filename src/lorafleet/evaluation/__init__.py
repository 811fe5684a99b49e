"""Evaluation: personas with checkable habits, per-revision metrics, the competence probe, the promotion gate.

Submodules: ``personas`` / ``habits`` (synthetic users, torch-free), ``metrics`` (held-out loss, habit
adherence, competence probe, stored on the revision), ``gate`` (candidate -> live, audited), ``cli``.
See docs/evaluation.md.
"""

from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.habits import HABITS, Habit, make_habit
from lorafleet.evaluation.personas import Persona, PersonaData, generate_personas, get_persona, shipped_personas

__all__ = [
    "HABITS",
    "EvaluationError",
    "Habit",
    "Persona",
    "PersonaData",
    "generate_personas",
    "get_persona",
    "make_habit",
    "shipped_personas",
]
