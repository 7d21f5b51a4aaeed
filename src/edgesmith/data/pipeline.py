"""tf.data pipelines: parallel decode, resize to the model's input size, normalize, batch, prefetch."""

from __future__ import annotations

import numpy as np

from edgesmith._keras import tf
from edgesmith.data.datasets import Split
from edgesmith.data.spec import PreprocessSpec
from edgesmith.data.validate import decode_rgb8

AUTOTUNE = tf.data.AUTOTUNE


def _decode_with_tf(path: tf.Tensor) -> tf.Tensor:
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def _decode_with_pillow(path: tf.Tensor) -> tf.Tensor:
    image = tf.numpy_function(decode_rgb8, [path], tf.uint8, stateful=False)
    image.set_shape([None, None, 3])
    return image


def _decode_file(path: tf.Tensor, use_pillow: tf.Tensor | None = None) -> tf.Tensor:
    """uint8 RGB from a file, through Pillow where the scan found TensorFlow's decoder misreads it."""
    if use_pillow is None:
        image = _decode_with_tf(path)
    else:
        image = tf.cond(use_pillow, lambda: _decode_with_pillow(path), lambda: _decode_with_tf(path))
    return tf.cast(image, tf.float32)


def _resize(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    image = tf.cast(image, tf.float32)
    return tf.image.resize(image, size, method="bilinear")


def _file_images(split: Split) -> tf.data.Dataset:
    files = tf.data.Dataset.from_tensor_slices(split.files)
    if split.use_pillow is None or not split.use_pillow.any():
        return files.map(_decode_file, num_parallel_calls=AUTOTUNE)
    flags = tf.data.Dataset.from_tensor_slices(split.use_pillow)
    return tf.data.Dataset.zip((files, flags)).map(_decode_file, num_parallel_calls=AUTOTUNE)


def pixels_dataset(split: Split, size: tuple[int, int]) -> tf.data.Dataset:
    """Unbatched float32 RGB pixels in 0..255 resized to ``size``, paired with labels, in split order."""
    labels = tf.data.Dataset.from_tensor_slices(split.labels)
    if split.files is not None:
        images = _file_images(split)
    else:
        images = tf.data.Dataset.from_tensor_slices(split.images)
    images = images.map(lambda x: _resize(x, size), num_parallel_calls=AUTOTUNE)
    return tf.data.Dataset.zip((images, labels))


def make_pipeline(
    split: Split,
    spec: PreprocessSpec,
    *,
    batch_size: int,
    shuffle_seed: int | None = None,
    flip: bool = False,
    random_flip: bool = False,
    cache: bool = False,
) -> tf.data.Dataset:
    """Batches of (model input, label) for training or evaluation.

    Args:
        split: the images and labels.
        spec: the model's preprocessing (size and normalization).
        batch_size: rows per batch.
        shuffle_seed: shuffle every epoch with this seed (None keeps the split's order).
        flip: mirror every image left-right (used to cache a flipped copy of a frozen phase's inputs).
        random_flip: mirror each image with probability 1/2 (training augmentation).
        cache: keep decoded, resized images in memory after the first pass.
    """
    data = pixels_dataset(split, spec.input_size)
    if cache:
        data = data.cache()
    if shuffle_seed is not None:
        data = data.shuffle(min(len(split), 20_000), seed=shuffle_seed, reshuffle_each_iteration=True)
    if flip:
        data = data.map(lambda x, y: (tf.image.flip_left_right(x), y), num_parallel_calls=AUTOTUNE)
    if random_flip:  # sequential: a stateful random op in a parallel map draws in a nondeterministic order
        data = data.map(lambda x, y: (tf.image.random_flip_left_right(x), y))
    data = data.map(lambda x, y: (spec.normalize(x), y), num_parallel_calls=AUTOTUNE)
    return data.batch(batch_size).prefetch(AUTOTUNE)


def load_pixels(split: Split, size: tuple[int, int], limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The split's images as one float32 array (N, H, W, 3) in 0..255 and its labels, in order."""
    data = pixels_dataset(split, size)
    if limit:
        data = data.take(limit)
    batches = list(data.batch(256).prefetch(AUTOTUNE).as_numpy_iterator())
    images = np.concatenate([b[0] for b in batches]).astype(np.float32)
    labels = np.concatenate([b[1] for b in batches])
    return images, labels
