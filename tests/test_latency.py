"""Latency method: minimum count and minimum time, percentiles, throughput, cold start, notes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from edgesmith.bench import bench, measure_latency
from edgesmith.bench.report import latency_notes, markdown_table
from edgesmith.bench.report_schema import report_schema, validate_report
from edgesmith.recipe import BenchConfig
from tiny_artifacts import make_row, tiny_data, tiny_tflite

LATENCY_KEYS = {"latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_mean_ms", "latency_std_ms",
                "latency_min_ms", "latency_runs", "latency_warmup", "latency_seconds", "latency_batch",
                "throughput_ips"}


def counting_call(seconds: float = 0.0):
    calls = []

    def call():
        calls.append(1)
        if seconds:
            time.sleep(seconds)

    return call, calls


def test_minimum_count_when_the_time_is_already_spent():
    call, calls = counting_call(0.002)
    result = measure_latency(call, warmup=2, runs=6, min_seconds=0.001)
    assert len(calls) == 8 and result["latency_runs"] == 6 and result["latency_warmup"] == 2
    assert set(result) == LATENCY_KEYS


def test_minimum_time_adds_runs_to_a_fast_call():
    call, calls = counting_call()
    result = measure_latency(call, warmup=0, runs=5, min_seconds=0.05)
    assert result["latency_runs"] == len(calls) > 5  # far more than 5 calls fit in 50 ms
    assert result["latency_seconds"] <= 0.05 + 0.05  # the summed call times, not more than the loop


def test_max_runs_bounds_the_loop():
    call, calls = counting_call()
    result = measure_latency(call, warmup=0, runs=3, min_seconds=60, max_runs=100)
    assert result["latency_runs"] == len(calls) == 100


def test_statistics_are_consistent():
    call, _ = counting_call(0.001)
    r = measure_latency(call, warmup=1, runs=20, batch=4)
    assert r["latency_min_ms"] <= r["latency_p50_ms"] <= r["latency_p90_ms"] <= r["latency_p99_ms"]
    assert r["latency_min_ms"] >= 0.9 and r["latency_std_ms"] >= 0
    assert r["latency_batch"] == 4
    assert r["throughput_ips"] == pytest.approx(4 * 20 / r["latency_seconds"], rel=1e-3)
    assert r["latency_mean_ms"] == pytest.approx(1000 * r["latency_seconds"] / 20, rel=1e-3)


def test_a_single_run_has_zero_spread():
    call, _ = counting_call()
    result = measure_latency(call, warmup=0, runs=1)
    assert result["latency_runs"] == 1 and result["latency_std_ms"] == 0.0


@pytest.fixture(scope="module")
def tflite_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("latency")
    return {"float_float32": tiny_tflite(root / "float_float32.tflite", int8=False),
            "model_int8": tiny_tflite(root / "model_int8.tflite")}


def test_bench_rows_carry_the_new_latency_fields_and_validate(tflite_pair):
    inputs, labels = tiny_data()
    # Older callers pass a namespace with a single int of threads and no batch sizes; bench accepts it.
    cfg = SimpleNamespace(warmup=2, runs=5, threads=1, eval_limit=0, min_seconds=0.05)
    report = bench(tflite_pair, inputs, labels, cfg).to_dict()
    validate_report(report)
    row_schema = report_schema()["$defs"]["row"]["properties"]
    for row in report["rows"]:
        assert set(row) <= set(row_schema)
        assert LATENCY_KEYS | {"cold_start_ms"} <= set(row), row["name"]
        assert row["latency_runs"] > 5 and row["latency_seconds"] > 0.02  # min_seconds honoured
        assert row["cold_start_ms"] > 0 and row["latency_batch"] == 1


def test_bench_without_min_seconds_keeps_the_run_count(tflite_pair):
    inputs, labels = tiny_data()
    report = bench(tflite_pair, inputs, labels, BenchConfig(min_seconds=0, warmup=1, runs=4, threads=1))
    assert [row["latency_runs"] for row in report.rows] == [4, 4]


def test_benching_tflite_alone_imports_no_tensorflow(tflite_pair):
    code = (
        "import sys, numpy as np\n"
        "from edgesmith.bench import bench\n"
        "from edgesmith.recipe import BenchConfig\n"
        f"paths = {{k: v for k, v in {dict((k, str(v)) for k, v in tflite_pair.items())!r}.items()}}\n"
        "x = np.zeros((4, 6), np.float32); y = np.zeros(4, int)\n"
        "report = bench(paths, x, y, BenchConfig(min_seconds=0, warmup=1, runs=2, threads=1))\n"
        "assert len(report.rows) == 2\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ""}, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_quantized_slower_than_float_gets_a_note():
    rows = [make_row("float_float32", bytes_=400_000, p50=1.0),
            make_row("pruned_int8", bytes_=100_000, p50=1.5, input_dtype="int8"),
            make_row("qat_int8", bytes_=100_000, p50=0.5, input_dtype="int8"),
            make_row("float_onnx", fmt="onnx", bytes_=400_000, p50=0.2)]
    notes = latency_notes(rows)
    assert notes == ["Note: pruned_int8 is slower than float_float32 at p50 (1.50 vs 1.00 ms on "
                     "ai-edge-litert): quantized kernels are not faster on every CPU; the measurement is "
                     "reported as taken."]


def test_markdown_table_shows_new_columns_and_tolerates_old_rows():
    new = make_row("a", p50=0.01234, latency_p99_ms=0.02, throughput_ips=81000.0, cold_start_ms=3.5)
    table = markdown_table([new, make_row("old", p50=150.0)])
    lines = table.splitlines()
    assert lines[0].split("|")[9:15] == [" p50 ms ", " p90 ms ", " p99 ms ", " img/s ", " cold start ms ",
                                         " threads "]
    assert "| 0.0123 | 0.0136 | 0.0200 | 81,000 | 3.50 | 1 |" in lines[2]
    assert "| 150.0 | 165.0 | - | - | - | 1 |" in lines[3]


def test_tflite_latency_call_is_invoke_alone_on_the_bound_input(tflite_pair):
    from edgesmith.runtime import TFLiteRunner, dequantize

    inputs, _ = tiny_data()
    runner = TFLiteRunner(tflite_pair["model_int8"], threads=1)
    expected = runner.predict(inputs[:1])
    call = runner.latency_call(inputs[:1])
    assert call == runner.interpreter.invoke
    call()  # the input was written once, by latency_call itself
    output = runner.interpreter.get_output_details()[0]
    got = dequantize(runner.interpreter.get_tensor(output["index"]), output)
    assert (got == expected).all()
