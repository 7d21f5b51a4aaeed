"""The on-disk cache of boundary activations: hit, miss on a changed key, corrupt files recomputed."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from edgesmith._keras import keras
from edgesmith.data.datasets import Split
from edgesmith.data.spec import PreprocessSpec
from edgesmith.train.feature_cache import cache_dir, cached_features, features_key


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESMITH_CACHE_DIR", str(tmp_path / "features"))


class Compute:
    """Stands for the backbone pass: counts its calls, returns fixed features."""

    def __init__(self, rows: int = 6) -> None:
        self.calls, self.rows = 0, rows

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        features = np.arange(self.rows * 4, dtype=np.float16).reshape(self.rows, 4)
        return features, np.arange(self.rows) % 3


def test_second_call_with_the_same_key_loads_instead_of_computing(caplog):
    compute = Compute()
    first = cached_features("k1", 6, compute)
    with caplog.at_level(logging.INFO, logger="edgesmith.train.feature_cache"):
        second = cached_features("k1", 6, compute)
    assert compute.calls == 1
    assert "feature cache hit: 6 activations loaded" in caplog.text and "s saved)" in caplog.text
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert [p.name for p in cache_dir().iterdir()] == ["k1.npz"]  # no temporary file left behind
    cached_features("k2", 6, compute)  # another key: computed again
    assert compute.calls == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "wrong_rows"])
def test_a_corrupt_cache_file_is_recomputed_with_a_warning(damage, caplog):
    compute = Compute()
    cached_features("k", 6, compute)
    path = cache_dir() / "k.npz"
    data = bytearray(path.read_bytes())
    if damage == "garbage":
        path.write_bytes(b"not a zip file")
    elif damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flipped":  # a flipped bit inside the stored features: the zip CRC catches it
        start = data.index(b"\x00\x3c\x00\x40\x00\x42")  # float16 1.0, 2.0, 3.0: inside the features
        data[start + 1] ^= 0x01
        path.write_bytes(bytes(data))
    rows = 5 if damage == "wrong_rows" else 6  # wrong_rows: an intact file that does not fit the data
    again = Compute(rows)
    with caplog.at_level(logging.WARNING, logger="edgesmith.train.feature_cache"):
        features, _ = cached_features("k", rows, again)
    assert "recomputing it" in caplog.text and again.calls == 1
    assert len(features) == rows
    assert cached_features("k", rows, again)[0].shape == features.shape and again.calls == 1  # rewritten, readable


def small_lower(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(inputs))


def test_the_key_changes_with_weights_layers_preprocessing_data_and_augmentation(tmp_path):
    lower = small_lower()
    spec = PreprocessSpec((8, 8), "unit", ("a", "b"))
    images = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    split = Split(labels=np.array([0, 1, 0, 1]), images=images)
    key = features_key(lower, spec, split, flip=False, policy="float32")
    assert key == features_key(small_lower(), spec, split, flip=False, policy="float32")  # same everything
    other_images = images.copy()
    other_images[0, 0, 0, 0] ^= 1
    changed = {
        "weights": features_key(small_lower(seed=1), spec, split, flip=False, policy="float32"),
        "layers": features_key(keras.Model(lower.input, keras.layers.ReLU()(lower.output)), spec, split, flip=False,
                               policy="float32"),
        "preprocessing": features_key(lower, PreprocessSpec((8, 8), "tf", ("a", "b")), split, flip=False,
                                      policy="float32"),
        "input size": features_key(lower, PreprocessSpec((9, 9), "unit", ("a", "b")), split, flip=False,
                                   policy="float32"),
        "pixels": features_key(lower, spec, Split(labels=split.labels, images=other_images), flip=False,
                               policy="float32"),
        "labels": features_key(lower, spec, Split(labels=np.array([1, 1, 0, 1]), images=images), flip=False,
                               policy="float32"),
        "mirroring": features_key(lower, spec, split, flip=True, policy="float32"),
        "precision": features_key(lower, spec, split, flip=False, policy="mixed_float16"),
    }
    assert all(value != key for value in changed.values()), [k for k, v in changed.items() if v == key]
    assert len(set(changed.values())) == len(changed)


def test_the_key_of_an_image_folder_follows_its_files(tmp_path, make_image_folder):
    from edgesmith.data.datasets import image_folder

    data = image_folder(make_image_folder(tmp_path / "images", per_class=2, test_per_class=1))
    lower, spec = small_lower(), PreprocessSpec((8, 8), "unit", data.class_names)
    key = features_key(lower, spec, data.train, flip=False, policy="float32")
    touched = data.train.files[0]
    os.utime(touched, ns=(0, os.stat(touched).st_mtime_ns + 10**9))  # the file was replaced later
    assert features_key(lower, spec, data.train, flip=False, policy="float32") != key


def test_the_key_of_shard_rows_follows_the_records_and_the_shard_files(tmp_path, make_image_folder):
    """Two shard directories of different images with the same labels must not share cached features."""
    from edgesmith.data.shards import shard_dataset, write_shards

    images = make_image_folder(tmp_path / "images", per_class=3, test_per_class=1)
    write_shards(images, tmp_path / "a", shard_size_mb=1 / 1024)
    data = shard_dataset(tmp_path / "a")
    lower, spec = small_lower(), PreprocessSpec((8, 8), "unit", data.class_names)
    key = features_key(lower, spec, data.train, flip=False, policy="float32")
    assert features_key(lower, spec, data.train.take(np.arange(len(data.train))[::-1]), flip=False,
                        policy="float32") != key  # other record order
    touched = data.train.shards.paths[0]
    os.utime(touched, ns=(0, os.stat(touched).st_mtime_ns + 10**9))  # a shard was rewritten
    assert features_key(lower, spec, data.train, flip=False, policy="float32") != key


def test_a_relative_and_an_absolute_data_path_share_one_key(tmp_path, make_image_folder, monkeypatch):
    from edgesmith.data.datasets import image_folder

    make_image_folder(tmp_path / "images", per_class=2, test_per_class=1)
    monkeypatch.chdir(tmp_path)
    relative, absolute = image_folder("images"), image_folder(tmp_path / "images")
    lower, spec = small_lower(), PreprocessSpec((8, 8), "unit", relative.class_names)
    assert str(relative.train.files[0]) != str(absolute.train.files[0])
    assert (features_key(lower, spec, relative.train, flip=False, policy="float32")
            == features_key(lower, spec, absolute.train, flip=False, policy="float32"))
