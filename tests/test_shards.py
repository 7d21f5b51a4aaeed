"""Shards: write an image folder as TFRecords, read them back streamed, same images as the folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_recipe, write_image_folder
from edgesmith.cli import main
from edgesmith.data.datasets import image_folder, load_dataset
from edgesmith.data.pipeline import load_pixels, make_pipeline, pixels_dataset
from edgesmith.data.shards import INDEX_FILE, is_shard_dir, read_index, shard_dataset, write_shards
from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import DataError
from edgesmith.recipe import DataConfig
from edgesmith.runs import sha256_file

SIZE = (24, 24)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes, 10 train + 4 test images each (PNG and JPEG), plus one BMP and one corrupt JPEG."""
    root = write_image_folder(tmp_path_factory.mktemp("shards") / "colors")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "train/leaf/zz.bmp")
    (root / "train/sea/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    """The folder written as shards of 2 KB each, so every split spans several files. Read-only."""
    out = tmp_path_factory.mktemp("written") / "colors-shards"
    write_shards(folder, out, shard_size_mb=2 / 1024)
    return out


def copy_of(shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "copy"))


def test_index_describes_every_split_class_and_shard(folder, shards):
    index = json.loads((shards / INDEX_FILE).read_text())
    assert index["format"] == "edgesmith-shards" and index["version"] == 1
    assert index["class_names"] == ["apple", "leaf", "sea"]
    assert index["splits"]["train"]["counts"] == [10, 11, 10]  # the BMP joins leaf, the corrupt JPEG is left out
    assert index["splits"]["test"]["counts"] == [4, 4, 4]
    assert [s["path"] for s in index["skipped"]] == ["train/sea/broken.jpg"]
    for split in index["splits"].values():
        assert len(split["shards"]) > 1
        assert sum(s["records"] for s in split["shards"]) == split["count"] == sum(split["counts"])
        for shard in split["shards"]:
            path = shards / shard["file"]
            assert path.stat().st_size == shard["bytes"] <= 2048 + 2048  # one record may overflow a shard
            assert sha256_file(path) == shard["sha256"]
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        [INDEX_FILE] + [s["file"] for split in index["splits"].values() for s in split["shards"]]
    )


def test_round_trip_gives_the_folders_pixels_labels_and_skipped_files(folder, shards):
    from_folder, from_shards = image_folder(folder), shard_dataset(shards)
    assert is_shard_dir(shards) and not is_shard_dir(folder)
    assert from_shards.class_names == from_folder.class_names
    assert [c.path for c in from_shards.skipped] == ["train/sea/broken.jpg"]
    for name in ("train", "test"):
        expected, streamed = getattr(from_folder, name), getattr(from_shards, name)
        np.testing.assert_array_equal(streamed.labels, expected.labels)
        pixels, labels = load_pixels(streamed, SIZE)
        want_pixels, want_labels = load_pixels(expected, SIZE)
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_array_equal(pixels, want_pixels)  # the BMP too (stored as a lossless PNG)


def test_load_dataset_picks_the_same_rows_from_shards_as_from_the_folder(folder, shards):
    config = DataConfig(dataset="folder", limit_per_class=8, test_limit_per_class=3, val_fraction=0.25)
    from_folder = load_dataset(config, seed=3, data_path=folder)
    from_shards = load_dataset(config, seed=3, data_path=shards)
    assert from_shards.describe()["counts"] == from_folder.describe()["counts"]
    for name in ("train", "val", "test"):
        pixels, labels = load_pixels(getattr(from_shards, name), SIZE)
        want_pixels, want_labels = load_pixels(getattr(from_folder, name), SIZE)
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_array_equal(pixels, want_pixels)


def fingerprints(pipeline) -> list[tuple[int, bytes]]:
    return sorted((int(y), x.tobytes()) for xs, ys in pipeline.as_numpy_iterator() for x, y in zip(xs, ys, strict=True))


def test_shuffled_streaming_epochs_hold_the_same_examples_in_a_seeded_order(folder, shards):
    spec = PreprocessSpec(SIZE, "unit")
    split, want = shard_dataset(shards).train, image_folder(folder).train
    streamed = make_pipeline(split, spec, batch_size=7, shuffle_seed=5, cache=True)
    epochs = [list(streamed.unbatch().map(lambda x, y: y).as_numpy_iterator()) for _ in range(2)]
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert epochs[0] != sorted(epochs[0])  # not in the stored class-by-class order
    again = make_pipeline(split, spec, batch_size=7, shuffle_seed=5)
    assert list(again.unbatch().map(lambda x, y: y).as_numpy_iterator()) == epochs[0]  # seeded
    assert fingerprints(streamed) == fingerprints(make_pipeline(want, spec, batch_size=7, shuffle_seed=5))


def test_a_subset_streams_only_its_rows(shards):
    split = shard_dataset(shards).test
    subset = split.take(np.array([0, 5, 11]))
    _, labels = load_pixels(subset, SIZE)
    np.testing.assert_array_equal(labels, [0, 1, 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), r"shard .*train-00001\.tfrecord is missing; re-run `edgesmith data shard"),
        (lambda p: p.write_bytes(p.read_bytes()[:-10]), r"train-00001\.tfrecord is \d+ bytes, index\.json says "
         r"\d+ \(truncated or altered\); re-run `edgesmith data shard"),
        (lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 1]) + p.read_bytes()[1:]),
         r"train-00001\.tfrecord: sha256 differs from index\.json \(corrupt\); re-run `edgesmith data shard"),
    ],
    ids=["missing", "truncated", "corrupt"],
)
def test_damaged_shard_is_named_with_what_to_do(shards, tmp_path, damage, message):
    copy = copy_of(shards, tmp_path)
    shard_dataset(copy)  # intact: opens (and its hashes are remembered for this process)
    damage(copy / "train-00001.tfrecord")
    with pytest.raises(DataError, match=message):
        shard_dataset(copy)


def test_size_only_verification_skips_the_hash(shards, tmp_path):
    copy = copy_of(shards, tmp_path)
    shard = copy / "test-00000.tfrecord"
    shard.write_bytes(bytes([shard.read_bytes()[0] ^ 1]) + shard.read_bytes()[1:])
    assert len(shard_dataset(copy, verify="size").test) == 12
    with pytest.raises(DataError, match="sha256 differs"):
        shard_dataset(copy)


def test_bad_index_is_named(shards, tmp_path):
    copy = copy_of(shards, tmp_path)
    (copy / INDEX_FILE).write_text('{"format": "something else"}')
    with pytest.raises(DataError, match=r"index\.json: not an edgesmith shard index.*edgesmith data shard"):
        read_index(copy)
    (copy / INDEX_FILE).write_text("{not json")
    with pytest.raises(DataError, match=r"index\.json: cannot be read"):
        shard_dataset(copy)


def test_existing_output_needs_force_and_is_replaced_whole(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(DataError, match=r"out already exists; pass --force"):
        write_shards(folder, out)
    assert (out / "stale.txt").exists()  # untouched
    write_shards(folder, out, force=True)
    assert is_shard_dir(out) and not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or set-aside folder left


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        write_shards(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(DataError, match="shard-size-mb 0"):
        write_shards(tmp_path, tmp_path / "out", shard_size_mb=0)
    assert list(tmp_path.iterdir()) == []


def test_strict_refuses_shards_written_without_unreadable_files(folder, shards, tmp_path):
    with pytest.raises(DataError, match=r"1 unreadable image file\(s\) were left out.*broken\.jpg"):
        load_dataset(DataConfig(dataset="folder"), seed=0, data_path=shards, strict=True)
    with pytest.raises(DataError, match="unreadable"):
        write_shards(folder, tmp_path / "strict", strict=True)


def test_cli_writes_shards_and_refuses_to_overwrite(folder, tmp_path, capsys):
    out = tmp_path / "cli-shards"
    assert main(["-q", "data", "shard", str(folder), "--out", str(out), "--shard-size-mb", "0.004"]) == 0
    printed = capsys.readouterr().out
    assert "train: 31 images in" in printed and "test: 12 images in" in printed and "skipped 1" in printed
    assert len(read_index(out)["splits"]["train"]["shards"]) > 1
    assert main(["-q", "data", "shard", str(folder), "--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["-q", "data", "shard", str(folder), "--out", str(out), "--force"]) == 0
    assert len(read_index(out)["splits"]["train"]["shards"]) == 1


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """300 training and 100 test digits (8x8) as PNG files in class folders: a task a model must learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    root = tmp_path_factory.mktemp("digits") / "digits"
    for i, (image, label) in enumerate(zip(bunch.images[:400], bunch.target[:400], strict=True)):
        folder = root / ("train" if i < 300 else "test") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)).convert("RGB").save(folder / f"{i:04d}.png")
    return root


