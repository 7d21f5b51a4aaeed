"""Data: image folders and their errors, digits, seeded subsets, pipelines, the preprocessing spec."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from edgesmith._keras import keras, tf
from edgesmith.data.datasets import (
    Split,
    digits,
    limit_per_class,
    load_dataset,
    stratified_split,
    with_validation,
)
from edgesmith.data.datasets import image_folder as read_image_folder
from edgesmith.data.pipeline import load_pixels, make_pipeline
from edgesmith.data.spec import MODES, SPEC_FILE, PreprocessSpec
from edgesmith.errors import DataError, ModelError
from edgesmith.recipe import DataConfig
from edgesmith.zoo import list_backbones

# ---------------------------------------------------------------- image folders


def test_image_folder_reads_classes_and_counts(image_folder):
    dataset = read_image_folder(image_folder)
    assert dataset.class_names == ("apple", "leaf", "sea")  # sorted folder names
    assert dataset.name == "colors"
    assert dataset.num_classes == 3
    assert dataset.train.class_counts(3) == [10, 10, 10]
    assert dataset.test.class_counts(3) == [4, 4, 4]
    assert dataset.val is None
    assert dataset.train.images is None and len(dataset.train.files) == 30
    # Files are grouped by class and each file sits in its label's folder.
    for path, label in zip(dataset.train.files, dataset.train.labels, strict=True):
        assert f"/train/{dataset.class_names[label]}/" in path
    assert dataset.describe()["counts"] == {"train": [10, 10, 10], "test": [4, 4, 4]}
    assert dataset.source == str(image_folder.resolve())


def test_class_names_are_sorted_not_in_creation_order(tmp_path, make_image_folder):
    root = make_image_folder(
        tmp_path / "d",
        classes={"zebra": (0, 0, 0), "ant": (255, 255, 255), "Moth": (9, 9, 9)},
        per_class=2,
        test_per_class=1,
    )
    assert read_image_folder(root).class_names == ("Moth", "ant", "zebra")


def test_image_folder_accepts_val_instead_of_test(tmp_path, image_folder):
    root = tmp_path / "d"
    shutil.copytree(image_folder, root)
    (root / "test").rename(root / "val")
    assert read_image_folder(root).test.class_counts(3) == [4, 4, 4]


def test_image_folder_ignores_non_images_and_hidden_folders(tmp_path, image_folder):
    root = tmp_path / "d"
    shutil.copytree(image_folder, root)
    (root / "train" / "apple" / "notes.txt").write_text("not an image")
    (root / "train" / ".cache").mkdir()
    dataset = read_image_folder(root)
    assert dataset.class_names == ("apple", "leaf", "sea")
    assert dataset.train.class_counts(3) == [10, 10, 10]


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=rf"data folder {tmp_path / 'nope'} does not exist"):
        read_image_folder(tmp_path / "nope")


def test_no_train_folder(tmp_path):
    (tmp_path / "d" / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=rf"{tmp_path / 'd'}: no train/ folder"):
        read_image_folder(tmp_path / "d")


def test_no_test_folder(tmp_path, image_folder):
    root = tmp_path / "d"
    shutil.copytree(image_folder / "train", root / "train")
    with pytest.raises(DataError, match=rf"{root}: no test/ or val/ folder beside train/"):
        read_image_folder(root)


def test_empty_class_folder(tmp_path, image_folder):
    root = tmp_path / "d"
    shutil.copytree(image_folder, root)
    (root / "train" / "ghost").mkdir()
    (root / "test" / "ghost").mkdir()
    with pytest.raises(DataError, match=rf"{root / 'train' / 'ghost'}: class folder holds no images"):
        read_image_folder(root)


def test_empty_class_folder_in_test(tmp_path, image_folder):
    root = tmp_path / "d"
    shutil.copytree(image_folder, root)
    for f in (root / "test" / "sea").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=rf"{root / 'test' / 'sea'}: class folder holds no images"):
        read_image_folder(root)


def test_single_class(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", classes={"only": (1, 2, 3)}, per_class=2, test_per_class=1)
    with pytest.raises(
        DataError, match=rf"{root / 'train'}: only one class folder \(only\); a classifier needs at least two"
    ):
        read_image_folder(root)


def test_no_class_folders(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "test").mkdir()
    with pytest.raises(DataError, match=r"train: no class folders"):
        read_image_folder(tmp_path / "d")


def test_test_classes_differ_from_train(tmp_path, image_folder):
    root = tmp_path / "d"
    shutil.copytree(image_folder, root)
    (root / "test" / "sea").rename(root / "test" / "ocean")
    with pytest.raises(
        DataError, match=rf"{root / 'test'}: class folders .*ocean.* differ from train/'s .*sea"
    ):
        read_image_folder(root)


# ---------------------------------------------------------------- named data sets and subsets


def test_digits_shapes_and_range():
    dataset = digits(seed=0)
    assert dataset.class_names == tuple(str(i) for i in range(10))
    assert len(dataset.train) + len(dataset.test) == 1797
    for split in (dataset.train, dataset.test):
        assert split.images.shape == (len(split), 8, 8, 3)
        assert split.images.dtype == np.uint8
        assert split.files is None
        assert np.array_equal(split.images[..., 0], split.images[..., 2])  # gray in RGB
    assert dataset.train.images.min() == 0 and dataset.train.images.max() == 255
    assert len(dataset.test) == pytest.approx(0.2 * 1797, abs=10)
    assert all(c >= 34 for c in dataset.test.class_counts(10))  # stratified: every digit held out


def test_digits_split_is_seeded():
    a, b, c = digits(seed=1), digits(seed=1), digits(seed=2)
    assert np.array_equal(a.test.images, b.test.images) and np.array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.test.images, c.test.images)


def test_stratified_split_keeps_class_balance_and_is_seeded():
    labels = np.repeat([0, 1, 2], [100, 50, 20])
    kept, held = stratified_split(labels, 0.2, seed=3)
    assert np.bincount(labels[held]).tolist() == [20, 10, 4]
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(170))  # a partition
    again_kept, again_held = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(held, again_held) and np.array_equal(kept, again_kept)
    _, other = stratified_split(labels, 0.2, seed=4)
    assert not np.array_equal(held, other)


def test_limit_per_class_is_stratified_and_seeded():
    labels = np.repeat([0, 1, 2], [30, 5, 12])
    split = Split(labels=labels, images=np.arange(len(labels))[:, None])
    small = limit_per_class(split, 8, seed=0)
    assert small.class_counts(3) == [8, 5, 8]
    assert np.array_equal(small.labels, labels[small.images[:, 0]])  # rows stay paired
    assert np.array_equal(limit_per_class(split, 8, seed=0).images, small.images)
    assert not np.array_equal(limit_per_class(split, 8, seed=1).images, small.images)
    assert limit_per_class(split, 0, seed=0) is split


def test_with_validation_keeps_class_balance():
    dataset = digits(seed=0)
    with_val = with_validation(dataset, 0.25, seed=5)
    train_counts = np.asarray(dataset.train.class_counts(10))
    assert np.abs(np.asarray(with_val.val.class_counts(10)) - 0.25 * train_counts).max() <= 1
    assert len(with_val.train) + len(with_val.val) == len(dataset.train)
    assert with_val.test is dataset.test
    again = with_validation(dataset, 0.25, seed=5)
    assert np.array_equal(again.val.images, with_val.val.images)
    assert with_validation(with_val, 0.5, seed=0) is with_val  # an existing val split is kept
    assert with_validation(dataset, 0.0, seed=0).val is None


def test_load_dataset_applies_limits_and_validation(image_folder):
    config = DataConfig(
        dataset="folder", path=str(image_folder), val_fraction=0.2, limit_per_class=5, test_limit_per_class=3
    )
    dataset = load_dataset(config, seed=0)
    assert dataset.train.class_counts(3) == [4, 4, 4]
    assert dataset.val.class_counts(3) == [1, 1, 1]
    assert dataset.test.class_counts(3) == [3, 3, 3]


def test_load_dataset_folder_without_path():
    with pytest.raises(DataError, match=r"data\.dataset = 'folder' needs a path"):
        load_dataset(DataConfig(dataset="folder"), seed=0)


def test_load_dataset_data_path_overrides_config(tmp_path, image_folder):
    config = DataConfig(dataset="folder", path=str(tmp_path / "elsewhere"), val_fraction=0.0)
    assert load_dataset(config, seed=0, data_path=image_folder).class_names == ("apple", "leaf", "sea")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(config, seed=0)


def test_load_dataset_rejects_a_data_path_it_would_ignore(tmp_path):
    with pytest.raises(DataError, match="nope"):
        load_dataset(DataConfig(dataset="digits"), seed=0, data_path=tmp_path / "nope")


# ---------------------------------------------------------------- pipelines


def test_make_pipeline_from_files(image_folder):
    dataset = read_image_folder(image_folder)
    spec = PreprocessSpec((16, 24), "unit", dataset.class_names)
    batches = list(make_pipeline(dataset.train, spec, batch_size=8))
    assert [len(b[1]) for b in batches] == [8, 8, 8, 6]
    images, labels = batches[0]
    assert images.shape == (8, 16, 24, 3) and images.dtype == tf.float32
    assert labels.dtype == tf.int64
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
    # Without a shuffle seed the split's order is kept: apples (mostly red) come first.
    first = images.numpy()[0].mean(axis=(0, 1))
    assert first[0] > 0.5 > first[2]
    assert np.array_equal(np.concatenate([b[1].numpy() for b in batches]), dataset.train.labels)


def test_make_pipeline_from_arrays_normalizes_with_the_spec():
    dataset = digits(seed=0)
    spec = PreprocessSpec((32, 32), "tf")
    images, labels = next(iter(make_pipeline(dataset.test, spec, batch_size=5)))
    assert images.shape == (5, 32, 32, 3)
    assert float(tf.reduce_min(images)) >= -1.0 and float(tf.reduce_max(images)) <= 1.0
    assert labels.numpy().tolist() == dataset.test.labels[:5].tolist()
    flipped, _ = next(iter(make_pipeline(dataset.test, spec, batch_size=5, flip=True)))
    np.testing.assert_allclose(flipped.numpy(), images.numpy()[:, :, ::-1, :], atol=1e-6)


def test_make_pipeline_shuffle_is_seeded():
    split = digits(seed=0).test
    spec = PreprocessSpec((8, 8), "unit")

    def order(seed):
        return np.concatenate(
            [y.numpy() for _, y in make_pipeline(split, spec, batch_size=64, shuffle_seed=seed)]
        )

    first = order(11)
    assert np.array_equal(first, order(11))
    assert not np.array_equal(first, split.labels)
    assert sorted(first.tolist()) == sorted(split.labels.tolist())


def test_load_pixels(image_folder):
    dataset = read_image_folder(image_folder)
    pixels, labels = load_pixels(dataset.test, (20, 20))
    assert pixels.shape == (12, 20, 20, 3) and pixels.dtype == np.float32
    assert pixels.max() > 150 and pixels.min() >= 0  # still 0..255
    assert np.array_equal(labels, dataset.test.labels)
    assert load_pixels(dataset.test, (20, 20), limit=5)[0].shape[0] == 5


# ---------------------------------------------------------------- the preprocessing spec

# Keras's own preprocess_input for each mode; 'raw' and 'unit' have none (identity, x / 255).
KERAS_MODULE_OF_MODE = {
    "tf": ["mobilenet", "mobilenet_v2"],
    "caffe": ["vgg16", "resnet50"],
    "torch": ["densenet"],
}
MODE_CASES = [
    pytest.param(mode, module, id=f"{mode}-{module}")
    for mode, modules in KERAS_MODULE_OF_MODE.items()
    for module in modules
]


def pixels_0_255(shape=(2, 5, 7, 3)):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, shape).astype(np.float32)
    x[0, 0, 0] = [0, 128, 255]  # the extremes and an off-centre channel pattern
    return x


@pytest.mark.parametrize(("mode", "module"), MODE_CASES)
@pytest.mark.parametrize("kind", ["numpy", "tf"])
def test_normalize_matches_keras_preprocess_input(mode, module, kind):
    x = pixels_0_255()
    expected = getattr(keras.applications, module).preprocess_input(x.copy())
    spec = PreprocessSpec((5, 7), mode)
    got = spec.normalize(x) if kind == "numpy" else spec.normalize(tf.constant(x)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["numpy", "tf"])
def test_normalize_raw_and_unit(kind):
    x = pixels_0_255()
    as_input = x if kind == "numpy" else tf.constant(x)

    def run(mode):
        out = PreprocessSpec((5, 7), mode).normalize(as_input)
        return out if kind == "numpy" else out.numpy()

    np.testing.assert_array_equal(run("raw"), x)
    np.testing.assert_allclose(run("unit"), x / 255.0, rtol=1e-6)
    assert run("raw") is not x  # a copy, so callers may modify it


def test_normalize_inside_a_tf_data_map_matches_numpy():
    x = pixels_0_255((4, 3, 3, 3))
    for mode in MODES:
        spec = PreprocessSpec((3, 3), mode)
        mapped = next(iter(tf.data.Dataset.from_tensor_slices(x).batch(4).map(spec.normalize))).numpy()
        np.testing.assert_allclose(mapped, spec.normalize(x), atol=1e-5, err_msg=mode)


# The keras.applications module whose preprocess_input each registered backbone's mode must reproduce.
KERAS_MODULE_OF_BACKBONE = {
    "mobilenet": "mobilenet",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3_small": "mobilenet_v3",
    "efficientnet_b0": "efficientnet",
    "vgg16": "vgg16",
    "resnet50": "resnet50",
    "small_cnn": None,  # trained from scratch by edgesmith: x / 255
    "tiny_cnn": None,
}


@pytest.mark.parametrize("backbone", list_backbones(), ids=lambda b: b.name)
def test_each_backbone_mode_matches_its_keras_preprocessing(backbone):
    assert backbone.name in KERAS_MODULE_OF_BACKBONE, (
        f"new backbone {backbone.name!r}: add its keras.applications module to KERAS_MODULE_OF_BACKBONE"
    )
    module = KERAS_MODULE_OF_BACKBONE[backbone.name]
    x = pixels_0_255()
    expected = x / 255.0 if module is None else getattr(keras.applications, module).preprocess_input(x.copy())
    got = PreprocessSpec((5, 7), backbone.preprocess).normalize(x)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_spec_save_and_load_round_trip(tmp_path):
    spec = PreprocessSpec((96, 64), "caffe", ("cat", "dog"))
    path = spec.save(tmp_path)
    assert path == tmp_path / SPEC_FILE
    model_file = tmp_path / "model.tflite"
    loaded = PreprocessSpec.load_beside(model_file)
    assert loaded == spec
    assert isinstance(loaded.input_size, tuple) and isinstance(loaded.class_names, tuple)
    assert PreprocessSpec.load_beside(path) == spec
    assert loaded.input_shape == (96, 64, 3)


def test_spec_errors(tmp_path):
    with pytest.raises(ModelError, match=r"preprocessing mode 'inception' is unknown; choose from tf, caffe"):
        PreprocessSpec((8, 8), "inception")
    with pytest.raises(ModelError, match=r"no preprocessing spec beside model\.onnx"):
        PreprocessSpec.load_beside(tmp_path / "model.onnx")


def test_split_take_keeps_rows_paired():
    split = Split(labels=np.array([0, 1, 2, 1]), files=np.array(["a", "b", "c", "d"]))
    picked = split.take(np.array([3, 0]))
    assert picked.labels.tolist() == [1, 0] and picked.files.tolist() == ["d", "a"] and picked.images is None
    assert len(replace(picked, labels=np.array([1]))) == 1
