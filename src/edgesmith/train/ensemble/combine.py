"""Linear combiners of member probabilities: averaging, weighted averaging and a linear stacked meta-model.

All three are one operation, ``p = act(concat(p_1, ..., p_M) @ kernel + bias)``: averaging and weighting use a
block-diagonal kernel (weights times identity) and no activation; stacking uses a multinomial logistic
regression's coefficients and softmax. The same operation is a Dense layer, which is how
:func:`edgesmith.train.ensemble.fold.fold_ensemble` puts it into one Keras graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edgesmith.errors import ModelError

log = logging.getLogger(__name__)
LINEAR_KINDS = ("average", "weighted", "stacked")


@dataclass
class LinearCombiner:
    """Combines M members' class probabilities with one linear map (and softmax for ``stacked``).

    Attributes:
        kind: one of :data:`LINEAR_KINDS`.
        kernel_: (M * C, C) matrix; bias_: (C,); set by :meth:`fit`.
        weights_: the members' weights (averaging and weighting).
    """

    kind: str = "average"
    seed: int = 0
    c: float = 1.0

    @classmethod
    def uniform(cls, count: int, classes: int) -> LinearCombiner:
        """Plain averaging of ``count`` members over ``classes`` classes (nothing to fit)."""
        return cls("average").fit([np.full((1, classes), 1.0 / classes)] * count, np.zeros(1, dtype=int))

    def fit(self, member_probs: list[np.ndarray], labels: np.ndarray) -> LinearCombiner:
        """Fit on rows no member was trained on (see :func:`edgesmith.train.ensemble.leakage.check_rows`)."""
        if self.kind not in LINEAR_KINDS:
            raise ModelError(f"combiner kind {self.kind!r} is unknown; choose from {', '.join(LINEAR_KINDS)}")
        count, classes = len(member_probs), member_probs[0].shape[1]
        if self.kind == "stacked":
            self._fit_stacked(member_probs, labels)
            return self
        self.weights_ = np.full(count, 1.0 / count) if self.kind == "average" else fit_weights(member_probs, labels)
        self.kernel_ = np.concatenate([w * np.eye(classes) for w in self.weights_]).astype(np.float32)
        self.bias_ = np.zeros(classes, np.float32)
        return self

    def _fit_stacked(self, member_probs: list[np.ndarray], labels: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        meta = LogisticRegression(C=self.c, max_iter=2000, random_state=self.seed)
        meta.fit(np.concatenate(member_probs, axis=1), labels)
        self.kernel_ = meta.coef_.T.astype(np.float32)
        self.bias_ = meta.intercept_.astype(np.float32)
        self.weights_ = None

    @property
    def softmax(self) -> bool:
        return self.kind == "stacked"

    def predict_proba(self, member_probs: list[np.ndarray]) -> np.ndarray:
        z = np.concatenate(member_probs, axis=1).astype(np.float32) @ self.kernel_ + self.bias_
        if not self.softmax:
            return z
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


def fit_weights(member_probs: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Non-negative member weights summing to 1 that minimize the log loss of the weighted average."""
    from scipy.optimize import minimize

    stacked = np.stack(member_probs).astype(np.float64)  # (M, N, C)
    picked = stacked[:, np.arange(len(labels)), labels]  # (M, N): each member's probability of the true class

    def loss(theta: np.ndarray) -> float:
        w = np.exp(theta - theta.max())
        w /= w.sum()
        return -float(np.mean(np.log(w @ picked + 1e-12)))

    theta = minimize(loss, np.zeros(len(member_probs)), method="L-BFGS-B").x
    weights = np.exp(theta - theta.max())
    return weights / weights.sum()
