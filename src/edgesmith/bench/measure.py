"""Measurements: top-1 accuracy on held-out data, bytes and gzip bytes, parameters, CPU latency.

Latency is measured like a careful person would by hand: a fixed input bound once, warm-up calls,
then ``runs`` timed calls of the runtime alone; p50 and p90 with the thread count recorded.
"""

from __future__ import annotations

import gzip
import logging
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.recipe import BenchConfig
from edgesmith.runtime import KerasRunner, load_runner

log = logging.getLogger(__name__)
RUNTIME_PACKAGES = ("tensorflow", "tf_keras", "ai-edge-litert", "onnxruntime", "tf2onnx", "onnx",
                    "tensorflow-model-optimization", "numpy")


@dataclass
class BenchReport:
    """Rows of measurements (one per model or artifact) and the environment they were taken in."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "environment": self.environment, "rows": self.rows}


def gzip_size(path: Path) -> int:
    """Bytes of the file (or of a folder's files) after gzip -9."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return sum(len(gzip.compress(f.read_bytes(), compresslevel=9)) for f in files)


def file_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def measure_latency(call: Any, *, warmup: int, runs: int) -> dict[str, float]:
    """Run ``call`` ``warmup`` times untimed, then ``runs`` times timed; milliseconds percentiles."""
    for _ in range(warmup):
        call()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        call()
        times[i] = time.perf_counter() - start
    times *= 1000.0
    return {
        "latency_p50_ms": round(float(np.percentile(times, 50)), 4),
        "latency_p90_ms": round(float(np.percentile(times, 90)), 4),
        "latency_mean_ms": round(float(times.mean()), 4),
        "latency_runs": runs,
    }


def top1_accuracy(runner: Any, inputs: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    correct = 0
    for start in range(0, len(inputs), batch_size):
        probs = runner.predict(inputs[start : start + batch_size])
        correct += int(np.sum(probs.argmax(-1) == labels[start : start + batch_size]))
    return correct / len(inputs)


def count_parameters(runner: Any) -> int:
    """Parameters of a Keras model, or elements of an artifact's constant tensors (weights)."""
    if isinstance(runner, KerasRunner):
        return int(runner.model.count_params())
    if hasattr(runner, "session"):
        import onnx

        graph = onnx.load(str(runner.path), load_external_data=False).graph
        return int(sum(np.prod(t.dims) for t in graph.initializer))
    return tflite_constant_elements(runner.interpreter)


def tflite_constant_elements(interpreter: Any) -> int:
    """Elements of the tensors that ops read but no op writes and that are not graph inputs."""
    ops = interpreter._get_ops_details()
    produced = {i for op in ops for i in op["outputs"]}
    consumed = {i for op in ops for i in op["inputs"] if i >= 0}
    inputs = {d["index"] for d in interpreter.get_input_details()}
    shapes = {d["index"]: d["shape"] for d in interpreter.get_tensor_details()}
    return int(sum(np.prod(shapes[i]) for i in consumed - produced - inputs if i in shapes))


def bench_one(name: str, source: Any, inputs: np.ndarray, labels: np.ndarray, cfg: BenchConfig,
              *, path: Path | None = None) -> dict[str, Any]:
    """Measure one model: accuracy on (inputs, labels), size, parameters and batch-1 latency."""
    runner = KerasRunner(source, threads=cfg.threads) if path is None or path.is_dir() else load_runner(path, threads=cfg.threads)
    started = time.perf_counter()
    row: dict[str, Any] = {"name": name, "format": _format_of(path), "runtime": runner.runtime,
                           "path": str(path) if path else ""}
    batch = 1 if not isinstance(runner, KerasRunner) else 256
    row["top1"] = round(top1_accuracy(runner, inputs, labels, batch), 5)
    row["eval_samples"] = int(len(inputs))
    if path is not None:
        row["bytes"], row["gzip_bytes"] = file_size(path), gzip_size(path)
    row["params"] = count_parameters(runner)
    row.update(measure_latency(runner.bind(inputs[:1]), warmup=cfg.warmup, runs=cfg.runs))
    row["threads"] = runner.threads
    row["input_dtype"] = runner.input_dtype
    log.info("bench %s: top1 %.4f, p50 %.2f ms (%.0f s)", name, row["top1"], row["latency_p50_ms"],
             time.perf_counter() - started)
    return row


def _format_of(path: Path | None) -> str:
    if path is None:
        return "keras"
    return {".tflite": "tflite", ".onnx": "onnx", ".keras": "keras", ".h5": "keras"}.get(path.suffix, path.suffix)


def bench(artifacts: dict[str, Path], inputs: np.ndarray, labels: np.ndarray, cfg: BenchConfig) -> BenchReport:
    """Measure every artifact on the same preprocessed held-out inputs.

    Args:
        artifacts: name -> model file (``.keras``/``.h5``, ``.tflite``, ``.onnx``).
        inputs: preprocessed float32 held-out images (the spec stored with the models).
        labels: their integer labels.
        cfg: warm-up, runs, threads, evaluation limit.
    """
    if cfg.eval_limit:
        inputs, labels = inputs[: cfg.eval_limit], labels[: cfg.eval_limit]
    report = BenchReport(environment=environment(cfg.threads))
    for name, path in artifacts.items():
        report.rows.append(bench_one(name, None, inputs, labels, cfg, path=Path(path)))
    return report


def environment(threads: int = 0) -> dict[str, Any]:
    """CPU, cores, threads, Python and runtime versions, GPU if any: recorded beside every number."""
    from edgesmith.runtime import cpu_threads

    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": cpu_threads(0),
        "threads": cpu_threads(threads),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {pkg: _version(pkg) for pkg in RUNTIME_PACKAGES},
        "gpus": _gpus(),
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpuinfo_field(key: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "fma", "sse4_2", "amx_int8")
    return [f for f in _cpuinfo_field("flags").split() if f in wanted]


def _gpus() -> list[str]:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]
