"""The one base class of user errors: bad input or a refused operation, never a bug.

Every room's user-error class derives from :class:`LorafleetError` and carries how it is shown: the HTTP status,
OpenAI-style error type and code the API answers with (``api/errors.py``), and the exit code of the CLI
(``cli/common.py``: one ``error:`` line on stderr). A subclass overrides only what differs. The message names the
problem and, where possible, the fix. Anything that is not a ``LorafleetError`` is a bug: a 500 / a traceback.
"""

from __future__ import annotations

from typing import ClassVar


class LorafleetError(Exception):
    """Base of every error lorafleet raises on purpose."""

    http_status: ClassVar[int] = 400
    error_type: ClassVar[str] = "invalid_request_error"
    code: ClassVar[str] = "invalid_request"
    exit_code: ClassVar[int] = 2


def user_error_classes() -> list[type[LorafleetError]]:
    """Every LorafleetError subclass defined so far (those of imported modules), the base included."""
    seen, todo = [], [LorafleetError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return seen
