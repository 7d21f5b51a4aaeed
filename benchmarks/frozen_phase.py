"""Frozen-phase epoch time: training the head on cached backbone features against plain ``fit``.

While the backbone is frozen its output never changes, so edgesmith computes it once and trains the
head on the cached features. The baseline is the course's recipe: ``fit`` on the frozen model, which
runs the whole backbone forward every epoch. Both on the same CIFAR-10 images, in one run.

    python benchmarks/frozen_phase.py [--data ../shared/data/cifar10] [--images 5000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import edgesmith._keras  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from edgesmith._keras import keras, tf
from edgesmith.data.datasets import image_folder, limit_per_class
from edgesmith.data.pipeline import make_pipeline
from edgesmith.train.transfer import compile_for, set_trainable
from edgesmith.zoo import build_classifier, head_start


def epoch_seconds(model: keras.Model, data, epochs: int) -> float:
    """Mean seconds per epoch after the first (which includes tracing)."""
    times = []
    for _ in range(epochs + 1):
        started = time.perf_counter()
        model.fit(data, epochs=1, verbose=0)
        times.append(time.perf_counter() - started)
    return float(np.mean(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/cifar10")
    parser.add_argument("--images", type=int, default=5_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    split = limit_per_class(image_folder(args.data).train, args.images // 10, seed=0)
    model, spec = build_classifier("mobilenet", num_classes=10, input_size=args.size, weights="imagenet")
    base_end = head_start(model)
    set_trainable(model, range(base_end), False)
    pipeline = make_pipeline(split, spec, batch_size=64, shuffle_seed=0, cache=True)

    compile_for(model, 1e-3)
    plain = epoch_seconds(model, pipeline, args.epochs)

    started = time.perf_counter()
    backbone = keras.Model(model.input, model.layers[base_end - 1].output)
    run = tf.function(lambda x: backbone(x, training=False))
    features = np.concatenate([run(x).numpy() for x, _ in pipeline])
    labels = np.concatenate([y.numpy() for _, y in pipeline])
    cache_seconds = time.perf_counter() - started
    head = keras.Model(model.layers[base_end - 1].output, model.output)
    compile_for(head, 1e-3)
    cached = epoch_seconds(head, tf.data.Dataset.from_tensor_slices((features, labels)).batch(64), args.epochs)

    print(f"{'frozen phase, per epoch':<48} {'seconds':>8}")
    print(f"{'plain fit on the frozen model (baseline)':<48} {plain:>8.2f}")
    print(f"{'edgesmith: head on cached features':<48} {cached:>8.2f}")
    print(f"speed-up per epoch: {plain / cached:.1f}x on {len(labels)} images at {args.size}x{args.size}; "
          f"one-time feature cache: {cache_seconds:.1f} s")


if __name__ == "__main__":
    main()
