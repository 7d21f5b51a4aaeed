"""Bench over batch sizes and thread counts: fixed-batch fallbacks, latency entries, peak memory."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from edgesmith.bench import bench, write_reports
from edgesmith.bench.measure import BenchPlan
from edgesmith.bench.memory import peak_rss_in_child, reset_peak, status_bytes
from edgesmith.bench.report_schema import report_schema, validate_report
from edgesmith.errors import RecipeError
from edgesmith.recipe import BenchConfig, recipe_from_dict
from edgesmith.runtime import OnnxRunner, TFLiteRunner, cpu_threads, fixed_chunks
from tiny_artifacts import tiny_data, tiny_tflite

DOC = Path(__file__).resolve().parents[1] / "docs" / "report-schema.md"
LINUX_PROC = Path("/proc/self/status").is_file()


def fixed_batch_tflite(path: Path, *, resizable: bool) -> Path:
    """A 6 -> 3 TFLite model exported with batch 1; ``resizable=False`` hard-codes the batch in a Reshape."""
    import edgesmith._keras  # noqa: F401
    from edgesmith._keras import keras, tf

    if resizable:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,), batch_size=1), keras.layers.Dense(3, activation="softmax")])
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
    else:
        @tf.function(input_signature=[tf.TensorSpec([1, 6], tf.float32)])
        def fixed(x):
            summed = tf.reduce_sum(tf.reshape(x, [2, 3]), axis=0)  # 6 values: holds for a batch of 1 only
            return tf.nn.softmax(tf.reshape(summed, [1, 3]))

        converter = tf.lite.TFLiteConverter.from_concrete_functions([fixed.get_concrete_function()], fixed)
    path.write_bytes(converter.convert())
    return path


def fixed_batch_onnx(path: Path) -> Path:
    """MatMul + Softmax with the input declared as [1, 6]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.arange(18, dtype=np.float32).reshape(6, 3) / 10, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Softmax", ["m"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches")
    return {"dynamic": tiny_tflite(root / "dynamic.tflite", int8=False),
            "resizable": fixed_batch_tflite(root / "resizable.tflite", resizable=True),
            "fixed": fixed_batch_tflite(root / "fixed.tflite", resizable=False),
            "fixed_onnx": fixed_batch_onnx(root / "fixed.onnx")}


def one_by_one(runner, inputs):
    return np.concatenate([runner.predict(inputs[i : i + 1]) for i in range(len(inputs))])


# --- batch modes ---------------------------------------------------------------------------------


def test_fixed_chunks_pad_the_last_chunk_with_its_last_sample():
    batch = np.arange(5)[:, None]
    chunks = fixed_chunks(batch, 2)
    assert [c[:, 0].tolist() for c in chunks] == [[0, 1], [2, 3], [4, 4]]
    assert [c[:, 0].tolist() for c in fixed_chunks(batch, 1)] == [[0], [1], [2], [3], [4]]


def test_tflite_batch_modes(models):
    inputs, _ = tiny_data(count=5)
    dynamic, resizable, fixed = (TFLiteRunner(models[k], threads=1) for k in ("dynamic", "resizable", "fixed"))
    assert dynamic.fixed_batch is None and dynamic.batch_mode(8) == "native"
    assert resizable.fixed_batch == 1 and resizable.batch_mode(1) == "native"
    assert resizable.batch_mode(5) == "resized"
    assert fixed.fixed_batch == 1 and fixed.batch_mode(5) == "loop"
    # After the refused resize the interpreter is back at the exported shape and still runs.
    assert fixed.interpreter.get_input_details()[0]["shape"].tolist() == [1, 6]
    for runner in (resizable, fixed):
        np.testing.assert_allclose(runner.predict(inputs), one_by_one(runner, inputs), rtol=1e-6)
        assert runner.predict(inputs).shape == (5, 3)


def test_loop_latency_call_runs_the_model_once_per_sample(models):
    inputs, _ = tiny_data(count=4)
    runner = TFLiteRunner(models["fixed"], threads=1)
    calls = []
    original = runner._bind

    def counting_bind(batch):
        bound = original(batch)
        return lambda: (calls.append(len(batch)), bound())[1]

    runner._bind = counting_bind
    out = runner.latency_call(inputs)()
    assert calls == [1, 1, 1, 1] and out.shape == (4, 3)


