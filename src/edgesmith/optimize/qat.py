"""Quantization-aware training (tfmot), plain or preserving sparsity / clusters of an earlier technique.

The model is made QAT-ready first: a backbone nested as a layer is flattened into one functional
graph (tfmot refuses nested models), and layers the quantization scheme does not support
(Rescaling, Normalization, custom layers) are left unannotated, so they stay float in the graph and
in the exported file; the report lists them. The whole model fine-tunes on images: fake quantization
of every layer must be in the loop.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from tensorflow_model_optimization.python.core.quantization.keras.quantize_config import QuantizeConfig

from edgesmith._keras import keras, tf
from edgesmith.data.datasets import ImageDataset
from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import ModelError
from edgesmith.optimize.finetune import FineTuner, copy_model, require_keras2, tfmot, unfreeze_all_but_batchnorm
from edgesmith.recipe import OptimizeConfig

log = logging.getLogger(__name__)


def has_nested_model(model: keras.Model) -> bool:
    return any(isinstance(layer, keras.Model) for layer in model.layers)


def flatten_nested(model: keras.Model) -> keras.Model:
    """One functional graph with every nested functional Model's layers inlined (weights shared).

    Raises:
        ModelError: a nested model is subclassed (its graph is unknown).
    """
    require_keras2(model)
    inputs = [keras.Input(t.shape[1:], dtype=t.dtype, name=t.name.split(":")[0]) for t in model.inputs]
    outputs = _replay(model, inputs)
    return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)


def _replay(model: keras.Model, inputs: list[Any]) -> list[Any]:
    """Call ``model``'s layers on ``inputs`` node by node, inlining nested functional models."""
    if not getattr(model, "_is_graph_network", False):
        raise ModelError(f"nested model {model.name} is subclassed; it cannot be flattened for QAT")
    tensors = {id(t): new for t, new in zip(model.inputs, inputs, strict=True)}
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                continue
            args, kwargs = tf.nest.map_structure(lambda t: tensors.get(id(t), t), (node.call_args, node.call_kwargs))
            layer = node.layer
            if isinstance(layer, keras.Model):
                outs = _replay(layer, tf.nest.flatten(args))
                outs = outs if len(layer.outputs) > 1 else outs[0]
            else:
                outs = layer(*args, **kwargs)
            for old, new in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outs), strict=True):
                tensors[id(old)] = new
    return [tensors[id(t)] for t in model.outputs]


@keras.utils.register_keras_serializable(package="edgesmith")
class NoOpQuantizeConfig(QuantizeConfig):
    """Leaves a layer tfmot cannot quantize (Rescaling, Normalization, custom layers) in float."""

    def get_weights_and_quantizers(self, layer: Any) -> list:
        return []

    def get_activations_and_quantizers(self, layer: Any) -> list:
        return []

    def set_quantize_weights(self, layer: Any, quantize_weights: list) -> None:
        pass

    def set_quantize_activations(self, layer: Any, quantize_activations: list) -> None:
        pass

    def get_output_quantizers(self, layer: Any) -> list:
        return []

    def get_config(self) -> dict:
        return {}


UNSUPPORTED = re.compile(r"Layer (?P<name>[^:\s]+):<class '(?P<cls>[^']+)'> is not supported")


def annotate(model: keras.Model, floats: dict[str, str]) -> keras.Model:
    """Every layer annotated for quantization; those in ``floats`` with the no-op config (kept float)."""
    quant = tfmot().quantization.keras

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        copy = layer.__class__.from_config(layer.get_config())
        if isinstance(layer, keras.layers.Lambda):  # arbitrary code: tfmot leaves it unannotated too
            return copy
        config = NoOpQuantizeConfig() if layer.name in floats else None
        return quant.quantize_annotate_layer(copy, quantize_config=config)

    annotated = keras.models.clone_model(model, clone_function=wrap)
    annotated.set_weights(model.get_weights())
    return annotated


def quantize(model: keras.Model, scheme: Any = None) -> tuple[keras.Model, dict[str, str]]:
    """A QAT model of ``model`` (flattened first if nested, every layer but BatchNormalization trainable)
    and the layers left in float, with why.

    Every layer is annotated; a layer the scheme then refuses ("is not supported") is re-annotated with
    :class:`NoOpQuantizeConfig` and the model quantized again, so only refused layers stay float.

    Raises:
        ModelError: tfmot fails on the model for another reason; the message names the error.
    """
    quant = tfmot().quantization.keras
    scheme = scheme or quant.default_8bit.Default8BitQuantizeScheme()
    if has_nested_model(model):
        log.info("flattening nested model(s) %s for QAT",
                 [layer.name for layer in model.layers if isinstance(layer, keras.Model)])
        model = flatten_nested(model)
    source = copy_model(model)
    unfreeze_all_but_batchnorm(source)
    floats: dict[str, str] = {}
    while True:
        try:
            with quant.quantize_scope({"NoOpQuantizeConfig": NoOpQuantizeConfig}):
                return quant.quantize_apply(annotate(source, floats), scheme), floats
        except Exception as exc:  # tfmot raises RuntimeError, ValueError, AttributeError, KeyError on odd graphs
            refused = UNSUPPORTED.search(str(exc))
            if not refused or refused["name"] in floats:
                raise _quantize_error(model, exc, floats) from None
            cls = refused["cls"].rsplit(".", 1)[-1]
            floats[refused["name"]] = f"{cls}: not supported by {type(scheme).__name__}; left in float"
            log.info("QAT: %s (%s) left in float", refused["name"], cls)


def _quantize_error(model: keras.Model, exc: Exception, floats: dict[str, str]) -> ModelError:
    left = ", ".join(f"{name} ({why.split(':')[0]})" for name, why in floats.items()) or "none"
    return ModelError(
        f"model {model.name} cannot be quantized by tfmot ({type(exc).__name__}: {str(exc)[:300]}); "
        f"layers left in float so far: {left}; drop the QAT techniques from optimize.techniques for this model"
    )


def quantization_aware(model: keras.Model, data: ImageDataset, cfg: OptimizeConfig, *, spec: PreprocessSpec,
                       seed: int = 0, mirror: bool = True, tuner: FineTuner | None = None,
                       scheme: Any = None) -> tuple[keras.Model, dict[str, Any]]:
    """Quantization-aware training of a copy of ``model`` with ``scheme`` (default 8-bit), whole model.

    Returns:
        The QAT model (export it as int8 with ``quantized=True``: no representative data needed) and a
        report: steps, quantized layers, layers left in float with why, a nested backbone flattened.
    """
    require_keras2(model)
    tuner = tuner or FineTuner(model, data, cfg, spec=spec, seed=seed, mirror=mirror)
    nested = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    qat, floats = quantize(model, scheme)
    tuner.run(qat, epochs=cfg.qat_epochs, learning_rate=cfg.qat_learning_rate, callbacks=[], phase="qat",
              whole_model=True)
    wrapped = sum(type(layer).__name__.startswith("QuantizeWrapper") for layer in qat.layers)
    report = {"steps": tuner.steps_per_epoch(whole_model=True) * cfg.qat_epochs, "quantized_layers": wrapped,
              "left_in_float": floats, "flattened_nested_models": nested,
              "scheme": type(scheme).__name__ if scheme else "Default8BitQuantizeScheme"}
    return qat, report


def prune_preserve_scheme() -> Any:
    return tfmot().quantization.keras.collab_opts.Default8BitPrunePreserveQuantizeScheme()


def cluster_preserve_scheme() -> Any:
    from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve import (
        default_8bit_cluster_preserve_quantize_scheme as cqat,
    )

    return cqat.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=True)
