"""Checks of an optimized model on what ships: its int8 TFLite file, on held-out images.

An optimization counts only if it survives export: sparsity and cluster structure are read back from
the int8 flatbuffer's constant tensors, sizes are the file's raw and gzip bytes, and top-1 is measured
for the float source, the optimized Keras model and the int8 file on the same held-out images.
The export stage's ``export`` is imported lazily (the one place optimize looks ahead to export).
"""

from __future__ import annotations

import gzip
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.data.datasets import ImageDataset, limit_per_class
from edgesmith.data.pipeline import load_pixels
from edgesmith.data.spec import PreprocessSpec

log = logging.getLogger(__name__)
MAX_INT8_GAP = 0.01  # a QAT int8 file more than 1 point below its QAT Keras model is flagged


def preprocessed(data: ImageDataset, spec: PreprocessSpec, split: str, count: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stratified sample of ``count`` images of a split, preprocessed as for training."""
    source = getattr(data, split)
    sample = limit_per_class(source, max(1, -(-count // data.num_classes)), seed)
    pixels, labels = load_pixels(sample, spec.input_size, limit=count)
    return spec.normalize(pixels).astype(np.float32), labels


@dataclass
class CheckData:
    """Calibration images (training split) and held-out images with labels, preprocessed once."""

    calibration: np.ndarray
    inputs: np.ndarray
    labels: np.ndarray

    @classmethod
    def draw(cls, data: ImageDataset, spec: PreprocessSpec, samples: int, seed: int,
             calibration_samples: int = 300) -> CheckData:
        held_out = "val" if data.val is not None else "test"
        calibration, _ = preprocessed(data, spec, "train", calibration_samples, seed)
        inputs, labels = preprocessed(data, spec, held_out, samples, seed + 1)
        return cls(calibration, inputs, labels)


def top1(predictions: np.ndarray, labels: np.ndarray) -> float:
    return round(float(np.mean(predictions.argmax(-1) == labels)), 4)


def predict(model_or_path: Any, inputs: np.ndarray) -> np.ndarray:
    from edgesmith.export.validate import predict_in_batches
    from edgesmith.runtime import KerasRunner, load_runner

    runner = load_runner(model_or_path) if isinstance(model_or_path, str | Path) else KerasRunner(model_or_path)
    return predict_in_batches(runner, inputs, batch_size=64)


def int8_tflite(model: Any, folder: Path, spec: PreprocessSpec, check: CheckData, *, quantized: bool) -> Path:
    """``model`` exported to full-integer TFLite in ``folder`` (calibrated unless it is a QAT model)."""
    from edgesmith.export import export
    from edgesmith.recipe import ExportConfig

    return export(model, "tflite-int8", ExportConfig(), spec=spec, out_dir=folder, name="check_int8",
                  calibration=None if quantized else check.calibration, quantized=quantized).path


def tflite_kernels(path: str | Path) -> dict[str, np.ndarray]:
    """The constant int8 weight tensors of rank >= 2 (kernels, not biases) of a TFLite file, by name.

    Constant = read by an operator but written by none and not a model input.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    ops = interpreter._get_ops_details()
    written = {int(i) for op in ops for i in op["outputs"]} | {d["index"] for d in interpreter.get_input_details()}
    read = {int(i) for op in ops for i in op["inputs"] if int(i) >= 0}
    return {detail["name"]: interpreter.get_tensor(detail["index"])
            for detail in interpreter.get_tensor_details()
            if detail["index"] in read - written and np.dtype(detail["dtype"]) == np.int8
            and len(detail["shape"]) >= 2}


def kernel_stats(path: str | Path, min_size: int = 64) -> dict[str, Any]:
    """Sparsity and distinct values of every int8 kernel of at least ``min_size`` values in the file.

    Distinct values are counted per output channel (TFLite kernels are output-channel first and
    quantized per channel, so k clusters give at most k values in each channel, not in the tensor).
    """
    per_tensor = {name: {"values": int(k.size), "sparsity": round(float(np.mean(k == 0)), 4),
                         "unique_values_per_channel": max(int(np.unique(row).size) for row in k)}
                  for name, k in tflite_kernels(path).items() if k.size >= min_size}
    values = sum(t["values"] for t in per_tensor.values())
    zeros = sum(t["values"] * t["sparsity"] for t in per_tensor.values())
    return {"int8_kernels": per_tensor, "int8_sparsity_overall": round(zeros / max(values, 1), 4),
            "int8_max_unique_values_per_channel": max(
                (t["unique_values_per_channel"] for t in per_tensor.values()), default=0)}


def file_sizes(path: Path) -> dict[str, int]:
    raw = path.read_bytes()
    return {"int8_bytes": len(raw), "int8_gzip_bytes": len(gzip.compress(raw, compresslevel=9))}


def check_int8(source: Any, optimized: Any, spec: PreprocessSpec, check: CheckData, *, quantized: bool,
               source_top1: float | None = None) -> dict[str, Any]:
    """Export ``optimized`` to int8 TFLite and measure it: top-1 (float source, optimized Keras, int8 file
    on the same held-out images), raw/gzip bytes, per-kernel sparsity and distinct values read back."""
    with tempfile.TemporaryDirectory() as folder:
        path = int8_tflite(optimized, Path(folder), spec, check, quantized=quantized)
        result = {"held_out_images": len(check.labels),
                  "float_keras_top1": source_top1 if source_top1 is not None
                  else top1(predict(source, check.inputs), check.labels),
                  "optimized_keras_top1": top1(predict(optimized, check.inputs), check.labels),
                  "int8_tflite_top1": top1(predict(path, check.inputs), check.labels),
                  **file_sizes(path), **kernel_stats(path)}
    gap = result["optimized_keras_top1"] - result["int8_tflite_top1"]
    if quantized and gap > MAX_INT8_GAP:
        result["flag"] = (f"int8 TFLite is {100 * gap:.2f} points below the QAT Keras model (more than "
                          f"{100 * MAX_INT8_GAP:.0f}); inspect the layers with the TFLite quantization debugger")
        log.warning("%s", result["flag"])
    return result
