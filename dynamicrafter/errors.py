"""The two kinds of failure the package reports.

:class:`UserError` is the base of every problem the user can fix (a bad input, option, file or
environment variable, a checkpoint that is missing or of the wrong kind): ``str(error)`` is one
sentence saying what is wrong and what to do. It subclasses ``ValueError``, so code written
against the earlier ``ValueError`` contract keeps working. Front ends print it as one line and
exit non-zero; anything else that escapes is a bug and keeps its traceback.

:class:`GenerationError` is a model that produced NaN or infinite values even in float32: not the
user's input, but no video either (the item fails, nothing is written).
"""

from __future__ import annotations

__all__ = ["UserError", "GenerationError"]


class UserError(ValueError):
    """A problem the user can fix; ``str(error)`` is one sentence."""


class GenerationError(RuntimeError):
    """The model produced NaN or infinite values even in float32 (nothing is written)."""
