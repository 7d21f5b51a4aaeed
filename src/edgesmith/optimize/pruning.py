"""Magnitude pruning (tfmot): unstructured to a target sparsity, or 2:4 structured; always stripped.

Only layers tfmot's PruneRegistry knows and that hold a prunable kernel are wrapped; every other layer
with weights (BatchNormalization, Rescaling/Normalization, frozen layers below the freeze boundary) is
left as it is and listed in the report with the reason. With ``prune_frozen`` the frozen kernels are
pruned too, in one shot by magnitude, before the layers above fine-tune on their activations. Sparsity
is measured on the stripped model, never taken from the schedule.
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
from edgesmith.errors import RecipeError
from edgesmith.optimize.check import preprocessed
from edgesmith.optimize.finetune import (
    FineTuner,
    copy_model,
    frozen_boundary,
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
    source, frozen = copy_model(model), {}
    if cfg.prune_frozen and (cut := frozen_boundary(model, cfg)) >= 0:
        frozen = prune_below_boundary(source, cut, cfg)
        images, _ = preprocessed(data, spec, "train", cfg.recalibration_samples, seed)
        recalibrate_batchnorm(source, model, cut, images)
        tuner = None  # a shared tuner's cached activations are the unpruned lower part's
    tuner = tuner or FineTuner(source, data, cfg, spec=spec, seed=seed, mirror=mirror)
    if tuner.cut < 0:
        unfreeze_all_but_batchnorm(source)
    total = tuner.steps_per_epoch() * cfg.prune_epochs
    wrapped, skipped = wrap_for_pruning(source, cfg, total, tuner.cut)
    skipped = {name: reason for name, reason in skipped.items() if name not in frozen}
    tuner.run(wrapped, epochs=cfg.prune_epochs, learning_rate=cfg.prune_learning_rate,
              callbacks=[tfmot().sparsity.keras.UpdatePruningStep()], phase="prune")
    stripped = strip(wrapped)
    structured = cfg.prune_structure == "2:4"
    report = {"structure": cfg.prune_structure, "target_sparsity": 0.5 if structured else cfg.sparsity,
              "schedule": cfg.prune_schedule, "steps": total, "fine_tuned": tuner.describe(),
              **measure_sparsity(stripped, exclude=skipped)}
    report["skipped_layers"] = skipped
    if frozen:
        report["pruned_frozen_layers"] = frozen
    report.update(weight_bytes(stripped))
    report["latency_note"] = STRUCTURED_NOTE if structured else LATENCY_NOTE
    return stripped, report


def prune_below_boundary(model: keras.Model, cut: int, cfg: OptimizeConfig) -> dict[str, str]:
    """Zero the smallest-magnitude ``cfg.sparsity`` of each prunable kernel up to layer ``cut``, in place.

    These layers are frozen (the fine-tune runs above them on cached activations), so they are pruned
    in one shot, layer by layer, as tfmot's magnitude pruning ranks weights; the layers above then
    fine-tune on the activations of the pruned lower part and learn to compensate. Returns
    ``{layer name: how it was pruned}``.
    """
    if cfg.prune_structure != "unstructured":
        raise RecipeError(f"optimize.prune_frozen: supports unstructured pruning only, not prune_structure = "
                          f"{cfg.prune_structure!r}; set prune_frozen = false or prune_structure = \"unstructured\"")
    pruned = {}
    for layer in model.layers[: cut + 1]:
        if not layer.weights or is_batchnorm(layer) or not prunable(layer):
            continue
        weights = layer.get_weights()
        weights[0] = magnitude_pruned(weights[0], cfg.sparsity)
        layer.set_weights(weights)
        pruned[layer.name] = f"{type(layer).__name__}: below the freeze boundary, one-shot magnitude pruning"
    log.info("pruned %d frozen layers below layer %d to %.0f%% in one shot", len(pruned), cut, cfg.sparsity * 100)
    return pruned


def recalibrate_batchnorm(pruned: keras.Model, original: keras.Model, cut: int, images: np.ndarray) -> list[str]:
    """Restore, in ``pruned``, the per-channel output statistics every BatchNormalization up to ``cut`` had.

    Pruning a frozen convolution shrinks and shifts its output, which the following (frozen,
    inference-mode) BatchNormalization still normalizes with the old moving statistics, so the layers
    above see other activations than they were trained on. Layer by layer from the input, each one's
    moving mean and variance are set so that its output on ``images`` has the mean and variance per
    channel that the original layer's output has (not the data's own statistics: the layers above were
    fine-tuned on the original layer's output). Returns the names recalibrated.
    """
    names = []
    for index, layer in enumerate(pruned.layers[: cut + 1]):
        if not is_batchnorm(layer) or not layer.center or not layer.scale:
            continue
        new_mean, new_var = input_moments(pruned, layer, images)
        old_mean, old_var = input_moments(original, original.layers[index], images)
        mean, var = layer.moving_mean.numpy().astype(np.float64), layer.moving_variance.numpy().astype(np.float64)
        eps = layer.epsilon
        ratio = np.where(old_var > 1e-12, new_var / np.maximum(old_var, 1e-12), 1.0)
        moved_var = np.maximum(ratio * (var + eps) - eps, 0.0)
        moved_mean = new_mean - (old_mean - mean) * np.sqrt((moved_var + eps) / (var + eps))
        layer.moving_mean.assign(moved_mean.astype(np.float32))
        layer.moving_variance.assign(moved_var.astype(np.float32))
        names.append(layer.name)
    log.info("restored the output statistics of %d BatchNormalization layers on %d images", len(names), len(images))
    return names


def input_moments(model: keras.Model, layer: keras.layers.Layer, images: np.ndarray,
                  batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of ``layer``'s input over ``images`` (all positions)."""
    probe = keras.Model(model.input, layer.input)
    count, total, squares = 0, 0.0, 0.0
    for start in range(0, len(images), batch_size):
        batch = probe(images[start : start + batch_size], training=False).numpy().astype(np.float64)
        axes = tuple(range(batch.ndim - 1))
        count += int(np.prod([batch.shape[a] for a in axes]))
        total, squares = total + batch.sum(axis=axes), squares + np.square(batch).sum(axis=axes)
    mean = total / count
    return mean, np.maximum(squares / count - np.square(mean), 0.0)


def magnitude_pruned(kernel: np.ndarray, sparsity: float) -> np.ndarray:
    """``kernel`` with its ``round(sparsity * size)`` smallest-magnitude weights set to exactly 0."""
    count = int(round(sparsity * kernel.size))
    if count == 0:
        return kernel.copy()
    flat = kernel.ravel().copy()
    flat[np.argpartition(np.abs(flat), count - 1)[:count]] = 0
    return flat.reshape(kernel.shape)


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
