"""What every optimization technique shares: model checks, copies, and the fine-tune that recovers accuracy.

A model the train stage fine-tuned keeps its lower layers frozen (``trainable = False``). Their output
never changes, so a technique that only rewrites the trainable top (pruning, clustering) fine-tunes on
activations at the freeze boundary computed ONCE, the way the train stage does (its ``_CachedTrainer``
and ``freeze_boundary`` are reused here): an epoch over the whole training split then costs a fraction
of a pass through the network. Models trained from scratch (everything trainable) fine-tune whole.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgesmith._keras import keras
from edgesmith.data.datasets import ImageDataset, limit_per_class
from edgesmith.data.pipeline import make_pipeline
from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import ModelError
from edgesmith.recipe import OptimizeConfig, Recipe, TrainConfig
from edgesmith.train.transfer import (
    EpochLogger,
    _CachedTrainer,
    compile_for,
    freeze_boundary,
    shuffled_batches,
)

log = logging.getLogger(__name__)


def tfmot() -> Any:
    import tensorflow_model_optimization

    return tensorflow_model_optimization


def require_keras2(model: Any) -> None:
    """Refuse anything tfmot cannot work on (Keras 3 models, subclassed models) with a clear error."""
    if not isinstance(model, keras.Model):
        raise ModelError(
            f"{type(model).__module__}.{type(model).__name__} is not a Keras 2 (tf_keras) model; tfmot needs "
            "Keras 2: rebuild the architecture with tf_keras and copy the weights (get_weights/set_weights)"
        )
    if not getattr(model, "_is_graph_network", False):
        raise ModelError(f"model {model.name} is subclassed; tfmot can only optimize Functional or Sequential models")


def copy_model(model: keras.Model) -> keras.Model:
    """An independent copy (same architecture, weights and trainable flags, no shared variables)."""
    require_keras2(model)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for source, copied in zip(model.layers, clone.layers, strict=True):
        copied.trainable = source.trainable
    return clone


def unfreeze_all_but_batchnorm(model: keras.Model) -> None:
    for layer in model.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)


def is_batchnorm(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def first_trained_layer(model: keras.Model) -> int:
    """Index of the lowest layer with trainable weights (BatchNormalization aside); 0 if none is frozen."""
    for index, layer in enumerate(model.layers):
        if layer.weights and layer.trainable and not is_batchnorm(layer):
            return index
    return 0


def finetune_split(data: ImageDataset, samples: int, seed: int) -> Any:
    """A stratified sample of the training split (``samples = 0``: all of it)."""
    per_class = math.ceil(samples / data.num_classes) if samples else 0
    return limit_per_class(data.train, per_class, seed)


@dataclass
class FrozenCache:
    """Activations of the training sample at a model's freeze boundary, computed once per optimize call.

    Attributes:
        cut: index of the boundary layer (its output feeds everything trainable).
        inputs: float16 activations, one row per training image.
        labels: their labels.
    """

    cut: int
    inputs: np.ndarray
    labels: np.ndarray

    @classmethod
    def build(cls, model: keras.Model, data: ImageDataset, spec: PreprocessSpec, cfg: OptimizeConfig,
              seed: int) -> FrozenCache | None:
        """None when nothing is frozen (the model fine-tunes whole) or caching is switched off."""
        cut = frozen_boundary(model, cfg)
        if cut < 0:
            return None
        lower = keras.Model(model.input, model.layers[cut].output, name="frozen_lower")
        recipe = Recipe(train=TrainConfig(batch_size=cfg.batch_size))
        split = finetune_split(data, cfg.finetune_samples, seed)
        trainer = _CachedTrainer(model, spec, data, recipe)  # its activation code and on-disk feature cache
        inputs, labels = trainer._stored_activations(lower, split, flip=False)
        log.info("fine-tuning above layer %d (%s) on %d cached activations %s", cut, model.layers[cut].name,
                 len(labels), inputs.shape[1:])
        return cls(cut, inputs, labels)

    def steps(self, batch_size: int) -> int:
        return math.ceil(len(self.labels) / batch_size)


def frozen_boundary(model: keras.Model, cfg: OptimizeConfig) -> int:
    """Index of the layer whose output a fine-tune caches (the freeze boundary); -1: it fine-tunes whole."""
    first = first_trained_layer(model)
    if not cfg.cache_frozen or first <= 1:
        return -1
    return freeze_boundary(model, first)[0]


def cosine(learning_rate: float, steps: int) -> Any:
    """The fine-tune's learning rate decayed along a cosine to 0 over ``steps`` (as the train stage does)."""
    return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, steps))


