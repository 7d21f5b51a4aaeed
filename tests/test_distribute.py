"""Distribution: strategy choice and errors, two workers on 127.0.0.1, mirrored replicas, mixed precision."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import accuracy, tiny_recipe
from edgesmith._keras import keras, tf
from edgesmith.errors import RecipeError, StrategyError
from edgesmith.train import distribute, train

TESTS = Path(__file__).parent
GOOD_TF_CONFIG = {"cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}, "task": {"type": "worker", "index": 1}}


def test_tf_config_is_read():
    workers, kind, index = distribute.cluster_from_tf_config(json.dumps(GOOD_TF_CONFIG))
    assert workers == ["127.0.0.1:2222", "127.0.0.1:2223"] and kind == "worker" and index == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, r"needs the TF_CONFIG environment variable"),
        ("", r"needs the TF_CONFIG environment variable"),
        ("{cluster:", r"TF_CONFIG is not valid JSON"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}}', r"TF_CONFIG needs a 'cluster' and a 'task'"),
        ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', r"TF_CONFIG cluster must list"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}',
         r"TF_CONFIG task .* does not name one of the cluster's tasks \(worker: 1\)"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}', r"TF_CONFIG task"),
    ],
)
def test_bad_tf_config_is_a_clear_error(value, message):
    with pytest.raises(StrategyError, match=message):
        distribute.cluster_from_tf_config(value)


def test_multiworker_without_tf_config_names_it(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(StrategyError, match="TF_CONFIG"):
        distribute.strategy_for("multiworker")


def test_tpu_without_a_tpu_is_a_clear_error():
    with pytest.raises(StrategyError, match=r"train\.strategy = 'tpu': no TPU found .* --strategy auto"):
        distribute.strategy_for("tpu")


def test_unknown_strategy_is_rejected_by_the_recipe():
    with pytest.raises(RecipeError, match=r"train\.strategy = 'gpus' is not allowed; choose from auto, none"):
        tiny_recipe(train={"strategy": "gpus"})


def test_auto_on_one_device_is_the_default_strategy(trained_tiny):
    assert distribute.strategy_for("auto") is tf.distribute.get_strategy()
    metrics = trained_tiny.metrics  # conftest's recipe leaves train.strategy at "auto"
    assert metrics["strategy"] == "auto" and metrics["replicas"] == 1
    assert metrics["global_batch_size"] == metrics["batch_size_per_replica"] == 32


def test_mixed_precision_on_cpu_warns_and_trains_float32(digits_data, caplog):
    recipe = tiny_recipe(train={"mixed_precision": True, "head_epochs": 1})
    with caplog.at_level(logging.WARNING, logger="edgesmith.train.distribute"):
        result = train(digits_data, recipe)
    assert "train.mixed_precision = true needs a GPU" in caplog.text
    assert result.metrics["precision_policy"] == "float32"
    assert all(layer.dtype_policy.name == "float32" for layer in result.model.layers)


def test_mixed_precision_keeps_the_output_float32_and_returns_a_float32_model(
    digits_data, tiny_test_inputs, monkeypatch
):
    monkeypatch.setattr(distribute, "gpu_count", lambda: 1)  # take the GPU path (mixed_float16 also runs on CPU)
    built = []
    original = distribute.with_float32_output

    def spy(model):
        rebuilt = original(model)
        built.append((model.layers[-2].compute_dtype, rebuilt.layers[-1].compute_dtype, rebuilt.output.dtype))
        return rebuilt

    monkeypatch.setattr(distribute, "with_float32_output", spy)
    result = train(digits_data, tiny_recipe(train={"mixed_precision": True}))
    assert built == [("float16", "float32", tf.float32)]  # trained in float16, softmax in float32
    assert result.metrics["precision_policy"] == "mixed_float16"
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after training
    assert all(layer.dtype_policy.name == "float32" for layer in result.model.layers)
    assert accuracy(result.model, *tiny_test_inputs) > 0.6


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


WORKER = """
import json, sys
import edgesmith._keras
from edgesmith.train.distribute import strategy_for
strategy = strategy_for(sys.argv[1])  # before any TensorFlow operation
from conftest import accuracy, tiny_recipe
from edgesmith.data.datasets import digits, with_validation
from edgesmith.data.pipeline import load_pixels
from edgesmith.train import train
from test_distribute import weights_digest
data = with_validation(digits(seed=0), 0.15, 0)
for name, sections in json.loads(sys.argv[2]).items():
    result = train(data, tiny_recipe(**{**sections, "train": {**sections["train"], "strategy": sys.argv[1]}}))
    pixels, labels = load_pixels(data.test, result.spec.input_size)
    test_accuracy = accuracy(result.model, result.spec.normalize(pixels).astype("float32"), labels)
    print("RESULT " + json.dumps({"name": name, "accuracy": test_accuracy, "digest": weights_digest(result.model),
                                  **result.metrics}), flush=True)
