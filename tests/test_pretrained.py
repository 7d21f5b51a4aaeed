"""The real ImageNet weights: Keras MobileNet classifies real photos, and the zoo loads the same weights."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from edgesmith._keras import keras
from edgesmith.zoo import build_base


def load_photo(path, size: int = 224) -> np.ndarray:
    """Centre square crop, bilinear resize, float32 RGB 0..255."""
    image = Image.open(path).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


@pytest.fixture(scope="module")
def mobilenet_224(mobilenet_weights):
    return keras.applications.MobileNet(weights="imagenet")


def test_mobilenet_classifies_real_imagenet_photos(mobilenet_224, imagenet_samples_dir):
    files = sorted(imagenet_samples_dir.glob("imagenet_*_*.jpg"))
    assert len(files) == 20
    labels = np.array([int(re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", f.name).group(1)) for f in files])
    photos = np.stack([load_photo(f) for f in files])
    probs = mobilenet_224.predict(keras.applications.mobilenet.preprocess_input(photos), verbose=0)
    assert probs.shape == (20, 1000)
    correct = int(np.sum(probs.argmax(-1) == labels))
    assert correct >= 15, (
        f"only {correct}/20 photos classified correctly: ImageNet weights or preprocessing broken"
    )


def test_zoo_loads_the_same_imagenet_weights_at_96(mobilenet_224):
    base, backbone = build_base("mobilenet", 96, "imagenet")
    assert backbone.preprocess == "tf"
    assert base.input_shape == (None, 96, 96, 3)
    for name in ("conv1", "conv_dw_1", "conv_pw_13", "conv_pw_13_bn"):
        for got, expected in zip(
            base.get_layer(name).get_weights(), mobilenet_224.get_layer(name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(got, expected, err_msg=name)
    # ... and they are not a fresh random initialization.
    random_base, _ = build_base("mobilenet", 96, "none")
    assert not np.allclose(
        random_base.get_layer("conv1").get_weights()[0], base.get_layer("conv1").get_weights()[0]
    )
