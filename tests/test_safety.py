"""Pickles load only when a run directory's manifest vouches for them (sha256), or with trust.

Unpickling can run code, so each refusal is checked to name the file, the reason and ``--trust``,
and the malicious-pickle case checks that the refused file's code did not run.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from edgesmith import safety
from edgesmith.errors import EdgesmithError, ModelError, RunDirError, TrustError
from edgesmith.runs import RunDir, write_text
from edgesmith.safety import load_pickle, save_pickle

TRUST_HINT = r"pass --trust \(trust=True\) only if the file's source is trusted"


class _WritesMarker:
    """Unpickling this runs code: it creates the file named by ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def recorded_run(root: Path, obj: object, name: str = "model.joblib") -> tuple[RunDir, Path]:
    """A run directory whose train stage wrote and recorded one pickle."""
    run = RunDir.create(root / "run")
    path = save_pickle(obj, run.stage_dir("train") / name)
    run.record_stage("train", config={}, inputs={}, outputs={"model": path})
    return run, path


def test_sklearn_model_round_trips_through_a_run_directory(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    images, labels = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(images[:500], labels[:500])
    _, path = recorded_run(tmp_path, model)
    loaded = load_pickle(path)
    np.testing.assert_array_equal(loaded.predict_proba(images[500:]), model.predict_proba(images[500:]))
    assert (loaded.predict(images[500:]) == labels[500:]).mean() > 0.8  # a fitted model, not an empty one


def test_save_pickle_leaves_no_temporary_file(tmp_path):
    path = save_pickle({"weights": [1, 2, 3]}, tmp_path / "sub" / "state.pkl")
    assert path == tmp_path / "sub" / "state.pkl"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pkl"]


def test_save_pickle_into_an_unwritable_place_is_a_clear_error(tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(RunDirError, match=r"cannot write .*blocker.*choose another --out"):
        save_pickle([1], tmp_path / "blocker" / "state.pkl")


def test_pickle_outside_any_run_directory_is_refused(tmp_path):
    path = save_pickle([1], tmp_path / "loose.pkl")
    with pytest.raises(TrustError, match=rf"loose\.pkl: refused to unpickle: it is not inside an edgesmith run "
                                         rf"directory \(no manifest\.json in any folder above it\).*{TRUST_HINT}"):
        load_pickle(path)


def test_unrecorded_pickle_inside_a_run_directory_is_refused(tmp_path):
    run, _ = recorded_run(tmp_path, [1])
    stray = save_pickle([2], run.path / "train" / "stray.pkl")
    with pytest.raises(TrustError, match=rf"stray\.pkl: refused to unpickle: the manifest .*manifest\.json does not "
                                         rf"record it as a stage output.*{TRUST_HINT}"):
        load_pickle(stray)


def test_pickle_changed_after_recording_is_refused(tmp_path):
    _, path = recorded_run(tmp_path, {"a": 1})
    save_pickle({"a": 2}, path)  # a valid pickle, but not the one the run recorded
    with pytest.raises(TrustError, match=rf"model\.joblib: refused to unpickle: its sha256 does not match the one "
                                         rf"recorded in .*manifest\.json for train/model\.joblib.*{TRUST_HINT}"):
        load_pickle(path)


def test_malicious_pickle_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_WritesMarker(marker)))
    with pytest.raises(TrustError, match=r"evil\.pkl: refused to unpickle"):
        load_pickle(path)
    assert not marker.exists()
    load_pickle(path, trust=True)  # the code runs only when the user vouches for the file
    assert marker.read_text() == "code ran"


def test_symlink_in_a_run_directory_to_an_outside_pickle_is_refused(tmp_path):
    run, _ = recorded_run(tmp_path, [1])
    outside = save_pickle([666], tmp_path / "outside.pkl")
    link = run.path / "train" / "linked.pkl"
    os.symlink(outside, link)
    with pytest.raises(TrustError, match=r"linked\.pkl: refused to unpickle: it is not inside an edgesmith run"):
        load_pickle(link)


def test_pickle_inside_a_recorded_folder_is_verified_by_the_folder_hash(tmp_path):
    run = RunDir.create(tmp_path / "run")
    folder = run.stage_dir("train") / "ensemble"
    first = save_pickle({"member": 0}, folder / "member0.pkl")
    save_pickle({"member": 1}, folder / "member1.pkl")
    run.record_stage("train", config={}, inputs={}, outputs={"ensemble": folder})
    assert load_pickle(first) == {"member": 0}
    save_pickle({"member": "swapped"}, folder / "member1.pkl")
    with pytest.raises(TrustError, match=r"member0\.pkl: refused to unpickle: its sha256 does not match .* "
                                         r"for train/ensemble \(changed since edgesmith wrote it\)"):
        load_pickle(first)


def test_unreadable_manifest_is_refused(tmp_path):
    run, path = recorded_run(tmp_path, [1])
    write_text(run.manifest_path, "{ not json")
    with pytest.raises(TrustError, match=r"model\.joblib: refused to unpickle: its run directory's manifest cannot "
                                         r"be read \(.*not valid JSON"):
        load_pickle(path)


def test_trust_loads_an_unrecorded_pickle(tmp_path):
    path = save_pickle({"from": "a colleague"}, tmp_path / "shared.pkl")
    assert load_pickle(path, trust=True) == {"from": "a colleague"}


def test_missing_pickle_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match=r"absent\.pkl: pickle file does not exist; check the path"):
        load_pickle(tmp_path / "absent.pkl", trust=True)


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", pickle.dumps(list(range(100)))[:40]],
                         ids=["empty", "text", "truncated"])
def test_unreadable_pickle_is_a_clear_error(tmp_path, content):
    path = tmp_path / "broken.pkl"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=r"broken\.pkl: not a readable pickle \(\w+"):
        load_pickle(path, trust=True)


def test_plain_pickle_is_used_without_joblib(tmp_path, monkeypatch):
    monkeypatch.setattr(safety, "_joblib", lambda: None)
    _, path = recorded_run(tmp_path, {"plain": True}, name="state.pkl")
    with open(path, "rb") as handle:
        assert pickle.load(handle) == {"plain": True}  # written by the standard library pickle
    assert load_pickle(path) == {"plain": True}


def test_trust_error_is_an_edgesmith_error_and_a_value_error():
    assert issubclass(TrustError, EdgesmithError) and issubclass(TrustError, ValueError)
