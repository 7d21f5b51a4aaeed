"""Ensembles without networks: estimators, combiners, leakage checks, renamed arguments and the slow-SVC guard.

Members are synthetic :class:`MemberOutputs`: seeded probabilities and embeddings of separable classes, with
string row identifiers per split, so every test here runs in well under a second or two (no TensorFlow model).
The folded graphs, exports and the stage on real run directories are in ``test_ensemble_stage.py``.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from edgesmith.errors import LeakageError, ModelError, RecipeError
from edgesmith.recipe import ENSEMBLE_ESTIMATORS, EnsembleConfig, apply_overrides, load_recipe, recipe_from_dict
from edgesmith.train.ensemble.combine import LinearCombiner
from edgesmith.train.ensemble.core import MemberOutputs, fit_ensembles
from edgesmith.train.ensemble.estimators import (
    ESTIMATORS,
    check_params,
    expected_svc_seconds,
    guard_slow,
    make_estimator,
    uses_rbf_svc,
)
from edgesmith.train.ensemble.leakage import LeakageWarning, check_eval_rows, check_meta_rows, row_ids

CLASSES = 3
SIZES = {"train": 90, "val": 60, "test": 45}  # distinct sizes, so a row count says which split was used
FAMILIES = {"random_forest": "bagging", "bagged_trees": "bagging", "adaboost": "boosting",
            "hist_gradient_boosting": "boosting", "stacking_svc_lr": "stacking"}
GUARD_LOG = "edgesmith.train.ensemble.estimators"


def split_rows(sizes: dict[str, int] = SIZES) -> dict[str, np.ndarray]:
    return {split: np.asarray([f"{split}/{i:03d}" for i in range(n)]) for split, n in sizes.items()}


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def make_member(name: str, *, seed: int, skill: float = 2.0, shift: int = 0, bootstrap: bool = False,
                sizes: dict[str, int] = SIZES, trained_rows: np.ndarray | None = None) -> MemberOutputs:
    """Probabilities peaked on the true class (``skill``; ``shift`` moves the peak to class + shift) and
    embeddings around well separated class centres (the same centres for every member)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(scale=3.0, size=(CLASSES, 8))
    probs, embeddings, labels = {}, {}, {}
    for split, n in sizes.items():
        y = np.arange(n) % CLASSES
        logits = skill * np.eye(CLASSES)[(y + shift) % CLASSES] + rng.normal(size=(n, CLASSES))
        probs[split] = softmax(logits).astype(np.float32)
        embeddings[split] = (centres[y] + rng.normal(size=(n, 8))).astype(np.float32)
        labels[split] = y
    rows = split_rows(sizes)["train"] if trained_rows is None else trained_rows
    return MemberOutputs(name, probs, embeddings, labels, rows, bootstrap)


def only(**changes) -> EnsembleConfig:
    """An ensemble section with nothing switched on except ``changes``."""
    return EnsembleConfig(**{"combiners": [], "estimators": [], "tree_meta": False, "n_estimators": 10, **changes})


def top1(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(1) == labels))


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return -float(np.mean(np.log(probs[np.arange(len(labels)), labels] + 1e-12)))


# ---------------------------------------------------------------- scikit-learn estimators


def test_registry_matches_the_recipe_choices_and_families():
    assert tuple(ESTIMATORS) == ENSEMBLE_ESTIMATORS
    assert {name: family for name, (family, _) in ESTIMATORS.items()} == FAMILIES


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_each_estimator_fits_on_the_fit_split_and_beats_chance_on_test(name):
    member = make_member("a", seed=1)
    rows = fit_ensembles([member], only(estimators=[name]), split_rows=split_rows(), seed=0)
    assert [r.name for r in rows] == ["a", name]
    row = rows[1]
    assert row.family == FAMILIES[name]
    assert row.members == ["a"]
    assert row.notes["fit_rows"] == SIZES["val"]
    assert row.probs.shape == (SIZES["test"], CLASSES)
    np.testing.assert_allclose(row.probs.sum(1), 1.0, atol=1e-5)
    assert row.top1 > 0.8  # chance is 1/3; the embeddings' classes are well separated
    # the score is the fitted model's on the test embeddings, not on the rows it was fitted on
    assert row.top1 == top1(row.fitted.predict_proba(member.embeddings["test"]), member.labels["test"])


