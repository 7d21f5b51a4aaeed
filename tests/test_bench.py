"""Bench: latency statistics, measured rows for every artifact, and the reports written from them."""

from __future__ import annotations

import csv
import gzip
import json
import time

import numpy as np
import pytest
from PIL import Image

from edgesmith.bench import bench, environment, measure_latency, write_reports
from edgesmith.bench.report import results_rows
from edgesmith.recipe import BenchConfig
from edgesmith.runtime import tensorflow_threads

ROW_KEYS = {  # at least these; bench may add more
    "name",
    "format",
    "runtime",
    "path",
    "top1",
    "eval_samples",
    "bytes",
    "gzip_bytes",
    "params",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_mean_ms",
    "latency_runs",
    "threads",
    "input_dtype",
}


BENCHED_FORMATS = ("tflite-float32", "tflite-float16", "tflite-dynamic", "tflite-int8", "onnx-float32")


def test_measure_latency_warms_up_then_times_runs():
    calls = []

    def call():
        calls.append(time.perf_counter())
        time.sleep(0.002 if len(calls) % 2 else 0.001)

    result = measure_latency(call, warmup=3, runs=8)
    assert len(calls) == 11
    assert result["latency_runs"] == 8
    assert result["latency_p50_ms"] <= result["latency_p90_ms"]
    assert result["latency_p50_ms"] >= 0.9  # every timed call sleeps at least 1 ms
    assert result["latency_p90_ms"] >= 1.9  # half of them sleep 2 ms
    assert result["latency_mean_ms"] >= result["latency_p50_ms"] * 0.5 > 0


@pytest.fixture(scope="module")
def bench_report(tiny_exports, tiny_keras_file, tiny_test_inputs):
    artifacts = {"float_keras": tiny_keras_file}
    artifacts.update({fmt.replace("-", "_"): tiny_exports[fmt].path for fmt in BENCHED_FORMATS})
    inputs, labels = tiny_test_inputs
    return bench(artifacts, inputs, labels, BenchConfig(min_seconds=0, warmup=2, runs=5, threads=[1], memory=False))


def test_bench_rows_measure_every_artifact(
    bench_report, tiny_exports, tiny_keras_file, tiny_test_inputs, trained_tiny
):
    rows = {row["name"]: row for row in bench_report.rows}
    assert list(rows) == [
        "float_keras",
        "tflite_float32",
        "tflite_float16",
        "tflite_dynamic",
        "tflite_int8",
        "onnx_float32",
    ]
    inputs, labels = tiny_test_inputs
    keras_top1 = float(np.mean(trained_tiny.model.predict(inputs, verbose=0).argmax(-1) == labels))
    for name, row in rows.items():
        assert ROW_KEYS <= set(row), (name, ROW_KEYS - set(row))
        assert row["eval_samples"] == len(labels)
        assert 0.6 < row["top1"] <= 1.0
        assert row["latency_runs"] == 5 and 0 < row["latency_p50_ms"] <= row["latency_p90_ms"]
        # TensorFlow fixes its thread pool when it starts (here: when the fixture trained the model).
        assert row["threads"] == (tensorflow_threads(0) if name == "float_keras" else 1)
        path = tiny_keras_file if name == "float_keras" else tiny_exports[name.replace("_", "-", 1)].path
        assert row["path"] == str(path)
        assert row["bytes"] == path.stat().st_size
        assert row["gzip_bytes"] == len(gzip.compress(path.read_bytes(), compresslevel=9))
    assert rows["float_keras"] | {"format": "keras", "runtime": "tensorflow"} == rows["float_keras"]
    assert rows["float_keras"]["top1"] == pytest.approx(keras_top1, abs=1e-5)
    assert rows["tflite_float32"]["top1"] == pytest.approx(keras_top1, abs=1e-5)
    # Agreement with the first row (the reference): exact for float32, absent in the reference itself.
    assert "top1_agreement" not in rows["float_keras"]
    assert rows["tflite_float32"]["top1_agreement"] == 1.0 and rows["onnx_float32"]["top1_agreement"] == 1.0
    assert all(0.6 < row["top1_agreement"] <= 1.0 for name, row in rows.items() if name != "float_keras")
    assert (
        rows["onnx_float32"]["runtime"] == "onnxruntime"
        and rows["tflite_int8"]["runtime"] == "ai-edge-litert"
    )
    assert rows["tflite_int8"]["input_dtype"] == "int8" and rows["tflite_float32"]["input_dtype"] == "float32"
    assert abs(rows["tflite_int8"]["top1"] - keras_top1) < 0.05
    # Parameters: Keras counts BatchNormalization statistics that the converters fold into the convolutions.
    keras_params = trained_tiny.model.count_params()
    assert rows["float_keras"]["params"] == keras_params
    for name in ("tflite_float32", "onnx_float32", "tflite_int8"):
        assert 0.8 * keras_params < rows[name]["params"] <= keras_params, name


