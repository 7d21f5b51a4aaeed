"""Two-phase transfer learning with the frozen part of the network computed once.

Phase 1 trains the head on a frozen ImageNet backbone; phase 2 unfreezes the top N backbone layers
(BatchNormalization stays frozen, so it keeps running in inference mode) and trains on at a ten times
lower learning rate. Everything below the lowest layer phase 2 trains is frozen in BOTH phases, so
its output (the activations at the freeze boundary) is computed once, optionally for a mirrored copy
of every image too, and both phases train only the small upper part on those cached activations.
Early stopping watches validation accuracy and restores the best weights.

Training runs under the recipe's tf.distribute strategy (``train.strategy``; ``batch_size`` is per replica)
and, given a checkpoint folder, checkpoints every epoch of each phase so a killed run resumes
(:mod:`edgesmith.train.checkpoints`). The boundary activations are also cached on disk
(:mod:`edgesmith.train.feature_cache`), so a second training on the same data and backbone skips them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith._keras import keras, tf
from edgesmith.data.datasets import ImageDataset, Split
from edgesmith.data.pipeline import make_pipeline
from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import ModelError
from edgesmith.recipe import Recipe
from edgesmith.train import distribute
from edgesmith.train.checkpoints import PhaseCheckpoints
from edgesmith.train.feature_cache import cached_features, features_key
from edgesmith.zoo import build_classifier, head_start

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` returns: the fine-tuned model, its preprocessing spec and its history."""

    model: keras.Model
    spec: PreprocessSpec
    history: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def train(data: ImageDataset, recipe: Recipe, *, checkpoint_dir: str | Path | None = None) -> TrainResult:
    """Fine-tune the recipe's backbone on ``data``: frozen base + new head, then the top layers.

    With ``model.weights = "none"`` there is nothing to transfer: the whole network trains in the
    head phase and the fine-tune phase is skipped.

    Args:
        data: the data set; its ``val`` split drives early stopping (see ``with_validation``).
        recipe: uses ``recipe.model``, ``recipe.train`` and ``recipe.seed``.
        checkpoint_dir: where every phase checkpoints each epoch; training again with the same recipe
            and data resumes from the last finished epoch. Removed once training finishes. None: no
            checkpoints.
    """
    tcfg = recipe.train
    strategy = distribute.strategy_for(tcfg.strategy)  # first: multi-worker set-up precedes any TF operation
    policy = distribute.precision_policy(tcfg.mixed_precision)
    setup = distribute.describe(strategy, tcfg.strategy, tcfg.batch_size, policy)
    log.info("strategy %s (%s): %d replica(s), global batch %d = %d per replica x %d; %s", tcfg.strategy,
             setup["strategy_class"], setup["replicas"], setup["global_batch_size"], tcfg.batch_size,
             setup["replicas"], policy)
    keras.utils.set_random_seed(recipe.seed)
    checkpoints = PhaseCheckpoints(checkpoint_dir, _fingerprint(data, recipe))
    started = time.perf_counter()
    with strategy.scope(), distribute.policy_scope(policy):
        model, spec = _build(data, recipe, recipe.model.weights)
        if policy != "float32":
            model = distribute.with_float32_output(model)
        base_end = head_start(model)
        pretrained = recipe.model.weights != "none"
        set_trainable(model, range(base_end), not pretrained)  # random weights: train everything from scratch
        trainer_class = _CachedTrainer if tcfg.cache_features and pretrained else _PipelineTrainer
        trainer = trainer_class(model, spec, data, recipe, strategy=strategy, checkpoints=checkpoints,
                                policy=policy)
        history = trainer.run(base_end if pretrained else 0)
    if policy != "float32":  # the deliverable computes in float32, like a model trained without the option
        model = distribute.copy_into(model, _build(data, recipe, "none")[0])
    checkpoints.remove()
    metrics = {
        "train_seconds": round(time.perf_counter() - started, 1),
        "best_val_accuracy": max(history.get("finetune", history.get("head", {})).get("val_accuracy", [0.0])),
        "params": int(model.count_params()),
        "trainable_layers_phase2": len(unfrozen_indices(model, base_end, tcfg.unfreeze_layers)) if pretrained else 0,
        **setup,
        "resumed_from_epoch": trainer.resumed_from,
    }
    return TrainResult(model=model, spec=spec, history=history, metrics=metrics)


def _build(data: ImageDataset, recipe: Recipe, weights: str) -> tuple[keras.Model, PreprocessSpec]:
    mcfg = recipe.model
    return build_classifier(
        mcfg.backbone,
        num_classes=data.num_classes,
        class_names=data.class_names,
        input_size=mcfg.input_size,
        weights=weights,
        pooling=mcfg.pooling,
        dense_units=mcfg.dense_units,
        dropout=mcfg.dropout,
    )