def test_every_row_carries_its_family():
    members = [make_member("a", seed=1), make_member("b", seed=2, bootstrap=True),
               make_member("c", seed=3, bootstrap=True)]
    cfg = only(combiners=["average", "weighted", "stacked"], estimators=["adaboost"], tree_meta=True)
    rows = {r.name: r for r in fit_ensembles(members, cfg, split_rows=split_rows(), seed=0)}
    assert {name: r.family for name, r in rows.items()} == {
        "a": "member", "b": "member", "c": "member", "average": "averaging", "weighted": "averaging",
        "stacked": "stacking", "bagged_networks": "bagging", "forest_stack": "stacking", "adaboost": "boosting"}
    assert rows["bagged_networks"].members == ["b", "c"]  # only the bootstrap members
    assert rows["forest_stack"].members == ["a", "b", "c"]
    assert rows["adaboost"].members == ["a"]  # the first member gives the embeddings
    assert rows["forest_stack"].notes["fit_rows"] == SIZES["val"]
    assert rows["average"].summary()["weights"] == [0.3333, 0.3333, 0.3333]
    for row in rows.values():
        assert row.probs.shape == (SIZES["test"], CLASSES)


def test_bagged_networks_with_a_class_missing_from_the_test_split():
    sizes = {"train": 90, "val": 60, "test": 40}
    members = [make_member(n, seed=s, bootstrap=True, sizes=sizes) for n, s in (("a", 1), ("b", 2))]
    for m in members:  # the test split holds classes 0 and 1 only
        m.labels["test"] = np.arange(40) % 2
    rows = {r.name: r for r in fit_ensembles(members, only(), split_rows=split_rows(sizes), seed=0)}
    np.testing.assert_allclose(rows["bagged_networks"].probs,
                               (members[0].probs["test"] + members[1].probs["test"]) / 2, atol=1e-6)


@pytest.mark.parametrize(("weak_learner", "depth"), [("stump", 1), ("shallow_tree", 3)])
def test_adaboost_uses_the_configured_weak_learner(weak_learner, depth):
    rows = fit_ensembles([make_member("a", seed=1)], only(estimators=["adaboost"], estimator=weak_learner),
                         split_rows=split_rows(), seed=0)
    fitted = rows[1].fitted
    assert fitted.estimator.max_depth == depth
    assert max(tree.get_depth() for tree in fitted.estimators_) <= depth


def test_stacking_on_a_tiny_fit_split_uses_fewer_folds(caplog):
    sizes = {"train": 90, "val": 9, "test": 45}  # 3 rows per class: 3 outer folds, 2 calibration folds inside
    with caplog.at_level(logging.WARNING, logger="edgesmith.train.ensemble.core"):
        rows = fit_ensembles([make_member("a", seed=1, sizes=sizes)], only(estimators=["stacking_svc_lr"]),
                             split_rows=split_rows(sizes), seed=0)
    assert "3 out-of-fold splits instead of 5" in caplog.text
    assert rows[1].fitted.cv == 3
    assert rows[1].fitted.get_params()["svc__calibratedclassifiercv__cv"] == 2
    assert rows[1].top1 > 0.6


def test_stacking_on_too_few_rows_per_class_says_so():
    sizes = {"train": 90, "val": 6, "test": 45}
    with pytest.raises(ModelError, match="stacking needs at least 3 rows of every class in the fit split; "
                                         "the smallest has 2"):
        fit_ensembles([make_member("a", seed=1, sizes=sizes)], only(estimators=["stacking_svc_lr"]),
                      split_rows=split_rows(sizes), seed=0)


def test_fit_ensembles_needs_a_member():
    with pytest.raises(ModelError, match="at least one network member"):
        fit_ensembles([], only(), split_rows=split_rows())


def test_member_outputs_round_trip_through_npz(tmp_path):
    member = make_member("a", seed=1)
    path = member.save(tmp_path / "a.npz")
    loaded = MemberOutputs.load(path, "a")
    for split in SIZES:
        np.testing.assert_array_equal(loaded.probs[split], member.probs[split])
        np.testing.assert_array_equal(loaded.embeddings[split], member.embeddings[split])
        np.testing.assert_array_equal(loaded.labels[split], member.labels[split])
    np.testing.assert_array_equal(loaded.trained_rows, member.trained_rows)
    other = np.asarray(["x", "y"])
    np.testing.assert_array_equal(MemberOutputs.load(path, "a", trained_rows=other).trained_rows, other)