def test_bench_eval_limit(tiny_exports, tiny_test_inputs):
    inputs, labels = tiny_test_inputs
    report = bench(
        {"f": tiny_exports["tflite-float32"].path},
        inputs,
        labels,
        BenchConfig(min_seconds=0, warmup=0, runs=1, eval_limit=10),
    )
    expected = float(
        np.mean(labels[:10] == report_predictions(tiny_exports["tflite-float32"].path, inputs[:10]))
    )
    assert report.rows[0]["eval_samples"] == 10
    assert report.rows[0]["top1"] == pytest.approx(expected)


def report_predictions(path, inputs):
    from edgesmith.runtime import load_runner

    runner = load_runner(path)
    return np.concatenate([runner.predict(inputs[i : i + 1]) for i in range(len(inputs))]).argmax(-1)


def test_environment_records_the_machine():
    env = environment(threads=1)
    assert env["threads"] == 1 and env["cores"] >= 1
    assert (
        env["versions"]["tensorflow"] and env["versions"]["onnxruntime"] and env["versions"]["ai-edge-litert"]
    )
    assert env["python"].count(".") == 2
    assert isinstance(env["gpus"], list) and isinstance(env["cpu_flags"], list)
    json.dumps(env)


def test_write_reports(bench_report, tmp_path):
    report = bench_report.to_dict()
    written = write_reports(report, tmp_path, title="tiny report", extra_sections=["## Notes\n\nhello"])
    assert set(written) == {
        "report_json",
        "results_csv",
        "accuracy_vs_size",
        "accuracy_vs_latency",
        "report_md",
    }
    for name in (
        "report.json",
        "results.csv",
        "report.md",
        "accuracy_vs_size.png",
        "accuracy_vs_latency.png",
    ):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    for png in ("accuracy_vs_size.png", "accuracy_vs_latency.png"):
        with Image.open(tmp_path / png) as image:
            assert image.format == "PNG" and image.width > 300

    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["schema_version"] == 1 and saved["environment"] == json.loads(
        json.dumps(report["environment"])
    )
    with open(tmp_path / "results.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    # One CSV line per latency entry (artifact, batch size, thread count), with its artifact's accuracy and size.
    assert len(csv_rows) == len(saved["latency"]) == len(saved["rows"])
    for csv_row, json_row in zip(csv_rows, results_rows(saved), strict=True):
        expected = {key: "" if json_row.get(key) is None else str(json_row[key]) for key in csv_row}
        assert csv_row == expected, json_row["name"]
        assert {"name", "top1", "bytes", "gzip_bytes", "params", "latency_p50_ms"} <= set(csv_row)

    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# tiny report")
    for row in saved["rows"]:
        assert f"| {row['name']} | {row['format']} | {row['runtime']} | {100 * row['top1']:.2f} |" in markdown
    assert "## Notes" in markdown and "![accuracy vs size](accuracy_vs_size.png)" in markdown
