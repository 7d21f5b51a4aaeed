"""Input pipeline speed: edgesmith's tf.data loaders against Keras's ImageDataGenerator.flow_from_directory.

What a training loop sees: every loader delivers shuffled batches of MobileNet inputs (resized to
--size, scaled to [-1, 1], float32) of the same --images CIFAR-10 training JPEGs, for --epochs epochs.
The epochs of the loaders alternate (Keras epoch 1, folder epoch 1, shards epoch 1, Keras epoch 2, ...)
so a change in the machine's load hits all of them alike. Files are read once beforehand, so every
loader finds them in the page cache.

- Keras: ``ImageDataGenerator(preprocessing_function=mobilenet.preprocess_input).flow_from_directory``
  on a folder holding exactly those images, ``shuffle=True``, its default (nearest) resizing; the
  course's loader, one image at a time in Python (PIL decode and resize, NumPy preprocessing).
- edgesmith folder: ``make_pipeline(..., cache=True)`` as the trainer uses it: parallel decode of
  the files at their stored size, uint8 cache after epoch 1, shuffle, bilinear resize and normalize
  on whole batches, prefetch, AUTOTUNE.
- edgesmith shards: the same pipeline on TFRecord shards of the same images (``edgesmith data shard``);
  streamed: no cache, every epoch reads and decodes the shards again (interleave, shuffle buffer of
  encoded records, parallel decode).

    python benchmarks/input_pipeline.py [--data ../shared/data/cifar10] [--images 10000] [--size 96] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import edgesmith._keras  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from edgesmith._keras import keras
from edgesmith.data.datasets import Split, image_folder, limit_per_class
from edgesmith.data.pipeline import make_pipeline
from edgesmith.data.shards import shard_dataset, write_shards
from edgesmith.data.spec import PreprocessSpec

Epoch = Callable[[], int]  # runs one epoch, returns the images it delivered


def link_folder(split: Split, class_names: tuple[str, ...], root: Path, test: Split) -> Path:
    """A folder of symbolic links to exactly ``split``'s files (plus a small test/ split for the shard writer)."""
    for name, part in (("train", split), ("test", test)):
        for path, label in zip(part.files, part.labels, strict=True):
            target = root / name / class_names[label] / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(Path(path).resolve())
    return root


def warm_page_cache(files) -> None:
    for path in files:
        Path(path).read_bytes()


def keras_epochs(root: Path, size: int, batch_size: int) -> Epoch:
    generator = keras.preprocessing.image.ImageDataGenerator(
        preprocessing_function=keras.applications.mobilenet.preprocess_input
    ).flow_from_directory(str(root / "train"), target_size=(size, size), batch_size=batch_size,
                          class_mode="sparse", shuffle=True, seed=0)

    return lambda: sum(len(next(generator)[1]) for _ in range(len(generator)))  # reshuffles every epoch


def tfdata_epochs(split: Split, spec: PreprocessSpec, batch_size: int) -> Epoch:
    pipeline = make_pipeline(split, spec, batch_size=batch_size, shuffle_seed=0, cache=True)
    return lambda: sum(int(labels.shape[0]) for _, labels in pipeline)


def timed(epoch: Epoch) -> tuple[float, int]:
    started = time.perf_counter()
    images = epoch()
    return time.perf_counter() - started, images


def run_alternating(loaders: dict[str, Epoch], epochs: int) -> dict[str, list[tuple[float, int]]]:
    times: dict[str, list[tuple[float, int]]] = {name: [] for name in loaders}
    for _ in range(epochs):
        for name, epoch in loaders.items():
            times[name].append(timed(epoch))
    return times


def rate(parts: list[tuple[float, int]]) -> float:
    return sum(n for _, n in parts) / sum(t for t, _ in parts)


def print_table(times: dict[str, list[tuple[float, int]]], baseline: str) -> Iterator[str]:
    head = f"{'loader':<28} {'epoch 1':>10} {'epochs 2+':>10} {'all':>10} {'x Keras (all)':>14} {'x Keras (ep. 1)':>16}"
    yield head
    yield "-" * len(head)
    base_all, base_first = rate(times[baseline]), rate(times[baseline][:1])
    for name, parts in times.items():
        later = f"{rate(parts[1:]):>10.0f}" if len(parts) > 1 else f"{'-':>10}"
        yield (f"{name:<28} {rate(parts[:1]):>10.0f} {later} {rate(parts):>10.0f} "
               f"{rate(parts) / base_all:>13.1f}x {rate(parts[:1]) / base_first:>15.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/cifar10")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    spec = PreprocessSpec((args.size, args.size), "tf")
    data = image_folder(args.data)
    split = limit_per_class(data.train, args.images // data.num_classes, seed=0)
    with tempfile.TemporaryDirectory(prefix="edgesmith-bench-") as tmp:
        root = link_folder(split, data.class_names, Path(tmp) / "images", limit_per_class(data.test, 2, seed=0))
        warm_page_cache(split.files)
        started = time.perf_counter()
        write_shards(root, Path(tmp) / "shards", shard_size_mb=16)
        shard_seconds = time.perf_counter() - started
        shards = shard_dataset(Path(tmp) / "shards")
        loaders = {
            "Keras flow_from_directory": keras_epochs(root, args.size, args.batch_size),
            "edgesmith tf.data, folder": tfdata_epochs(image_folder(root).train, spec, args.batch_size),
            "edgesmith tf.data, shards": tfdata_epochs(shards.train, spec, args.batch_size),
        }
        times = run_alternating(loaders, args.epochs)
    print(f"\n{len(split)} CIFAR-10 training images -> shuffled batches of {args.batch_size} MobileNet inputs "
          f"({args.size}x{args.size}x3 float32 in [-1, 1]), {args.epochs} epochs, images/s; "
          f"{len(os.sched_getaffinity(0))} CPU cores, load average {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(print_table(times, "Keras flow_from_directory")))
    print(f"\nepoch 1: includes reading and decoding every file (folder) or record (shards); "
          f"epochs 2+: the folder loader resizes from its uint8 cache, the shard loader decodes again.\n"
          f"all: images delivered over all {args.epochs} epochs / their total time (what a training run sees).\n"
          f"writing the shards once took {shard_seconds:.1f} s (the folder loader's scan of the files not included).")


if __name__ == "__main__":
    main()
