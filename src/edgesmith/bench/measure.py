"""Measurements: top-1 accuracy on held-out data, bytes and gzip bytes, parameters, latency, memory.

Latency is measured like a careful person would by hand: a fixed input bound once, warm-up calls,
then timed calls of the runtime alone until both a minimum count (``runs``) and a minimum time
(``min_seconds``) are reached; p50, p90, p99, mean, standard deviation and throughput. Every
artifact is timed at every configured batch size and thread count (one entry of ``latency`` each);
its row carries the first of them (the headline). Cold start is loading the model into its runtime
plus the first inference; peak memory is measured in a fresh process (:mod:`edgesmith.bench.memory`).
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

from edgesmith.errors import RecipeError
from edgesmith.recipe import BenchConfig
from edgesmith.runs import disk_bytes, files_under
from edgesmith.runtime import KerasRunner, cpu_threads, import_runtime, load_runner

log = logging.getLogger(__name__)
DEFAULT_MAX_RUNS = 1_000_000  # a bound on the timed calls of a very fast model under min_seconds
RUNTIME_PACKAGES = ("tensorflow", "tf_keras", "ai-edge-litert", "onnxruntime", "onnxruntime-gpu", "tf2onnx",
                    "onnx", "tensorflow-model-optimization", "numpy")
# Copied from the headline latency entry into the artifact's row.
HEADLINE_KEYS = ("device", "provider", "batch_mode", "note")


@dataclass(frozen=True)
class BenchPlan:
    """The resolved bench settings: thread counts (0 resolved to the cores), batch sizes, device."""

    threads: list[int]
    batch_sizes: list[int]
    device: str = "cpu"
    providers: list[str] | None = None
    memory: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> BenchPlan:
        """From a :class:`BenchConfig` (or any object with its fields; older callers pass ``threads`` as an int).

        Raises:
            RecipeError: an empty list of thread counts or batch sizes.
        """
        threads = cfg.threads if isinstance(cfg.threads, list | tuple) else [cfg.threads]
        batch_sizes = list(getattr(cfg, "batch_sizes", [1]))
        for key, values in (("bench.threads", threads), ("bench.batch_sizes", batch_sizes)):
            if not values:
                raise RecipeError(f"{key} is empty; give at least one value, e.g. [1]")
        return cls(threads=list(dict.fromkeys(cpu_threads(t) for t in threads)),
                   batch_sizes=list(dict.fromkeys(batch_sizes)), device=getattr(cfg, "device", "cpu"),
                   providers=list(getattr(cfg, "onnx_providers", []) or []) or None,
                   memory=bool(getattr(cfg, "memory", False)))

    def device_for(self, path: Path | None) -> tuple[str, str]:
        """The device an artifact runs on, and a note when it is not the one asked for."""
        if self.device == "gpu" and path is not None and path.suffix == ".tflite":
            return "cpu", ("measured on the CPU: ai-edge-litert has no GPU delegate in its Linux wheel; "
                           "device 'gpu' applies to ONNX and Keras artifacts")
        return self.device, ""


@dataclass
class BenchReport:
    """One row per model or artifact (accuracy, size, headline latency), one latency entry per
    (artifact, batch size, thread count) measured, and the environment they were taken in."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    latency: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "environment": self.environment, "rows": self.rows, "latency": self.latency}


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
        "latency_seconds": round(total, 9),
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


def load_cold(source: Any, path: Path | None, first_input: np.ndarray, threads: int,
              device: str = "cpu", providers: list[str] | None = None) -> tuple[Any, float]:
    """The runner and its cold start in ms: loading the model plus its first inference.

    The runtime's Python module is imported before the clock starts: that is paid once per process,
    not once per model.
    """
    import_runtime(path)
    start = time.perf_counter()
    if path is None or path.is_dir():
        runner = KerasRunner(source if path is None else path, threads=threads, device=device)
    else:
        runner = load_runner(path, threads=threads, device=device, providers=providers)
    runner.bind(first_input)()
    return runner, round((time.perf_counter() - start) * 1000.0, 3)


def bench_one(name: str, source: Any, inputs: np.ndarray, labels: np.ndarray, cfg: Any, *,
              path: Path | None = None, reference: np.ndarray | None = None
              ) -> tuple[dict[str, Any], np.ndarray, list[dict[str, Any]]]:
    """Measure one model: accuracy on (inputs, labels), size, parameters, cold start, latency, memory.

    ``cfg.runs`` is the minimum number of timed calls and ``cfg.min_seconds`` the minimum time of the
    timed loop, for each batch size and thread count. With ``reference`` (another model's predicted
    classes on the same inputs) the row also holds the fraction of inputs on which both predict the
    same class. Returns the row, this model's predicted classes and its latency entries.
    """
    started, plan = time.perf_counter(), BenchPlan.from_config(cfg)
    device, device_note = plan.device_for(path)
    runner, cold_start_ms = load_cold(source, path, inputs[:1], plan.threads[0], device, plan.providers)
    row: dict[str, Any] = {"name": name, "format": _format_of(path), "runtime": runner.runtime,
                           "path": str(path) if path else ""}
    predictions = predicted_classes(runner, inputs, 256 if isinstance(runner, KerasRunner) else 1)
    row["top1"] = round(float(np.mean(predictions == labels)), 5)
    if reference is not None:
        row["top1_agreement"] = round(float(np.mean(predictions == reference)), 5)
    row["eval_samples"] = int(len(inputs))
    if path is not None:
        row["bytes"], row["gzip_bytes"] = disk_bytes(path), gzip_size(path)
    row["params"] = count_parameters(runner)
    entries = latency_entries(name, runner, path, inputs, cfg, plan, device_note)
    row.update({key: value for key, value in entries[0].items() if key.startswith(("latency_", "throughput"))})
    row.update({key: entries[0][key] for key in HEADLINE_KEYS if key in entries[0]})
    row["threads"] = entries[0]["threads"]
    row["input_dtype"] = runner.input_dtype
    row["cold_start_ms"] = cold_start_ms
    if plan.memory and path is not None:
        add_peak_memory(row, entries, path, plan, device)
    log.info("bench %s: top1 %.4f, p50 %.2f ms (%.0f s)", name, row["top1"], row["latency_p50_ms"],
             time.perf_counter() - started)
    return row, predictions, entries


