"""The optimize stage's one function: each technique of the recipe applied to the trained model.

Every technique works on a copy of the model, fine-tunes with BatchNormalization frozen (inference
mode) as the train stage does, and reports what it did and what it skipped. Post-training
quantization is a setting of export, not a technique here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from edgesmith._keras import keras
from edgesmith.data.datasets import ImageDataset
from edgesmith.data.spec import PreprocessSpec
from edgesmith.optimize.check import CheckData, check_int8, predict, top1
from edgesmith.optimize.clustering import cluster
from edgesmith.optimize.finetune import FineTuner, copy_model
from edgesmith.optimize.pruning import measure_sparsity, prune
from edgesmith.optimize.qat import cluster_preserve_scheme, prune_preserve_scheme, quantization_aware
from edgesmith.recipe import OptimizeConfig

__all__ = ["OptimizeResult", "cluster", "copy_model", "measure_sparsity", "optimize", "prune", "quantization_aware"]
log = logging.getLogger(__name__)
QAT_TECHNIQUES = ("qat", "prune_qat", "cluster_qat")


@dataclass
class OptimizeResult:
    """Optimized models by technique name, with a report entry for each (done or skipped, and why)."""

    models: dict[str, keras.Model] = field(default_factory=dict)
    report: dict[str, dict[str, Any]] = field(default_factory=dict)


class _Session:
    """One optimize call: a shared fine-tuner (one activation cache) and each finished model, so a chain
    (``prune_qat`` after ``prune``) reuses the earlier step instead of redoing it."""

    def __init__(self, model: keras.Model, data: ImageDataset, cfg: OptimizeConfig, spec: PreprocessSpec,
                 seed: int, mirror: bool) -> None:
        self.model, self.data, self.cfg, self.spec, self.seed, self.mirror = model, data, cfg, spec, seed, mirror
        self.tuner = FineTuner(model, data, cfg, spec=spec, seed=seed, mirror=mirror)
        self.done: dict[str, tuple[keras.Model, dict[str, Any]]] = {}

    def kwargs(self) -> dict[str, Any]:
        return {"spec": self.spec, "seed": self.seed, "mirror": self.mirror, "tuner": self.tuner}

    def run(self, name: str) -> tuple[keras.Model, dict[str, Any]]:
        if name not in self.done:
            self.done[name] = STEPS[name](self)
        return self.done[name]


def _prune(session: _Session) -> tuple[keras.Model, dict[str, Any]]:
    return prune(session.model, session.data, session.cfg, **session.kwargs())


def _cluster(session: _Session) -> tuple[keras.Model, dict[str, Any]]:
    return cluster(session.model, session.data, session.cfg, **session.kwargs())


def _qat(session: _Session) -> tuple[keras.Model, dict[str, Any]]:
    return quantization_aware(session.model, session.data, session.cfg, **session.kwargs())


def _chained_qat(first: str, scheme: Any) -> Any:
    def run(session: _Session) -> tuple[keras.Model, dict[str, Any]]:
        earlier, earlier_report = session.run(first)
        qat, report = quantization_aware(earlier, session.data, session.cfg, **session.kwargs(), scheme=scheme())
        return qat, {**report, "after": first, first: earlier_report}

    return run


STEPS = {"prune": _prune, "qat": _qat, "cluster": _cluster,
         "prune_qat": _chained_qat("prune", prune_preserve_scheme),
         "cluster_qat": _chained_qat("cluster", cluster_preserve_scheme)}


def optimize(model: keras.Model, data: ImageDataset, cfg: OptimizeConfig, *, spec: PreprocessSpec,
             seed: int = 0, mirror: bool = True) -> OptimizeResult:
    """Apply each technique in ``cfg.techniques`` to ``model``.

    ``prune``, ``cluster`` and ``qat`` each start from ``model``; ``prune_qat`` / ``cluster_qat`` run
    QAT that preserves the sparsity / clusters of ``prune`` / ``cluster`` (reused when also listed).
    With ``cfg.check_samples`` > 0 each result is exported to int8 TFLite and measured (see
    :func:`edgesmith.optimize.check.check_int8`): top-1 of float / optimized / int8 on the same
    held-out images, file bytes and gzip bytes, sparsity and distinct values read back from the file.

    Args:
        model: the trained Keras 2 model (left unchanged).
        data: fine-tuning draws from ``data.train``; checks use ``data.val`` (else ``data.test``).
        cfg: techniques, targets, epochs, learning rates.
        spec: the model's preprocessing.
        seed: seeds samples and shuffling.
        mirror: left-right mirrored images are valid examples (random flips in whole-model fine-tunes).
    """
    session = _Session(model, data, cfg, spec, seed, mirror)
    result = OptimizeResult()
    check = CheckData.draw(data, spec, cfg.check_samples, seed) if cfg.check_samples else None
    source_top1 = top1(predict(model, check.inputs), check.labels) if check else None
    for name in cfg.techniques:
        optimized, report = session.run(name)
        if check is not None:
            report["int8_check"] = check_int8(model, optimized, spec, check, quantized=name in QAT_TECHNIQUES,
                                              source_top1=source_top1)
        result.models[name], result.report[name] = optimized, report
    return result
