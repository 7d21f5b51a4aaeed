"""Export: one entry point that dispatches on format; every artifact is validated before it counts."""

from edgesmith.export.convert import EXPORTERS, ExportResult, export
from edgesmith.export.validate import Validation, validate_artifact

__all__ = ["EXPORTERS", "ExportResult", "Validation", "export", "validate_artifact"]
