"""Network members of an ensemble: fine-tuned on activations computed once for all of them.

Every member built on the same backbone, input size and freeze boundary shares the layers below the
boundary unchanged (frozen ImageNet weights), so their activations there are computed once per split
(:class:`BoundaryCache`) and each member trains and predicts only its upper part on them. Members differ
by seed (head initialization, shuffling, dropout) and, for bagging of networks, by a bootstrap sample
of the training rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgesmith._keras import keras, tf
from edgesmith.data.datasets import ImageDataset, Split
from edgesmith.data.pipeline import make_pipeline
from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import ModelError
from edgesmith.recipe import Recipe
from edgesmith.train.transfer import (
    EpochLogger,
    compile_for,
    freeze_boundary,
    set_trainable,
    shuffled_batches,
    unfrozen_indices,
)
from edgesmith.zoo import build_classifier, head_start

log = logging.getLogger(__name__)
EMBEDDING_LAYER = "head_pool"


def build_member(recipe: Recipe, data: ImageDataset) -> tuple[keras.Model, PreprocessSpec]:
    """A fresh (untrained) classifier as the recipe describes it, backbone frozen, and its spec."""
    mcfg = recipe.model
    model, spec = build_classifier(mcfg.backbone, num_classes=data.num_classes, class_names=data.class_names,
                                input_size=mcfg.input_size, weights=mcfg.weights, pooling=mcfg.pooling,
                                dense_units=mcfg.dense_units, dropout=mcfg.dropout)
    set_trainable(model, range(head_start(model)), False)
    return model, spec


def boundary_index(model: keras.Model, recipe: Recipe) -> int:
    """The freeze boundary the train stage uses for this recipe (see ``transfer.freeze_boundary``)."""
    base_end = head_start(model)
    first_trained = max(1, base_end - (recipe.train.unfreeze_layers if recipe.train.finetune_epochs else 0))
    return freeze_boundary(model, first_trained)[0]


def upper_model(model: keras.Model, cut: int, *, embeddings: bool = False) -> keras.Model:
    """Boundary activations -> probabilities (and the pooled embedding), sharing ``model``'s weights."""
    outputs = [model.output, model.get_layer(EMBEDDING_LAYER).output] if embeddings else model.output
    return keras.Model(model.layers[cut].output, outputs, name="upper")


def check_shared_lower(model: keras.Model, reference: keras.Model, cut: int) -> None:
    """Raise unless ``model`` and ``reference`` have identical weights up to layer ``cut``.

    Only then are the cached activations valid for ``model``.
    """
    for a, b in zip(model.layers[: cut + 1], reference.layers[: cut + 1], strict=True):
        same = type(a) is type(b) and len(a.weights) == len(b.weights) and all(
            np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))
        if not same:
            raise ModelError(f"{model.name}: layer {a.name} differs from the cache's backbone below the freeze "
                             "boundary; members must share frozen lower layers (same backbone, weights, input size)")


@dataclass
class BoundaryCache:
    """Activations at the freeze boundary, per split (float16), and the untrained reference member."""

    cut: int
    reference: keras.Model
    spec: PreprocessSpec
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    _head_inputs: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def build(cls, recipe: Recipe, data: ImageDataset, splits: tuple[str, ...] = ("train", "val", "test"),
              batch_size: int = 256) -> BoundaryCache:
        reference, spec = build_member(recipe, data)
        cache = cls(cut=boundary_index(reference, recipe), reference=reference, spec=spec)
        lower = keras.Model(reference.input, reference.layers[cache.cut].output, name="lower")
        for name in splits:
            cache.splits[name] = _activations(lower, spec, getattr(data, name), batch_size)
        return cache

    def head_inputs(self, split: str) -> np.ndarray:
        """The frozen ImageNet top's output (what the head phase trains on), computed once per split."""
        if split not in self._head_inputs:
            base_end = head_start(self.reference)
            top = keras.Model(self.reference.layers[self.cut].output, self.reference.layers[base_end - 1].output)
            self._head_inputs[split] = run_batched(top, self.splits[split][0])
        return self._head_inputs[split]


