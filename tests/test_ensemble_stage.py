"""Ensembles of real (tiny) networks: folded into one Keras graph, exported, joined with scikit-learn in ONNX,
and the `edgesmith ensemble` stage on run directories.

The members are the session's ``trained_tiny`` (tiny_cnn on digits), its mirrored view and a copy with a
perturbed head (which shares the backbone, for the shared-trunk fold). The stage tests train two tiny runs
through the CLI (a few epochs each) and ensemble them once per module.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import sha256
from edgesmith._keras import keras
from edgesmith.cli import EXIT_BAD_INPUT, main
from edgesmith.errors import ModelError, RunDirError, TrustError
from edgesmith.recipe import ExportConfig
from edgesmith.runtime import load_runner
from edgesmith.train.ensemble.combine import LinearCombiner
from edgesmith.train.ensemble.deploy import agreement, export_folded, export_joined
from edgesmith.train.ensemble.estimators import make_estimator
from edgesmith.train.ensemble.fold import embedding_model, fold_ensemble, fold_members, mirror_view
from edgesmith.train.ensemble.onnx_join import write_joined
from edgesmith.train.ensemble.stage import load_estimator
from edgesmith.zoo import head_start

FIT = 180  # the first FIT test inputs fit the combiners; the rest check them


def predict(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return model.predict(x, batch_size=256, verbose=0)


@pytest.fixture(scope="module")
def members(trained_tiny) -> list[keras.Model]:
    """Two different members: the trained tiny_cnn and the same network on mirrored images."""
    return [trained_tiny.model, mirror_view(trained_tiny.model)]


@pytest.fixture(scope="module")
def head_variant(trained_tiny) -> keras.Model:
    """A copy of the trained model with a perturbed head: same backbone weights, different outputs."""
    model = trained_tiny.model
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    rng = np.random.default_rng(0)
    for layer in twin.layers[head_start(twin):]:
        layer.set_weights([w + rng.normal(scale=0.3, size=w.shape).astype(w.dtype) for w in layer.get_weights()])
    return twin


@pytest.fixture(scope="module")
def member_probs(members, tiny_test_inputs) -> list[np.ndarray]:
    return [predict(m, tiny_test_inputs[0]) for m in members]


def fitted(kind: str, probs: list[np.ndarray], labels: np.ndarray) -> LinearCombiner:
    return LinearCombiner(kind, seed=0).fit([p[:FIT] for p in probs], labels[:FIT])


# ---------------------------------------------------------------- folding into one graph


@pytest.mark.parametrize("kind", ["average", "weighted", "stacked"])
def test_folded_graph_computes_the_in_process_ensemble(members, member_probs, tiny_test_inputs, kind):
    x, labels = tiny_test_inputs
    combiner = fitted(kind, member_probs, labels)
    folded = fold_ensemble(members, combiner, name=f"{kind}_ensemble")
    assert len(folded.inputs) == 1 and len(folded.outputs) == 1
    assert not any(isinstance(layer, keras.Model) for layer in folded.layers)  # flat, nothing nested
    names = [layer.name for layer in folded.layers]
    assert "m0_predictions" in names and "m1_predictions" in names and names[-1] == f"{kind}_combiner"
    expected = combiner.predict_proba([p[FIT:] for p in member_probs])
    np.testing.assert_allclose(predict(folded, x[FIT:]), expected, atol=1e-5)


def test_fold_members_concatenates_their_probabilities(members, member_probs, tiny_test_inputs):
    joined = fold_members(members)
    np.testing.assert_allclose(predict(joined, tiny_test_inputs[0]), np.concatenate(member_probs, 1), atol=1e-5)


def test_mirror_view_is_the_model_on_flipped_images(trained_tiny, members, tiny_test_inputs):
    x = tiny_test_inputs[0][:64]
    np.testing.assert_allclose(predict(members[1], x), predict(trained_tiny.model, x[:, :, ::-1]), atol=1e-5)
    assert not np.allclose(predict(members[1], x), predict(trained_tiny.model, x), atol=1e-3)


def test_shared_trunk_computes_the_same_function_with_fewer_weights(trained_tiny, head_variant, tiny_test_inputs):
    x, labels = tiny_test_inputs
    pair = [trained_tiny.model, head_variant]
    combiner = fitted("stacked", [predict(m, x) for m in pair], labels)
    cut = head_start(trained_tiny.model) - 1  # the last backbone layer
    shared = fold_ensemble(pair, combiner, shared_cut=cut)
    separate = fold_ensemble(pair, combiner)
    np.testing.assert_allclose(predict(shared, x), predict(separate, x), atol=1e-5)
    backbone = keras.Model(trained_tiny.model.input, trained_tiny.model.layers[cut].output).count_params()
    assert shared.count_params() == separate.count_params() - backbone


def test_fold_refuses_members_it_cannot_combine(trained_tiny, members, member_probs, tiny_test_inputs):
    x, labels = tiny_test_inputs
    other = keras.models.clone_model(trained_tiny.model)  # fresh weights below the cut
    with pytest.raises(ModelError, match="differs from the cache's backbone below the freeze boundary"):
        fold_ensemble([trained_tiny.model, other], fitted("average", member_probs, labels), shared_cut=3)
    three = LinearCombiner("average").fit([p[:FIT] for p in member_probs * 2][:3], labels[:FIT])
    with pytest.raises(ModelError, match="combiner was fitted on 30 member outputs, the ensemble has 20"):
        fold_ensemble(members, three)
    from edgesmith.zoo import build_classifier

    five_classes, _ = build_classifier("tiny_cnn", num_classes=5, input_size=16, dense_units=8)
    with pytest.raises(ModelError, match=r"must share one input shape and class count.*classes \[5, 10\]"):
        fold_members([trained_tiny.model, five_classes])


# ---------------------------------------------------------------- shipped files


def test_folded_ensemble_exports_agree_with_the_in_process_ensemble(trained_tiny, members, member_probs,
                                                                      tiny_test_inputs, tmp_path):
    x, labels = tiny_test_inputs
    combiner = fitted("stacked", member_probs, labels)
    reference = combiner.predict_proba(member_probs)
    folded = fold_ensemble(members, combiner)
    results = export_folded(folded, ["tflite-float32", "onnx-float32"], ExportConfig(), spec=trained_tiny.spec,
                            out_dir=tmp_path, name="ensemble", validation_inputs=x[:100])
    assert sorted(Path(r["path"]).name for r in results.values()) == ["ensemble.onnx", "ensemble.tflite"]
    for result in results.values():
        assert result["validation"]["passed"]
        got = np.concatenate([load_runner(result["path"]).predict(x[i : i + 64]) for i in range(0, len(x), 64)])
        np.testing.assert_allclose(got, reference, atol=1e-4)
        assert agreement(result["path"], x, reference) >= 0.99
    assert (tmp_path / "preprocess.json").is_file()


def run_onnx(path: Path, x: np.ndarray) -> tuple[list[str], list[str], np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    return *names, session.run(None, {"input": x})[0]


def test_tree_meta_model_joined_into_one_onnx_file_matches_scikit_learn(members, tiny_test_inputs, tmp_path):
    import onnx

    x, labels = tiny_test_inputs
    network = fold_members(members)
    forest = make_estimator("random_forest", n_estimators=10, seed=0).fit(predict(network, x[:FIT]), labels[:FIT])
    path = write_joined(network, forest, tmp_path / "forest.onnx", opset=ExportConfig().onnx_opset)
    inputs, outputs, got = run_onnx(path, x[FIT:])
    assert (inputs, outputs) == (["input"], ["skl_probabilities"])
    np.testing.assert_allclose(got, forest.predict_proba(predict(network, x[FIT:])), atol=1e-5)
    opsets = {imp.domain: imp.version for imp in onnx.load(str(path)).opset_import}
    assert opsets["ai.onnx.ml"] == 3 and opsets[""] == ExportConfig().onnx_opset


@pytest.mark.filterwarnings("ignore:Attribute `prob:FutureWarning")  # skl2onnx reads SVC's deprecated probA_
def test_stacking_on_embeddings_joined_and_validated(trained_tiny, tiny_test_inputs, tmp_path):
    x, labels = tiny_test_inputs
    network = embedding_model(trained_tiny.model)
    stack = make_estimator("stacking_svc_lr", seed=0).fit(predict(network, x[:FIT]), labels[:FIT])
    path, validation = export_joined(network, stack, spec=trained_tiny.spec, out_dir=tmp_path, name="stack",
                                     validation_inputs=x[FIT:], cfg=ExportConfig())
    assert validation.passed and validation.max_abs_diff < 1e-4 and validation.samples == len(x) - FIT
    _, _, got = run_onnx(path, x[FIT:])
    np.testing.assert_allclose(got, stack.predict_proba(predict(network, x[FIT:])), atol=1e-4)


# ---------------------------------------------------------------- the stage on run directories

TINY = ['model.backbone="tiny_cnn"', "model.input_size=16", "model.dense_units=16", "train.head_epochs=3",
        "train.patience=3"]
ESTIMATORS = ["random_forest", "hist_gradient_boosting"]
ENSEMBLE = [f"ensemble.estimators={json.dumps(ESTIMATORS)}", "ensemble.n_estimators=10",
            "ensemble.latency_runs=3"]


def sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def train_run(out: Path, *overrides: str) -> Path:
    assert main(["-q", "train", "quickstart", "--out", str(out), *sets(*TINY, *overrides)]) == 0
    return out


@pytest.fixture(scope="module")
def ensembled(tmp_path_factory) -> tuple[Path, Path, str]:
    """Runs ``a`` and ``b`` (tiny_cnn on digits, different heads), then `edgesmith ensemble a --member b`."""
    root = tmp_path_factory.mktemp("ensemble")
    a = train_run(root / "a")
    b = train_run(root / "b", "model.dense_units=8", "train.head_learning_rate=0.006")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["-q", "ensemble", str(a), "--member", str(b), *sets(*ENSEMBLE)]) == 0
    return a, b, printed.getvalue()


def stage_entry(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]["ensemble"]


def report_rows(run: Path) -> dict[str, dict]:
    report = json.loads((run / "ensemble" / "ensemble.json").read_text())
    return {r["name"]: r for r in report["rows"]}


def test_ensemble_stage_writes_its_report_and_records_every_file(ensembled):
    a, b, printed = ensembled
    assert printed.startswith("# Ensembles") and "| forest_stack | stacking | this_run+b |" in printed
    entry = stage_entry(a)
    assert entry["config"]["estimators"] == ESTIMATORS and entry["config"]["n_estimators"] == 10
    assert entry["inputs"]["this_run"]["sha256"] == sha256(a / "train" / "model.keras")
    assert entry["inputs"]["b"]["sha256"] == sha256(b / "train" / "model.keras")
    rows = report_rows(a)
    assert list(rows) == ["this_run", "b", "average", "weighted", "stacked", "forest_stack", *ESTIMATORS]
    assert [r["family"] for r in rows.values()] == ["member", "member", "averaging", "averaging", "stacking",
                                                    "stacking", "bagging", "boosting"]
    assert json.loads((a / "ensemble" / "ensemble.json").read_text())["eval_samples"] == 359  # digits test split
    best = max(("average", "weighted", "stacked"), key=lambda k: rows[k]["top1"])
    expected = {"report", "report_json", "plot", "combiners", f"{best}_tflite-float32", f"{best}_onnx-float32",
                "forest_stack_onnx", "random_forest_onnx",
                *(f"{n}_pickle" for n in ("average", "weighted", "stacked", "forest_stack", *ESTIMATORS))}
    assert expected <= set(entry["outputs"])
    for output in entry["outputs"].values():
        assert sha256(a / output["path"]) == output["sha256"]
    assert {k: v["top1"] for k, v in entry["metrics"].items()} == {k: r["top1"] for k, r in rows.items()}


def test_shipped_rows_agree_with_what_was_scored(ensembled):
    rows = report_rows(ensembled[0])
    best = max(("average", "weighted", "stacked"), key=lambda k: rows[k]["top1"])
    assert rows[best]["artifact"].startswith("folded tflite")
    assert set(rows[best]["exports"]) == {"tflite-float32", "onnx-float32"}
    for name in (best, "forest_stack", "random_forest"):
        assert rows[name]["export_agreement"] >= 0.99, name
        assert rows[name]["bytes"] > 0 and rows[name]["latency_p50_ms"] > 0
    hgb = rows["hist_gradient_boosting"]  # skl2onnx may not convert it: then costed in-process, with the reason
    assert hgb.get("export_agreement", 0) >= 0.99 or (hgb["artifact"].startswith("in-process") and
                                                       hgb["export_error"])


def test_folded_file_is_the_combiner_on_the_cached_member_outputs(ensembled):
    from edgesmith.data.datasets import load_dataset
    from edgesmith.data.pipeline import load_pixels
    from edgesmith.data.spec import PreprocessSpec
    from edgesmith.runs import RunDir
    from edgesmith.workflow import load_run_recipe

    a = ensembled[0]
    rows = report_rows(a)
    best = max(("average", "weighted", "stacked"), key=lambda k: rows[k]["top1"])
    combiner = json.loads((a / "ensemble" / "combiners.json").read_text())[best]
    cache = {p.name.split("-")[0]: np.load(p) for p in (a / "ensemble" / "members").glob("*.npz")}
    assert set(cache) == {"this_run", "b"}
    assert f"this_run-{sha256(a / 'train' / 'model.keras')[:16]}.npz" in os.listdir(a / "ensemble" / "members")
    probs = np.concatenate([cache[m]["test_probs"] for m in combiner["members"]], 1)
    z = probs @ np.asarray(combiner["kernel"], np.float32) + np.asarray(combiner["bias"], np.float32)
    if combiner["softmax"]:
        z = np.exp(z - z.max(1, keepdims=True))
        z /= z.sum(1, keepdims=True)
    labels = cache["this_run"]["test_labels"]
    assert float(np.mean(z.argmax(1) == labels)) == pytest.approx(rows[best]["top1"], abs=1e-5)
    for member in ("this_run", "b"):
        top1 = float(np.mean(cache[member]["test_probs"].argmax(1) == labels))
        assert top1 == pytest.approx(rows[member]["top1"], abs=1e-5)
    run = RunDir.open(a)
    recipe = load_run_recipe(run)
    spec = PreprocessSpec.load_beside(a / "train" / "model.keras")
    pixels, test_labels = load_pixels(load_dataset(recipe.data, seed=recipe.seed).test, spec.input_size)
    np.testing.assert_array_equal(test_labels, labels)
    runner = load_runner(run.stage_output("ensemble", f"{best}_tflite-float32"))
    x = spec.normalize(pixels).astype(np.float32)
    got = np.concatenate([runner.predict(x[i : i + 64]) for i in range(0, len(x), 64)])
    np.testing.assert_allclose(got, z, atol=1e-4)


def test_load_estimator_is_verified_by_the_manifest(ensembled, tmp_path):
    run = Path(shutil.copytree(ensembled[0], tmp_path / "a"))
    forest = load_estimator(run, "random_forest")
    cache = next((run / "ensemble" / "members").glob("this_run-*.npz"))
    with np.load(cache) as outputs:
        top1 = float(np.mean(forest.predict_proba(outputs["test_emb"]).argmax(1) == outputs["test_labels"]))
    assert top1 == pytest.approx(report_rows(run)["random_forest"]["top1"], abs=1e-5)
    with pytest.raises(RunDirError, match="stage 'ensemble' recorded no output 'svm_pickle'"):
        load_estimator(run, "svm")
    with open(run / "ensemble" / "random_forest.pkl", "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(TrustError, match="refused to unpickle: its sha256 does not match"):
        load_estimator(run, "random_forest")


def test_member_trained_on_the_ensembles_held_out_rows_is_refused(ensembled, tmp_path, capsys):
    a = Path(shutil.copytree(ensembled[0], tmp_path / "a"))
    other_split = train_run(tmp_path / "c", "seed=1", "train.head_epochs=1")  # another seed: another split
    capsys.readouterr()
    assert main(["-q", "ensemble", str(a), "--member", str(other_split), *sets(*ENSEMBLE)]) == EXIT_BAD_INPUT
    assert "rows that member 'c' was trained on" in capsys.readouterr().err
    assert stage_entry(a) == stage_entry(ensembled[0])  # nothing recorded by the failed attempt
