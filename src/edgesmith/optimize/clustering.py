"""Weight clustering (tfmot): each trainable kernel keeps only ``k`` distinct values; always stripped.

Like pruning, only the trainable kernels above the freeze boundary are clustered (fine-tuned on cached
activations); every other layer with weights is listed as skipped with the reason.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgesmith._keras import keras
from edgesmith.data.datasets import ImageDataset
from edgesmith.data.spec import PreprocessSpec
from edgesmith.optimize import pruning
from edgesmith.optimize.finetune import FineTuner, copy_model, rewrap, tfmot, unfreeze_all_but_batchnorm
from edgesmith.optimize.pruning import weight_bytes
from edgesmith.recipe import OptimizeConfig

log = logging.getLogger(__name__)


def clusterable_weights(layer: keras.layers.Layer) -> list[str]:
    """Names of the weights tfmot's ClusteringRegistry clusters for this layer ([] if none)."""
    from tensorflow_model_optimization.python.core.clustering.keras.clustering_registry import ClusteringRegistry

    weights = ClusteringRegistry._LAYERS_WEIGHTS_MAP.get(layer.__class__)
    return list(weights or [])


def is_cluster_wrapper(layer: keras.layers.Layer) -> bool:
    from tensorflow_model_optimization.python.core.clustering.keras.cluster_wrapper import ClusterWeights

    return isinstance(layer, ClusterWeights)


def skip_reason(layer: keras.layers.Layer, index: int, cut: int) -> str | None:
    """Why a layer with weights is not clustered (None: it is clustered)."""
    return pruning.skip_reason(layer, index, cut, supported=clusterable_weights, kernel="clusterable",
                               registry="ClusteringRegistry")


def cluster(model: keras.Model, data: ImageDataset, cfg: OptimizeConfig, *, spec: PreprocessSpec,
            seed: int = 0, mirror: bool = True, tuner: FineTuner | None = None) -> tuple[keras.Model, dict[str, Any]]:
    """Cluster every trainable kernel into ``cfg.clusters`` values (k-means++ start), fine-tune, strip.

    Returns:
        The stripped model and a report: distinct values per clustered kernel, skipped layers with
        reasons, raw and gzip bytes of the weights.
    """
    clustering = tfmot().clustering.keras
    tuner = tuner or FineTuner(model, data, cfg, spec=spec, seed=seed, mirror=mirror)
    source = copy_model(model)
    if tuner.cut < 0:
        unfreeze_all_but_batchnorm(source)
    skipped = {layer.name: reason for i, layer in enumerate(source.layers)
               if layer.weights and (reason := skip_reason(layer, i, tuner.cut))}
    init = clustering.CentroidInitialization.KMEANS_PLUS_PLUS

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer | None:
        if layer.weights and layer.name not in skipped:
            return clustering.cluster_weights(layer, number_of_clusters=cfg.clusters, cluster_centroids_init=init)
        return None

    wrapped = rewrap(source, wrap, is_cluster_wrapper)
    tuner.run(wrapped, epochs=cfg.cluster_epochs, learning_rate=cfg.cluster_learning_rate, callbacks=[],
              phase="cluster")
    stripped = clustering.strip_clustering(wrapped)
    report = {"clusters": cfg.clusters, "steps": tuner.steps_per_epoch() * cfg.cluster_epochs,
              "fine_tuned": tuner.describe(), "unique_values_per_layer": unique_values(stripped, skipped),
              "skipped_layers": skipped, **weight_bytes(stripped)}
    return stripped, report


def unique_values(model: keras.Model, exclude: dict[str, str]) -> dict[str, int]:
    """Distinct values in the first (kernel) weight of every layer with weights not in ``exclude``."""
    return {layer.name: int(np.unique(layer.get_weights()[0]).size) for layer in model.layers
            if layer.weights and layer.name not in exclude}