# ---------------------------------------------------------------- linear combiners


def test_average_is_the_mean_of_member_probabilities():
    a, b = make_member("a", seed=1), make_member("b", seed=2)
    combiner = LinearCombiner("average").fit([a.probs["val"], b.probs["val"]], a.labels["val"])
    probs = combiner.predict_proba([a.probs["test"], b.probs["test"]])
    assert probs.shape == (SIZES["test"], CLASSES)
    assert combiner.kernel_.shape == (2 * CLASSES, CLASSES)
    np.testing.assert_allclose(combiner.weights_, [0.5, 0.5])
    np.testing.assert_allclose(probs, (a.probs["test"] + b.probs["test"]) / 2, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_weighted_combiner_trusts_the_good_member_over_a_clearly_bad_one():
    good, bad = make_member("good", seed=1, skill=3.0), make_member("bad", seed=2, skill=0.0)
    fit = [good.probs["val"], bad.probs["val"]]
    weighted = LinearCombiner("weighted").fit(fit, good.labels["val"])
    average = LinearCombiner("average").fit(fit, good.labels["val"])
    assert np.all(weighted.weights_ >= 0) and weighted.weights_.sum() == pytest.approx(1.0)
    assert weighted.weights_[0] > 0.8
    # the weights minimise the log loss on the fit rows, where averaging is one of the candidates
    assert log_loss(weighted.predict_proba(fit), good.labels["val"]) <= log_loss(
        average.predict_proba(fit), good.labels["val"]) + 1e-6
    test, labels = [good.probs["test"], bad.probs["test"]], good.labels["test"]
    probs = weighted.predict_proba(test)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert top1(probs, labels) >= top1(bad.probs["test"], labels)
    assert top1(probs, labels) >= top1(average.predict_proba(test), labels)


def test_stacked_combiner_learns_a_member_that_names_classes_wrongly():
    weak, shifted = make_member("weak", seed=1, skill=0.5), make_member("shifted", seed=2, skill=4.0, shift=1)
    fit, labels = [weak.probs["val"], shifted.probs["val"]], weak.labels["val"]
    stacked = LinearCombiner("stacked", seed=0).fit(fit, labels)
    average = LinearCombiner("average").fit(fit, labels)
    test, y = [weak.probs["test"], shifted.probs["test"]], weak.labels["test"]
    probs = stacked.predict_proba(test)
    assert probs.shape == (SIZES["test"], CLASSES)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert stacked.weights_ is None and stacked.softmax
    assert top1(probs, y) > 0.9  # the shifted member is right once its classes are mapped back
    assert top1(probs, y) > top1(average.predict_proba(test), y) + 0.2


def test_uniform_combiner_needs_no_fitting():
    combiner = LinearCombiner.uniform(3, CLASSES)
    assert combiner.kernel_.shape == (3 * CLASSES, CLASSES)
    members = [make_member(n, seed=s).probs["test"] for n, s in (("a", 1), ("b", 2), ("c", 3))]
    np.testing.assert_allclose(combiner.predict_proba(members), np.mean(members, axis=0), atol=1e-6)


def test_unknown_combiner_kind_lists_the_choices():
    a = make_member("a", seed=1)
    with pytest.raises(ModelError, match="combiner kind 'median' is unknown; choose from average, weighted, stacked"):
        LinearCombiner("median").fit([a.probs["val"]], a.labels["val"])


# ---------------------------------------------------------------- leakage


def test_meta_model_on_a_members_training_rows_is_refused():
    member_rows = {"a": np.asarray(["r0", "r1"]), "b": np.asarray(["r1", "r2", "r3"])}
    with pytest.raises(LeakageError, match=r"meta-model is fitted on 2 rows that member 'b' was trained on "
                                           r"\(e\.g\. r2\).*ensemble\.fit_split = 'val'"):
        check_meta_rows(np.asarray(["r2", "r3", "r9"]), member_rows)


def test_allow_leakage_warns_instead_of_refusing(caplog):
    with pytest.warns(LeakageWarning, match="member 'a' was trained on"), caplog.at_level(logging.WARNING):
        check_meta_rows(np.asarray(["r0", "r9"]), {"a": np.asarray(["r0"])}, allow=True)
    assert "out-of-sample" in caplog.text


def test_disjoint_rows_pass_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_meta_rows(np.asarray(["v0", "v1"]), {"a": np.asarray(["t0", "t1"])})
        check_eval_rows(np.asarray(["e0"]), {"a": np.asarray(["t0"]), "meta-model": np.asarray(["v0"])})


def test_evaluation_rows_overlapping_fitted_rows_are_an_error():
    with pytest.raises(LeakageError, match=r"evaluation rows include 1 rows 'meta-model' was fitted on \(e\.g\. "
                                           r"v1\); evaluate on the held-out test split only"):
        check_eval_rows(np.asarray(["e0", "v1"]), {"a": np.asarray(["t0"]), "meta-model": np.asarray(["v1"])})


def test_fit_ensembles_refuses_meta_models_fitted_on_training_rows():
    members = [make_member("a", seed=1), make_member("b", seed=2)]
    cfg = only(combiners=["stacked"], fit_split="train")
    with pytest.raises(LeakageError, match="member 'a' was trained on"):
        fit_ensembles(members, cfg, split_rows=split_rows())
    cfg.allow_leakage = True
    with pytest.warns(LeakageWarning, match="was trained on") as caught:
        rows = fit_ensembles(members, cfg, split_rows=split_rows())
    assert sorted(str(w.message).split("member ")[1][:3] for w in caught) == ["'a'", "'b'"]
    assert "stacked" in [r.name for r in rows]


def test_allow_leakage_does_not_allow_evaluating_on_training_rows():
    rows = split_rows()
    leaky = make_member("b", seed=2, trained_rows=np.concatenate([rows["train"], rows["test"][:3]]))
    cfg = only(allow_leakage=True)
    with pytest.raises(LeakageError, match=r"evaluation rows include 3 rows 'b' was fitted on"):
        fit_ensembles([make_member("a", seed=1), leaky], cfg, split_rows=rows)


def test_row_ids_of_folders_are_paths_and_of_arrays_are_pixel_hashes(image_folder):
    from edgesmith.data.datasets import Split
    from edgesmith.data.datasets import image_folder as read_folder

    data = read_folder(image_folder)
    np.testing.assert_array_equal(row_ids(data.train), data.train.files.astype(str))
    images = np.zeros((3, 4, 4, 3), np.uint8)
    images[2, 0, 0, 0] = 1
    ids = row_ids(Split(labels=np.zeros(3, int), images=images))
    assert ids[0] == ids[1] != ids[2]  # identical pixels are the same row, wherever they appear


def test_row_ids_of_shards_are_unique_and_stable_across_splits(tmp_path, image_folder):
    from edgesmith.data.datasets import with_validation
    from edgesmith.data.shards import shard_dataset, write_shards

    write_shards(image_folder, tmp_path / "shards", shard_size_mb=0.002)
    data = with_validation(shard_dataset(tmp_path / "shards"), 0.2, 0)
    ids = {split: row_ids(getattr(data, split)) for split in ("train", "val", "test")}
    assert sum(len(v) for v in ids.values()) == len(set(np.concatenate(list(ids.values())))) == 42
    again = with_validation(shard_dataset(tmp_path / "shards"), 0.2, 0)
    np.testing.assert_array_equal(row_ids(again.val), ids["val"])


# ---------------------------------------------------------------- renamed base_estimator


def test_recipe_with_base_estimator_points_to_estimator(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text('[ensemble]\nbase_estimator = "DecisionTreeClassifier(max_depth=1)"\n')
    with pytest.raises(RecipeError, match=r"ensemble\.base_estimator was renamed 'estimator' in scikit-learn 1\.2 "
                                          r"and removed in 1\.4; write ensemble\.estimator = \"stump\""):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"ensemble\.base_estimator was renamed 'estimator'"):
        apply_overrides(recipe_from_dict({}), ['ensemble.base_estimator="stump"'])


def test_make_estimator_with_base_estimator_points_to_estimator():
    import sklearn

    with pytest.raises(RecipeError, match=rf"ensemble estimator adaboost\.base_estimator was renamed 'estimator' .*"
                                          rf"this is scikit-learn {sklearn.__version__}.*write estimator = "):
        make_estimator("adaboost", base_estimator="stump")
    with pytest.raises(RecipeError, match=r"^recipe\.ensemble\.base_estimator was renamed 'estimator'"):
        check_params("recipe.ensemble", {"n_estimators": 5, "base_estimator": None})


def test_make_estimator_rejects_unknown_parameters_and_names():
    with pytest.raises(RecipeError, match="unknown parameters max_leaf_nodes; allowed: n_estimators, max_depth, seed"):
        make_estimator("random_forest", max_leaf_nodes=4)
    with pytest.raises(RecipeError, match="'xgboost' is unknown; choose from random_forest, bagged_trees, adaboost"):
        make_estimator("xgboost")


# ---------------------------------------------------------------- slow RBF SVCs


@pytest.fixture
def many_rows() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(CLASSES), [150, 90, 60])
    return rng.normal(size=(len(y), 4)).astype(np.float32), y


