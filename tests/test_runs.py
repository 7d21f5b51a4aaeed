"""Run directories: atomic writes, the manifest, stage records."""

from __future__ import annotations

import json

import pytest

from conftest import sha256
from edgesmith.errors import RunDirError
from edgesmith.runs import RunDir, atomic_path, read_json, sha256_file, write_json, write_text


def test_atomic_path_renames_into_place_on_success(tmp_path):
    target = tmp_path / "sub" / "model.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert not target.exists()  # nothing visible under the real name while writing
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.bin"]


def test_atomic_path_leaves_no_file_on_exception(tmp_path):
    target = tmp_path / "model.bin"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_old_target_on_exception(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new but unfinished")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_write_and_read_json(tmp_path):
    import numpy as np

    path = write_json(
        tmp_path / "a.json", {"n": np.int64(3), "x": np.float32(0.5), "p": tmp_path, "t": (1, 2)}
    )
    assert read_json(path) == {"n": 3, "x": 0.5, "p": str(tmp_path), "t": [1, 2]}
    with pytest.raises(TypeError, match="cannot write object to JSON"):
        write_json(tmp_path / "b.json", {"o": object()})
    assert not (tmp_path / "b.json").exists()


def test_read_json_errors(tmp_path):
    with pytest.raises(RunDirError, match=r"missing\.json: not found; run the stage that writes it first"):
        read_json(tmp_path / "missing.json")
    write_text(tmp_path / "bad.json", "{nope")
    with pytest.raises(RunDirError, match=r"bad\.json: not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_create_refuses_an_existing_run_without_force(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.record_stage("train", config={}, inputs={}, outputs={})
    with pytest.raises(RunDirError, match=r"already holds a run; pass --force"):
        RunDir.create(tmp_path / "run")
    assert "train" in run.manifest()["stages"]  # the refused create changed nothing
    again = RunDir.create(tmp_path / "run", force=True)
    assert again.manifest()["stages"] == {}


def test_force_drops_training_checkpoints_so_the_new_run_starts_over(tmp_path):
    run = RunDir.create(tmp_path / "run")
    checkpoints = run.stage_dir("train") / "checkpoints"
    (checkpoints / "head").mkdir(parents=True)
    (checkpoints / "head" / "state.json").write_text("{}")
    (run.stage_dir("train") / "notes.txt").write_text("kept")
    RunDir.create(tmp_path / "run", force=True)
    assert not checkpoints.exists()
    assert (run.stage_dir("train") / "notes.txt").read_text() == "kept"  # only the checkpoints go


def test_create_accepts_an_existing_folder_without_manifest(tmp_path):
    (tmp_path / "run").mkdir()
    run = RunDir.create(tmp_path / "run")
    assert run.manifest_path.is_file()
    assert set(run.manifest()) == {"created", "stages"}


def test_open_requires_a_manifest(tmp_path):
    with pytest.raises(RunDirError, match=r"not a run directory \(no manifest\.json\)"):
        RunDir.open(tmp_path)
    RunDir.create(tmp_path / "run")
    assert RunDir.open(tmp_path / "run").path == tmp_path / "run"


def test_record_stage_writes_sha256_and_bytes(tmp_path):
    run = RunDir.create(tmp_path / "run")
    model = run.stage_dir("train") / "model.bin"
    model.write_bytes(b"\x00weights" * 100)
    data = tmp_path / "data.csv"
    data.write_text("a,b\n1,2\n")
    entry = run.record_stage(
        "train",
        config={"lr": 0.1},
        inputs={"data": data},
        outputs={"model": model, "not_yet": tmp_path / "run" / "later.bin"},
        metrics={"acc": 0.5},
    )
    recorded = run.manifest()["stages"]["train"]
    assert recorded == json.loads(json.dumps(entry))
    assert recorded["outputs"]["model"] == {"path": "train/model.bin", "bytes": 800, "sha256": sha256(model)}
    assert recorded["inputs"]["data"]["sha256"] == sha256(data)
    assert recorded["inputs"]["data"]["bytes"] == data.stat().st_size
    assert recorded["outputs"]["not_yet"] == {"path": "later.bin"}  # a missing file has no hash
    assert recorded["config"] == {"lr": 0.1} and recorded["metrics"] == {"acc": 0.5}
    assert run.stage_output("train", "model") == model
    assert run.stage_outputs("train")["model"] == model


def test_sha256_of_a_folder_covers_its_files(tmp_path):
    folder = tmp_path / "saved"
    (folder / "variables").mkdir(parents=True)
    (folder / "a.pb").write_bytes(b"graph")
    (folder / "variables" / "v.bin").write_bytes(b"values")
    before = sha256_file(folder)
    (folder / "variables" / "v.bin").write_bytes(b"VALUES")
    assert sha256_file(folder) != before


def test_record_stage_bytes_of_a_folder_count_only_files(tmp_path):
    run = RunDir.create(tmp_path / "run")
    folder = run.path / "train" / "saved_model"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"x" * 10)
    (folder / "variables" / "variables.data").write_bytes(b"y" * 20)
    entry = run.record_stage("train", config={}, inputs={}, outputs={"model": folder})
    assert entry["outputs"]["model"]["bytes"] == 30


def test_stage_output_errors(tmp_path):
    run = RunDir.create(tmp_path / "run")
    with pytest.raises(RunDirError, match=r"stage 'export' has not finished; run `edgesmith export` first"):
        run.stage_output("export", "model")
    assert run.stage_outputs("export") == {}
    run.record_stage("train", config={}, inputs={}, outputs={"history": tmp_path / "h.json"})
    with pytest.raises(RunDirError, match=r"stage 'train' recorded no output 'model' \(it has: history\)"):
        run.stage_output("train", "model")


def test_update_manifest_keeps_other_fields(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.record_stage("train", config={}, inputs={}, outputs={})
    run.update_manifest(recipe={"name": "x"})
    manifest = run.manifest()
    assert manifest["recipe"] == {"name": "x"} and "train" in manifest["stages"]
