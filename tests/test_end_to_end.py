"""End to end: `edgesmith run` on the bundled quickstart recipe and on a subset of real CIFAR-10."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, sha256
from edgesmith.cli import main
from edgesmith.runs import STAGES, RunDir

REPORT_FILES = ("report.md", "report.json", "results.csv", "accuracy_vs_size.png", "accuracy_vs_latency.png")


def check_run_directory(path: Path) -> dict:
    """Every stage finished, every file the manifest lists exists with its hash, every export validated."""
    run = RunDir.open(path)
    manifest = run.manifest()
    assert list(manifest["stages"]) == list(STAGES)
    listed = 0
    for stage, entry in manifest["stages"].items():
        for kind in ("inputs", "outputs"):
            for key, record in entry[kind].items():
                if "sha256" not in record:  # a non-file input such as a bundled data set's name
                    assert kind == "inputs", f"{stage} output {key} was not written"
                    continue
                file = path / record["path"]
                if kind == "inputs" and file.is_dir():  # a data folder: present is enough (rehashing is slow)
                    continue
                assert file.is_file(), f"{stage} {kind} {key}: {file} missing"
                assert file.stat().st_size == record["bytes"], f"{stage} {kind} {key}: size changed"
                assert sha256(file) == record["sha256"], f"{stage} {kind} {key}: content changed"
                listed += 1
    assert listed > 10
    validations = manifest["stages"]["export"]["metrics"]
    assert validations and all(v and v["passed"] for v in validations.values()), validations
    assert json.loads((path / "export" / "validation.json").read_text()).keys() == validations.keys()
    for name in REPORT_FILES:
        assert (path / name).is_file() and (path / name).stat().st_size > 0, name
    report = json.loads((path / "report.json").read_text())
    exported = {
        k
        for k, v in manifest["stages"]["export"]["outputs"].items()
        if v["path"].endswith((".tflite", ".onnx"))
    }
    assert exported <= {row["name"] for row in report["rows"]}  # every artifact was benchmarked
    return manifest


@pytest.mark.slow
def test_quickstart_end_to_end(quickstart_run, quick_recipe):
    manifest = check_run_directory(quickstart_run)
    # The CLI's --set overrides resolved to exactly the recipe apply_overrides builds, and it was recorded.
    assert manifest["recipe"] == json.loads(json.dumps(quick_recipe.to_dict()))
    exports = manifest["stages"]["export"]["outputs"]
    assert {
        "float_float32",
        "float_float16",
        "float_dynamic",
        "float_int8",
        "float_onnx",
        "pruned_int8",
        "qat_int8",
    } <= set(exports)
    assert manifest["stages"]["optimize"]["metrics"]["prune_sparsity_overall"] == pytest.approx(0.5, abs=0.02)
    rows = {row["name"]: row for row in json.loads((quickstart_run / "report.json").read_text())["rows"]}
    assert rows["float_keras"]["top1"] > 0.8, rows["float_keras"]
    assert rows["float_float32"]["top1"] == pytest.approx(rows["float_keras"]["top1"], abs=0.005)
    assert rows["qat_int8"]["bytes"] < rows["float_float32"]["bytes"] / 2


CIFAR_FALLBACK_RECIPE = """
name = "cifar10"
seed = 42
[data]
dataset = "cifar10"
val_fraction = 0.1
[model]
backbone = "mobilenet"
weights = "imagenet"
input_size = 96
dense_units = 256
[train]
batch_size = 128
unfreeze_layers = 13
cache_features = true
"""

# A small stratified subset and short phases: minutes on 2 cores, not hours. Full-integer post-training
# quantization of MobileNet v1 agrees with the float model on only ~84-88% of these images (below the 0.90
# gate; measured, see the test-suite report), so this run exports float formats plus the QAT model's int8.
CIFAR_OVERRIDES = [
    "data.limit_per_class=60",
    "data.test_limit_per_class=30",
    "train.batch_size=32",
    "train.head_epochs=4",
    "train.finetune_epochs=1",
    "train.patience=2",
    "optimize.finetune_samples=200",
    "optimize.batch_size=32",
    'export.formats=["tflite-float32", "tflite-float16", "onnx-float32"]',
    "export.calibration_samples=50",
    "export.validation_samples=100",
    "bench.warmup=2",
    "bench.runs=10",
    "bench.min_seconds=0.1",
    "bench.eval_limit=0",
]


@pytest.mark.slow
def test_cifar10_subset_end_to_end(cifar10_dir, mobilenet_weights, tmp_path, capsys):
    recipe = REPO_ROOT / "recipes" / "cifar10.toml"
    if not recipe.is_file():
        recipe = tmp_path / "cifar10.toml"
        recipe.write_text(CIFAR_FALLBACK_RECIPE)
    out = tmp_path / "run"
    argv = ["run", str(recipe), "--data", str(cifar10_dir), "--out", str(out)]
    for override in CIFAR_OVERRIDES:
        argv += ["--set", override]
    started = time.perf_counter()
    assert main(argv) == 0
    seconds = time.perf_counter() - started
    with capsys.disabled():
        print(f"\nCIFAR-10 subset end to end: {seconds:.0f} s")

    manifest = check_run_directory(out)
    assert manifest["data"]["counts"]["train"] == [54] * 10
    assert manifest["data"]["counts"]["val"] == [6] * 10
    assert manifest["data"]["counts"]["test"] == [30] * 10
    assert manifest["recipe"]["model"]["backbone"] == "mobilenet"
    assert {"float_float32", "float_float16", "float_onnx", "qat_int8"} <= set(
        manifest["stages"]["export"]["outputs"]
    )
    rows = {row["name"]: row for row in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["float_keras"]["eval_samples"] == 300
    assert rows["float_keras"]["top1"] > 0.45, rows["float_keras"]  # chance is 0.10
    assert rows["float_float32"]["top1"] == pytest.approx(rows["float_keras"]["top1"], abs=0.01)
