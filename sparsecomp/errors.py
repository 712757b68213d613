"""Errors that reach the user as one clear line plus a hint.

Every error sparsecomp raises on purpose is a `SparsecompError`: the CLI prints
`error: <message>` and `hint: <hint>` and exits non-zero (`--debug` shows the trace). Raise these
at the point where we know *what* is wrong (the model, layer, option or file at fault), instead of
letting a stack trace from deep inside torch, ONNX or TVM escape.
"""

from __future__ import annotations

__all__ = [
    "SparsecompError",
    "CaptureError",
    "PipelineError",
    "PatternError",
    "ModelLoadError",
    "OnnxError",
    "NotYetAvailableError",
    "VerificationError",
]


class SparsecompError(Exception):
    """Base class: `message` says what is wrong, `hint` what to try."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line, plus the hint when there is one
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class CaptureError(SparsecompError):
    """A model could not be traced into the FX IR."""


class PipelineError(SparsecompError):
    """A pipeline string or pass option is malformed or names an unknown pass/option."""


class PatternError(SparsecompError):
    """A weight-pattern spec (`unstructured:S`, `block:RxC:S`, `N:M`) is malformed."""


class ModelLoadError(SparsecompError):
    """A MODEL argument (zoo name, factory file, ONNX file, weights file) cannot be loaded."""


class OnnxError(SparsecompError):
    """An ONNX file cannot be parsed, analysed or imported."""


class NotYetAvailableError(SparsecompError):
    """A command, backend or option that a later release adds."""


class VerificationError(SparsecompError):
    """A rewritten graph no longer matches its reference on the example inputs."""