@pytest.mark.parametrize("cache_features", [True, False], ids=["cached-activations", "streamed-pipeline"])
def test_training_from_shards_matches_the_folder(digits_folder, tmp_path, pretrained_tiny_weights, cache_features):
    from edgesmith.train import train

    write_shards(digits_folder, tmp_path / "shards")
    recipe = tiny_recipe(data={"dataset": "folder", "val_fraction": 0.2},
                         model={"weights": str(pretrained_tiny_weights)},
                         train={"head_epochs": 2, "finetune_epochs": 1, "unfreeze_layers": 4,
                                "cache_features": cache_features})
    results = {}
    for name, path in (("folder", digits_folder), ("shards", tmp_path / "shards")):
        data = load_dataset(recipe.data, seed=recipe.seed, data_path=path)
        results[name] = train(data, recipe).history
    accuracy = {name: history["finetune"]["val_accuracy"][-1] for name, history in results.items()}
    print(accuracy)
    assert accuracy["folder"] > 0.5, accuracy  # it learned something (chance is 0.1)
    if cache_features:  # activations computed in the same order from the same pixels: the same run
        assert results["shards"] == results["folder"]
    else:  # the same examples in another order: the same accuracy band
        assert abs(accuracy["shards"] - accuracy["folder"]) <= 0.1, accuracy


def test_batches_of_mixed_image_sizes_resize_image_by_image_to_the_same_pixels(tmp_path):
    root = write_image_folder(tmp_path / "a", per_class=3, test_per_class=2, size=20)
    write_image_folder(tmp_path / "b", per_class=2, test_per_class=1, size=13, seed=1)
    for extra in (tmp_path / "b" / "train").rglob("*.*"):
        shutil.copy(extra, root / "train" / extra.parent.name / f"b{extra.name}")
    split = image_folder(root).train
    batches = make_pipeline(split, PreprocessSpec(SIZE, "raw"), batch_size=4)
    pixels = np.concatenate([x for x, _ in batches.as_numpy_iterator()])
    singles = np.stack([x for x, _ in pixels_dataset(split, SIZE).as_numpy_iterator()])  # image by image
    np.testing.assert_array_equal(pixels, singles)
    np.testing.assert_array_equal(load_pixels(split, SIZE)[0], singles)


def test_streamed_split_knows_its_length(shards):
    split = shard_dataset(shards).train.take(np.arange(0, 31, 2))
    batches = make_pipeline(split, PreprocessSpec(SIZE, "unit"), batch_size=4, shuffle_seed=0)
    assert int(batches.cardinality()) == 4  # 16 rows: the fine-tune schedule can plan its steps
