"""Data sets: an image folder (``train/<class>/*.jpg`` + ``test/`` or ``val/``) and named sets.

A data set is a list of splits; each split holds image file paths (decoded lazily by the
tf.data pipeline), an in-memory uint8 array, or rows of TFRecord shards (streamed, see
:mod:`edgesmith.data.shards`), plus integer labels. Class names come from the
folder names, sorted, and travel with the model in its :class:`PreprocessSpec`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.data.validate import FileCheck, ScanResult, scan_images
from edgesmith.errors import DataError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
HELD_OUT_NAMES = ("test", "val", "validation")


@dataclass(frozen=True)
class Split:
    """One split: labels plus ``files`` (paths), ``images`` (uint8 N x H x W x 3) or shard ``records``.

    ``use_pillow`` marks the files TensorFlow's decoder misreads (see :mod:`edgesmith.data.validate`);
    the pipeline decodes those through Pillow. None means every file decodes with TensorFlow.
    ``records`` are the rows' positions in ``shards`` (a :class:`edgesmith.data.shards.ShardFiles`),
    ascending; the pipeline streams them from the shard files.
    """

    labels: np.ndarray
    files: np.ndarray | None = None
    images: np.ndarray | None = None
    use_pillow: np.ndarray | None = None
    records: np.ndarray | None = None
    shards: Any = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> Split:
        """The rows at ``indices``, in that order."""
        def pick(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[indices]

        return Split(labels=self.labels[indices], files=pick(self.files), images=pick(self.images),
                     use_pillow=pick(self.use_pillow), records=pick(self.records), shards=self.shards)

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()


@dataclass(frozen=True)
class ImageDataset:
    """A data set of labelled RGB images with train, validation and held-out test splits."""

    name: str
    class_names: tuple[str, ...]
    train: Split
    test: Split
    val: Split | None = None
    source: str = ""
    skipped: tuple[FileCheck, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        """Counts per split and class, and the unreadable files that were skipped, for the manifest."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {
            "name": self.name,
            "source": self.source,
            "class_names": list(self.class_names),
            "counts": {k: s.class_counts(self.num_classes) for k, s in splits.items() if s is not None},
            "skipped": [{"path": c.path, "reason": c.reason} for c in self.skipped],
        }


def image_folder(root: str | Path, *, name: str | None = None, strict: bool = False) -> ImageDataset:
    """Read an image folder laid out as ``train/<class>/*`` with ``test/`` (or ``val/``) beside it.

    Every image is checked first (:func:`edgesmith.data.validate.scan_images`). Unreadable files
    (corrupt, truncated, or not images despite their suffix) are skipped with a warning naming them
    and listed in :attr:`ImageDataset.skipped`, or, with ``strict``, fail the load. Hidden files and
    files without an image suffix are ignored.

    Raises:
        DataError: the folder is missing, has no ``train/``, a class folder has no (readable) images,
            the held-out split's classes differ from the training classes, or ``strict`` is set and
            some files are unreadable.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist; pass --data with a folder holding train/<class>/ images"
        )
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(
            f"{root}: no train/ folder; expected {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg"
        )
    class_names = _class_folders(train_dir)
    held_out_dir = next((root / n for n in HELD_OUT_NAMES if (root / n).is_dir()), None)
    if held_out_dir is None:
        raise DataError(f"{root}: no test/ or val/ folder beside train/; add one with the same class folders")
    if _class_folders(held_out_dir) != class_names:
        raise DataError(
            f"{held_out_dir}: class folders {list(_class_folders(held_out_dir))} differ from train/'s "
            f"{list(class_names)}; both splits need the same classes"
        )
    started = time.perf_counter()
    train, train_bad = _scan_split(train_dir, class_names, strict)
    test, test_bad = _scan_split(held_out_dir, class_names, strict)
    skipped = tuple(train_bad + test_bad)
    checked = len(train) + len(test) + len(skipped)
    log.info("%s: checked %d image files in %.1f s", root, checked, time.perf_counter() - started)
    _report_unreadable(root, skipped, strict)
    return ImageDataset(
        name or root.name, class_names, train, test, source=str(root.resolve()), skipped=skipped
    )


def _class_folders(split_dir: Path) -> tuple[str, ...]:
    names = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not names:
        raise DataError(f"{split_dir}: no class folders; put each class's images in {split_dir}/<class>/")
    if len(names) < 2:
        raise DataError(f"{split_dir}: only one class folder ({names[0]}); a classifier needs at least two")
    return names


def _image_files(class_dir: Path) -> list[str]:
    """Image files of a class folder, sorted; hidden files (``.DS_Store``, ``._x.jpg``) are ignored."""
    return sorted(
        str(p) for p in class_dir.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def _scan_split(split_dir: Path, class_names: tuple[str, ...], strict: bool) -> tuple[Split, list[FileCheck]]:
    """The split's readable images with labels, and the unreadable files found in it."""
    files, labels = [], []
    for index, class_name in enumerate(class_names):
        found = _image_files(split_dir / class_name)
        if not found:
            raise DataError(
                f"{split_dir / class_name}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                "add images or remove the folder"
            )
        files += found
        labels += [index] * len(found)
    files, labels = np.asarray(files), np.asarray(labels, dtype=np.int64)
    scan = scan_images(files.tolist())
    if not strict:
        _require_readable_per_class(split_dir, class_names, labels, scan)
    keep, pillow = scan.readable, scan.use_pillow[scan.readable]
    split = Split(labels=labels[keep], files=files[keep], use_pillow=pillow if pillow.any() else None)
    return split, scan.unreadable


