"""Converters: Keras -> TFLite (float32, float16, dynamic range, full integer) and Keras -> ONNX (float, int8).

Full-integer TFLite variants: ``tflite-int8`` (int8 I/O), ``tflite-int8-float-io`` (int8 inside, float
I/O), ``tflite-uint8`` (uint8 I/O) and ``tflite-int16x8`` (int16 activations, int8 weights, int16 I/O).
Their representative data is checked before use (:mod:`edgesmith.export.representative`) and the
written file is checked to hold no float compute op (:mod:`edgesmith.export.inspect`).

Backends are imported lazily; :func:`export` lists the valid formats when given an unknown one.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import ExportValidationError, ModelError
from edgesmith.export.inspect import check_integer_only
from edgesmith.export.representative import check_representative
from edgesmith.export.validate import Validation, validate_artifact
from edgesmith.recipe import ExportConfig
from edgesmith.runs import atomic_path

log = logging.getLogger(__name__)
FLOAT_FORMATS = ("tflite-float32", "onnx-float32")
# TFLite full-integer modes: (input/output type, activations are int16)
INTEGER_MODES = {"int8": ("int8", False), "int8-float-io": ("float32", False), "uint8": ("uint8", False),
                 "int16x8": ("int16", True)}
CALIBRATED_FORMATS = (*(f"tflite-{mode}" for mode in INTEGER_MODES), "onnx-int8")


@dataclass
class ExportResult:
    """One exported artifact and its validation against the source model."""

    format: str
    path: Path
    bytes: int
    seconds: float
    validation: Validation | None = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "path": str(self.path),
            "bytes": self.bytes,
            "seconds": round(self.seconds, 1),
            "validation": self.validation.to_dict() if self.validation else None,
            "notes": self.notes,
            **({"details": self.details} if self.details else {}),
        }


def _tflite_converter(model: Any) -> Any:
    from edgesmith._keras import tf

    return tf.lite.TFLiteConverter.from_keras_model(model)


def _representative(calibration: np.ndarray | None) -> Callable[[], Iterator[list[np.ndarray]]]:
    if calibration is None or not len(calibration):
        raise ModelError("full-integer export needs calibration data (representative samples); none was given")

    def samples() -> Iterator[list[np.ndarray]]:
        for row in calibration:
            yield [row[None].astype(np.float32)]

    return samples


def _convert_tflite(model: Any, mode: str, calibration: np.ndarray | None, quantized: bool) -> bytes:
    from edgesmith._keras import tf

    converter = _tflite_converter(model)
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode in INTEGER_MODES:
        _set_integer_mode(converter, mode, calibration, quantized)
    with warnings.catch_warnings():  # a QAT model's input ranges come from its quantize layer
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


def _set_integer_mode(converter: Any, mode: str, calibration: np.ndarray | None, quantized: bool) -> None:
    from edgesmith._keras import tf

    io_type, int16_activations = INTEGER_MODES[mode]
    if int16_activations:
        ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    else:
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if not quantized:  # a QAT model carries its own int8 ranges and needs no representative data
        converter.representative_dataset = _representative(calibration)
        converter.target_spec.supported_ops = ops
    if io_type != "float32":
        converter.inference_input_type = converter.inference_output_type = getattr(tf, io_type)


def _tflite_exporter(mode: str) -> Callable[..., dict[str, Any] | None]:
    def write(model: Any, path: Path, cfg: ExportConfig, calibration: np.ndarray | None, quantized: bool) -> None:
        path.write_bytes(_convert_tflite(model, mode, calibration, quantized))

    return write


def _write_onnx(model: Any, path: Path, cfg: ExportConfig, calibration: np.ndarray | None, quantized: bool) -> None:
    import tf2onnx

    from edgesmith._keras import tf

    signature = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input"),)
    tf2onnx.convert.from_keras(model, input_signature=signature, opset=cfg.onnx_opset, output_path=str(path))


def _write_onnx_int8(model: Any, path: Path, cfg: ExportConfig, calibration: np.ndarray | None,
                     quantized: bool) -> dict[str, Any]:
    from edgesmith.export.onnx_quant import quantize_onnx

    float_path = path.with_name(f"{path.stem}.float{path.suffix}")
    try:
        _write_onnx(model, float_path, cfg, calibration, quantized)
        return quantize_onnx(float_path, path, _require_calibration(calibration), cfg).to_dict()
    finally:
        float_path.unlink(missing_ok=True)


def _require_calibration(calibration: np.ndarray | None) -> np.ndarray:
    _representative(calibration)  # raises the same error when there is none
    return np.asarray(calibration)


# Each exporter writes the artifact to ``path``; it may return details recorded with the result.
EXPORTERS: dict[str, Callable[..., dict[str, Any] | None]] = {
    "tflite-float32": _tflite_exporter("float32"),
    "tflite-float16": _tflite_exporter("float16"),
    "tflite-dynamic": _tflite_exporter("dynamic"),
    "tflite-int8": _tflite_exporter("int8"),
    "onnx-float32": _write_onnx,
    "tflite-int8-float-io": _tflite_exporter("int8-float-io"),
    "tflite-uint8": _tflite_exporter("uint8"),
    "tflite-int16x8": _tflite_exporter("int16x8"),
    "onnx-int8": _write_onnx_int8,
}
SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx"}


def export(
    model: Any,
    fmt: str,
    cfg: ExportConfig,
    *,
    spec: PreprocessSpec,
    out_dir: str | Path,
    name: str = "model",
    calibration: np.ndarray | None = None,
    validation_inputs: np.ndarray | None = None,
    quantized: bool = False,
) -> ExportResult:
    """Export ``model`` to ``fmt``, write it atomically, and validate it against ``model``.

    Args:
        model: a Keras 2 model (float, pruned-and-stripped, or QAT).
        fmt: one of :data:`EXPORTERS`.
        cfg: validation tolerances and ONNX opset.
        spec: the preprocessing spec, written next to the artifact.
        out_dir: folder for ``<name>.<format>.<suffix>``.
        calibration: preprocessed training samples for full-integer quantization.
        validation_inputs: preprocessed held-out samples; None skips validation.
        quantized: ``model`` is a QAT model (int8 export needs no calibration).

    Raises:
        ModelError: unknown format. ExportValidationError: the artifact disagrees with ``model``;
        the failed file is kept under ``<name>.failed<suffix>`` for inspection.
    """
    if fmt not in EXPORTERS:
        raise ModelError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORTERS)}")
    out_dir = Path(out_dir)
    path = out_dir / f"{name}{SUFFIXES[fmt.split('-')[0]]}"
    if fmt in CALIBRATED_FORMATS and not quantized and calibration is not None:
        check_representative(calibration, spec, input_shape=tuple(model.input_shape[1:]))
    started = time.perf_counter()
    with atomic_path(path) as tmp:
        details = EXPORTERS[fmt](model, tmp, cfg, calibration, quantized)
    spec.save(out_dir)
    result = ExportResult(fmt, path, path.stat().st_size, time.perf_counter() - started, details=details or {})
    if fmt in CALIBRATED_FORMATS and fmt.startswith("tflite"):
        result.notes.append(_check_integer_only(path, fmt))
    if validation_inputs is not None:
        result.validation = _validate(model, path, fmt, cfg, validation_inputs)
        _debug_if_degraded(result, model, cfg, calibration, validation_inputs, quantized)
    log.info("exported %s (%s, %d bytes) in %.0f s", path.name, fmt, result.bytes, result.seconds)
    return result


def _validate(model: Any, path: Path, fmt: str, cfg: ExportConfig, inputs: np.ndarray) -> Validation:
    exact = fmt in FLOAT_FORMATS
    limit = cfg.max_abs_diff_float if exact else None
    agreement = cfg.min_top1_agreement if exact or fmt == "tflite-float16" else cfg.min_top1_agreement_quantized
    try:
        return validate_artifact(model, path, inputs, max_abs_diff=limit, min_top1_agreement=agreement)
    except ExportValidationError as exc:
        failed = path.with_suffix(f".failed{path.suffix}")
        path.replace(failed)
        raise ExportValidationError(str(exc).replace(str(path), str(failed), 1)) from None


def _check_integer_only(path: Path, fmt: str) -> str:
    try:
        ops = check_integer_only(path)
    except ExportValidationError as exc:
        failed = path.with_suffix(f".failed{path.suffix}")
        path.replace(failed)
        raise ExportValidationError(str(exc).replace(str(path), str(failed), 1)) from None
    return f"integer only: none of the {ops} operators computes in float (checked in the flatbuffer)"


def _debug_if_degraded(result: ExportResult, model: Any, cfg: ExportConfig, calibration: np.ndarray | None,
                       inputs: np.ndarray, quantized: bool) -> None:
    """Record the layers with the largest quantization error when an int8 TFLite file lost too much.

    Without labels the drop in top-1 is bounded by the share of changed predictions, so the debugger
    runs when more than ``cfg.debug_gap_points`` percent of predictions changed.
    """
    from edgesmith.export.debug import debug_quantization, gap_exceeds

    validation = result.validation
    if result.format not in ("tflite-int8", "tflite-int8-float-io", "tflite-uint8") or validation is None:
        return
    if not gap_exceeds(1.0, validation.top1_agreement, cfg.debug_gap_points):
        return
    samples = calibration if calibration is not None else inputs
    result.details["quantization_debug"] = debug_quantization(model, samples, inputs, quantized=quantized)
