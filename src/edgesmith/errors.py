"""Typed errors. Each refines a builtin so callers can catch either."""

from __future__ import annotations


class EdgesmithError(Exception):
    """Base class of every error edgesmith raises on purpose (bad input, failed validation)."""


class RecipeError(EdgesmithError, ValueError):
    """A recipe key is unknown or has a bad value."""


class DataError(EdgesmithError, ValueError):
    """A data set folder or file is missing, empty or malformed."""


class ModelError(EdgesmithError, ValueError):
    """A backbone, weights file or model file cannot be used."""


class RunDirError(EdgesmithError, FileExistsError):
    """A run directory cannot be created, reused or read."""


class ExportValidationError(EdgesmithError, AssertionError):
    """An exported artifact disagrees with its source model beyond tolerance."""


class MissingDependencyError(EdgesmithError, ImportError):
    """An optional backend is not installed."""


class TrustError(EdgesmithError, ValueError):
    """A file that could run code when loaded (a pickle) is not verified by a run directory's manifest."""


class StrategyError(EdgesmithError, RuntimeError):
    """A distribution strategy cannot be set up here (no TF_CONFIG, no TPU, created too late)."""


class LeakageError(EdgesmithError, ValueError):
    """An ensemble part is fitted or evaluated on rows another part was trained on."""
