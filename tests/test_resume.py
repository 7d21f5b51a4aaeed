"""Interrupted runs: Ctrl-C exits cleanly and marks the stage incomplete; --resume continues the run.

The Ctrl-C case interrupts a real `edgesmith run quickstart` in a subprocess during training and
resumes it to completion (one module-scoped run, reused by the tests after it). The resume logic
itself is checked on fast stand-in stages that write and record one file each.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import QUICK_OVERRIDES
from edgesmith import workflow
from edgesmith.cli import EXIT_BAD_INPUT, main
from edgesmith.errors import RecipeError, RunDirError
from edgesmith.recipe import apply_overrides, load_recipe
from edgesmith.runs import RunDir, write_text
from edgesmith.workflow import run_recipe, stages_to_resume

# quick, and fewer artifacts and measurements: resume is under test here, not every technique and format
OVERRIDES = [*QUICK_OVERRIDES, "optimize.techniques=['prune']", "optimize.check_samples=0",
             "export.formats=['tflite-float32','tflite-int8']", "bench.include_keras=false", "bench.memory=false",
             "bench.eval_limit=200"]
STAGES = ("train", "optimize", "export", "bench")


def quickstart_argv(out: Path, *extra: str) -> list[str]:
    argv = ["run", "quickstart", "--out", str(out), *extra]
    for override in OVERRIDES:
        argv += ["--set", override]
    return argv


def temporary_files(folder: Path) -> list[Path]:
    """Files left under their atomic-write temporary name (``.<stem>.<random>.tmp<suffix>``)."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


@dataclass
class Interrupted:
    run: Path
    returncode: int
    stderr: str
    manifest: dict
    files: list[str]
    temporary: list[Path]


