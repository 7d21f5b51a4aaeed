"""Train: from scratch, two-phase transfer on cached activations, freeze boundaries, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import accuracy, tiny_recipe
from edgesmith._keras import keras
from edgesmith.errors import ModelError
from edgesmith.train import train
from edgesmith.train.transfer import freeze_boundary, unfrozen_indices
from edgesmith.zoo import build_classifier, head_start


def test_train_from_scratch_learns_digits(trained_tiny, tiny_test_inputs):
    inputs, labels = tiny_test_inputs
    test_accuracy = accuracy(trained_tiny.model, inputs, labels)
    assert test_accuracy > 0.6, f"test accuracy {test_accuracy:.3f} (chance is 0.10)"
    history = trained_tiny.history
    assert set(history) == {"head"}  # no weights to transfer: no fine-tune phase
    assert len(history["head"]["val_accuracy"]) == 8
    assert trained_tiny.metrics["best_val_accuracy"] == pytest.approx(max(history["head"]["val_accuracy"]))
    assert trained_tiny.metrics["params"] == trained_tiny.model.count_params()
    assert trained_tiny.spec.class_names == tuple(str(i) for i in range(10))
    assert trained_tiny.spec.input_size == (16, 16) and trained_tiny.spec.mode == "unit"
    # From scratch, every layer trains (BatchNormalization included).
    assert all(layer.trainable for layer in trained_tiny.model.layers if layer.weights)


@pytest.fixture(scope="module")
def transfer_recipe(pretrained_tiny_weights):
    return tiny_recipe(
        model={"weights": str(pretrained_tiny_weights)},
        train={
            "head_epochs": 4,
            "finetune_epochs": 2,
            "unfreeze_layers": 4,
            "cache_features": True,
            "head_learning_rate": 3e-3,
            "finetune_learning_rate": 3e-4,
            "patience": 4,
        },
    )


@pytest.fixture(scope="module")
def transferred(digits_data, transfer_recipe):
    return train(digits_data, transfer_recipe)


def stored_weights(path) -> dict[str, list[np.ndarray]]:
    from edgesmith.zoo import build_base

    base, _ = build_base("tiny_cnn", 16, str(path))
    return {layer.name: layer.get_weights() for layer in base.layers if layer.weights}


def test_transfer_two_phases_on_cached_activations(transferred, tiny_test_inputs):
    assert set(transferred.history) == {"head", "finetune"}
    assert len(transferred.history["finetune"]["val_accuracy"]) == 2
    inputs, labels = tiny_test_inputs
    test_accuracy = accuracy(transferred.model, inputs, labels)
    assert test_accuracy > 0.6, f"test accuracy {test_accuracy:.3f} with a pretrained base (chance is 0.10)"
    # unfreeze_layers = 4 covers block1_conv, block1_bn, block1_relu, block1_pool: only the conv has weights
    # that phase 2 may train (BatchNormalization stays frozen).
    assert transferred.metrics["trainable_layers_phase2"] == 1


def test_transfer_keeps_batchnorm_and_the_bottom_frozen(transferred, pretrained_tiny_weights):
    model = transferred.model
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, f"{layer.name} is trainable after train()"
    assert not model.get_layer("block0_conv").trainable
    assert model.get_layer("block1_conv").trainable  # the top layer phase 2 unfroze
    assert all(model.get_layer(n).trainable for n in ("head_dense", "predictions"))
    # Frozen layers were not changed by either phase; the unfrozen conv was fine-tuned.
    stored = stored_weights(pretrained_tiny_weights)
    for name in ("block0_conv", "block0_bn", "block1_bn"):
        for got, expected in zip(model.get_layer(name).get_weights(), stored[name], strict=True):
            np.testing.assert_array_equal(got, expected, err_msg=name)
    assert not np.array_equal(model.get_layer("block1_conv").get_weights()[0], stored["block1_conv"][0])


def test_cached_transfer_is_deterministic(transferred, digits_data, transfer_recipe, tiny_test_inputs):
    again = train(digits_data, transfer_recipe)
    for a, b in zip(transferred.model.get_weights(), again.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    inputs = tiny_test_inputs[0][:64]
    np.testing.assert_array_equal(
        transferred.model.predict(inputs, verbose=0), again.model.predict(inputs, verbose=0)
    )
    assert again.history == transferred.history


def test_transfer_without_cache_also_trains_two_phases(
    digits_data, pretrained_tiny_weights, tiny_test_inputs
):
    recipe = tiny_recipe(
        model={"weights": str(pretrained_tiny_weights)},
        train={"head_epochs": 2, "finetune_epochs": 1, "unfreeze_layers": 4, "cache_features": False},
    )
    result = train(digits_data, recipe)
    assert set(result.history) == {"head", "finetune"}
    assert not result.model.get_layer("block0_conv").trainable
    assert accuracy(result.model, *tiny_test_inputs) > 0.5


def test_unfrozen_indices_skip_batchnorm_and_weightless_layers():
    model, _ = build_classifier("tiny_cnn", num_classes=3)
    end = head_start(model)
    picked = [model.layers[i].name for i in unfrozen_indices(model, end, 100)]
    assert picked == ["block0_conv", "block1_conv"]
    assert unfrozen_indices(model, end, 0) == []


def test_freeze_boundary_in_resnet50_cuts_between_blocks():
    model, _ = build_classifier("resnet50", num_classes=3, input_size=32, dense_units=8)
    names = [layer.name for layer in model.layers]
    # Inside conv5_block3 its shortcut crosses every cut: the cut falls back to the previous block's output.
    first_trained = names.index("conv5_block3_2_conv")
    index, upper = freeze_boundary(model, first_trained)
    assert names[index] == "conv5_block2_out"
    assert upper.input_shape == model.layers[index].output_shape
    # The lower part followed by the upper part is the whole model.
    lower = keras.Model(model.input, model.layers[index].output)
    x = np.random.default_rng(0).uniform(-100, 100, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(upper(lower(x)).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    # Just below the head, the last block's output is itself a valid cut.
    index, _ = freeze_boundary(model, head_start(model))
    assert names[index] == "conv5_block3_out"


def test_freeze_boundary_without_a_single_tensor_cut():
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(4, name="d")(inputs)
    outputs = keras.layers.Add(name="skip")([inputs, hidden])
    model = keras.Model(inputs, outputs, name="skippy")
    with pytest.raises(
        ModelError, match=r"skippy: no single-tensor cut below layer 2; set train\.cache_features = false"
    ):
        freeze_boundary(model, 2)
