"""Every error type peft-basis raises on purpose, in one place (each a ``ValueError``, so code that
catches PEFT's / transformers' ``ValueError`` for bad input keeps working)."""

from __future__ import annotations


class CalibrationError(ValueError):
    """Calibration statistics are missing, empty, not finite, or do not fit the model."""


class AdapterTypeError(ValueError):
    """A repo or folder holds an adapter of another type than the one asked for."""


class TaskVectorError(ValueError):
    """Task vectors that cannot be built, combined or loaded as asked."""


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, incomplete, or does not match the model built from its config."""


class CompressedCheckpointError(CheckpointError):
    """A standalone compressed checkpoint that cannot be written or read as it is."""


class ConfigError(ValueError):
    """A config field has the wrong type or is out of range (the message says what to pass)."""


class BaseModelMismatchError(ValueError):
    """An adapter or calibration statistics were made on another base model than the one given (a different
    fingerprint of its weights; see :mod:`peft_basis.fingerprint`)."""
