"""Magnitude pruning (tfmot): unstructured to a target sparsity, or 2:4 structured; always stripped.

Only layers tfmot's PruneRegistry knows and that hold a prunable kernel are wrapped; every other layer
with weights (BatchNormalization, depthwise convolutions, Rescaling/Normalization, frozen layers below
the freeze boundary) is left as it is and listed in the report with the reason. Sparsity is measured on
the stripped model, never taken from the schedule.
"""

from __future__ import annotations

import gzip
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith._keras import keras
from edgesmith.data.datasets import ImageDataset
from edgesmith.data.spec import PreprocessSpec
from edgesmith.optimize.finetune import (
    FineTuner,
    copy_model,
    is_batchnorm,
    rewrap,
    tfmot,
    unfreeze_all_but_batchnorm,
)
from edgesmith.recipe import OptimizeConfig

log = logging.getLogger(__name__)
LATENCY_NOTE = ("unstructured sparsity shrinks the compressed (gzip) size, not latency: TFLite and ONNX Runtime "
                "run sparse kernels as dense ones on CPU")
STRUCTURED_NOTE = ("2:4 sparsity can be accelerated only by hardware/kernels with 2:4 support; "
                   "no latency gain is claimed here")


def prunable(layer: keras.layers.Layer) -> bool:
    """tfmot's PruneRegistry knows the layer and lists a prunable weight for it."""
    from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import PruneRegistry

    return PruneRegistry.supports(layer) and bool(PruneRegistry._weight_names(layer))


def skip_reason(layer: keras.layers.Layer, index: int, cut: int, *, supported: Any = None,
                kernel: str = "prunable", registry: str = "PruneRegistry") -> str | None:
    """Why a layer with weights is not pruned (None: it is pruned); clustering passes its own registry check."""
    kind = type(layer).__name__
    if index <= cut:
        return f"{kind}: below the freeze boundary (frozen, not fine-tuned)"
    if is_batchnorm(layer):
        return f"{kind}: normalization statistics, not a kernel"
    if not (supported or prunable)(layer):
        return f"{kind}: no {kernel} kernel in tfmot's {registry}"
    if not layer.trainable:
        return f"{kind}: frozen (trainable = False)"
    return None


