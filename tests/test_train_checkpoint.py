"""Checkpoints: a training killed mid-phase resumes from its last finished epoch, phase by phase."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import accuracy, tiny_recipe
from edgesmith.train import train, transfer
from edgesmith.train.checkpoints import PhaseCheckpoints

TESTS = Path(__file__).parent

TRAIN_SCRIPT = """
import json, logging, sys, time
import edgesmith._keras
from conftest import accuracy, tiny_recipe
from edgesmith.data.datasets import digits, with_validation
from edgesmith.data.pipeline import load_pixels
from edgesmith.train import train, transfer

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
if sys.argv[2] == "slow":  # a second per epoch, so the test can kill it between two epochs
    class SlowLogger(transfer.EpochLogger):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            time.sleep(1.0)
    transfer.EpochLogger = SlowLogger
data = with_validation(digits(seed=0), 0.15, 0)
result = train(data, tiny_recipe(), checkpoint_dir=sys.argv[1])
pixels, labels = load_pixels(data.test, result.spec.input_size)
test_accuracy = accuracy(result.model, result.spec.normalize(pixels).astype("float32"), labels)
print("RESULT " + json.dumps({"accuracy": test_accuracy, "history": result.history, **result.metrics}), flush=True)
"""


def start_training(checkpoints: Path, mode: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(checkpoints), mode], cwd=TESTS, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(TESTS)})


def wait_for_backup(process: subprocess.Popen, phase_dir: Path, timeout: float) -> None:
    """Until BackupAndRestore has written its first checkpoint of the phase (or the process ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if any(p.name == "checkpoint" for p in (phase_dir / "backup").rglob("checkpoint")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint under {phase_dir} after {timeout} s (exit code {process.poll()})")


def test_killed_training_resumes_from_its_last_epoch(tmp_path, trained_tiny, tiny_test_inputs):
    checkpoints = tmp_path / "checkpoints"
    first = start_training(checkpoints, "slow", tmp_path / "first.log")
    try:
        wait_for_backup(first, checkpoints / "head", timeout=180)
        first.send_signal(signal.SIGKILL)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL
    second = start_training(checkpoints, "fast", tmp_path / "second.log")
    try:
        second.wait(timeout=180)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    text = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, text[-4000:]
    resumed = [line for line in text.splitlines() if "resuming head from epoch" in line]
    assert resumed, text[-4000:]
    (result,) = [json.loads(line[len("RESULT "):]) for line in text.splitlines() if line.startswith("RESULT ")]
    epoch = result["resumed_from_epoch"]["head"]
    assert epoch >= 1 and f"resuming head from epoch {epoch} " in resumed[0]
    # the whole phase's history (epochs before the kill included) and the final metrics come back
    assert len(result["history"]["head"]["val_accuracy"]) == 8
    assert result["best_val_accuracy"] == pytest.approx(max(result["history"]["head"]["val_accuracy"]))
    assert not checkpoints.exists()  # removed once training finished
    uninterrupted = accuracy(trained_tiny.model, *tiny_test_inputs)  # the same recipe, never killed
    assert result["accuracy"] > 0.6 and abs(result["accuracy"] - uninterrupted) < 0.1, [result["accuracy"],
                                                                                         uninterrupted]


class Interrupted(Exception):
    pass


def test_a_finished_phase_is_skipped_and_the_next_resumes(digits_data, pretrained_tiny_weights, tmp_path,
                                                          monkeypatch, caplog):
    recipe = tiny_recipe(model={"weights": str(pretrained_tiny_weights)},
                         train={"head_epochs": 2, "finetune_epochs": 3, "unfreeze_layers": 4, "cache_features": True,
                                "finetune_learning_rate": 3e-4, "patience": 3})
    monkeypatch.setenv("EDGESMITH_CACHE_DIR", str(tmp_path / "features"))
    checkpoints = tmp_path / "checkpoints"

    class FailingLogger(transfer.EpochLogger):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            if self.phase == "finetune" and epoch == 1:  # after the second fine-tune epoch was checkpointed
                raise Interrupted

    monkeypatch.setattr(transfer, "EpochLogger", FailingLogger)
    with pytest.raises(Interrupted):
        train(digits_data, recipe, checkpoint_dir=checkpoints)
    assert (checkpoints / "head" / "done.json").is_file() and (checkpoints / "finetune" / "state.json").is_file()
    monkeypatch.undo()
    monkeypatch.setenv("EDGESMITH_CACHE_DIR", str(tmp_path / "features"))
    with caplog.at_level(logging.INFO, logger="edgesmith"):
        resumed = train(digits_data, recipe, checkpoint_dir=checkpoints)
    assert "phase head already finished before the restart" in caplog.text
    assert "resuming finetune from epoch 2 " in caplog.text
    assert "feature cache hit" in caplog.text  # the boundary activations were not recomputed either
    assert resumed.metrics["resumed_from_epoch"] == {"finetune": 2}
    assert [len(resumed.history[p]["val_accuracy"]) for p in ("head", "finetune")] == [2, 3]
    assert not checkpoints.exists()
    uninterrupted = train(digits_data, recipe)
    assert resumed.history["head"] == uninterrupted.history["head"]
    assert abs(resumed.metrics["best_val_accuracy"] - uninterrupted.metrics["best_val_accuracy"]) < 0.05


def test_checkpoints_of_another_recipe_are_discarded(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    (folder / "head").mkdir(parents=True)
    (folder / "fingerprint.json").write_text(json.dumps({"recipe": "another"}))
    (folder / "head" / "done.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="edgesmith"):
        PhaseCheckpoints(folder, {"recipe": "this one"})
    assert "checkpoints from another recipe or data set; starting training from scratch" in caplog.text
    assert not (folder / "head").exists()
    assert json.loads((folder / "fingerprint.json").read_text()) == {"recipe": "this one"}
