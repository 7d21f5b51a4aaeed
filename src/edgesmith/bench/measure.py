"""Measurements: top-1 accuracy on held-out data, bytes and gzip bytes, parameters, CPU latency.

Latency is measured like a careful person would by hand: a fixed input bound once, warm-up calls,
then timed calls of the runtime alone until both a minimum count (``runs``) and a minimum time
(``min_seconds``) are reached; p50, p90, p99, mean, standard deviation and throughput, with the
thread count recorded. Cold start is loading the model into its runtime plus the first inference.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.recipe import BenchConfig
from edgesmith.runs import disk_bytes, files_under
from edgesmith.runtime import KerasRunner, load_runner

log = logging.getLogger(__name__)
_RUNTIME_MODULES = {".tflite": "ai_edge_litert.interpreter", ".onnx": "onnxruntime",
                    ".keras": "edgesmith._keras", ".h5": "edgesmith._keras"}
DEFAULT_MAX_RUNS = 1_000_000  # a bound on the timed calls of a very fast model under min_seconds
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
    return sum(len(gzip.compress(f.read_bytes(), compresslevel=9)) for f in files_under(path))


def measure_latency(call: Any, *, warmup: int, runs: int, min_seconds: float = 0.0, batch: int = 1,
                    max_runs: int = DEFAULT_MAX_RUNS) -> dict[str, float]:
    """Time ``call`` after ``warmup`` untimed calls until both ``runs`` calls and ``min_seconds`` passed.

    Args:
        call: a zero-argument callable that runs one inference (input already bound).
        warmup: untimed calls first (caches, allocations, thread pools, lazy compilation).
        runs: the minimum number of timed calls.
        min_seconds: the minimum wall time of the timed loop; fast models get more calls.
        batch: images per call, for the throughput.
        max_runs: stop here even if ``min_seconds`` is not reached yet.

    Returns:
        Percentiles, mean, standard deviation and minimum in ms, the number of timed calls, their
        total seconds and the throughput in images per second.
    """
    for _ in range(warmup):
        call()
    times = _timed_calls(call, runs=runs, min_seconds=min_seconds, max_runs=max(max_runs, runs))
    total = float(times.sum())
    ms = times * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "latency_p50_ms": round(float(p50), 6),
        "latency_p90_ms": round(float(p90), 6),
        "latency_p99_ms": round(float(p99), 6),
        "latency_mean_ms": round(float(ms.mean()), 6),
        "latency_std_ms": round(float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, 6),
        "latency_min_ms": round(float(ms.min()), 6),
        "latency_runs": len(ms),
        "latency_warmup": warmup,
        "latency_seconds": round(total, 6),
        "latency_batch": batch,
        "throughput_ips": round(batch * len(ms) / total, 2) if total > 0 else 0.0,
    }


def _timed_calls(call: Any, *, runs: int, min_seconds: float, max_runs: int) -> np.ndarray:
    """Seconds of each timed call; the clock is read twice per call and nothing else is timed."""
    clock, times = time.perf_counter, []
    append = times.append
    loop_start = end = clock()
    while (len(times) < runs or end - loop_start < min_seconds) and len(times) < max_runs:
        start = clock()
        call()
        end = clock()
        append(end - start)
    return np.asarray(times)


def predicted_classes(runner: Any, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """The arg-max class of every input, run in batches."""
    return np.concatenate([runner.predict(inputs[start : start + batch_size]).argmax(-1)
                           for start in range(0, len(inputs), batch_size)])


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


def load_cold(source: Any, path: Path | None, first_input: np.ndarray, threads: int) -> tuple[Any, float]:
    """The runner and its cold start in ms: loading the model plus its first inference.

    The runtime's Python module is imported before the clock starts: that is paid once per process,
    not once per model.
    """
    module = _RUNTIME_MODULES.get(path.suffix if path is not None and not path.is_dir() else ".keras")
    if module and importlib.util.find_spec(module.split(".")[0]) is not None:
        importlib.import_module(module)
    start = time.perf_counter()
    if path is None or path.is_dir():
        runner = KerasRunner(source if path is None else path, threads=threads)
    else:
        runner = load_runner(path, threads=threads)
    runner.bind(first_input)()
    return runner, round((time.perf_counter() - start) * 1000.0, 3)


def bench_one(name: str, source: Any, inputs: np.ndarray, labels: np.ndarray, cfg: BenchConfig,
              *, path: Path | None = None, reference: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Measure one model: accuracy on (inputs, labels), size, parameters, cold start and batch-1 latency.

    ``cfg.runs`` is the minimum number of timed calls and ``cfg.min_seconds`` the minimum time of the
    timed loop. With ``reference`` (another model's predicted classes on the same inputs) the row also
    holds the fraction of inputs on which both predict the same class. Returns the row and this
    model's predicted classes.
    """
    started = time.perf_counter()
    runner, cold_start_ms = load_cold(source, path, inputs[:1], cfg.threads)
    row: dict[str, Any] = {"name": name, "format": _format_of(path), "runtime": runner.runtime,
                           "path": str(path) if path else ""}
    batch = 1 if not isinstance(runner, KerasRunner) else 256
    predictions = predicted_classes(runner, inputs, batch)
    row["top1"] = round(float(np.mean(predictions == labels)), 5)
    if reference is not None:
        row["top1_agreement"] = round(float(np.mean(predictions == reference)), 5)
    row["eval_samples"] = int(len(inputs))
    if path is not None:
        row["bytes"], row["gzip_bytes"] = disk_bytes(path), gzip_size(path)
    row["params"] = count_parameters(runner)
    row.update(measure_latency(runner.latency_call(inputs[:1]), warmup=cfg.warmup, runs=cfg.runs,
                               min_seconds=cfg.min_seconds, batch=1))
    row["threads"] = runner.threads
    row["input_dtype"] = runner.input_dtype
    row["cold_start_ms"] = cold_start_ms
    log.info("bench %s: top1 %.4f, p50 %.2f ms (%.0f s)", name, row["top1"], row["latency_p50_ms"],
             time.perf_counter() - started)
    return row, predictions


def _format_of(path: Path | None) -> str:
    if path is None:
        return "keras"
    formats = {".tflite": "tflite", ".onnx": "onnx", ".keras": "keras", ".h5": "keras"}
    return formats.get(path.suffix, path.suffix)


def bench(artifacts: dict[str, Path], inputs: np.ndarray, labels: np.ndarray,
          cfg: BenchConfig) -> BenchReport:
    """Measure every artifact on the same preprocessed held-out inputs.

    Args:
        artifacts: name -> model file (``.keras``/``.h5``, ``.tflite``, ``.onnx``).
        inputs: preprocessed float32 held-out images (the spec stored with the models).
        labels: their integer labels.
        cfg: warm-up, runs, threads, evaluation limit.

    The first artifact is the reference: every later row records ``top1_agreement``, the fraction of
    inputs on which it predicts the same class as the reference.
    """
    if cfg.eval_limit:
        inputs, labels = inputs[: cfg.eval_limit], labels[: cfg.eval_limit]
    report = BenchReport(environment=environment(cfg.threads))
    reference = None
    for name, path in artifacts.items():
        row, predictions = bench_one(name, None, inputs, labels, cfg, path=Path(path), reference=reference)
        reference = predictions if reference is None else reference
        report.rows.append(row)
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