def interrupt_during_training(out: Path) -> Interrupted:
    """Start `edgesmith run quickstart`, send SIGINT once the first training epoch is logged."""
    # A shell starts background jobs with SIGINT ignored, and the child would inherit that (Python then
    # installs no KeyboardInterrupt handler): give the child the default disposition, as in a terminal.
    proc = subprocess.Popen([sys.executable, "-m", "edgesmith.cli", *quickstart_argv(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(600, proc.kill)  # a hung child must not hang the suite
    watchdog.start()
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "epoch 1:" in line:
                proc.send_signal(signal.SIGINT)
                break
        stderr = "".join(seen) + proc.stderr.read()
        proc.wait()
    finally:
        watchdog.cancel()
    assert any("epoch 1:" in line for line in seen), f"training never logged an epoch:\n{stderr[-3000:]}"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    manifest = json.loads((out / "manifest.json").read_text())
    return Interrupted(out, proc.returncode, stderr, manifest, files, temporary_files(out))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Interrupted:
    """A quickstart run interrupted during training (as it was right after the interrupt)."""
    return interrupt_during_training(tmp_path_factory.mktemp("interrupted") / "run")


@pytest.fixture(scope="module")
def resumed(interrupted) -> Path:
    """The interrupted run, resumed to completion with `edgesmith run ... --resume` (exit code checked)."""
    assert main(quickstart_argv(interrupted.run, "--resume")) == 0
    return interrupted.run


def test_ctrl_c_during_training_exits_130_with_one_line(interrupted):
    assert interrupted.returncode == 130
    assert "Traceback" not in interrupted.stderr
    ours = [line for line in interrupted.stderr.splitlines() if line.startswith("edgesmith:")]
    assert ours == ["edgesmith: interrupted; the run directory's manifest.json records which stages finished; "
                    "repeat the command with --resume to continue"]


def test_ctrl_c_marks_train_incomplete_and_leaves_no_partial_file(interrupted):
    assert interrupted.manifest["status"] == "incomplete: train did not finish"
    assert interrupted.manifest["stages"] == {}
    assert "train/model.keras" not in interrupted.files
    assert interrupted.temporary == []


def test_resume_completes_the_interrupted_run(resumed):
    manifest = RunDir.open(resumed).manifest()
    assert manifest["status"] == "complete"
    assert manifest["resumed"] == ["train"]
    assert list(manifest["stages"]) == list(STAGES)
    assert manifest["stages"]["train"]["metrics"]["best_val_accuracy"] > 0.5
    rows = json.loads((resumed / "report.json").read_text())["rows"]
    assert {row["name"] for row in rows} == {"float_float32", "float_int8", "pruned_int8"}
    assert temporary_files(resumed) == []


def test_resume_of_a_complete_run_reruns_nothing(resumed, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(resumed, run)
    before = RunDir.open(run).manifest()["stages"]
    caplog.set_level("INFO", logger="edgesmith")
    run_recipe(apply_overrides(load_recipe("quickstart"), OVERRIDES), out=run, resume=True)
    assert RunDir.open(run).manifest()["stages"] == before
    assert "resume: every stage finished and its outputs are intact; nothing to run" in caplog.text


@pytest.mark.parametrize(("edited", "expected"), [
    ("report.json", ("bench",)),
    ("export/float_int8.tflite", ("export", "bench")),
    ("train/model.keras", STAGES),
])
def test_resume_starts_at_the_stage_whose_output_changed(resumed, tmp_path, edited, expected):
    run = tmp_path / "run"
    shutil.copytree(resumed, run)
    with open(run / edited, "ab") as handle:  # one byte more, after the stage recorded its sha256
        handle.write(b"\0")
    assert stages_to_resume(RunDir.open(run), STAGES) == expected


# ---- the resume logic on stand-in stages (each writes and records one small file) ----


@pytest.fixture
def fake_stages(monkeypatch):
    """Replace the four stage runners; returns the list of stages run and the set of stages to fail."""
    calls: list[str] = []
    failing: dict[str, BaseException] = {}

    def runner_for(stage):
        def runner(run, recipe, data):
            calls.append(stage)
            if stage in failing:
                raise failing.pop(stage)
            path = write_text(run.stage_dir(stage) / "out.txt", f"{stage} output")
            return run.record_stage(stage, config={}, inputs={}, outputs={"out": path})
        return runner

    for stage in STAGES:
        monkeypatch.setitem(workflow.STAGE_RUNNERS, stage, runner_for(stage))
    return calls, failing


@pytest.fixture
def quick():
    return load_recipe("quickstart")


def test_interrupted_stage_is_marked_and_resume_starts_there(tmp_path, fake_stages, quick):
    calls, failing = fake_stages
    failing["export"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        run_recipe(quick, out=tmp_path / "run")
    manifest = RunDir.open(tmp_path / "run").manifest()
    assert manifest["status"] == "incomplete: export did not finish"
    assert list(manifest["stages"]) == ["train", "optimize"]
    calls.clear()
    run_recipe(quick, out=tmp_path / "run", resume=True)
    assert calls == ["export", "bench"]
    assert RunDir.open(tmp_path / "run").manifest()["status"] == "complete"


def test_failed_stage_is_marked_incomplete(tmp_path, fake_stages, quick):
    _, failing = fake_stages
    failing["optimize"] = MemoryError()
    with pytest.raises(MemoryError):
        run_recipe(quick, out=tmp_path / "run")
    manifest = RunDir.open(tmp_path / "run").manifest()
    assert manifest["status"] == "incomplete: optimize did not finish"
    assert list(manifest["stages"]) == ["train"]


@pytest.mark.parametrize(("damage", "expected"), [
    ("delete", ("optimize", "export", "bench")),
    ("edit", ("optimize", "export", "bench")),
])
def test_missing_or_edited_output_makes_its_stage_run_again(tmp_path, fake_stages, quick, damage, expected):
    run = run_recipe(quick, out=tmp_path / "run")
    output = run.path / "optimize" / "out.txt"
    output.unlink() if damage == "delete" else output.write_text("edited")
    assert run.changed_outputs("optimize") == ["out"]
    assert stages_to_resume(run, STAGES) == expected


def test_records_of_rerun_stages_are_dropped_before_they_run(tmp_path, fake_stages, quick):
    calls, failing = fake_stages
    run = run_recipe(quick, out=tmp_path / "run")
    (run.path / "train" / "out.txt").write_text("edited")
    failing["optimize"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        run_recipe(quick, out=run.path, resume=True)
    # the old optimize/export/bench records described outputs of the old train output: they must not count
    assert list(run.manifest()["stages"]) == ["train"]
    calls.clear()
    run_recipe(quick, out=run.path, resume=True)
    assert calls == ["optimize", "export", "bench"]
    assert run.manifest()["resumed"] == ["train", "optimize"]  # each resume, by the stage it started at


def test_resume_with_fewer_stages_runs_only_those(tmp_path, fake_stages, quick):
    calls, _ = fake_stages
    run_recipe(quick, out=tmp_path / "run", stages=("train",))
    calls.clear()
    run_recipe(quick, out=tmp_path / "run", resume=True, stages=("train", "optimize"))
    assert calls == ["optimize"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "train.head_epochs=3"], r"train\.head_epochs \(recorded 12, given 3\)"),
    (["--set", "seed=1", "--set", "optimize.sparsity=0.7"],
     r"optimize\.sparsity \(recorded 0\.5, given 0\.7\); seed \(recorded 42, given 1\)"),
    (["--strict"], r"data\.strict \(recorded False, given True\)"),
])
def test_resume_with_a_different_recipe_is_refused(tmp_path, fake_stages, quick, capsys, extra, message):
    run_recipe(quick, out=tmp_path / "run", stages=("train",))
    assert main(["run", "quickstart", "--out", str(tmp_path / "run"), "--resume", *extra]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("edgesmith: error: --resume: the recipe differs from the one recorded in ")
    assert f"{tmp_path / 'run' / 'recipe.json'} at " in err
    assert re.search(message, err), err
    assert err.endswith("resume with the same recipe, --set, --strict and --data values, or start over with --force")


def test_resume_with_another_data_folder_is_refused(tmp_path, fake_stages, quick, image_folder):
    run_recipe(quick, out=tmp_path / "run", stages=("train",))
    with pytest.raises(RecipeError, match=rf"data\.path \(recorded '', given '{re.escape(str(image_folder))}'\)"):
        run_recipe(quick, out=tmp_path / "run", data_path=image_folder, resume=True)


def test_resume_without_a_run_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["run", "quickstart", "--out", str(tmp_path / "nothing"), "--resume"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err == (f"edgesmith: error: --resume: {tmp_path / 'nothing'} holds no run to resume (no manifest.json); "
                   "drop --resume to start a new run there")


def test_resume_and_force_together_are_refused(tmp_path, capsys):
    assert main(["run", "quickstart", "--out", str(tmp_path / "run"), "--resume", "--force"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == (
        "edgesmith: error: --resume and --force contradict each other: --resume continues the run in --out, "
        "--force starts it over; pass only one")
    assert not (tmp_path / "run").exists()


def test_existing_run_without_resume_or_force_names_both(tmp_path, fake_stages, quick):
    run_recipe(quick, out=tmp_path / "run", stages=("train",))
    with pytest.raises(RunDirError, match=r"already holds a run; pass --force to overwrite it, --resume to continue"):
        run_recipe(quick, out=tmp_path / "run")
