"""tf.data pipelines: parallel decode, resize to the model's input size, normalize, batch, prefetch.

Images are decoded to uint8 at their stored size; ``cache`` keeps that compact form (CIFAR-10's
50,000 training images: 154 MB, against 5.5 GB as float32 at 96x96) and every epoch resizes from it.
Resizing and normalizing work on whole batches (one op per batch instead of one per image); batches
of images of different sizes fall back to resizing image by image, with the same result.
Splits read from shards stream instead: nothing is cached, the shuffle buffer holds encoded records.
"""

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
        return _decode_with_tf(path)
    return tf.cond(use_pillow, lambda: _decode_with_pillow(path), lambda: _decode_with_tf(path))


def _resize(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    image = tf.cast(image, tf.float32)
    return tf.image.resize(image, size, method="bilinear")


def _file_images(split: Split) -> tf.data.Dataset:
    files = tf.data.Dataset.from_tensor_slices(split.files)
    if split.use_pillow is None or not split.use_pillow.any():
        return files.map(_decode_file, num_parallel_calls=AUTOTUNE)
    flags = tf.data.Dataset.from_tensor_slices(split.use_pillow)
    return tf.data.Dataset.zip((files, flags)).map(_decode_file, num_parallel_calls=AUTOTUNE)


def is_streamed(split: Split) -> bool:
    """True for a split read from shards: pipelines stream it instead of caching it in memory."""
    return split.shards is not None


def decoded_dataset(split: Split, *, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Unbatched (uint8 RGB image at its stored size, label), in split order.

    ``shuffle_seed`` only applies to a streamed split (its records are shuffled before decoding);
    other splits come in order and :func:`make_pipeline` shuffles them after the cache.
    """
    if is_streamed(split):
        from edgesmith.data.shards import decoded_records

        return decoded_records(split, shuffle_seed=shuffle_seed)
    labels = tf.data.Dataset.from_tensor_slices(split.labels)
    if split.files is not None:
        images = _file_images(split)
    else:
        images = tf.data.Dataset.from_tensor_slices(split.images)
    return tf.data.Dataset.zip((images, labels))


def _batched(data: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Batches of uint8 images: dense when every image has one static shape, ragged otherwise."""
    if data.element_spec[0].shape.is_fully_defined():
        return data.batch(batch_size)
    return data.ragged_batch(batch_size)


def _resize_batch(images: tf.Tensor | tf.RaggedTensor, size: tuple[int, int]) -> tf.Tensor:
    """float32 (B, H, W, 3) in 0..255: one resize for a batch of same-size images, else one per image."""
    if not isinstance(images, tf.RaggedTensor):
        return _resize(images, size)
    bounds = images.bounding_shape()
    same_size = tf.reduce_all(tf.equal(images.row_lengths(), bounds[1])) & tf.reduce_all(
        tf.equal(images.values.row_lengths(), bounds[2]))
    one_by_one = tf.TensorSpec([*size, 3], tf.float32)
    return tf.cond(
        same_size,
        lambda: _resize(images.to_tensor(), size),
        lambda: tf.map_fn(lambda image: _resize(image.to_tensor(), size), images, fn_output_signature=one_by_one),
    )


def pixel_batches(split: Split, size: tuple[int, int], batch_size: int, *, limit: int = 0) -> tf.data.Dataset:
    """Batches of (float32 RGB pixels in 0..255 resized to ``size``, labels), in split order."""
    data = decoded_dataset(split)
    if limit:
        data = data.take(limit)
    return _batched(data, batch_size).map(lambda x, y: (_resize_batch(x, size), y), num_parallel_calls=AUTOTUNE)


def pixels_dataset(split: Split, size: tuple[int, int]) -> tf.data.Dataset:
    """Unbatched float32 RGB pixels in 0..255 resized to ``size``, paired with labels, in split order."""
    return decoded_dataset(split).map(lambda x, y: (_resize(x, size), y), num_parallel_calls=AUTOTUNE)


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
        cache: keep the decoded uint8 images in memory after the first pass (ignored for a split
            read from shards, which streams every epoch).
    """
    streamed = is_streamed(split)
    data = decoded_dataset(split, shuffle_seed=shuffle_seed if streamed else None)
    if cache and not streamed:
        data = data.cache()
    if shuffle_seed is not None and not streamed:
        data = data.shuffle(min(len(split), 20_000), seed=shuffle_seed, reshuffle_each_iteration=True)
    def prepare(images: tf.Tensor | tf.RaggedTensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        pixels = _resize_batch(images, spec.input_size)
        return spec.normalize(tf.image.flip_left_right(pixels) if flip else pixels), labels

    data = _batched(data, batch_size).map(prepare, num_parallel_calls=AUTOTUNE)
    if random_flip:  # sequential: a stateful random op in a parallel map draws in a nondeterministic order
        data = data.map(lambda x, y: (tf.image.random_flip_left_right(x), y))
    return data.prefetch(AUTOTUNE)


def load_pixels(split: Split, size: tuple[int, int], limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The split's images as one float32 array (N, H, W, 3) in 0..255 and its labels, in order."""
    batches = list(pixel_batches(split, size, 256, limit=limit).prefetch(AUTOTUNE).as_numpy_iterator())
    images = np.concatenate([b[0] for b in batches]).astype(np.float32)
    labels = np.concatenate([b[1] for b in batches])
    return images, labels