def pruning_schedule(cfg: OptimizeConfig, total_steps: int) -> Any:
    """Polynomial (0 -> target by ``prune_end_fraction`` of the steps) or constant, updating often enough.

    The masks are updated about 25 times before the end step (tfmot's default every 100 steps never
    prunes in a short fine-tune).
    """
    schedules = tfmot().sparsity.keras
    end = max(1, int(total_steps * cfg.prune_end_fraction))
    frequency = cfg.prune_frequency or max(1, end // 25)
    if cfg.prune_schedule == "constant":
        return schedules.ConstantSparsity(cfg.sparsity, begin_step=0, end_step=end, frequency=frequency)
    return schedules.PolynomialDecay(initial_sparsity=0.0, final_sparsity=cfg.sparsity, begin_step=0,
                                     end_step=end, frequency=frequency)


def wrap_for_pruning(model: keras.Model, cfg: OptimizeConfig, total_steps: int, cut: int = -1
                     ) -> tuple[keras.Model, dict[str, str]]:
    """A copy of ``model`` with every prunable layer above ``cut`` wrapped; and the skipped layers with why."""
    keras_sparsity = tfmot().sparsity.keras
    schedule = pruning_schedule(cfg, total_steps)
    extra = {"sparsity_m_by_n": (2, 4)} if cfg.prune_structure == "2:4" else {}
    index = {layer.name: i for i, layer in enumerate(model.layers)}
    skipped = {layer.name: reason for i, layer in enumerate(model.layers)
               if layer.weights and (reason := skip_reason(layer, i, cut))}

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer | None:
        if layer.weights and layer.name not in skipped and index.get(layer.name, -1) > cut:
            return keras_sparsity.prune_low_magnitude(layer, pruning_schedule=schedule, **extra)
        return None

    return rewrap(model, wrap, is_wrapper), skipped


def prune(model: keras.Model, data: ImageDataset, cfg: OptimizeConfig, *, spec: PreprocessSpec,
          seed: int = 0, mirror: bool = True, tuner: FineTuner | None = None) -> tuple[keras.Model, dict[str, Any]]:
    """Magnitude-prune the trainable kernels during a fine-tune, strip the wrappers, measure.

    ``cfg.prune_structure`` = "unstructured" prunes to ``cfg.sparsity`` with ``cfg.prune_schedule``;
    "2:4" keeps 2 of every 4 consecutive input-channel weights. With frozen lower layers the
    fine-tune runs above the freeze boundary on cached activations (see :class:`FineTuner`).

    Returns:
        The stripped model (plain layers, exact zeros) and a report: measured sparsity per pruned layer
        and overall, skipped layers with reasons, raw and gzip bytes of the stripped weights.
    """
    tuner = tuner or FineTuner(model, data, cfg, spec=spec, seed=seed, mirror=mirror)
    source = copy_model(model)
    if tuner.cut < 0:
        unfreeze_all_but_batchnorm(source)
    total = tuner.steps_per_epoch() * cfg.prune_epochs
    wrapped, skipped = wrap_for_pruning(source, cfg, total, tuner.cut)
    tuner.run(wrapped, epochs=cfg.prune_epochs, learning_rate=cfg.prune_learning_rate,
              callbacks=[tfmot().sparsity.keras.UpdatePruningStep()], phase="prune")
    stripped = strip(wrapped)
    structured = cfg.prune_structure == "2:4"
    report = {"structure": cfg.prune_structure, "target_sparsity": 0.5 if structured else cfg.sparsity,
              "schedule": cfg.prune_schedule, "steps": total, "fine_tuned": tuner.describe(),
              **measure_sparsity(stripped, exclude=skipped)}
    report["skipped_layers"] = skipped
    report.update(weight_bytes(stripped))
    report["latency_note"] = STRUCTURED_NOTE if structured else LATENCY_NOTE
    return stripped, report


def is_wrapper(layer: keras.layers.Layer) -> bool:
    from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude

    return isinstance(layer, PruneLowMagnitude)


def strip(model: keras.Model) -> keras.Model:
    """The model without pruning wrappers; what is saved and exported (never the wrapped one)."""
    stripped = tfmot().sparsity.keras.strip_pruning(model)
    if any(is_wrapper(layer) for layer in stripped.layers):
        raise RuntimeError("strip_pruning left a pruning wrapper in the model")
    return stripped


def measure_sparsity(model: keras.Model, exclude: dict[str, str] | None = None) -> dict[str, Any]:
    """Fraction of exact zeros in each prunable kernel not in ``exclude``, over them, and over all kernels."""
    per_layer, zeros, total, all_zeros, all_total = {}, 0, 0, 0, 0
    for layer in model.layers:
        if not prunable(layer):
            continue
        kernel = layer.get_weights()[0]
        all_zeros, all_total = all_zeros + int(np.sum(kernel == 0)), all_total + kernel.size
        if exclude and layer.name in exclude:
            continue
        per_layer[layer.name] = round(float(np.mean(kernel == 0)), 4)
        zeros += int(np.sum(kernel == 0))
        total += kernel.size
    return {"sparsity_per_layer": per_layer, "sparsity_overall": round(zeros / max(total, 1), 4),
            "sparsity_all_kernels": round(all_zeros / max(all_total, 1), 4)}


def weight_bytes(model: keras.Model) -> dict[str, int]:
    """Raw and gzip bytes of the model's weights as float32 (what sparsity and clustering compress)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.npy"
        np.save(path, np.concatenate([w.astype(np.float32).ravel() for w in model.get_weights()]))
        raw = path.read_bytes()
    return {"weights_bytes": len(raw), "weights_gzip_bytes": len(gzip.compress(raw, compresslevel=9))}