def _fingerprint(data: ImageDataset, recipe: Recipe) -> dict[str, Any]:
    """What checkpoints must match to be resumed: the recipe and the data's counts."""
    resolved = recipe.to_dict()
    return {"recipe": {k: resolved[k] for k in ("seed", "data", "model", "train")}, "data": data.describe()}


def set_trainable(model: keras.Model, indices: Any, trainable: bool) -> None:
    for i in indices:
        model.layers[i].trainable = trainable


def unfrozen_indices(model: keras.Model, base_end: int, count: int) -> list[int]:
    """Indices of the top ``count`` backbone layers that phase 2 trains (BatchNormalization excluded)."""
    top = range(max(1, base_end - count), base_end)
    layers = model.layers
    return [i for i in top if not isinstance(layers[i], keras.layers.BatchNormalization) and layers[i].weights]


def freeze_boundary(model: keras.Model, first_trained: int) -> tuple[int, keras.Model]:
    """The deepest layer below ``first_trained`` whose output alone feeds the rest of the graph.

    Returns its index and the upper model (that layer's output -> predictions), which shares weights
    with ``model``. Graphs with skip connections (ResNet) are cut only between blocks.
    """
    for index in range(first_trained - 1, 0, -1):
        try:
            upper = keras.Model(model.layers[index].output, model.output, name="upper")
        except ValueError:  # graph disconnected: a skip connection crosses this cut
            continue
        return index, upper
    raise ModelError(
        f"{model.name}: no single-tensor cut below layer {first_trained}; set train.cache_features = false"
    )


def compile_for(model: keras.Model, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


class EpochLogger(keras.callbacks.Callback):
    """Logs one line per epoch (the CLI shows them); library code never prints."""

    def __init__(self, phase: str) -> None:
        super().__init__()
        self.phase = phase
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        shown = " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items())
        log.info("%s epoch %d: %s (%.0f s)", self.phase, epoch + 1, shown, time.perf_counter() - self._start)


def shuffled_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """Reshuffled float32 batches gathered from one in-memory float16 copy of ``x`` (no per-epoch copies)."""
    features, labels = tf.constant(x), tf.constant(y)
    del x
    order = tf.data.Dataset.range(len(y)).shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    return (
        order.batch(batch_size)
        .map(lambda idx: (tf.cast(tf.gather(features, idx), tf.float32), tf.gather(labels, idx)))
        .prefetch(2)
    )


class _PipelineTrainer:
    """Trains the whole model on tf.data batches (no activation cache).

    Runs inside the strategy's scope: every batch holds ``batch_size x replicas`` rows (the global
    batch), which the strategy splits across replicas (and, with several workers, shards by data).
    """

    def __init__(self, model: keras.Model, spec: PreprocessSpec, data: ImageDataset, recipe: Recipe, *,
                 strategy: tf.distribute.Strategy | None = None, checkpoints: PhaseCheckpoints | None = None,
                 policy: str = "float32") -> None:
        self.model, self.spec, self.data, self.recipe = model, spec, data, recipe
        self.cfg = recipe.train
        self.strategy = strategy or tf.distribute.get_strategy()
        self.checkpoints = checkpoints or PhaseCheckpoints(None, {})
        self.policy = policy
        self.global_batch = self.cfg.batch_size * self.strategy.num_replicas_in_sync
        self.resumed_from: dict[str, int] = {}

    def run(self, base_end: int) -> dict[str, dict[str, list[float]]]:
        history = {}
        phases = [("head", self.cfg.head_epochs, self.cfg.head_learning_rate, [])]
        phases.append(("finetune", self.cfg.finetune_epochs, self.cfg.finetune_learning_rate,
                       unfrozen_indices(self.model, base_end, self.cfg.unfreeze_layers)))
        for phase, epochs, lr, unfreeze in phases:
            if epochs <= 0 or (phase == "finetune" and not unfreeze):
                continue
            finished = self.checkpoints.finished(phase, self.model)  # before the flags change: same layout
            set_trainable(self.model, unfreeze, True)
            history[phase] = finished if finished is not None else self._fit_phase(phase, epochs, lr, base_end)
        return history

    def _fit_phase(self, phase: str, epochs: int, lr: float, base_end: int) -> dict[str, list[float]]:
        trained, fit_data, val = self.phase_data(phase, base_end)
        compile_for(trained, self._schedule(phase, lr, epochs, fit_data["x"]))
        log.info("phase %s: %d epochs at learning rate %g, %d trainable weights", phase, epochs, lr,
                 len(trained.trainable_weights))
        stopper, callbacks = self.checkpoints.callbacks(phase, self.cfg.patience)
        trained.fit(**fit_data, epochs=epochs, validation_data=val, callbacks=[*callbacks, EpochLogger(phase)],
                    verbose=0)
        if stopper.resumed_from:
            self.resumed_from[phase] = stopper.resumed_from
        self.checkpoints.finish(phase, self.model, stopper.history)
        return stopper.history

    def _schedule(self, phase: str, lr: float, epochs: int, batches: tf.data.Dataset) -> Any:
        """The fine-tune phase decays its rate to zero along a cosine over its planned steps."""
        if phase != "finetune" or self.cfg.finetune_schedule == "constant":
            return lr
        steps_per_epoch = int(batches.cardinality().numpy())
        if steps_per_epoch <= 0:  # unknown length: nothing to plan a decay over
            return lr
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps_per_epoch * epochs)

    _pipelines: tuple[tf.data.Dataset, tf.data.Dataset] | None = None

    def phase_data(self, phase: str, base_end: int) -> tuple[keras.Model, dict[str, Any], Any]:
        if self._pipelines is None:  # built once: both phases share the decoded-image caches
            train = make_pipeline(self.data.train, self.spec, batch_size=self.global_batch,
                                  shuffle_seed=self.recipe.seed, random_flip=self.recipe.data.mirror, cache=True)
            val = make_pipeline(self._val_split(), self.spec, batch_size=self.global_batch, cache=True)
            self._pipelines = (distribute.shard_by_data(train, self.strategy),
                               distribute.shard_by_data(val, self.strategy))
        train, val = self._pipelines
        return self.model, {"x": train}, val

    def _val_split(self) -> Split:
        return self.data.val if self.data.val is not None else self.data.test