def test_slow_svc_is_fitted_on_a_stratified_subsample(many_rows, caplog):
    x, y = many_rows
    estimator = make_estimator("stacking_svc_lr")
    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        kept, x_kept, y_kept = guard_slow(estimator, x, y, max_rows=100, policy="subsample", seed=0)
    assert kept is estimator
    assert len(x_kept) == len(y_kept) == 100
    np.testing.assert_array_equal(np.bincount(y_kept), [50, 30, 20])  # the classes' shares are kept
    assert {tuple(r) for r in x_kept} <= {tuple(r) for r in x}
    assert "RBF SVC on 300 rows" in caplog.text and "stratified subsample of 100 rows" in caplog.text


def test_slow_svc_is_replaced_by_a_calibrated_linear_svc(many_rows, caplog):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC, LinearSVC

    x, y = many_rows
    estimator = make_estimator("stacking_svc_lr")
    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        linear, x_kept, y_kept = guard_slow(estimator, x, y, max_rows=100, policy="linear", seed=0)
    assert len(y_kept) == 300 and x_kept is x
    assert not uses_rbf_svc(linear) and uses_rbf_svc(estimator)  # a changed copy; the original is untouched
    calibrated = linear.get_params()["svc__calibratedclassifiercv"]
    assert isinstance(calibrated, CalibratedClassifierCV) and isinstance(calibrated.estimator, LinearSVC)
    assert "using LinearSVC + calibration" in caplog.text
    plain, _, _ = guard_slow(SVC(), x, y, max_rows=100, policy="linear", seed=0)
    assert isinstance(plain, CalibratedClassifierCV) and isinstance(plain.estimator, LinearSVC)


