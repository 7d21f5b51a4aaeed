"""TFRecord shards of an image folder: written once, streamed by training, evaluation and bench.

``write_shards`` scans the folder exactly as :func:`edgesmith.data.datasets.image_folder` does (the
same validation, the same skipped files) and writes, per split, the images' original encoded bytes
and integer labels into files of about ``shard_size_mb`` each, plus ``index.json``: the format
version, class names, counts per split and class, the skipped files, and for every shard its file
name, byte size, record count and sha256. Files that TensorFlow's decoder misreads (BMP, GIF, ...)
are stored as lossless PNGs of the pixels Pillow decodes, so every record decodes with TensorFlow and
to the same pixels as the folder loader gives.

Records keep the folder loader's order (class by class, files sorted), so a record's position in its
split is the row of the folder loader's split: subsets and validation splits pick the same rows, and
an unshuffled read yields the same images in the same order. Training reads stream: shard files in a
seeded order, interleaved, a shuffle buffer of encoded records (bounded in bytes), parallel decode.

Shards are checked before use: every file's size on every open, its sha256 on the first open in a
process (``verify="size"`` skips the hash). A missing, truncated or altered shard is a
:class:`~edgesmith.errors.DataError` naming the file and telling the user to re-run ``edgesmith data shard``.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith._keras import tf
from edgesmith.data.datasets import ImageDataset, Split, image_folder
from edgesmith.data.validate import FileCheck, decode_rgb8
from edgesmith.errors import DataError
from edgesmith.runs import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)
INDEX_FILE = "index.json"
FORMAT = "edgesmith-shards"
VERSION = 1
SHUFFLE_BUFFER_BYTES = 64 << 20  # encoded records held for shuffling: 53,000 CIFAR-10 JPEGs, 600 ImageNet ones
MAX_SHUFFLE_RECORDS = 20_000  # the folder pipeline's buffer
CYCLE_LENGTH = 8  # shard files read at once while training
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of shards whose sha256 matched


@dataclass(frozen=True)
class ShardFiles:
    """One split's shard files in record order, with the position of each file's first record."""

    paths: tuple[str, ...]
    offsets: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)


# ---------------------------------------------------------------- writing


def write_shards(
    image_dir: str | Path,
    out_dir: str | Path,
    *,
    shard_size_mb: float = 100.0,
    force: bool = False,
    strict: bool = False,
) -> dict[str, Any]:
    """Write an image folder as TFRecord shards plus ``index.json`` into ``out_dir``; return the index.

    The folder is scanned by :func:`~edgesmith.data.datasets.image_folder` (unreadable files are
    skipped and logged, or fail the call with ``strict``). Everything is written into a temporary
    folder beside ``out_dir`` and renamed into place when complete.

    Args:
        image_dir: ``train/<class>/*`` with ``test/`` (or ``val/``) beside it.
        out_dir: the shard directory to create.
        shard_size_mb: start a new shard file once a file would exceed this many MB (1 MB = 2**20 bytes).
        force: replace an existing ``out_dir``.
        strict: unreadable image files fail the call instead of being skipped.

    Raises:
        DataError: see ``image_folder``; also a non-positive ``shard_size_mb``, or ``out_dir`` exists
            and ``force`` is not set.
    """
    out_dir = Path(out_dir)
    if shard_size_mb <= 0:
        raise DataError(f"--shard-size-mb {shard_size_mb}: must be a positive number of MB, e.g. 100")
    if out_dir.exists() and not force:
        raise DataError(f"{out_dir} already exists; pass --force to replace it or choose another --out")
    data = image_folder(image_dir, strict=strict)
    started = time.perf_counter()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        shard_bytes = int(shard_size_mb * 2**20)
        splits = {name: _write_split(tmp, name, getattr(data, name), data.num_classes, shard_bytes)
                  for name in ("train", "test")}
        index = _index(data, Path(image_dir), splits)
        write_json(tmp / INDEX_FILE, index)
        trash = _set_aside(out_dir)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    total = sum(s["bytes"] for split in splits.values() for s in split["shards"])
    log.info("wrote %s: %d shard files, %.1f MB, in %.1f s", out_dir, sum(len(s["shards"]) for s in splits.values()),
             total / 2**20, time.perf_counter() - started)
    return index


def _set_aside(out_dir: Path) -> Path | None:
    """Move an existing ``out_dir`` out of the way (deleted once the new one is in place)."""
    if not out_dir.exists():
        return None
    trash = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, trash)
    return trash


def _index(data: ImageDataset, image_dir: Path, splits: dict[str, dict]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "source": data.source,
        "record": {"image": "the file's encoded bytes (JPEG, PNG; other formats as lossless PNG)",
                   "label": "class index into class_names"},
        "class_names": list(data.class_names),
        "splits": splits,
        "skipped": [{"path": os.path.relpath(c.path, image_dir), "reason": c.reason} for c in data.skipped],
    }


def _write_split(folder: Path, name: str, split: Split, num_classes: int, shard_bytes: int) -> dict[str, Any]:
    """Write one split's records in order into ``<name>-NNNNN.tfrecord`` files; describe them."""
    shards, started, step = [], time.perf_counter(), max(1, len(split) // 10)
    for done, (path, count) in enumerate(_fill_shards(folder, name, _records(split), shard_bytes), 1):
        shards.append({"file": path.name, "records": count, "bytes": path.stat().st_size,
                       "sha256": sha256_file(path)})
        written = sum(s["records"] for s in shards)
        if written // step != (written - count) // step or written == len(split):
            log.info("%s: %d/%d images (%.0f%%) in %d shard(s), %.1f s", name, written, len(split),
                     100 * written / max(1, len(split)), done, time.perf_counter() - started)
    return {"count": len(split), "counts": split.class_counts(num_classes), "shards": shards}


def _fill_shards(folder: Path, name: str, records: Iterator[bytes], shard_bytes: int) -> Iterator[tuple[Path, int]]:
    """Write serialized records into numbered files of at most ``shard_bytes``; yield (file, records)."""
    number, writer, size, count, path = 0, None, 0, 0, None
    for record in records:
        framed = len(record) + 16  # TFRecord framing: length, two CRCs
        if writer is not None and size + framed > shard_bytes:
            writer.close()
            yield path, count
            writer, number = None, number + 1
        if writer is None:
            path, size, count = folder / f"{name}-{number:05d}.tfrecord", 0, 0
            writer = tf.io.TFRecordWriter(str(path))
        writer.write(record)
        size, count = size + framed, count + 1
    if writer is not None:
        writer.close()
        yield path, count


def _records(split: Split) -> Iterator[bytes]:
    pillow = split.use_pillow if split.use_pillow is not None else np.zeros(len(split), dtype=bool)
    for path, label, use_pillow in zip(split.files, split.labels, pillow, strict=True):
        yield _example(_png_bytes(path) if use_pillow else Path(path).read_bytes(), int(label))


def _png_bytes(path: str) -> bytes:
    """A lossless PNG of the pixels Pillow decodes, for a format TensorFlow misreads."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(decode_rgb8(path)).save(buffer, format="PNG")
    return buffer.getvalue()


def _example(image: bytes, label: int) -> bytes:
    feature = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        "image": feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": feature(int64_list=tf.train.Int64List(value=[label])),
    })).SerializeToString()


# ---------------------------------------------------------------- opening


def is_shard_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder holding an ``index.json`` (a shard directory, not an image folder)."""
    return (Path(path) / INDEX_FILE).is_file()


def read_index(shard_dir: str | Path) -> dict[str, Any]:
    """The shard directory's ``index.json``, checked for its format and version."""
    path = Path(shard_dir) / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); {_rerun(shard_dir)}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path}: not an edgesmith shard index (no \"format\": \"{FORMAT}\"); {_rerun(shard_dir)}")
    if index.get("version") != VERSION:
        raise DataError(f"{path}: shard format version {index.get('version')} is not the supported "
                        f"version {VERSION}; {_rerun(shard_dir)}")
    return index


def verify_shards(shard_dir: str | Path, index: dict[str, Any], *, verify: str = "sha256") -> None:
    """Check every shard file named by ``index``: present, the recorded size, and (``verify="sha256"``) hash.

    The hash is computed once per process for a file whose size and modification time stay the same.

    Raises:
        DataError: naming the first missing, truncated or altered shard.
    """
    if verify not in ("sha256", "size"):
        raise DataError(f"verify={verify!r}: choose 'sha256' (size and hash) or 'size' (size only)")
    for split in index["splits"].values():
        for shard in split["shards"]:
            _verify_shard(Path(shard_dir) / shard["file"], shard, full=verify == "sha256")


def _verify_shard(path: Path, shard: dict[str, Any], *, full: bool) -> None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing; {_rerun(path.parent)}") from None
    if stat.st_size != shard["bytes"]:
        raise DataError(f"shard {path} is {stat.st_size} bytes, index.json says {shard['bytes']} (truncated or "
                        f"altered); {_rerun(path.parent)}")
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if not full or key in _VERIFIED:
        return
    if sha256_file(path) != shard["sha256"]:
        raise DataError(f"shard {path}: sha256 differs from index.json (corrupt); {_rerun(path.parent)}")
    _VERIFIED.add(key)


def _rerun(shard_dir: str | Path) -> str:
    return f"re-run `edgesmith data shard IMAGE_DIR --out {shard_dir} --force` to rewrite the shards"


def shard_dataset(shard_dir: str | Path, *, name: str | None = None, strict: bool = False,
                  verify: str = "sha256") -> ImageDataset:
    """An :class:`ImageDataset` whose splits stream from the shards (checked first, see :func:`verify_shards`).

    Its train and test splits hold the same rows, labels and class names as ``image_folder`` gives
    for the folder the shards were written from, so subsets and validation splits pick the same images.
    The files skipped while writing are listed in ``skipped``; with ``strict`` they fail the load.
    """
    shard_dir = Path(shard_dir)
    index = read_index(shard_dir)
    verify_shards(shard_dir, index, verify=verify)
    splits = {key: _split(shard_dir, index["splits"][key]) for key in ("train", "test")}
    skipped = tuple(FileCheck(s["path"], False, reason=s["reason"]) for s in index.get("skipped", []))
    if strict and skipped:
        raise DataError(f"{shard_dir}: {len(skipped)} unreadable image file(s) were left out when the shards "
                        f"were written (first: {skipped[0].path}, {skipped[0].reason}); fix them and re-run "
                        "`edgesmith data shard`, or run without --strict")
    return ImageDataset(name or shard_dir.name, tuple(index["class_names"]), splits["train"], splits["test"],
                        source=str(shard_dir.resolve()), skipped=skipped)


def _split(shard_dir: Path, entry: dict[str, Any]) -> Split:
    counts = [s["records"] for s in entry["shards"]]
    files = ShardFiles(tuple(str(shard_dir / s["file"]) for s in entry["shards"]),
                       tuple(int(x) for x in np.cumsum([0, *counts[:-1]])), tuple(counts))
    labels = np.repeat(np.arange(len(entry["counts"]), dtype=np.int64), entry["counts"])  # class by class
    return Split(labels=labels, records=np.arange(len(labels), dtype=np.int64), shards=files)


# ---------------------------------------------------------------- reading


def decoded_records(split: Split, *, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """(uint8 RGB image at its stored size, label) for the split's rows, streamed from its shards.

    Without ``shuffle_seed`` the rows come in split order, read file after file. With it, the files
    are taken in a seeded order reshuffled every epoch, read ``CYCLE_LENGTH`` at a time (interleaved,
    in parallel), and the encoded records pass a shuffle buffer before they are decoded in parallel.
    """
    files = split.shards
    if split.records is None or files is None:
        raise ValueError("decoded_records needs a split read from shards")
    if np.any(np.diff(split.records) <= 0):
        raise ValueError("shard splits keep their rows in ascending record order")
    wanted = np.zeros(files.total, dtype=bool)
    wanted[split.records] = True
    chosen = [i for i, (o, c) in enumerate(zip(files.offsets, files.counts, strict=True)) if wanted[o : o + c].any()]
    sources = tf.data.Dataset.from_tensor_slices(
        (np.asarray(files.paths)[chosen], np.asarray(files.offsets, dtype=np.int64)[chosen])
    )
    if shuffle_seed is None:
        records = sources.flat_map(_numbered_records)
    else:
        records = sources.shuffle(len(chosen), seed=shuffle_seed, reshuffle_each_iteration=True).interleave(
            _numbered_records, cycle_length=min(len(chosen), CYCLE_LENGTH), num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True)
    keep = tf.constant(wanted)
    records = records.filter(lambda position, record: tf.gather(keep, position)).apply(
        tf.data.experimental.assert_cardinality(len(split.records)))  # known length: epochs plan their steps
    if shuffle_seed is not None:
        buffer = _shuffle_buffer(files, len(split.records))
        records = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    return records.map(lambda position, record: parse_record(record), num_parallel_calls=tf.data.AUTOTUNE)


def _numbered_records(path: tf.Tensor, offset: tf.Tensor) -> tf.data.Dataset:
    """(position in the split, serialized record) for every record of one shard file."""
    records = tf.data.TFRecordDataset(path, buffer_size=1 << 20)
    return tf.data.Dataset.zip((tf.data.Dataset.range(offset, offset + (1 << 62)), records))


def _shuffle_buffer(files: ShardFiles, rows: int) -> int:
    """Records that fit in ``SHUFFLE_BUFFER_BYTES`` (at the shards' mean record size), at most 20,000."""
    mean_bytes = sum(os.path.getsize(p) for p in files.paths) / max(1, files.total)
    return max(1, min(rows, MAX_SHUFFLE_RECORDS, int(SHUFFLE_BUFFER_BYTES / max(1.0, mean_bytes))))


def parse_record(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A serialized record -> (uint8 RGB image, int64 label), decoded as the folder loader decodes files."""
    parsed = tf.io.parse_single_example(record, {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
    })
    image = tf.io.decode_image(parsed["image"], channels=3, expand_animations=False)
    return image, parsed["label"]

