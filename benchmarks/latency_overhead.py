"""Harness overhead and repeatability of edgesmith's latency numbers, on this CPU.

For each TFLite model it measures, in one process and interleaved round by round (the order
alternating, so that drift of a shared machine hits both alike):

* ``bare``: a hand-written loop of ``interpreter.invoke()`` with only the clock around it, and
* ``edgesmith``: ``measure_latency`` on ``runner.latency_call`` (what ``bench`` times),

then prints the p50 of every round of each side by side, their medians and the harness overhead in
percent, and the p50 of two consecutive ``edgesmith.bench.bench`` runs and how far apart they are
(the issue asks for 3% and 5%). Noise is reduced by design, not by dropping numbers: the process is
pinned to as many cores as it runs threads (no migrations), every measurement runs at least
``--min-seconds`` after 50 warm-up calls, and rounds are interleaved.

    python benchmarks/latency_overhead.py --keras runs/cifar10/train/model.keras --threads 1
    python benchmarks/latency_overhead.py /tmp/d/mobilenet.tflite --threads 1
    python benchmarks/latency_overhead.py             # builds a small conv net to measure

A benchmark, not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgesmith.bench.measure import bench, measure_latency
from edgesmith.recipe import BenchConfig
from edgesmith.runtime import TFLiteRunner


def pin_to_cores(count: int) -> list[int]:
    """Pin this process to ``count`` of the cores it may use (the last ones: core 0 takes most interrupts)."""
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[-count:] if 0 < count <= len(allowed) else allowed
    os.sched_setaffinity(0, chosen)
    return chosen


def bare_p50_ms(interpreter, runs: int, min_seconds: float) -> float:
    """p50 of invoke() alone: the input stays in the tensor, only the clock is read around the call."""
    invoke, clock, times = interpreter.invoke, time.perf_counter, []
    loop_start = end = clock()
    while len(times) < runs or end - loop_start < min_seconds:
        start = clock()
        invoke()
        end = clock()
        times.append(end - start)
    return 1000.0 * float(np.median(times))


def overhead(path: Path, sample: np.ndarray, *, threads: int, rounds: int, runs: int,
             min_seconds: float) -> dict:
    runner = TFLiteRunner(path, threads=threads)
    call = runner.bind(sample)
    timed = runner.latency_call(sample)  # what bench times; it also leaves the input in the tensor
    bare, harness = [], []
    for round_ in range(rounds):  # interleaved, the order alternating, so drift hits both alike
        for which in ("bare", "harness") if round_ % 2 == 0 else ("harness", "bare"):
            for _ in range(50):
                call()
            if which == "bare":
                bare.append(bare_p50_ms(runner.interpreter, runs, min_seconds))
            else:
                measured = measure_latency(timed, warmup=50, runs=runs, min_seconds=min_seconds)
                harness.append(measured["latency_p50_ms"])
    b, h = statistics.median(bare), statistics.median(harness)
    return {"model": path.name, "bare_p50_ms": round(b, 5), "edgesmith_p50_ms": round(h, 5),
            "overhead_pct": round(100 * (h - b) / b, 2),
            "bare_rounds_ms": [round(v, 4) for v in bare], "edgesmith_rounds_ms": [round(v, 4) for v in harness]}


def repeatability(paths: list[Path], inputs: np.ndarray, labels: np.ndarray, *, threads: int, runs: int,
                  min_seconds: float) -> list[dict]:
    """Two consecutive ``bench`` runs (batch 1, ``threads``, no memory probe) and their p50 apart."""
    cfg = BenchConfig(warmup=50, runs=runs, threads=[threads], batch_sizes=[1], min_seconds=min_seconds,
                      eval_limit=len(inputs), memory=False)
    artifacts = {p.stem: p for p in paths}
    first, second = (bench(artifacts, inputs, labels, cfg).rows for _ in range(2))
    return [{"model": a["name"], "run1_p50_ms": a["latency_p50_ms"], "run2_p50_ms": b["latency_p50_ms"],
             "difference_pct": _pct_apart(a["latency_p50_ms"], b["latency_p50_ms"])}
            for a, b in zip(first, second, strict=True)]


def _pct_apart(a: float, b: float) -> float:
    return round(100 * abs(a - b) / a, 2)


def small_convnet(folder: Path) -> Path:
    """A small float32 conv net (32x32x3 -> 10) as TFLite, for a machine without a run directory."""
    import edgesmith._keras  # noqa: F401
    from edgesmith._keras import keras, tf

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input((32, 32, 3)), layers.Conv2D(32, 3, activation="relu"),
                              layers.Conv2D(64, 3, strides=2, activation="relu"),
                              layers.GlobalAveragePooling2D(), layers.Dense(10, activation="softmax")])
    path = folder / "convnet_float32.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


def export_float32(keras_file: Path, out_dir: Path) -> Path:
    """``keras_file`` (with its preprocess.json) as float32 TFLite via edgesmith's export API, in a child
    process so that this one, which measures, never imports TensorFlow."""
    import subprocess

    code = (
        "import sys, numpy as np\n"
        "from edgesmith.data.spec import PreprocessSpec\n"
        "from edgesmith.export.convert import export\n"
        "from edgesmith.recipe import ExportConfig\n"
        "from edgesmith.runtime import load_keras_model\n"
        "src, out = sys.argv[1], sys.argv[2]\n"
        "spec = PreprocessSpec.load_beside(src)\n"
        "x = np.random.default_rng(0).uniform(-1, 1, (32, *spec.input_shape)).astype(np.float32)\n"
        "print(export(load_keras_model(src), 'tflite-float32', ExportConfig(), spec=spec, out_dir=out,\n"
        "             name='model', validation_inputs=x).path)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(keras_file), str(out_dir)], capture_output=True,
                          text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", type=Path, help="TFLite files (default: a small conv net)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved bare/edgesmith rounds")
    parser.add_argument("--runs", type=int, default=300, help="minimum timed calls per measurement")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="minimum time per measurement")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the process to --threads cores")
    parser.add_argument("--keras", type=Path, help="also export this Keras model (e.g. the CIFAR-10 MobileNet, "
                        "runs/cifar10/train/model.keras) to float32 TFLite and measure it")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0)) if args.no_pin else pin_to_cores(args.threads)
    models = list(args.models) + ([export_float32(args.keras, Path(tempfile.mkdtemp()))] if args.keras else [])
    models = models or [small_convnet(Path(tempfile.mkdtemp()))]
    shape = TFLiteRunner(models[0]).interpreter.get_input_details()[0]["shape"][1:]
    sample = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    print(f"threads {args.threads}, cores {cores}, {args.rounds} interleaved rounds, each measurement "
          f">= {args.runs} calls and >= {args.min_seconds} s after 50 warm-up calls")
    rows = [overhead(p, sample, threads=args.threads, rounds=args.rounds, runs=args.runs,
                     min_seconds=args.min_seconds) for p in models]
    inputs = np.repeat(sample, 4, axis=0)
    repeat = repeatability(models, inputs, np.zeros(4, int), threads=args.threads, runs=args.runs,
                           min_seconds=args.min_seconds)
    for row in rows:
        print(f"\nper round p50 ms, {row['model']} (bare | edgesmith):")
        for i, (b, h) in enumerate(zip(row["bare_rounds_ms"], row["edgesmith_rounds_ms"], strict=True)):
            print(f"  round {i + 1}: {b:>10.4f} | {h:>10.4f}")
    summary = [{k: v for k, v in row.items() if not k.endswith("_rounds_ms")} for row in rows]
    tables = (("harness overhead (median of the rounds' p50, same process; target within 3%)", summary),
              ("two consecutive bench runs (p50; target within 5%)", repeat))
    for title, table in tables:
        print(f"\n{title}")
        print("  ".join(f"{k:>18}" for k in table[0]))
        for row in table:
            print("  ".join(f"{v!s:>18}" for v in row.values()))
    if args.json:
        args.json.write_text(json.dumps({"overhead": rows, "repeatability": repeat}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