def _require_readable_per_class(split_dir: Path, class_names: tuple[str, ...], labels: np.ndarray,
                               scan: ScanResult) -> None:
    readable = np.bincount(labels[scan.readable], minlength=len(class_names))
    for index in np.flatnonzero(readable == 0):
        class_dir = split_dir / class_names[index]
        bad = [c for c in scan.unreadable if Path(c.path).parent == class_dir]
        raise DataError(
            f"{class_dir}: none of its {len(bad)} images is readable ({_list_files(bad)}); "
            "replace them or remove the folder"
        )


def _report_unreadable(root: Path, unreadable: tuple[FileCheck, ...], strict: bool) -> None:
    if not unreadable:
        return
    if strict:
        raise DataError(
            f"{root}: {len(unreadable)} unreadable image file(s): {_list_files(unreadable, root)}; "
            "fix or remove them, or run without --strict to skip them"
        )
    log.warning(
        "%s: skipped %d unreadable image file(s): %s", root, len(unreadable), _list_files(unreadable, root)
    )


def _list_files(checks: Sequence[FileCheck], root: Path | None = None, limit: int = 10) -> str:
    """'a.jpg (reason), b.png (reason), ... and N more', paths relative to ``root`` when given."""
    named = [os.path.relpath(c.path, root) if root else Path(c.path).name for c in checks[:limit]]
    shown = [f"{name} ({check.reason})" for name, check in zip(named, checks, strict=False)]
    more = f" and {len(checks) - limit} more" if len(checks) > limit else ""
    return ", ".join(shown) + more


def digits(*, seed: int = 0, test_fraction: float = 0.2) -> ImageDataset:
    """scikit-learn's bundled 1,797 handwritten 8x8 digits as 0..255 RGB images (no network needed)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    whole = Split(labels=labels, images=images)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    names = tuple(str(i) for i in range(10))
    return ImageDataset(
        "digits", names, whole.take(train_idx), whole.take(test_idx), source="sklearn.datasets.load_digits"
    )


def cifar10_download() -> ImageDataset:
    """CIFAR-10 through Keras's downloader (needs a network the first time; cached in ~/.keras/datasets)."""
    from edgesmith._keras import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"could not download CIFAR-10 ({type(exc).__name__}: {exc}); pass --data with a local "
            "cifar10 folder (train/<class>/*.jpg) instead"
        ) from None
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    train = Split(labels=y_train.ravel().astype(np.int64), images=x_train)
    test = Split(labels=y_test.ravel().astype(np.int64), images=x_test)
    return ImageDataset("cifar10", names, train, test, source="keras.datasets.cifar10")


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out) with ``fraction`` of every class held out, seeded."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cut = int(round(len(idx) * fraction))
        held.append(idx[:cut])
        kept.append(idx[cut:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def limit_per_class(split: Split, limit: int, seed: int) -> Split:
    """A stratified subset with at most ``limit`` rows per class (0 keeps everything)."""
    if limit <= 0:
        return split
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(split.labels == c))[:limit] for c in np.unique(split.labels)]
    return split.take(np.sort(np.concatenate(picks)))


def with_validation(dataset: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """Carve a stratified validation split out of train (unless the data set already has one)."""
    if dataset.val is not None or fraction <= 0:
        return dataset
    kept, held = stratified_split(dataset.train.labels, fraction, seed)
    return replace(dataset, train=dataset.train.take(kept), val=dataset.train.take(held))


def load_dataset(
    config, *, seed: int, data_path: str | Path | None = None, strict: bool = False
) -> ImageDataset:
    """Load the data set a recipe's ``[data]`` section names, subset and split as configured.

    Args:
        config: a :class:`edgesmith.recipe.DataConfig`.
        seed: seeds the validation split and subsets.
        data_path: overrides ``config.path`` (the CLI's ``--data``). An image folder or a shard
            directory written by ``edgesmith data shard`` (recognized by its ``index.json``).
        strict: unreadable image files fail the load instead of being skipped (also set by a
            ``strict`` field of ``config``, if it has one).

    Raises:
        DataError: see :func:`image_folder`; also a ``data_path`` given for the bundled digits set,
            which reads no folder.
    """
    path = data_path or config.path
    strict = strict or bool(getattr(config, "strict", False))
    if config.dataset == "digits" and data_path:
        raise DataError(
            f"--data {data_path} was given, but data.dataset = 'digits' is bundled and reads no folder; "
            "set data.dataset = 'folder' (--set data.dataset=folder) to train on that folder"
        )
    if config.dataset == "digits":
        dataset = digits(seed=seed)
    elif path:
        from edgesmith.data.shards import is_shard_dir, shard_dataset

        name = config.dataset if config.dataset != "folder" else None
        read = shard_dataset if is_shard_dir(path) else image_folder
        dataset = read(path, name=name, strict=strict)
    elif config.dataset == "cifar10":
        dataset = cifar10_download()
    else:
        raise DataError("data.dataset = 'folder' needs a path: set data.path in the recipe or pass --data")
    dataset = replace(
        dataset,
        train=limit_per_class(dataset.train, config.limit_per_class, seed),
        test=limit_per_class(dataset.test, config.test_limit_per_class, seed),
    )
    dataset = with_validation(dataset, config.val_fraction, seed)
    log.info("data set %s: %s", dataset.name, {k: sum(v) for k, v in dataset.describe()["counts"].items()})
    return dataset