def test_onnx_fixed_batch_loops(models):
    inputs, _ = tiny_data(count=3)
    runner = OnnxRunner(models["fixed_onnx"], threads=1)
    assert runner.fixed_batch == 1 and runner.batch_mode(3) == "loop" and runner.batch_mode(1) == "native"
    expected = np.exp(inputs @ (np.arange(18, dtype=np.float32).reshape(6, 3) / 10))
    np.testing.assert_allclose(runner.predict(inputs), expected / expected.sum(-1, keepdims=True), rtol=1e-5)


# --- bench over batch sizes and thread counts ----------------------------------------------------


@pytest.fixture(scope="module")
def batch_report(models):
    inputs, labels = tiny_data()
    artifacts = {k: models[k] for k in ("dynamic", "resizable", "fixed", "fixed_onnx")}
    cfg = BenchConfig(min_seconds=0, warmup=1, runs=3, threads=[1, 0], batch_sizes=[1, 4, 64], memory=False)
    return bench(artifacts, inputs, labels, cfg).to_dict()


def test_every_artifact_batch_and_thread_count_is_an_entry(batch_report):
    threads = list(dict.fromkeys([1, cpu_threads(0)]))
    entries = batch_report["latency"]
    expected = [(name, t, b) for name in ("dynamic", "resizable", "fixed", "fixed_onnx") for t in threads
                for b in (1, 4, 64)]
    assert [(e["name"], e["threads"], e["latency_batch"]) for e in entries] == expected
    for e in entries:
        assert e["throughput_ips"] == pytest.approx(e["latency_batch"] * e["latency_runs"] / e["latency_seconds"],
                                                    rel=1e-3)
        assert e["device"] == "cpu"
    modes = {(e["name"], e["latency_batch"]): e["batch_mode"] for e in entries}
    assert modes[("dynamic", 64)] == "native" and modes[("resizable", 4)] == "resized"
    assert modes[("fixed", 4)] == "loop" and modes[("fixed_onnx", 64)] == "loop"
    assert {modes[(name, 1)] for name in ("dynamic", "resizable", "fixed", "fixed_onnx")} == {"native"}
    notes = {(e["name"], e["latency_batch"]): e.get("note") for e in entries}
    assert notes[("dynamic", 4)] is None
    assert notes[("fixed", 64)] == notes[("fixed", 4)] == (
        "batch dimension fixed at 1 and not resizable: each timed batch is a loop of calls of 1 sample(s)")
    assert notes[("resizable", 4)] == "batch dimension fixed at 1 in the model; resized to 4"
    env = batch_report["environment"]
    assert env["thread_counts"] == threads and env["batch_sizes"] == [1, 4, 64] and env["device"] == "cpu"


def test_rows_hold_the_headline_entry_and_the_report_validates(batch_report):
    validate_report(batch_report)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(batch_report, report_schema())
    first = {}
    for entry in batch_report["latency"]:
        first.setdefault(entry["name"], entry)
    for row in batch_report["rows"]:
        headline = first[row["name"]]
        assert row["threads"] == 1 and row["latency_batch"] == 1
        assert row["latency_p50_ms"] == headline["latency_p50_ms"] and row["provider"] == headline["provider"]


def test_reports_have_a_line_per_entry(batch_report, tmp_path):
    write_reports(batch_report, tmp_path, title="batches")
    with open(tmp_path / "results.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == len(batch_report["latency"])
    fixed = [line for line in lines if line["name"] == "fixed"]
    assert [line["batch_mode"] for line in fixed][:3] == ["native", "loop", "loop"]
    assert {line["top1"] for line in fixed} == {str(batch_report["rows"][2]["top1"])}  # accuracy on every line
    markdown = (tmp_path / "report.md").read_text()
    assert "## Latency by batch size and threads" in markdown
    assert "| fixed | cpu | XNNPACK | 64 | 1 | loop |" in markdown
    assert "fixed (batch 4, threads 1), fixed (batch 64, threads 1)" in markdown


def test_a_tiny_batch_report_round_trips_through_json(batch_report, tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(batch_report))
    from edgesmith.bench.report import load_report

    assert load_report(tmp_path)["latency"] == batch_report["latency"]


def test_the_doc_lists_every_latency_key():
    text = DOC.read_text()
    keys = report_schema()["$defs"]["latency"]["properties"]
    assert not [key for key in keys if f"`{key}`" not in text]


# --- settings ------------------------------------------------------------------------------------


def test_plan_resolves_and_deduplicates_thread_counts():
    plan = BenchPlan.from_config(BenchConfig(threads=[0, cpu_threads(0), 1], batch_sizes=[8, 1, 8]))
    assert plan.threads == list(dict.fromkeys([cpu_threads(0), 1])) and plan.batch_sizes == [8, 1]
    assert BenchPlan.from_config(BenchConfig(threads=2)).threads == [2]  # an int from older callers
    assert BenchConfig().threads == [1, 0] and BenchConfig().batch_sizes == [1]
    with pytest.raises(RecipeError, match=r"bench\.batch_sizes is empty; give at least one value"):
        BenchPlan.from_config(BenchConfig(batch_sizes=[]))


@pytest.mark.parametrize(("bench_table", "message"), [
    ({"batch_sizes": [1, 0]}, r"bench\.batch_sizes = 0 is out of range; allowed: 1 <= batch_sizes <= 4096"),
    ({"threads": "all"}, r"bench\.threads\[0\] must be int, got str 'all'"),
    ({"device": "tpu"}, r"bench\.device = 'tpu' is not allowed; choose from cpu, gpu"),
    ({"onnx_providers": ["CUDA"]}, r"bench\.onnx_providers = 'CUDA' is not allowed; choose from CPUExecutionProvider"),
])
def test_recipe_rejects_bad_bench_settings(bench_table, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"bench": bench_table})


