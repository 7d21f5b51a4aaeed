"""Numeric validation of an exported model against its source, on byte-identical inputs.

All differences are collected first; one typed error then lists every failed check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import ExportValidationError
from edgesmith.runtime import KerasRunner, load_runner


@dataclass(frozen=True)
class Validation:
    """How an artifact's outputs compare with its source model's on the same inputs."""

    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    max_abs_diff_limit: float | None
    min_top1_agreement: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict_in_batches(runner: Any, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([runner.predict(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def validate_artifact(
    source: Any,
    artifact: str | Path,
    inputs: np.ndarray,
    *,
    max_abs_diff: float | None,
    min_top1_agreement: float,
    reference: np.ndarray | None = None,
) -> Validation:
    """Compare ``artifact``'s outputs with the Keras ``source`` model's on ``inputs``.

    Args:
        source: the Keras model the artifact was exported from.
        artifact: path of the exported file.
        inputs: preprocessed float32 inputs (N, H, W, C), fed unchanged to both.
        max_abs_diff: largest allowed |difference| of outputs (None: not checked, e.g. for int8).
        min_top1_agreement: smallest allowed fraction of equal arg-max predictions.
        reference: the source's outputs on ``inputs`` if already computed.

    Raises:
        ExportValidationError: listing every check that failed.
    """
    expected = reference if reference is not None else predict_in_batches(KerasRunner(source), inputs)
    got = predict_in_batches(load_runner(artifact), inputs)
    diff = np.abs(expected.astype(np.float64) - got.astype(np.float64))
    agreement = float(np.mean(expected.argmax(-1) == got.argmax(-1)))
    failures = []
    if max_abs_diff is not None and diff.max() > max_abs_diff:
        failures.append(f"max |difference| {diff.max():.3g} > {max_abs_diff:.3g}")
    if agreement < min_top1_agreement:
        failures.append(f"top-1 agreement {agreement:.4f} < {min_top1_agreement:.4f}")
    result = Validation(len(inputs), float(diff.max()), float(diff.mean()), agreement, max_abs_diff,
                        min_top1_agreement, not failures)
    if failures:
        raise ExportValidationError(f"{artifact}: failed validation on {len(inputs)} inputs: " + "; ".join(failures))
    return result
