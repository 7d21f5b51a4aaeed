"""Optimize: pruning reaches its target sparsity, QAT wraps layers, non-Keras-2 models are refused."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import accuracy
from edgesmith._keras import keras
from edgesmith.errors import ModelError, RecipeError
from edgesmith.optimize import optimize, prune, quantization_aware
from edgesmith.optimize.pruning import prune_below_boundary, recalibrate_batchnorm
from edgesmith.optimize.techniques import copy_model, measure_sparsity
from edgesmith.recipe import OptimizeConfig
from edgesmith.zoo import build_classifier

PRUNABLE = ["block0_conv", "block1_conv", "head_dense", "predictions"]


@pytest.mark.parametrize(("sparsity", "samples", "epochs"), [(0.5, 400, 1), (0.8, 200, 2)])
def test_prune_reaches_the_target_sparsity(trained_tiny, digits_data, sparsity, samples, epochs):
    cfg = OptimizeConfig(
        sparsity=sparsity,
        finetune_samples=samples,
        prune_epochs=epochs,
        batch_size=32,
        prune_learning_rate=1e-3,
    )
    pruned, report = prune(trained_tiny.model, digits_data, cfg, spec=trained_tiny.spec, seed=0, mirror=False)
    # Measure on the stripped model ourselves, not only through the report.
    kernels = {name: pruned.get_layer(name).get_weights()[0] for name in PRUNABLE}
    for name, kernel in kernels.items():
        assert np.mean(kernel == 0) == pytest.approx(sparsity, abs=0.02), name
    overall = sum(int(np.sum(k == 0)) for k in kernels.values()) / sum(k.size for k in kernels.values())
    assert overall == pytest.approx(sparsity, abs=0.02)
    assert report["sparsity_overall"] == pytest.approx(overall, abs=1e-4)
    assert set(report["sparsity_per_layer"]) == set(PRUNABLE)
    assert report["target_sparsity"] == sparsity
    assert report["steps"] == epochs * int(np.ceil(samples / 32))
    # BatchNormalization has weights but no prunable kernel: listed as skipped, with the reason.
    assert set(report["skipped_layers"]) == {"block0_bn", "block1_bn"}
    assert "not a kernel" in report["skipped_layers"]["block0_bn"]
    assert report["fine_tuned"] == "whole model on images"  # trained from scratch: nothing is frozen
    assert report["weights_gzip_bytes"] < report["weights_bytes"]
    assert "not latency" in report["latency_note"]
    # Stripped: plain layers again, and the source model is untouched.
    assert not any("Prune" in type(layer).__name__ for layer in pruned.layers)
    assert np.mean(trained_tiny.model.get_layer("block1_conv").get_weights()[0] == 0) < 0.01


def frozen_lower_copy(model):
    """A copy of ``model`` whose first block is frozen, as the train stage leaves a fine-tuned backbone."""
    frozen = copy_model(model)
    for name in ("block0_conv", "block0_bn"):
        frozen.get_layer(name).trainable = False
    return frozen


@pytest.mark.parametrize("prune_frozen", [False, True])
def test_prune_above_the_freeze_boundary_and_optionally_below(trained_tiny, digits_data, prune_frozen):
    model = frozen_lower_copy(trained_tiny.model)
    cfg = OptimizeConfig(sparsity=0.6, finetune_samples=300, prune_epochs=2, batch_size=32,
                         prune_learning_rate=1e-3, prune_frozen=prune_frozen)
    pruned, report = prune(model, digits_data, cfg, spec=trained_tiny.spec, seed=0, mirror=False)
    assert report["fine_tuned"].startswith("above layer 4 (block0_pool) on 300 cached activations")
    for name in ("block1_conv", "head_dense", "predictions"):
        assert np.mean(pruned.get_layer(name).get_weights()[0] == 0) == pytest.approx(0.6, abs=0.02), name
    lower = pruned.get_layer("block0_conv").get_weights()[0]
    if prune_frozen:  # one shot, exactly the target share of the smallest magnitudes
        assert np.mean(lower == 0) == pytest.approx(0.6, abs=1 / lower.size)
        kept = np.abs(model.get_layer("block0_conv").get_weights()[0])[lower != 0]
        dropped = np.abs(model.get_layer("block0_conv").get_weights()[0])[lower == 0]
        assert kept.min() >= dropped.max()
        assert set(report["pruned_frozen_layers"]) == {"block0_conv"}
        assert "block0_conv" in report["sparsity_per_layer"] and "block0_conv" not in report["skipped_layers"]
        assert report["sparsity_all_kernels"] == pytest.approx(0.6, abs=0.02)
    else:
        assert np.mean(lower == 0) < 0.01
        assert "below the freeze boundary" in report["skipped_layers"]["block0_conv"]
        assert "pruned_frozen_layers" not in report
    assert np.array_equal(model.get_layer("block0_conv").get_weights()[0],
                          trained_tiny.model.get_layer("block0_conv").get_weights()[0])  # source untouched


def test_recalibration_restores_the_statistics_the_layers_above_were_trained_on(trained_tiny, tiny_test_inputs):
    inputs = tiny_test_inputs[0]
    original = frozen_lower_copy(trained_tiny.model)
    pruned = copy_model(original)
    prune_below_boundary(pruned, 4, OptimizeConfig(sparsity=0.8))

    def bn_output_moments(model):
        out = keras.Model(model.input, model.get_layer("block0_bn").output)(inputs, training=False).numpy()
        return out.mean(axis=(0, 1, 2)), out.var(axis=(0, 1, 2))

    (mean0, var0), (mean1, var1) = bn_output_moments(original), bn_output_moments(pruned)
    assert np.max(np.abs(mean1 - mean0)) > 0.05 or np.max(np.abs(var1 - var0)) > 0.05  # pruning moved them ...
    assert recalibrate_batchnorm(pruned, original, 4, inputs) == ["block0_bn"]
    mean2, var2 = bn_output_moments(pruned)  # ... recalibration puts them back
    np.testing.assert_allclose(mean2, mean0, atol=1e-3)
    np.testing.assert_allclose(var2, var0, rtol=1e-3, atol=1e-4)
    assert np.mean(pruned.get_layer("block0_conv").get_weights()[0] == 0) == pytest.approx(0.8, abs=0.01)


def test_prune_frozen_refuses_structured_sparsity(trained_tiny, digits_data):
    cfg = OptimizeConfig(prune_structure="2:4", prune_frozen=True, finetune_samples=64, batch_size=32)
    with pytest.raises(RecipeError, match="optimize.prune_frozen: supports unstructured pruning only"):
        prune(frozen_lower_copy(trained_tiny.model), digits_data, cfg, spec=trained_tiny.spec, seed=0)


def test_measure_sparsity_counts_exact_zeros():
    model, _ = build_classifier("tiny_cnn", num_classes=2, dense_units=4)
    kernel, *rest = model.get_layer("head_dense").get_weights()
    kernel[: kernel.shape[0] // 2] = 0.0
    model.get_layer("head_dense").set_weights([kernel, *rest])
    report = measure_sparsity(model)
    assert report["sparsity_per_layer"]["head_dense"] == 0.5
    assert report["sparsity_per_layer"]["block0_conv"] == 0.0


def test_quantization_aware_wraps_layers(trained_tiny, digits_data, tiny_test_inputs):
    cfg = OptimizeConfig(finetune_samples=200, qat_epochs=1, batch_size=32, qat_learning_rate=1e-4)
    qat, report = quantization_aware(
        trained_tiny.model, digits_data, cfg, spec=trained_tiny.spec, seed=0, mirror=False
    )
    kinds = [type(layer).__name__ for layer in qat.layers]
    assert "QuantizeLayer" in kinds
    wrapped = [layer.layer.name for layer in qat.layers if type(layer).__name__.startswith("QuantizeWrapper")]
    assert set(PRUNABLE) <= set(wrapped)
    assert report["steps"] == int(np.ceil(200 / 32))
    # A short QAT fine-tune keeps the model useful (simulated int8 throughout).
    assert accuracy(qat, *tiny_test_inputs) > 0.6


def test_optimize_runs_each_technique_independently(trained_tiny, digits_data):
    cfg = OptimizeConfig(techniques=["prune", "qat"], sparsity=0.5, finetune_samples=100, batch_size=50,
                         check_samples=0)
    before = [w.copy() for w in trained_tiny.model.get_weights()]
    result = optimize(trained_tiny.model, digits_data, cfg, spec=trained_tiny.spec, seed=0, mirror=False)
    assert list(result.models) == ["prune", "qat"] and list(result.report) == ["prune", "qat"]
    # QAT started from the trained model, not from the pruned one.
    wrapper = result.models["qat"].get_layer("quant_block1_conv")
    qat_kernel = next(w for w in wrapper.weights if w.name.endswith("kernel:0")).numpy()
    assert qat_kernel.shape == (3, 3, 8, 16)
    assert np.mean(qat_kernel == 0) < 0.1
    for a, b in zip(before, trained_tiny.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the input model is left unchanged


def test_copy_model_is_independent(trained_tiny):
    copy = copy_model(trained_tiny.model)
    assert copy is not trained_tiny.model
    for a, b in zip(copy.get_weights(), trained_tiny.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    copy.get_layer("predictions").kernel.assign_add(
        np.ones_like(copy.get_layer("predictions").kernel.numpy())
    )
    assert not np.array_equal(
        copy.get_layer("predictions").kernel.numpy(),
        trained_tiny.model.get_layer("predictions").kernel.numpy(),
    )


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.dense = keras.layers.Dense(2)

    def call(self, inputs):
        return self.dense(inputs)


@pytest.mark.parametrize("technique", [prune, quantization_aware])
def test_non_keras2_models_are_refused(technique, digits_data, trained_tiny):
    cfg = OptimizeConfig(finetune_samples=10)
    with pytest.raises(
        ModelError, match=r"builtins\.object is not a Keras 2 \(tf_keras\) model; tfmot needs Keras 2"
    ):
        technique(object(), digits_data, cfg, spec=trained_tiny.spec)
    subclassed = Subclassed()
    subclassed(np.zeros((1, 3), np.float32))
    with pytest.raises(
        ModelError, match=r"model subclassed is subclassed; tfmot can only optimize Functional or Sequential"
    ):
        technique(subclassed, digits_data, cfg, spec=trained_tiny.spec)


def test_keras3_model_is_refused(digits_data, trained_tiny):
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3."):
        pytest.skip(f"`keras` is {keras3.__version__}, not Keras 3")
    model = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2)])
    with pytest.raises(
        ModelError, match=r"keras\.src\..*Sequential is not a Keras 2 \(tf_keras\) model.*rebuild"
    ):
        quantization_aware(model, digits_data, OptimizeConfig(finetune_samples=10), spec=trained_tiny.spec)


def nested_model_with_rescaling(trained_tiny) -> keras.Model:
    """The tiny classifier behind a Rescaling layer, its body nested as a Model: both things tfmot refuses."""
    body = trained_tiny.model
    inputs = keras.Input(body.input_shape[1:])
    scaled = keras.layers.Rescaling(1.0, name="identity_rescale")(inputs)
    return keras.Model(inputs, body(scaled), name="nested_with_rescaling")


def test_qat_flattens_a_nested_backbone_and_leaves_rescaling_in_float(trained_tiny, digits_data, tiny_test_inputs):
    model = nested_model_with_rescaling(trained_tiny)
    inputs, labels = tiny_test_inputs
    qat, report = quantization_aware(model, digits_data, OptimizeConfig(finetune_samples=64, batch_size=32),
                                     spec=trained_tiny.spec, seed=0, mirror=False)
    assert report["flattened_nested_models"] == [trained_tiny.model.name]
    assert list(report["left_in_float"]) == ["identity_rescale"]
    assert report["left_in_float"]["identity_rescale"].startswith("Rescaling: not supported")
    assert not any(isinstance(layer, keras.Model) for layer in qat.layers)  # one flat graph
    assert report["quantized_layers"] > 5
    assert accuracy(qat, inputs, labels) > 0.8  # the fine-tune kept the tiny model's accuracy (~0.9+)


def test_qat_of_mobilenet_v3_small_is_a_model_error(digits_data):
    model, spec = build_classifier("mobilenet_v3_small", num_classes=10, input_size=32, dense_units=8)
    with pytest.raises(ModelError, match=r"cannot be quantized by tfmot"):
        quantization_aware(model, digits_data, OptimizeConfig(finetune_samples=10), spec=spec)