def latency_entries(name: str, runner: Any, path: Path | None, inputs: np.ndarray, cfg: Any, plan: BenchPlan,
                    device_note: str = "") -> list[dict[str, Any]]:
    """One latency entry per thread count and batch size, in that order (the first is the headline).

    TFLite and ONNX Runtime get a new runner per thread count (both fix it when loading). TensorFlow
    keeps one thread pool per process, so a Keras model is measured once, at the pool's size.
    """
    entries = []
    for threads in plan.threads:
        if isinstance(runner, KerasRunner):
            threads_runner = runner
        else:
            threads_runner = runner if threads == runner.threads else load_runner(
                path, threads=threads, device=runner.device, providers=plan.providers)
        for batch in plan.batch_sizes:
            entries.append(latency_entry(name, threads_runner, inputs, batch, cfg, device_note))
        if isinstance(runner, KerasRunner):
            if len(plan.threads) > 1:
                for entry in entries:
                    entry["note"] = _join(entry.get("note"), _keras_threads_note(runner.threads))
            break
    return entries


def _keras_threads_note(threads: int) -> str:
    return (f"TensorFlow keeps one thread pool per process ({threads} threads, fixed when it started); "
            "other thread counts were not measured")


def _join(*notes: str | None) -> str:
    return "; ".join(n for n in notes if n)


def latency_entry(name: str, runner: Any, inputs: np.ndarray, batch: int, cfg: Any,
                  device_note: str = "") -> dict[str, Any]:
    """Latency of ``runner`` on ``batch`` held-out images per call (repeated when fewer are held out)."""
    sample = np.resize(inputs, (batch, *inputs.shape[1:])) if len(inputs) < batch else inputs[:batch]
    mode = runner.batch_mode(batch)
    entry: dict[str, Any] = {"name": name, "device": runner.device, "provider": runner.provider,
                             "threads": runner.threads, "batch_mode": mode}
    entry.update(measure_latency(runner.latency_call(sample), warmup=cfg.warmup, runs=cfg.runs,
                                 min_seconds=getattr(cfg, "min_seconds", 0.0), batch=batch))
    note = _join(device_note, _batch_note(runner, batch, mode))
    if note:
        entry["note"] = note
    return entry


def _batch_note(runner: Any, batch: int, mode: str) -> str:
    if mode == "resized":
        return f"batch dimension fixed at {runner.fixed_batch} in the model; resized to {batch}"
    if mode == "loop":
        return (f"batch dimension fixed at {runner.fixed_batch} and not resizable: each timed batch is a loop "
                f"of calls of {runner.fixed_batch} sample(s)")
    return ""


def add_peak_memory(row: dict[str, Any], entries: list[dict[str, Any]], path: Path, plan: BenchPlan,
                    device: str) -> None:
    """Peak RSS of loading and running the artifact (a fresh process), into its row and latency entries."""
    from edgesmith.bench.memory import peak_rss_in_child

    measured = peak_rss_in_child(path, batch_sizes=plan.batch_sizes, threads=max(plan.threads), device=device,
                                 providers=plan.providers)
    if not measured:
        return
    peaks = measured["peak_rss_bytes"]
    for entry in entries:
        entry["peak_rss_bytes"] = peaks[entry["latency_batch"]]
    row["peak_rss_bytes"] = max(peaks.values())
    row["rss_before_load_bytes"] = measured["rss_before_load_bytes"]


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
        cfg: warm-up, runs, minimum time, thread counts, batch sizes, device, memory, evaluation limit.

    The first artifact is the reference: every later row records ``top1_agreement``, the fraction of
    inputs on which it predicts the same class as the reference.

    Raises:
        DeviceError: ``cfg.device`` is ``gpu`` and an ONNX or Keras artifact cannot run on a GPU here.
    """
    if cfg.eval_limit:
        inputs, labels = inputs[: cfg.eval_limit], labels[: cfg.eval_limit]
    plan = BenchPlan.from_config(cfg)
    report = BenchReport(environment=environment(plan.threads[0], plan=plan))
    reference = None
    for name, path in artifacts.items():
        row, predictions, entries = bench_one(name, None, inputs, labels, cfg, path=Path(path),
                                              reference=reference)
        reference = predictions if reference is None else reference
        report.rows.append(row)
        report.latency.extend(entries)
    return report


def environment(threads: int = 0, *, plan: BenchPlan | None = None) -> dict[str, Any]:
    """CPU, cores, threads, Python and runtime versions, GPUs and ONNX Runtime's providers.

    With ``plan`` (what bench measures), also the thread counts, batch sizes and device asked for.
    """
    env = {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": cpu_threads(0),
        "threads": cpu_threads(threads),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {pkg: _version(pkg) for pkg in RUNTIME_PACKAGES},
        "gpus": _gpus(),
        "onnx_providers": _onnx_providers(),
    }
    if plan is not None:
        env.update(thread_counts=plan.threads, batch_sizes=plan.batch_sizes, device=plan.device)
    return env


def _onnx_providers() -> list[str]:
    """The execution providers of the installed onnxruntime (empty without it)."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime

    return list(onnxruntime.get_available_providers())


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