def test_a_single_thread_count_or_batch_size_is_a_list_of_one():
    # Run directories recorded before thread counts were lists hold `"threads": 0`; they still load.
    bench_cfg = recipe_from_dict({"bench": {"threads": 0, "batch_sizes": 8}}).bench
    assert bench_cfg.threads == [0] and bench_cfg.batch_sizes == [8]


def test_bench_cli_flags_become_validated_recipe_overrides():
    from edgesmith.cli import _bench_overrides, build_parser
    from edgesmith.recipe import Recipe, apply_overrides

    args = build_parser().parse_args(["bench", "runs/x", "--batch-sizes", "1,8,32", "--threads", "1,0", "--device",
                                      "gpu", "--onnx-providers", "TensorrtExecutionProvider,CUDAExecutionProvider",
                                      "--no-memory"])
    cfg = apply_overrides(Recipe(), _bench_overrides(args)).bench
    assert cfg.batch_sizes == [1, 8, 32] and cfg.threads == [1, 0] and cfg.device == "gpu" and not cfg.memory
    assert cfg.onnx_providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert _bench_overrides(build_parser().parse_args(["bench", "runs/x"])) == []
    bad = build_parser().parse_args(["bench", "runs/x", "--batch-sizes", "1,x"])
    with pytest.raises(RecipeError, match=r"bench\.batch_sizes"):
        apply_overrides(Recipe(), _bench_overrides(bad))


# --- peak memory ---------------------------------------------------------------------------------


def test_status_bytes_reads_kilobytes(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n")
    assert status_bytes("VmHWM", status) == 2048 * 1024 and status_bytes("VmRSS", status) == 1024 * 1024
    assert status_bytes("VmSwap", status) is None and status_bytes("VmHWM", tmp_path / "missing") is None
    assert reset_peak(tmp_path / "no" / "clear_refs") is False


@pytest.mark.skipif(not LINUX_PROC, reason="peak RSS is read from /proc/self/status (Linux only)")
def test_peak_memory_grows_with_the_model(tmp_path):
    small = tiny_tflite(tmp_path / "small.tflite", int8=False)
    large = tiny_tflite(tmp_path / "large.tflite", int8=False, hidden=400_000)  # ~19 MB of float32 weights
    measured = {p.stem: peak_rss_in_child(p, batch_sizes=[8, 1], threads=1) for p in (small, large)}
    for result in measured.values():
        peaks = result["peak_rss_bytes"]
        assert list(peaks) == [1, 8] and result["rss_before_load_bytes"] > 10_000_000
        assert result["rss_before_load_bytes"] <= peaks[1] <= peaks[8]
    added = {name: r["peak_rss_bytes"][8] - r["rss_before_load_bytes"] for name, r in measured.items()}
    assert added["large"] - added["small"] > 0.8 * (large.stat().st_size - small.stat().st_size)


def test_bench_records_peak_memory_in_rows_and_entries(models):
    inputs, labels = tiny_data()
    cfg = BenchConfig(min_seconds=0, warmup=1, runs=2, threads=[1], batch_sizes=[1, 4], memory=True)
    report = bench({"dynamic": models["dynamic"]}, inputs, labels, cfg).to_dict()
    validate_report(report)
    row, entries = report["rows"][0], report["latency"]
    if not LINUX_PROC:
        assert "peak_rss_bytes" not in row
        return
    assert row["peak_rss_bytes"] == max(e["peak_rss_bytes"] for e in entries) >= row["rss_before_load_bytes"] > 0
