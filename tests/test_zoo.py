"""The backbone registry: flat graphs for every backbone, QAT on them, typed weights errors."""

from __future__ import annotations

import numpy as np
import pytest

from edgesmith._keras import keras
from edgesmith.data.spec import MODES
from edgesmith.errors import ModelError
from edgesmith.zoo import build_base, build_classifier, get_backbone, head_start, list_backbones

BACKBONES = list_backbones()
HEAD_LAYERS = ["head_pool", "head_dense", "head_dropout", "predictions"]


def small_size(backbone) -> int:
    """The smallest side worth building in a test: the backbone's minimum (32 for the ImageNet families)."""
    return max(backbone.min_size, 16 if not backbone.has_imagenet else 32)


def test_registry_is_sorted_and_has_the_test_backbone():
    names = [b.name for b in BACKBONES]
    assert names == sorted(names)
    assert "tiny_cnn" in names
    assert get_backbone("tiny_cnn").default_size == 16


@pytest.mark.parametrize("backbone", BACKBONES, ids=lambda b: b.name)
def test_backbone_builds_one_flat_graph_with_the_head(backbone):
    size = small_size(backbone)
    model, spec = build_classifier(
        backbone.name, num_classes=3, class_names=("a", "b", "c"), input_size=size, dense_units=8
    )
    nested = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    assert nested == [], f"{backbone.name}: backbone nested as a layer ({nested}); QAT rejects nested models"
    names = [layer.name for layer in model.layers]
    assert names[-4:] == HEAD_LAYERS
    assert head_start(model) == len(names) - 4
    assert model.input_shape == (None, size, size, 3)
    assert model.output_shape == (None, 3)
    assert (
        spec.input_size == (size, size)
        and spec.mode == backbone.preprocess
        and spec.class_names == ("a", "b", "c")
    )
    assert backbone.preprocess in MODES
    probs = model(np.zeros((1, size, size, 3), np.float32), training=False).numpy()
    assert probs.shape == (1, 3) and probs.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("pooling", "layer_type"),
    [
        ("avg", keras.layers.GlobalAveragePooling2D),
        ("max", keras.layers.GlobalMaxPooling2D),
        ("flatten", keras.layers.Flatten),
    ],
)
def test_head_options(pooling, layer_type):
    model, _ = build_classifier("tiny_cnn", num_classes=4, pooling=pooling, dense_units=0)
    names = [layer.name for layer in model.layers]
    assert isinstance(model.get_layer("head_pool"), layer_type)
    assert "head_dense" not in names and "head_dropout" not in names  # dense_units = 0 drops them
    assert model.output_shape == (None, 4)
    assert model.input_shape == (None, 16, 16, 3)  # input_size 0: the backbone's default


def test_too_small_input_is_rejected():
    with pytest.raises(ModelError, match=r"model\.input_size = 3 is too small for tiny_cnn; use at least 4"):
        build_base("tiny_cnn", 3, "none")
    with pytest.raises(ModelError, match=r"input_size = 16 is too small for mobilenet_v2; use at least 32"):
        build_base("mobilenet_v2", 16, "none")


def test_unknown_backbone_lists_the_registry():
    names = ", ".join(b.name for b in BACKBONES)
    with pytest.raises(
        ModelError, match=rf"unknown backbone 'resnet9000'; registered: {names} \(see `edgesmith models`\)"
    ):
        build_classifier("resnet9000", num_classes=2)


def test_imagenet_weights_for_a_backbone_without_them():
    with pytest.raises(ModelError, match=r"tiny_cnn has no ImageNet weights; set model\.weights = 'none'"):
        build_base("tiny_cnn", 16, "imagenet")


def test_missing_weights_file(tmp_path):
    with pytest.raises(ModelError, match=rf"weights file {tmp_path / 'nope.h5'} does not exist"):
        build_base("tiny_cnn", 16, str(tmp_path / "nope.h5"))


def test_weights_file_loads(tmp_path):
    source, _ = build_base("tiny_cnn", 16, "none")
    source.save_weights(str(tmp_path / "base.h5"))
    loaded, _ = build_base("tiny_cnn", 16, str(tmp_path / "base.h5"))
    for a, b in zip(source.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_weights_file_of_another_architecture_same_layer_names(tmp_path):
    small, _ = build_base("small_cnn", 16, "none")  # same layer names as tiny_cnn, wider layers
    small.save_weights(str(tmp_path / "small.h5"))
    with pytest.raises(
        ModelError, match=r"small\.h5 does not fit backbone tiny_cnn \(ValueError: .*\); use weights saved"
    ):
        build_base("tiny_cnn", 16, str(tmp_path / "small.h5"))


def test_weights_file_of_another_architecture_other_layer_names(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="stem_conv")(inputs)
    other = keras.Model(inputs, keras.layers.Dense(2, name="fc")(x))
    other.save_weights(str(tmp_path / "other.h5"))
    with pytest.raises(ModelError, match=r"does not fit backbone tiny_cnn"):
        build_base("tiny_cnn", 16, str(tmp_path / "other.h5"))


def test_head_start_rejects_a_model_not_built_by_the_zoo():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="plain")
    with pytest.raises(ModelError, match=r"model plain has no 'head_pool' layer"):
        head_start(model)


# ------------------------------------------------------- quantization-aware training needs flat graphs


@pytest.mark.parametrize("name", ["tiny_cnn", "mobilenet_v2"])
def test_qat_quantizes_the_flat_classifier(name):
    import tensorflow_model_optimization as tfmot

    model, _ = build_classifier(name, num_classes=3, input_size=32, dense_units=8)
    qat = tfmot.quantization.keras.quantize_model(model)
    wrapped = [layer for layer in qat.layers if type(layer).__name__.startswith("QuantizeWrapper")]
    layers_with_weights = [layer for layer in model.layers if layer.weights]
    assert len(wrapped) >= len(layers_with_weights)
    assert qat.output_shape == model.output_shape


def test_qat_rejects_a_nested_backbone():
    """Why the zoo builds flat graphs: the same backbone nested as a layer is refused."""
    import tensorflow_model_optimization as tfmot

    base, _ = build_base("tiny_cnn", 16, "none")
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs))
    nested = keras.Model(inputs, keras.layers.Dense(2)(x))
    with pytest.raises(ValueError, match=r"keras Model inside another keras Model is not supported"):
        tfmot.quantization.keras.quantize_model(nested)
