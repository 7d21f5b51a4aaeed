"""Tiny artifacts for the bench, budget and report tests: hand-made report.json dicts and TFLite files.

The TFLite helpers import TensorFlow (through ``edgesmith._keras``) only when called.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ENVIRONMENT = {
    "cpu": "Test CPU", "cpu_flags": ["avx2"], "cores": 2, "threads": 1, "machine": "x86_64",
    "python": "3.11.7", "platform": "Linux-test", "gpus": [],
    "versions": {"ai-edge-litert": "2.3.0", "onnxruntime": None},
}


def make_row(name: str, *, fmt: str = "tflite", bytes_: int | None = 100_000, top1: float = 0.9,
             p50: float = 1.0, **extra: Any) -> dict[str, Any]:
    """A report row as bench writes it (``bytes_=None`` leaves out the sizes, like an in-memory model)."""
    runtime = {"tflite": "ai-edge-litert", "onnx": "onnxruntime", "keras": "tensorflow"}[fmt]
    suffix = {"tflite": ".tflite", "onnx": ".onnx", "keras": ".keras"}[fmt]
    row: dict[str, Any] = {"name": name, "format": fmt, "runtime": runtime, "path": f"export/{name}{suffix}",
                           "top1": top1, "eval_samples": 100}
    if bytes_ is not None:
        row["bytes"], row["gzip_bytes"] = bytes_, int(bytes_ * 0.8)
    row.update({"params": 1000, "latency_p50_ms": p50, "latency_p90_ms": p50 * 1.1,
                "latency_mean_ms": p50 * 1.05, "latency_runs": 50, "threads": 1, "input_dtype": "float32"})
    row.update(extra)
    return row


def make_report(*rows: dict[str, Any], run_name: str | None = "tiny") -> dict[str, Any]:
    report = {"schema_version": 1, "environment": copy.deepcopy(ENVIRONMENT), "rows": list(rows)}
    if run_name:
        report["run"] = {"name": run_name, "path": f"runs/{run_name}"}
    return report


def standard_report(int8_bytes: int = 100_000, **run: Any) -> dict[str, Any]:
    """A run with a float TFLite model, an int8 one and a QAT int8 one."""
    return make_report(
        make_row("float_float32", bytes_=400_000, top1=0.93, p50=2.0),
        make_row("pruned_int8", bytes_=int8_bytes, top1=0.90, p50=0.8, input_dtype="int8"),
        make_row("qat_int8", bytes_=110_000, top1=0.92, p50=0.7, input_dtype="int8"),
        **run,
    )


def write_run(folder: Path, report: dict[str, Any]) -> Path:
    """A run directory holding just ``report.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    return folder


def tiny_tflite(path: Path, *, hidden: int = 8, int8: bool = True, features: int = 6, classes: int = 3,
                seed: int = 0) -> Path:
    """A 2-layer dense classifier (``features`` -> ``hidden`` -> ``classes``) converted to TFLite.

    ``int8`` makes it fully integer (int8 input and output) with a seeded representative set;
    a larger ``hidden`` makes a larger file.
    """
    import edgesmith._keras  # noqa: F401  (selects Keras 2 before tensorflow loads)
    from edgesmith._keras import keras, tf

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(hidden, activation="relu"),
                              keras.layers.Dense(classes, activation="softmax")])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        samples = np.random.default_rng(seed).normal(size=(32, features)).astype(np.float32)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([s[None]] for s in samples)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # int8 I/O without quantized_input_stats is expected here
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        path.write_bytes(converter.convert())
    return path


def tiny_data(features: int = 6, classes: int = 3, count: int = 30,
              seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, features)).astype(np.float32), rng.integers(0, classes, size=count)
