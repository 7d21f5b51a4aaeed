"""Fit every configured ensemble on member outputs and score it on held-out rows only.

Network members contribute class probabilities and pooled embeddings per split (computed once, cached
as npz). Combiners (averaging, weighted, linear stacking) and a tree meta-model are fitted on the members'
probabilities for ``fit_split`` rows, which no member was trained on, so the meta-features are
out-of-sample; scikit-learn ensembles are fitted on one member's embeddings of the same rows (stacking
inside them uses 5-fold out-of-fold predictions). Everything is scored on ``eval_split`` only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import ModelError
from edgesmith.recipe import EnsembleConfig
from edgesmith.runs import atomic_path
from edgesmith.train.ensemble.combine import LinearCombiner
from edgesmith.train.ensemble.estimators import ESTIMATORS, guard_slow, make_estimator
from edgesmith.train.ensemble.leakage import check_eval_rows, check_meta_rows

log = logging.getLogger(__name__)
FAMILIES = {"average": "averaging", "weighted": "averaging", "stacked": "stacking", "forest_stack": "stacking",
            "bagged_networks": "bagging"}


@dataclass
class MemberOutputs:
    """One network member's probabilities, embeddings and labels per split, and the rows it trained on."""

    name: str
    probs: dict[str, np.ndarray]
    embeddings: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    trained_rows: np.ndarray
    bootstrap: bool = False

    def arrays(self) -> dict[str, np.ndarray]:
        """``<split>_probs``, ``<split>_emb``, ``<split>_labels`` and ``trained_rows`` (the npz layout)."""
        parts = {"probs": self.probs, "emb": self.embeddings, "labels": self.labels}
        return {"trained_rows": self.trained_rows,
                **{f"{split}_{kind}": v for kind, d in parts.items() for split, v in d.items()}}

    def save(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **self.arrays())
        return Path(path)

    @classmethod
    def from_arrays(cls, arrays: Any, name: str, trained_rows: np.ndarray | None = None, *,
                    bootstrap: bool = False) -> MemberOutputs:
        """From the npz layout of :meth:`arrays` (``trained_rows`` given here wins over a stored one)."""
        keys = list(arrays.keys())
        parts = {kind: {key.rsplit("_", 1)[0]: arrays[key] for key in keys if key.endswith(f"_{kind}")}
                 for kind in ("probs", "emb", "labels")}
        if trained_rows is None:
            trained_rows = arrays["trained_rows"]
        return cls(name, parts["probs"], parts["emb"], parts["labels"], np.asarray(trained_rows), bootstrap)

    @classmethod
    def load(cls, path: str | Path, name: str, *, bootstrap: bool = False,
             trained_rows: np.ndarray | None = None) -> MemberOutputs:
        with np.load(path) as data:
            return cls.from_arrays({k: data[k] for k in data.files}, name, trained_rows, bootstrap=bootstrap)


@dataclass
class EnsembleRow:
    """One scored model: a member or an ensemble, with its in-process held-out probabilities."""

    name: str
    family: str
    members: list[str]
    top1: float
    probs: np.ndarray
    fitted: Any = None
    fit_seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "members": self.members, "top1": round(self.top1, 5),
                "fit_seconds": round(self.fit_seconds, 2), **self.notes}


BOOSTING_DEPTH = {"stump": 1, "shallow_tree": 3}
EVAL_SPLIT = "test"


def _top1(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(1) == labels))


def fit_ensembles(members: list[MemberOutputs], cfg: EnsembleConfig, *, split_rows: dict[str, np.ndarray],
                  seed: int = 0) -> list[EnsembleRow]:
    """Score every member and fit and score every configured ensemble; the first member gives the embeddings.

    Args:
        members: network members' outputs; each has ``cfg.fit_split`` and the test split.
        cfg: the recipe's ``[ensemble]`` section.
        split_rows: row identifiers per split (see :func:`edgesmith.train.ensemble.leakage.row_ids`).

    Raises:
        LeakageError: the meta-model's rows overlap a member's training rows (unless ``allow_leakage``), or
            the evaluation rows overlap any fitted rows.
    """
    fit, ev = cfg.fit_split, EVAL_SPLIT
    if not members:
        raise ModelError("an ensemble needs at least one network member")
    trained = {m.name: m.trained_rows for m in members}
    check_meta_rows(split_rows[fit], trained, allow=cfg.allow_leakage)
    check_eval_rows(split_rows[ev], {**trained, "meta-model": split_rows[fit]})
    labels, fit_labels = members[0].labels[ev], members[0].labels[fit]
    rows = [EnsembleRow(m.name, "member", [m.name], _top1(m.probs[ev], labels), m.probs[ev]) for m in members]
    names = [m.name for m in members]
    fit_probs, ev_probs = [m.probs[fit] for m in members], [m.probs[ev] for m in members]
    if len(members) > 1:
        rows += _combiner_rows(cfg.combiners, seed, names, fit_probs, fit_labels, ev_probs, labels)
        rows += _bagged_network_rows(members, ev, labels)
    if cfg.tree_meta and len(members) > 1:
        forest = make_estimator("random_forest", n_estimators=cfg.n_estimators, max_depth=cfg.max_depth, seed=seed)
        rows.append(_sklearn_row("forest_stack", "stacking", names, forest, np.concatenate(fit_probs, 1), fit_labels,
                                 np.concatenate(ev_probs, 1), labels, cfg, seed))
    source = members[0]
    for name in cfg.estimators:
        depth = BOOSTING_DEPTH[cfg.estimator] if ESTIMATORS[name][0] == "boosting" else cfg.max_depth
        estimator = make_estimator(name, n_estimators=cfg.n_estimators, max_depth=depth, seed=seed)
        rows.append(_sklearn_row(name, ESTIMATORS[name][0], [source.name], estimator, source.embeddings[fit],
                                 fit_labels, source.embeddings[ev], labels, cfg, seed))
    return rows