class _CachedTrainer(_PipelineTrainer):
    """Trains only what is above the freeze boundary, on activations computed once.

    The fine-tune phase trains the upper model (boundary activations -> predictions). The head phase,
    where the whole backbone is frozen, goes one step further: the frozen upper backbone runs once
    over the cached activations and the head trains on the backbone's output features.
    """

    _boundary: tuple[Any, Any] | None = None

    def phase_data(self, phase: str, base_end: int) -> tuple[keras.Model, dict[str, Any], Any]:
        cut, upper, (x, y), val = self._boundary_activations(base_end)
        if phase == "head" and cut < base_end - 1:
            boundary, base_output = self.model.layers[cut].output, self.model.layers[base_end - 1].output
            features = keras.Model(boundary, base_output, name="frozen_top")
            x, val = _run_frozen(features, x), (_run_frozen(features, val[0]), val[1])
            upper = keras.Model(base_output, self.model.output, name="head")
        train = distribute.shard_by_data(shuffled_batches(x, y, self.global_batch, self.recipe.seed), self.strategy)
        return upper, {"x": train}, self._validation(val[0].astype(np.float32), val[1])

    def _validation(self, x: np.ndarray, y: np.ndarray) -> Any:
        """In-memory validation data as is; with several workers, as global batches sharded by data."""
        if not distribute.is_multiworker(self.strategy):
            return x, y
        batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(self.global_batch)
        return distribute.shard_by_data(batches, self.strategy)

    def _boundary_activations(self, base_end: int) -> tuple[int, keras.Model, tuple, tuple]:
        if self._boundary is None:
            first_trained = max(1, base_end - (self.cfg.unfreeze_layers if self.cfg.finetune_epochs else 0))
            cut, upper = freeze_boundary(self.model, first_trained)
            lower = keras.Model(self.model.input, self.model.layers[cut].output, name="lower")
            log.info("freeze boundary after layer %d (%s), activations %s", cut, self.model.layers[cut].name,
                     lower.output_shape[1:])
            flips = (False, True) if self.recipe.data.mirror and self.cfg.cache_mirrored else (False,)
            parts = [self._stored_activations(lower, self.data.train, flip=flip) for flip in flips]
            train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            del parts
            self._boundary = (cut, upper, train, self._stored_activations(lower, self._val_split(), flip=False))
        return self._boundary

    def _stored_activations(self, lower: keras.Model, split: Split, *, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_activations` through the on-disk feature cache (every worker computes the same ones)."""
        key = features_key(lower, self.spec, split, flip=flip, policy=self.policy)
        return cached_features(key, len(split), lambda: self._activations(lower, split, flip=flip))

    def _activations(self, lower: keras.Model, split: Split, *, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        pipeline = make_pipeline(split, self.spec, batch_size=256, flip=flip)
        run = tf.function(lambda batch: lower(batch, training=False))
        chunks, labels = [], []
        for images, batch_labels in pipeline:
            chunks.append(run(images).numpy().astype(np.float16))
            labels.append(batch_labels.numpy())
        log.info("cached %d activations%s in %.0f s", len(split), " (mirrored)" if flip else "",
                 time.perf_counter() - started)
        return np.concatenate(chunks), np.concatenate(labels)


def _run_frozen(model: keras.Model, inputs: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """A frozen model's outputs for in-memory inputs, as float16."""
    run = tf.function(lambda batch: model(batch, training=False))
    chunks = [run(tf.cast(inputs[i : i + batch_size], tf.float32)).numpy().astype(np.float16)
              for i in range(0, len(inputs), batch_size)]
    return np.concatenate(chunks)