def _activations(lower: keras.Model, spec: PreprocessSpec, split: Split,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    started = time.perf_counter()
    pipeline = make_pipeline(split, spec, batch_size=batch_size)
    run = tf.function(lambda batch: lower(batch, training=False))
    chunks, labels = [], []
    for images, batch_labels in pipeline:
        chunks.append(run(images).numpy().astype(np.float16))
        labels.append(batch_labels.numpy())
    log.info("boundary activations of %d images in %.0f s", len(split), time.perf_counter() - started)
    return np.concatenate(chunks), np.concatenate(labels)


def run_batched(model: keras.Model, inputs: np.ndarray, batch_size: int = 512) -> Any:
    """A model's outputs (one array, or a list for several outputs) on in-memory float16 inputs."""
    run = tf.function(lambda batch: model(batch, training=False))
    chunks = [run(tf.cast(inputs[i : i + batch_size], tf.float32)) for i in range(0, len(inputs), batch_size)]
    if isinstance(chunks[0], list | tuple):
        return [np.concatenate([c[k].numpy() for c in chunks]) for k in range(len(chunks[0]))]
    return np.concatenate([c.numpy() for c in chunks])


def bootstrap_rows(count: int, seed: int) -> np.ndarray:
    """``count`` row indices drawn with replacement (a bootstrap sample), seeded."""
    return np.random.default_rng(seed).integers(0, count, size=count)


def train_member(recipe: Recipe, data: ImageDataset, cache: BoundaryCache, *, seed: int,
                 bootstrap: bool = False) -> tuple[keras.Model, dict[str, Any]]:
    """Fine-tune one member (head phase, then the top layers) on the cached boundary activations.

    Same two phases as :func:`edgesmith.train.train` with ``cache_features``; ``seed`` replaces the
    recipe's seed, and ``bootstrap`` trains on a bootstrap sample of the training rows.
    """
    keras.utils.set_random_seed(seed)
    (model, _), tcfg = build_member(recipe, data), recipe.train
    check_shared_lower(model, cache.reference, cache.cut)
    x, y = cache.splits["train"]
    rows = bootstrap_rows(len(y), seed) if bootstrap else np.arange(len(y))
    base_end, started, history = head_start(model), time.perf_counter(), {}
    head = keras.Model(model.layers[base_end - 1].output, model.output, name="head")
    val_head = (cache.head_inputs("val").astype(np.float32), cache.splits["val"][1])
    history["head"] = _fit(head, cache.head_inputs("train")[rows], y[rows], val_head, tcfg.head_epochs,
                           tcfg.head_learning_rate, tcfg, seed, "head")
    unfreeze = unfrozen_indices(model, base_end, tcfg.unfreeze_layers)
    if tcfg.finetune_epochs and unfreeze:
        set_trainable(model, unfreeze, True)
        val = (cache.splits["val"][0].astype(np.float32), cache.splits["val"][1])
        history["finetune"] = _fit(upper_model(model, cache.cut), x[rows], y[rows], val, tcfg.finetune_epochs,
                                   tcfg.finetune_learning_rate, tcfg, seed, "finetune")
    metrics = {"seed": seed, "bootstrap": bootstrap, "unique_rows": int(len(np.unique(rows))),
               "train_seconds": round(time.perf_counter() - started, 1),
               "best_val_accuracy": max(history.get("finetune", history["head"])["val_accuracy"])}
    return model, {"history": history, **metrics}


def _fit(model: keras.Model, x: np.ndarray, y: np.ndarray, val: tuple, epochs: int, lr: float, tcfg: Any,
         seed: int, phase: str) -> dict[str, list[float]]:
    if epochs <= 0:
        return {"val_accuracy": [0.0]}
    batches = shuffled_batches(x, y, tcfg.batch_size, seed)
    schedule: Any = lr
    if phase == "finetune" and tcfg.finetune_schedule == "cosine":
        schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=-(-len(y) // tcfg.batch_size) * epochs)
    compile_for(model, schedule)
    callbacks = [keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=tcfg.patience,
                                               restore_best_weights=True, mode="max"), EpochLogger(phase)]
    fit = model.fit(batches, epochs=epochs, validation_data=val, callbacks=callbacks, verbose=0)
    return {k: [float(v) for v in vals] for k, vals in fit.history.items()}


def member_outputs(model: keras.Model, cache: BoundaryCache, splits: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Probabilities (``<split>_probs``), embeddings (``<split>_emb``) and labels per split, from the cache."""
    upper = upper_model(model, cache.cut, embeddings=True)
    out = {}
    for split in splits:
        x, y = cache.splits[split]
        out[f"{split}_probs"], out[f"{split}_emb"] = run_batched(upper, x)
        out[f"{split}_labels"] = y
    return out


__all__ = ["BoundaryCache", "bootstrap_rows", "build_member", "check_shared_lower", "member_outputs",
           "train_member", "upper_model"]
