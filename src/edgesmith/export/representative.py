"""Checks on representative (calibration) data before it sets the quantization ranges of a model.

A full-integer export fixes every activation range from these samples, so bad samples quietly make
a bad model: wrong dtype, wrong shape, duplicates (fewer distinct samples than it seems) or values
preprocessed differently from training (e.g. 0..255 pixels for a model trained on [-1, 1]).
"""

from __future__ import annotations

import hashlib

import numpy as np

from edgesmith.data.spec import IMAGENET_MEAN_RGB, TORCH_MEAN_RGB, TORCH_STD_RGB, PreprocessSpec
from edgesmith.errors import DataError

# Real image sets reach close to both ends of the range; samples that stay inside the middle of it
# (e.g. [0, 1] data for a [-1, 1] model) were preprocessed differently from training.
COVERAGE_MARGIN = 0.25
RANGE_TOLERANCE = 1e-3


def expected_range(spec: PreprocessSpec) -> tuple[float, float]:
    """The value range the spec's normalization maps 0..255 pixels to."""
    if spec.mode == "tf":
        return -1.0, 1.0
    if spec.mode == "unit":
        return 0.0, 1.0
    if spec.mode == "caffe":
        return -max(IMAGENET_MEAN_RGB), 255.0 - min(IMAGENET_MEAN_RGB)
    if spec.mode == "torch":
        means, stds = np.asarray(TORCH_MEAN_RGB), np.asarray(TORCH_STD_RGB)
        return float(np.min(-means / stds)), float(np.max((1 - means) / stds))
    return 0.0, 255.0


def check_representative(samples: np.ndarray, spec: PreprocessSpec, *, input_shape: tuple[int, ...]) -> None:
    """Raise :class:`DataError` naming what is wrong with ``samples`` as representative data.

    Args:
        samples: preprocessed samples (N, H, W, C) meant to calibrate a full-integer export.
        spec: the model's preprocessing spec (its mode gives the expected value range).
        input_shape: the model's input shape without the batch dimension.
    """
    where = "representative data"
    if not isinstance(samples, np.ndarray) or samples.dtype != np.float32:
        got = samples.dtype if isinstance(samples, np.ndarray) else type(samples).__name__
        raise DataError(f"{where} is {got}; expected float32 samples preprocessed like training "
                        "(spec.normalize(pixels).astype(np.float32))")
    if samples.ndim < 1 or not len(samples) or tuple(samples.shape[1:]) != tuple(input_shape):
        raise DataError(f"{where} has shape {samples.shape}; the model expects (N, {', '.join(map(str, input_shape))}) "
                        "with N >= 1: resize the images to the model's input size")
    _check_finite(samples, where)
    _check_duplicates(samples, where)
    _check_range(samples, spec, where)


def _check_finite(samples: np.ndarray, where: str) -> None:
    bad = np.flatnonzero(~np.isfinite(samples.reshape(len(samples), -1)).all(axis=1))
    if len(bad):
        raise DataError(f"{where}: samples {_indices(bad)} hold NaN or infinite values; drop or fix them")


def _check_duplicates(samples: np.ndarray, where: str) -> None:
    first_seen: dict[str, int] = {}
    pairs = []
    for index, row in enumerate(samples):
        digest = hashlib.sha1(np.ascontiguousarray(row).tobytes()).hexdigest()
        if digest in first_seen:
            pairs.append(f"{index} = {first_seen[digest]}")
        first_seen.setdefault(digest, index)
    if pairs:
        raise DataError(f"{where}: {len(pairs)} of {len(samples)} samples are duplicates (sample {', '.join(pairs[:5])}"
                        f"{', ...' if len(pairs) > 5 else ''}); draw distinct images from the training split")


def _check_range(samples: np.ndarray, spec: PreprocessSpec, where: str) -> None:
    low, high = expected_range(spec)
    got_low, got_high = float(samples.min()), float(samples.max())
    tolerance = RANGE_TOLERANCE * (high - low)
    margin = COVERAGE_MARGIN * (high - low)
    outside = got_low < low - tolerance or got_high > high + tolerance
    too_narrow = got_low > low + margin or got_high < high - margin
    if outside or too_narrow:
        problem = "goes outside" if outside else "covers only part of"
        raise DataError(
            f"{where}: values span [{got_low:.4g}, {got_high:.4g}], which {problem} the training range "
            f"[{low:.4g}, {high:.4g}] of preprocessing mode {spec.mode!r}; preprocess the samples with the "
            "model's own spec (spec.normalize on 0..255 RGB pixels)"
        )


def _indices(indices: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (", ..." if len(indices) > limit else "")
