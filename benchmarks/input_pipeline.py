"""Input pipeline speed: edgesmith's tf.data loader against Keras's ImageDataGenerator.flow_from_directory.

Both read the same CIFAR-10 JPEG folder, resize to the backbone's input size and apply MobileNet's
preprocessing; the number is images per second over the same images, measured in one run.

    python benchmarks/input_pipeline.py [--data ../shared/data/cifar10] [--images 10000] [--size 96]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import edgesmith._keras  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from edgesmith._keras import keras
from edgesmith.data.datasets import image_folder, limit_per_class
from edgesmith.data.pipeline import make_pipeline
from edgesmith.data.spec import PreprocessSpec


def time_batches(batches, images: int, batch_size: int) -> float:
    """Images per second while pulling ``images`` images out of an iterator of batches."""
    started, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch[0])
        if seen >= images:
            break
    return seen / (time.perf_counter() - started)


def keras_generator(root: Path, size: int, batch_size: int):
    generator = keras.preprocessing.image.ImageDataGenerator(
        preprocessing_function=keras.applications.mobilenet.preprocess_input
    )
    return generator.flow_from_directory(str(root / "train"), target_size=(size, size), batch_size=batch_size,
                                         class_mode="sparse", shuffle=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/cifar10")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    spec = PreprocessSpec((args.size, args.size), "tf")
    split = limit_per_class(image_folder(args.data).train, args.images // 10 + 1, seed=0)
    tfdata = time_batches(make_pipeline(split, spec, batch_size=args.batch_size), args.images, args.batch_size)
    keras_rate = time_batches(keras_generator(args.data, args.size, args.batch_size), args.images, args.batch_size)
    print(f"{'loader':<44} {'images/s':>10}")
    print(f"{'Keras ImageDataGenerator.flow_from_directory':<44} {keras_rate:>10.0f}")
    print(f"{'edgesmith tf.data (parallel decode, prefetch)':<44} {tfdata:>10.0f}")
    print(f"speed-up: {tfdata / keras_rate:.1f}x on {args.images} images at {args.size}x{args.size}")


if __name__ == "__main__":
    main()
