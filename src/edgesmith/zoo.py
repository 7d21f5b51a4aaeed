"""Backbone registry: name -> builder, default input size and preprocessing mode.

Every classifier is ONE flat functional graph: ``keras.Model(base.input, head(base.output))``. The
backbone is never nested as a layer, because quantization-aware training rejects nested models.
Tiny test backbones are registered exactly like the real ones, so tests parametrize over the registry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgesmith._keras import keras
from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import ModelError

log = logging.getLogger(__name__)
BaseBuilder = Callable[[tuple[int, int, int], "str | None"], keras.Model]


@dataclass(frozen=True)
class Backbone:
    """A registered backbone.

    Attributes:
        name: registry key.
        build_base: ``(input_shape, weights) -> headless keras.Model`` (weights is "imagenet" or None).
        default_size: input side used when a recipe leaves ``model.input_size`` at 0.
        preprocess: a :data:`edgesmith.data.spec.MODES` key; "raw" for models that rescale inside.
        min_size: smallest input side the architecture accepts.
        has_imagenet: whether ``weights="imagenet"`` exists for it.
    """

    name: str
    build_base: BaseBuilder
    default_size: int
    preprocess: str
    min_size: int = 32
    has_imagenet: bool = True
    description: str = ""


_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    """Add a backbone to the registry (a later registration under the same name replaces it)."""
    _REGISTRY[backbone.name] = backbone
    return backbone


def list_backbones() -> list[Backbone]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_backbone(name: str) -> Backbone:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"unknown backbone {name!r}; registered: {', '.join(sorted(_REGISTRY))} (see `edgesmith models`)"
        ) from None


def _application(factory_name: str, **kwargs) -> BaseBuilder:
    def build(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        factory = getattr(keras.applications, factory_name)
        return factory(input_shape=input_shape, include_top=False, weights=weights, **kwargs)

    return build


def _small_cnn(widths: tuple[int, ...]) -> BaseBuilder:
    def build(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        inputs = keras.Input(input_shape, name="image")
        x = inputs
        for i, width in enumerate(widths):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{i}_conv")(x)
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{i}_bn")(x)
            x = keras.layers.ReLU(name=f"block{i}_relu")(x)
            x = keras.layers.MaxPooling2D(name=f"block{i}_pool")(x)
        return keras.Model(inputs, x, name="small_cnn")

    return build


for _bb in (
    Backbone("mobilenet", _application("MobileNet", alpha=1.0), 96, "tf", description="MobileNet v1 1.0"),
    Backbone("mobilenet_v2", _application("MobileNetV2", alpha=1.0), 96, "tf", description="MobileNetV2 1.0"),
    Backbone("mobilenet_v3_small", _application("MobileNetV3Small"), 96, "raw", description="rescales inside"),
    Backbone("vgg16", _application("VGG16"), 64, "caffe", description="VGG16"),
    Backbone("resnet50", _application("ResNet50"), 64, "caffe", description="ResNet50 (v1)"),
    Backbone("efficientnet_b0", _application("EfficientNetB0"), 96, "raw", description="rescales inside"),
    Backbone("small_cnn", _small_cnn((32, 64, 128)), 32, "unit", 8, False, "3 conv blocks, for fast runs"),
    Backbone("tiny_cnn", _small_cnn((8, 16)), 16, "unit", 4, False, "2 conv blocks, for tests"),
):
    register(_bb)


def build_base(name: str, input_size: int, weights: str) -> tuple[keras.Model, Backbone]:
    """Build a headless backbone with ``weights`` = "imagenet" | "none" | path to a weights file."""
    backbone = get_backbone(name)
    size = input_size or backbone.default_size
    if size < backbone.min_size:
        raise ModelError(f"model.input_size = {size} is too small for {name}; use at least {backbone.min_size}")
    shape = (size, size, 3)
    if weights == "imagenet":
        if not backbone.has_imagenet:
            raise ModelError(f"{name} has no ImageNet weights; set model.weights = 'none' or a weights file path")
        return _build_imagenet(backbone, shape), backbone
    base = backbone.build_base(shape, None)
    if weights not in ("none", ""):
        _load_weights_file(base, Path(weights), name)
    return base, backbone


def _build_imagenet(backbone: Backbone, shape: tuple[int, int, int]) -> keras.Model:
    try:
        return backbone.build_base(shape, "imagenet")
    except Exception as exc:  # the downloader raises several exception types offline
        if isinstance(exc, ValueError) and "weights" not in str(exc):
            raise
        raise ModelError(
            f"could not load ImageNet weights for {backbone.name} ({type(exc).__name__}: {str(exc)[:200]}); "
            "put Keras's weight file in ~/.keras/models/, or set model.weights to 'none' or a weights file"
        ) from None


def _load_weights_file(base: keras.Model, path: Path, name: str) -> None:
    if not path.is_file():
        raise ModelError(
            f"weights file {path} does not exist; set model.weights to an existing file, 'imagenet' or 'none'"
        )
    try:
        base.load_weights(str(path))
    except Exception as exc:  # h5py, TF and Keras each raise their own types on mismatch
        raise ModelError(
            f"weights file {path} does not fit backbone {name} ({type(exc).__name__}: {str(exc)[:200]}); "
            "use weights saved from the same architecture without its top"
        ) from None


def build_classifier(
    name: str,
    *,
    num_classes: int,
    class_names: tuple[str, ...] = (),
    input_size: int = 0,
    weights: str = "none",
    pooling: str = "avg",
    dense_units: int = 256,
    dropout: float = 0.3,
) -> tuple[keras.Model, PreprocessSpec]:
    """Backbone + classification head as one flat functional graph, and its preprocessing spec.

    The head is pooling (or Flatten) -> Dense(dense_units, relu) -> Dropout -> Dense(num_classes, softmax);
    ``dense_units = 0`` drops the hidden layer.
    """
    base, backbone = build_base(name, input_size, weights)
    x = base.output
    pool_layers = {
        "avg": keras.layers.GlobalAveragePooling2D,
        "max": keras.layers.GlobalMaxPooling2D,
        "flatten": keras.layers.Flatten,
    }
    x = pool_layers[pooling](name="head_pool")(x)
    if dense_units:
        x = keras.layers.Dense(dense_units, activation="relu", name="head_dense")(x)
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(base.input, outputs, name=f"{name}_classifier")
    spec = PreprocessSpec(tuple(base.input_shape[1:3]), backbone.preprocess, tuple(class_names))
    return model, spec


def head_start(model: keras.Model) -> int:
    """Index of the first head layer (the layers before it are the backbone)."""
    names = [layer.name for layer in model.layers]
    if "head_pool" not in names:
        raise ModelError(f"model {model.name} has no 'head_pool' layer; it was not built by edgesmith.zoo")
    return names.index("head_pool")