def _combiner_rows(kinds: list[str], seed: int, names: list[str], fit_probs: list[np.ndarray],
                   fit_labels: np.ndarray, ev_probs: list[np.ndarray], labels: np.ndarray) -> list[EnsembleRow]:
    rows = []
    for kind in kinds:
        started = time.perf_counter()
        combiner = LinearCombiner(kind, seed=seed).fit(fit_probs, fit_labels)
        probs = combiner.predict_proba(ev_probs)
        notes = {"weights": [round(float(w), 4) for w in combiner.weights_]} if combiner.weights_ is not None else {}
        rows.append(EnsembleRow(kind, FAMILIES[kind], names, _top1(probs, labels), probs, combiner,
                                time.perf_counter() - started, notes))
    return rows


def _bagged_network_rows(members: list[MemberOutputs], ev: str, labels: np.ndarray) -> list[EnsembleRow]:
    """Averaged probabilities of the members trained on bootstrap samples (bagging of networks)."""
    bagged = [m for m in members if m.bootstrap]
    if len(bagged) < 2:
        return []
    combiner = LinearCombiner.uniform(len(bagged), bagged[0].probs[ev].shape[1])  # not labels: a class may be absent
    probs = combiner.predict_proba([m.probs[ev] for m in bagged])
    return [EnsembleRow("bagged_networks", "bagging", [m.name for m in bagged], _top1(probs, labels), probs,
                        combiner)]


def _fit_folds(estimator: Any, y: np.ndarray) -> None:
    """Fewer out-of-fold splits when the smallest class has fewer rows than folds (tiny data sets).

    Each of ``smallest`` stratified folds leaves ``smallest - 1`` rows of that class to fit on, so a
    cross-validation nested inside (the SVC's calibration) gets at most that many splits.
    """
    params = estimator.get_params()
    folds, smallest = params.get("cv"), int(np.bincount(y).min()) if len(y) else 0
    nested = {k: v for k, v in params.items() if k.endswith("__cv") and isinstance(v, int)}
    if isinstance(folds, int) and smallest < folds:
        need = 3 if nested else 2
        if smallest < need:
            raise ModelError(f"stacking needs at least {need} rows of every class in the fit split; the smallest "
                             f"has {smallest}: use more data or drop the stacking estimators")
        log.warning("stacking: %d out-of-fold splits instead of %d (smallest class has %d rows)", smallest, folds,
                    smallest)
        estimator.set_params(cv=smallest, **{k: min(v, smallest - 1) for k, v in nested.items()})


def _sklearn_row(name: str, family: str, members: list[str], estimator: Any, x: np.ndarray, y: np.ndarray,
                 x_eval: np.ndarray, labels: np.ndarray, cfg: EnsembleConfig, seed: int) -> EnsembleRow:
    estimator, x, y = guard_slow(estimator, x.astype(np.float32), y, max_rows=cfg.svc_max_rows,
                                 policy=cfg.slow_policy, seed=seed)
    _fit_folds(estimator, y)
    started = time.perf_counter()
    estimator.fit(x, y)
    seconds = time.perf_counter() - started
    probs = estimator.predict_proba(x_eval.astype(np.float32))
    log.info("%s: fitted on %d rows in %.1f s, top-1 %.4f", name, len(y), seconds, _top1(probs, labels))
    return EnsembleRow(name, family, members, _top1(probs, labels), probs, estimator, seconds,
                       {"fit_rows": int(len(y))})