"""


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def run_processes(script: str, envs: list[dict[str, str]], argv: list[str], logs: Path,
                  timeout: float) -> list[list[dict]]:
    """Run ``script`` once per env, all at once; kill every one on failure or timeout. Their RESULT lines."""
    processes = []
    try:
        for i, env in enumerate(envs):
            with open(logs / f"worker{i}.log", "w") as out:
                processes.append(subprocess.Popen([sys.executable, "-c", script, *argv], cwd=TESTS, stdout=out,
                                                  stderr=subprocess.STDOUT, env={**os.environ, **env}))
        deadline = time.monotonic() + timeout
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = []
    for i, process in enumerate(processes):
        text = (logs / f"worker{i}.log").read_text()
        assert process.returncode == 0, f"worker {i} exited {process.returncode}:\n{text[-4000:]}"
        results.append([json.loads(line[len("RESULT "):]) for line in text.splitlines() if line.startswith("RESULT ")])
    return results


def worker_env(tmp_path: Path, index: int, tf_config: dict | None) -> dict[str, str]:
    env = {"PYTHONPATH": str(TESTS), "EDGESMITH_CACHE_DIR": str(tmp_path / f"features{index}"),
           "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


@pytest.fixture(scope="module")
def recipes(pretrained_tiny_weights) -> dict[str, dict]:
    """Both trainers on a pretrained base: on tf.data batches, and on cached boundary activations."""
    train_cfg = {"batch_size": 32, "head_epochs": 2, "finetune_epochs": 1, "unfreeze_layers": 4,
                 "finetune_learning_rate": 3e-4, "patience": 2}
    return {name: {"model": {"weights": str(pretrained_tiny_weights)}, "train": {**train_cfg, "cache_features": cache}}
            for name, cache in (("pipeline", False), ("cached", True))}


@pytest.fixture(scope="module")
def one_worker(digits_data, recipes, tiny_test_inputs) -> dict[str, dict]:
    results = {}
    for name, sections in recipes.items():
        result = train(digits_data, tiny_recipe(**sections))
        results[name] = {"accuracy": accuracy(result.model, *tiny_test_inputs), **result.metrics}
    return results


def test_two_workers_train_to_the_same_accuracy_band_as_one(tmp_path, recipes, one_worker):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    envs = [worker_env(tmp_path, i, {"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]
    workers = run_processes(WORKER, envs, ["multiworker", json.dumps(recipes)], tmp_path, timeout=240)
    assert [[r["name"] for r in results] for results in workers] == [list(recipes)] * 2
    for name, (first, second) in zip(recipes, zip(*workers, strict=True), strict=True):
        assert first["strategy"] == "multiworker" and first["replicas"] == 2
        assert first["global_batch_size"] == 2 * first["batch_size_per_replica"] == 64
        # synchronous all-reduce: both workers (each with its own feature cache) end with the same weights
        assert first["digest"] == second["digest"], name
        alone = one_worker[name]["accuracy"]
        assert first["accuracy"] > 0.6 and abs(first["accuracy"] - alone) < 0.15, (name, first["accuracy"], alone)


def test_mirrored_over_two_cpu_replicas_splits_the_global_batch(tmp_path, recipes, one_worker):
    # MirroredStrategy() takes the GPUs (else one CPU): on a CPU-only machine, mirror two logical CPUs
    split_cpu = ("import tensorflow as tf; from edgesmith.train import distribute; "
                 "cpu = tf.config.list_physical_devices('CPU')[0]; "
                 "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2); "
                 "distribute._created['mirrored'] = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])")
    mirrored = {"pipeline": recipes["pipeline"]}
    script = WORKER.replace("strategy = strategy_for", f"{split_cpu}\nstrategy = strategy_for")
    ((result,),) = run_processes(script, [worker_env(tmp_path, 0, None)], ["mirrored", json.dumps(mirrored)], tmp_path,
                                 timeout=180)
    assert result["strategy_class"] == "MirroredStrategy" and result["replicas"] == 2
    assert result["global_batch_size"] == 64
    assert abs(result["accuracy"] - one_worker["pipeline"]["accuracy"]) < 0.15 and result["accuracy"] > 0.6
