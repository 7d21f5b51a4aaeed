"""scikit-learn ensembles on the networks' pooled features (embeddings): a registry of named estimators.

Bagging (random forest, bagged trees), boosting (AdaBoost over stumps or shallow trees, histogram gradient
boosting) and stacking (SVC with probabilities + logistic regression -> logistic regression, meta-features
from out-of-fold predictions). Slow estimators on large data are handled before they hang: an RBF SVC
above ``svc_max_rows`` rows is fitted on a stratified subsample or replaced by a calibrated linear SVC.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from edgesmith.errors import RecipeError

log = logging.getLogger(__name__)
RENAMED_PARAMS = {
    "base_estimator": "was renamed 'estimator' in scikit-learn 1.2 and removed in 1.4 (this is "
                      "scikit-learn {version}); write estimator = ... instead",
}
SVC_SECONDS_PER_MROWS2 = 15.0  # RBF SVC fit time ~ this * (rows / 1000)**2 / 1000 s, measured on 1024-d embeddings


def check_params(where: str, params: dict[str, Any]) -> None:
    """Raise RecipeError for parameters older tutorials use but current scikit-learn rejects."""
    import sklearn

    for key in params:
        if key in RENAMED_PARAMS:
            raise RecipeError(f"{where}.{key} {RENAMED_PARAMS[key].format(version=sklearn.__version__)}")


def _tree(max_depth: int, seed: int) -> Any:
    from sklearn.tree import DecisionTreeClassifier

    return DecisionTreeClassifier(max_depth=max_depth or None, random_state=seed)


def random_forest(n_estimators: int, max_depth: int, seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth or None, n_jobs=-1,
                                  random_state=seed)


def bagged_trees(n_estimators: int, max_depth: int, seed: int) -> Any:
    from sklearn.ensemble import BaggingClassifier

    return BaggingClassifier(estimator=_tree(max_depth, seed), n_estimators=n_estimators,
                             random_state=seed)


def adaboost(n_estimators: int, max_depth: int, seed: int) -> Any:
    from sklearn.ensemble import AdaBoostClassifier

    return AdaBoostClassifier(estimator=_tree(max_depth or 1, seed), n_estimators=n_estimators, random_state=seed)


def hist_gradient_boosting(n_estimators: int, max_depth: int, seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=n_estimators, max_depth=max_depth or None,
                                          random_state=seed)


def stacking_svc_lr(n_estimators: int, max_depth: int, seed: int) -> Any:
    """SVC with probabilities + LogisticRegression -> LogisticRegression, 5-fold out-of-fold meta-features.

    The SVC's probabilities come from ``CalibratedClassifierCV(SVC(), ensemble=False)``: scikit-learn 1.9
    deprecates ``SVC(probability=True)`` in its favour (removal in 1.11).
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import StackingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    svc = CalibratedClassifierCV(SVC(random_state=seed), ensemble=False, cv=3)
    base = [("svc", make_pipeline(StandardScaler(), svc)),
            ("lr", make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed)))]
    return StackingClassifier(base, final_estimator=LogisticRegression(max_iter=1000, random_state=seed),
                              cv=5, stack_method="predict_proba", n_jobs=1)


ESTIMATORS: dict[str, tuple[str, Callable[[int, int, int], Any]]] = {
    "random_forest": ("bagging", random_forest),
    "bagged_trees": ("bagging", bagged_trees),
    "adaboost": ("boosting", adaboost),
    "hist_gradient_boosting": ("boosting", hist_gradient_boosting),
    "stacking_svc_lr": ("stacking", stacking_svc_lr),
}


def make_estimator(name: str, *, n_estimators: int = 100, max_depth: int = 0, seed: int = 0, **params: Any) -> Any:
    """A registered, unfitted estimator; ``params`` are checked for renamed arguments (``base_estimator``)."""
    check_params(f"ensemble estimator {name}", params)
    if params:
        raise RecipeError(f"ensemble estimator {name}: unknown parameters {', '.join(params)}; allowed: "
                          "n_estimators, max_depth, seed")
    if name not in ESTIMATORS:
        raise RecipeError(f"ensemble estimator {name!r} is unknown; choose from {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name][1](n_estimators, max_depth, seed)


def uses_rbf_svc(estimator: Any) -> bool:
    from sklearn.svm import SVC

    found = [v for v in estimator.get_params(deep=True).values() if isinstance(v, SVC)]
    return (isinstance(estimator, SVC) and estimator.kernel != "linear") or any(v.kernel != "linear" for v in found)


def expected_svc_seconds(rows: int) -> float:
    return SVC_SECONDS_PER_MROWS2 * (rows / 1000) ** 2 / 1000


def guard_slow(estimator: Any, x: np.ndarray, y: np.ndarray, *, max_rows: int, policy: str,
               seed: int) -> tuple[Any, np.ndarray, np.ndarray]:
    """Keep an RBF SVC from hanging on many rows: subsample, switch to a calibrated linear SVC, or warn.

    Args:
        max_rows: rows above which an RBF SVC counts as slow (0: never).
        policy: ``subsample`` (stratified ``max_rows`` rows), ``linear`` (LinearSVC + calibration on all rows)
            or ``warn`` (fit all rows after logging the expected time).
    """
    if not max_rows or len(y) <= max_rows or not uses_rbf_svc(estimator):
        return estimator, x, y
    minutes = expected_svc_seconds(len(y)) / 60
    if policy == "warn":
        log.warning("RBF SVC on %d rows: expect about %.0f min (time grows with rows squared)", len(y), minutes)
        return estimator, x, y
    if policy == "linear":
        log.warning("RBF SVC on %d rows would take about %.0f min; using LinearSVC + calibration", len(y), minutes)
        return _linear_svc(estimator, seed), x, y
    from sklearn.model_selection import train_test_split

    log.warning("RBF SVC on %d rows would take about %.0f min; fitting on a stratified subsample of %d rows",
                len(y), minutes, max_rows)
    x, _, y, _ = train_test_split(x, y, train_size=max_rows, stratify=y, random_state=seed)
    return estimator, x, y


def _linear_svc(estimator: Any, seed: int) -> Any:
    """``estimator`` with every RBF SVC replaced by a linear one (calibrated, if it was not already)."""
    from sklearn.base import clone
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC, LinearSVC

    def linear(calibrated: bool) -> Any:
        return LinearSVC(random_state=seed) if calibrated else CalibratedClassifierCV(LinearSVC(random_state=seed),
                                                                                        cv=3)

    if isinstance(estimator, SVC):
        return linear(False)
    params = estimator.get_params(deep=True)
    swaps = {k: linear(isinstance(params.get(k.rpartition("__")[0]), CalibratedClassifierCV))
             for k, v in params.items() if isinstance(v, SVC) and v.kernel != "linear"}
    return clone(estimator).set_params(**swaps)