class FineTuner:
    """Fine-tunes rewritten copies of one source model on its training data.

    Above the freeze boundary on cached activations when the source has frozen lower layers (built on
    first use, shared by every technique of one optimize call), otherwise the whole model on images.
    """

    def __init__(self, source: keras.Model, data: ImageDataset, cfg: OptimizeConfig, *, spec: PreprocessSpec,
                 seed: int = 0, mirror: bool = True) -> None:
        require_keras2(source)
        self.source, self.data, self.cfg, self.spec = source, data, cfg, spec
        self.seed, self.mirror = seed, mirror
        self._cache: FrozenCache | None | bool = False

    @property
    def cache(self) -> FrozenCache | None:
        if self._cache is False:
            self._cache = FrozenCache.build(self.source, self.data, self.spec, self.cfg, self.seed)
        return self._cache

    @property
    def cut(self) -> int:
        """Layers up to this index stay as they are (frozen); -1 when the whole model fine-tunes."""
        return self.cache.cut if self.cache is not None else -1

    def describe(self) -> str:
        if self.cache is None:
            return "whole model on images"
        boundary = self.source.layers[self.cut].name
        return f"above layer {self.cut} ({boundary}) on {len(self.cache.labels)} cached activations"

    def steps_per_epoch(self, whole_model: bool = False) -> int:
        if self.cache is not None and not whole_model:
            return self.cache.steps(self.cfg.batch_size)
        return math.ceil(len(self._split(whole_model)) / self.cfg.batch_size)

    def _split(self, whole_model: bool) -> Any:
        samples = (self.cfg.qat_samples or self.cfg.finetune_samples) if whole_model else self.cfg.finetune_samples
        return finetune_split(self.data, samples, self.seed)

    def run(self, model: keras.Model, *, epochs: int, learning_rate: float, callbacks: list[Any], phase: str,
            whole_model: bool = False) -> None:
        """Fine-tune ``model`` (a rewritten copy of the source with the same layer order).

        ``whole_model`` trains through every layer on images even when a cache exists (QAT: the
        lower layers' fake quantization must be in the loop).
        """
        steps = self.steps_per_epoch(whole_model)
        if self.cache is not None and not whole_model:
            trained = keras.Model(model.layers[self.cut].output, model.output, name="upper")
            x = shuffled_batches(self.cache.inputs, self.cache.labels, self.cfg.batch_size, self.seed)
        else:
            x = make_pipeline(self._split(whole_model), self.spec, batch_size=self.cfg.batch_size,
                              shuffle_seed=self.seed, random_flip=self.mirror, cache=True)
            trained = model
        compile_for(trained, cosine(learning_rate, steps * epochs))
        log.info("%s: %d epochs of %d steps at learning rate %g", phase, epochs, steps, learning_rate)
        trained.fit(x, epochs=epochs, callbacks=[*callbacks, EpochLogger(phase)], verbose=0)


def rewrap(model: keras.Model, wrap: Any, is_wrapped: Any) -> keras.Model:
    """A clone of ``model`` where ``wrap(layer)`` replaces each layer it returns a wrapper for.

    Wrappers hold the original layer (its weights); every other layer is a fresh copy that gets the
    source's weights and trainable flag, so the clone shares no graph nodes with ``model``.
    """

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        return wrap(layer) or layer.__class__.from_config(layer.get_config())

    wrapped = keras.models.clone_model(model, clone_function=clone)
    for plain, layer in zip(model.layers, wrapped.layers, strict=True):
        if not is_wrapped(layer):
            layer.set_weights(plain.get_weights())
            layer.trainable = plain.trainable
    return wrapped