def test_slow_svc_is_kept_with_a_warning(many_rows, caplog):
    x, y = many_rows
    estimator = make_estimator("stacking_svc_lr")
    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        kept, x_kept, y_kept = guard_slow(estimator, x, y, max_rows=100, policy="warn", seed=0)
    assert kept is estimator and x_kept is x and y_kept is y
    assert "RBF SVC on 300 rows: expect about" in caplog.text


@pytest.mark.parametrize(("name", "max_rows"), [("stacking_svc_lr", 300), ("stacking_svc_lr", 0),
                                                ("random_forest", 10)])
def test_guard_leaves_fast_estimators_alone(many_rows, caplog, name, max_rows):
    x, y = many_rows
    estimator = make_estimator(name)
    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        kept, x_kept, y_kept = guard_slow(estimator, x, y, max_rows=max_rows, policy="subsample", seed=0)
    assert kept is estimator and len(y_kept) == 300
    assert not caplog.records


def test_expected_svc_time_grows_with_rows_squared():
    assert expected_svc_seconds(20_000) == pytest.approx(4 * expected_svc_seconds(10_000))


@pytest.mark.parametrize("policy", ["subsample", "linear"])
def test_fit_ensembles_applies_the_slow_policy(policy):
    cfg = only(estimators=["stacking_svc_lr"], svc_max_rows=30, slow_policy=policy)
    row = fit_ensembles([make_member("a", seed=1)], cfg, split_rows=split_rows(), seed=0)[1]
    assert row.notes["fit_rows"] == (30 if policy == "subsample" else SIZES["val"])
    assert uses_rbf_svc(row.fitted) == (policy == "subsample")
    assert row.top1 > 0.8
