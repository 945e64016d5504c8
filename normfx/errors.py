"""normfx's exceptions: one base, ``NormfxError``, so a caller can catch everything normfx raises
on purpose. Each subclass also derives from the built-in exception its situation matches, so code
written against the built-in (``except RuntimeError``) keeps working.

Per-site problems are not exceptions: the site is skipped and the report says why. These are the
preconditions that make a whole call impossible; each message names the module and what to do.
"""
from __future__ import annotations

__all__ = ["NormfxError", "TraceFailure", "TrainingModeError", "RepBNNotFinishedError", "ExportError",
           "AlreadyTransformedError",
           "SpecializedCallError"]


class NormfxError(Exception):
    """Base of every exception normfx raises on purpose."""


class TraceFailure(NormfxError, RuntimeError):
    """Nothing in the model could be traced; the message names the module and the line."""


class TrainingModeError(NormfxError, RuntimeError):
    """Deploy mode was asked of a BatchNorm that is still in training mode."""


class RepBNNotFinishedError(NormfxError, RuntimeError):
    """``deploy`` met a ProgressiveRepBN whose λ has not reached 0."""


class ExportError(NormfxError, RuntimeError):
    """Exporting or verifying the ONNX model failed; the message says at which step and why."""


class SpecializedCallError(NormfxError, TypeError):
    """A traced model was called with a value for an argument its graph was specialized on (a
    defaulted argument of the root's forward, fixed at its default when it was traced)."""


class AlreadyTransformedError(NormfxError, ValueError):
    """A one-liner was applied to a model that already carries its constructs, where a second
    application would overwrite state (calibrated fixed-point casts)."""
