"""Pruning and quantization-aware training (tensorflow-model-optimization, Keras 2).

Both work on a copy of the model, fine-tune briefly on a stratified sample of the training split,
and leave BatchNormalization frozen (inference mode) as the train stage does. Post-training
quantization is a setting of export, not a technique here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgesmith._keras import keras
from edgesmith.data.datasets import ImageDataset, limit_per_class
from edgesmith.data.pipeline import make_pipeline
from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import ModelError
from edgesmith.recipe import OptimizeConfig
from edgesmith.train.transfer import EpochLogger, compile_for

log = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    """Optimized models by technique name, with a report entry for each (done or skipped, and why)."""

    models: dict[str, keras.Model] = field(default_factory=dict)
    report: dict[str, dict[str, Any]] = field(default_factory=dict)


def _tfmot() -> Any:
    import tensorflow_model_optimization as tfmot

    return tfmot


def copy_model(model: keras.Model) -> keras.Model:
    """An independent copy (same architecture and weights, no shared variables)."""
    _require_keras2(model)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _require_keras2(model: Any) -> None:
    if not isinstance(model, keras.Model):
        raise ModelError(
            f"{type(model).__module__}.{type(model).__name__} is not a Keras 2 (tf_keras) model; tfmot needs "
            "Keras 2: rebuild the architecture with tf_keras and copy the weights (get_weights/set_weights)"
        )
    if not getattr(model, "_is_graph_network", False):
        raise ModelError(f"model {model.name} is subclassed; tfmot can only optimize Functional or Sequential models")


def unfreeze_all_but_batchnorm(model: keras.Model) -> None:
    for layer in model.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)


def finetune_data(data: ImageDataset, spec: PreprocessSpec, cfg: OptimizeConfig, seed: int,
                  mirror: bool) -> tuple[Any, int]:
    """The fine-tune pipeline (a stratified sample of train, mirrored at random if ``mirror``) and its steps."""
    per_class = math.ceil(cfg.finetune_samples / data.num_classes) if cfg.finetune_samples else 0
    split = limit_per_class(data.train, per_class, seed)
    pipeline = make_pipeline(split, spec, batch_size=cfg.batch_size, shuffle_seed=seed, random_flip=mirror, cache=True)
    return pipeline, math.ceil(len(split) / cfg.batch_size)


def _prunable(layer: keras.layers.Layer) -> bool:
    from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import PruneRegistry

    return PruneRegistry.supports(layer) and bool(PruneRegistry._weight_names(layer))


def prune(model: keras.Model, data: ImageDataset, cfg: OptimizeConfig, *, spec: PreprocessSpec,
          seed: int = 0, mirror: bool = True) -> tuple[keras.Model, dict[str, Any]]:
    """Magnitude-prune every prunable kernel to ``cfg.sparsity`` during a short fine-tune, then strip.

    The polynomial schedule reaches the target at 70% of the fine-tune and updates the masks about 20
    times, so short fine-tunes really reach it. Returns the stripped model and a report with the
    measured sparsity per pruned layer and overall.
    """
    tfmot = _tfmot()
    pipeline, steps = finetune_data(data, spec, cfg, seed, mirror)
    total = steps * cfg.prune_epochs
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=cfg.sparsity, begin_step=0,
        end_step=max(1, int(total * 0.7)), frequency=max(1, total // 20),
    )
    source = copy_model(model)
    unfreeze_all_but_batchnorm(source)
    skipped = {layer.name: type(layer).__name__ for layer in source.layers if layer.weights and not _prunable(layer)}

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        if _prunable(layer):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    pruned = keras.models.clone_model(source, clone_function=wrap)
    compile_for(pruned, cfg.prune_learning_rate)
    log.info("pruning to %.0f%% sparsity over %d steps", cfg.sparsity * 100, total)
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep(), EpochLogger("prune")]
    pruned.fit(pipeline, epochs=cfg.prune_epochs, callbacks=callbacks, verbose=0)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    report = {"target_sparsity": cfg.sparsity, "steps": total, **measure_sparsity(stripped, source)}
    report["skipped_layers"] = {name: f"{cls}: no prunable kernel in tfmot's registry" for name, cls in skipped.items()}
    return stripped, report


def measure_sparsity(model: keras.Model, reference: keras.Model | None = None) -> dict[str, Any]:
    """Fraction of exact zeros in each kernel that was pruned, and over all of them."""
    per_layer, zeros, total = {}, 0, 0
    for layer in model.layers:
        if not _prunable(layer):
            continue
        kernel = layer.get_weights()[0]
        per_layer[layer.name] = round(float(np.mean(kernel == 0)), 4)
        zeros += int(np.sum(kernel == 0))
        total += kernel.size
    return {"sparsity_per_layer": per_layer, "sparsity_overall": round(zeros / max(total, 1), 4)}


def quantization_aware(model: keras.Model, data: ImageDataset, cfg: OptimizeConfig, *, spec: PreprocessSpec,
                       seed: int = 0, mirror: bool = True) -> tuple[keras.Model, dict[str, Any]]:
    """Quantization-aware training: tfmot ``quantize_model`` on a copy, then a short fine-tune."""
    tfmot = _tfmot()
    source = copy_model(model)
    unfreeze_all_but_batchnorm(source)
    try:
        qat = tfmot.quantization.keras.quantize_model(source)
    except Exception as exc:  # tfmot raises ValueError, RuntimeError or AttributeError on unsupported layers
        raise ModelError(
            f"model {model.name} cannot be quantized by tfmot ({type(exc).__name__}: {str(exc)[:300]}); "
            "drop 'qat' from optimize.techniques for this backbone"
        ) from None
    pipeline, steps = finetune_data(data, spec, cfg, seed, mirror)
    compile_for(qat, cfg.qat_learning_rate)
    log.info("quantization-aware training for %d steps", steps * cfg.qat_epochs)
    qat.fit(pipeline, epochs=cfg.qat_epochs, callbacks=[EpochLogger("qat")], verbose=0)
    return qat, {"steps": steps * cfg.qat_epochs, "quantized_layers": len(qat.layers)}


TECHNIQUES = {"prune": prune, "qat": quantization_aware}


def optimize(model: keras.Model, data: ImageDataset, cfg: OptimizeConfig, *, spec: PreprocessSpec,
             seed: int = 0, mirror: bool = True) -> OptimizeResult:
    """Apply each technique in ``cfg.techniques`` to ``model`` independently.

    Args:
        model: the trained Keras 2 model (left unchanged).
        data: fine-tuning draws a stratified sample of ``data.train``.
        cfg: techniques, targets, epochs, learning rates.
        spec: the model's preprocessing.
        seed: seeds the sample and its shuffling.
        mirror: left-right mirrored images are valid examples (random flips while fine-tuning).
    """
    result = OptimizeResult()
    for name in cfg.techniques:
        optimized, report = TECHNIQUES[name](model, data, cfg, spec=spec, seed=seed, mirror=mirror)
        result.models[name] = optimized
        result.report[name] = report
    return result
