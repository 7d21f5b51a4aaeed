"""Which layers lose most to int8 quantization: the TFLite quantization debugger, summarized.

Called when an int8 artifact falls too far below its float source (PTQ or QAT). For every
quantized tensor, the debugger runs the float model and the int8 model side by side on the same
samples; the error is reported relative to the tensor's quantization step (``rmse / scale``), so
layers of different ranges compare: a value far above 0.29 (the RMSE of uniform rounding, 1/sqrt(12))
means the layer loses more than rounding alone explains.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
ROUNDING_RMSE = 1 / math.sqrt(12)


def gap_exceeds(float_top1: float, int8_top1: float, max_gap_points: float) -> bool:
    """True when the int8 top-1 is more than ``max_gap_points`` percentage points below the float top-1.

    With labels, pass the two accuracies; without, pass 1.0 and the top-1 agreement (the share of
    changed predictions bounds the accuracy drop). ``max_gap_points`` <= 0 never triggers.
    """
    return max_gap_points > 0 and (float_top1 - int8_top1) * 100 > max_gap_points + 1e-9


def _samples(inputs: np.ndarray, limit: int) -> Callable[[], Iterator[list[np.ndarray]]]:
    def generate() -> Iterator[list[np.ndarray]]:
        for row in inputs[:limit]:
            yield [row[None].astype(np.float32)]

    return generate


def debug_quantization(model: Any, calibration: np.ndarray, inputs: np.ndarray, *, quantized: bool = False,
                       top: int = 5, max_samples: int = 32) -> dict[str, Any]:
    """Run the TFLite quantization debugger on ``model`` and return the layers with the largest error.

    Args:
        model: the float (PTQ) or QAT Keras model the int8 artifact came from.
        calibration: preprocessed samples that set the int8 ranges (as for the export).
        inputs: preprocessed held-out samples the per-layer error is measured on.
        quantized: ``model`` is a QAT model (its own ranges are used; calibration only feeds the debugger).
        top: how many layers to return.
        max_samples: at most this many calibration and debug samples (the debugger runs per layer).

    Returns:
        ``{"metric": ..., "layers": [{"tensor", "op", "rmse_over_scale", "max_abs_error", "scale"}, ...]}``,
        largest error first; ``{"error": ...}`` when the debugger cannot run on this model.
    """
    from edgesmith._keras import tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _samples(calibration, max_samples)
    try:
        with warnings.catch_warnings():  # the debugger itself uses tf.lite.Interpreter; QAT inputs carry ranges
            warnings.filterwarnings("ignore", message=".*(tf.lite.Interpreter is deprecated|Statistics for quantized)")
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=_samples(inputs, max_samples))
            debugger.run()
    except Exception as exc:  # the debugger raises RuntimeError/ValueError from the converter and runtime
        log.warning("quantization debugger could not run: %s", exc)
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "quantized": quantized}
    rows = _layer_rows(debugger)
    return {"metric": "rmse / scale (0.29 = rounding alone)", "quantized": quantized, "layers": rows[:top]}


def _layer_rows(debugger: Any) -> list[dict[str, Any]]:
    """The debugger's per-tensor statistics (its CSV dump, the public interface) as sorted rows."""
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    rows = []
    for stats in csv.DictReader(io.StringIO(dump.getvalue())):
        scale = float(stats["scale"])
        if not scale:
            continue
        rows.append({
            "tensor": stats["tensor_name"],
            "op": stats["op_name"],
            "rmse_over_scale": round(math.sqrt(float(stats["mean_squared_error"])) / scale, 4),
            "max_abs_error": round(float(stats["max_abs_error"]), 6),
            "scale": scale,
        })
    return sorted(rows, key=lambda row: -row["rmse_over_scale"])
