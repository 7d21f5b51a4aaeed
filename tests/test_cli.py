"""The command line: listings, clean one-line errors with exit code 2, stage re-runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pytest

from conftest import sha256
from edgesmith.cli import EXIT_BAD_INPUT, main
from edgesmith.zoo import list_backbones


def test_models_lists_every_backbone(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["name", "size", "preprocess", "imagenet"]
    listed = [line.split()[0] for line in lines[1:]]
    assert listed == [b.name for b in list_backbones()]
    tiny = next(line for line in lines if line.startswith("tiny_cnn"))
    assert tiny.split()[1:4] == ["16", "unit", "no"]


def test_env_prints_json_with_versions(capsys):
    assert main(["env"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["versions"]["tensorflow"] == metadata.version("tensorflow")
    assert env["versions"]["tf_keras"] == metadata.version("tf_keras")
    assert env["versions"]["onnxruntime"] == metadata.version("onnxruntime")
    assert env["cores"] >= 1 and env["threads"] == env["cores"]
    assert {"cpu", "cpu_flags", "machine", "python", "platform", "gpus"} <= set(env)


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "edgesmith.cli", "-q", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> str:
    import re

    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("edgesmith: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]  # the last thing printed
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (
            ["--set", 'data.dataset="folder"', "--data", "{tmp}/no-such-folder"],
            r"data folder .*no-such-folder does not exist; pass --data",
        ),
        (["--set", 'model.backbone="nope"'], r"unknown backbone 'nope'; registered: .*tiny_cnn"),
        (["--set", 'model.weights="{tmp}/missing.h5"'], r"missing\.h5 does not exist"),
    ],
    ids=["missing-data-folder", "unknown-backbone", "missing-weights-file"],
)
def test_run_errors_are_one_line_with_exit_code_2(tmp_path, extra, pattern):
    args = ["run", "quickstart", "--out", str(tmp_path / "run"), *(a.format(tmp=tmp_path) for a in extra)]
    assert_one_line_error(run_cli(*args), pattern)


def test_missing_data_folder_creates_no_run_directory(tmp_path, capsys):
    code = main(
        [
            "run",
            "quickstart",
            "--set",
            'data.dataset="folder"',
            "--data",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == EXIT_BAD_INPUT
    assert "edgesmith: error: data folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (
            ["run", "quickstart", "--stages", "train,deploy"],
            r"--stages: unknown stage 'deploy'; choose from train, optimize, export, bench",
        ),
        (["run", "quickstart", "--set", "train.epochz=1"], r"unknown key 'train\.epochz'"),
        (
            ["run", "quickstart", "--set", "optimize.sparsity=1.5"],
            r"optimize\.sparsity = 1\.5 is out of range",
        ),
        (["run", "no-such-recipe.toml"], r"recipe 'no-such-recipe\.toml' not found"),
        (["bench", "{tmp}"], r"not a run directory \(no manifest\.json\)"),
    ],
)
def test_bad_input_returns_2_in_process(tmp_path, capsys, args, pattern):
    import re

    argv = [a.format(tmp=tmp_path) for a in args]
    if argv[0] == "run":
        argv += ["--out", str(tmp_path / "run")]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert re.search(r"^edgesmith: error: .*" + pattern, err, re.MULTILINE), err


def test_existing_run_directory_needs_force(tmp_path, capsys):
    from edgesmith.runs import RunDir

    RunDir.create(tmp_path / "run")
    assert main(["run", "quickstart", "--out", str(tmp_path / "run"), "--stages", "train"]) == EXIT_BAD_INPUT
    assert "already holds a run; pass --force" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_stage_reruns_alone(quickstart_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(quickstart_run, run)
    before = json.loads((run / "manifest.json").read_text())
    old_rows = json.loads((run / "report.json").read_text())["rows"]
    for name in ("report.json", "results.csv", "report.md"):
        (run / name).unlink()
    capsys.readouterr()

    assert main(["bench", str(run)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["stage"] == "bench" and printed["outputs"]["report_json"] == "report.json"

    report = json.loads((run / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == [r["name"] for r in old_rows]
    assert [r["top1"] for r in report["rows"]] == [r["top1"] for r in old_rows]  # same models, same data
    assert (run / "results.csv").is_file() and (run / "report.md").is_file()
    assert report["run"]["path"] == str(run)
    after = json.loads((run / "manifest.json").read_text())
    assert after["stages"]["bench"]["outputs"]["report_json"]["sha256"] == sha256(run / "report.json")
    assert after["stages"]["bench"]["finished"] >= before["stages"]["bench"]["finished"]
    for stage in ("train", "optimize", "export"):  # earlier stages untouched
        assert after["stages"][stage] == before["stages"][stage]


def test_stage_set_overrides_apply_to_that_stage_only(quickstart_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(quickstart_run, run)
    recipe_before = (run / "recipe.json").read_text()
    assert main(["bench", str(run), "--no-memory", "--set", "bench.include_keras=false", "--set", "bench.runs=3"]) == 0
    names = [r["name"] for r in json.loads((run / "report.json").read_text())["rows"]]
    assert names and not any(name.endswith("_keras") for name in names)
    entry = json.loads((run / "manifest.json").read_text())["stages"]["bench"]
    assert entry["config"]["include_keras"] is False and entry["config"]["runs"] == 3
    assert (run / "recipe.json").read_text() == recipe_before  # the run's recipe is left as it is
    capsys.readouterr()
    assert main(["bench", str(run), "--set", "bench.nonsense=1"]) == EXIT_BAD_INPUT
    assert "bench.nonsense" in capsys.readouterr().err
