"""On-disk cache of the activations at the freeze boundary, so a second training skips computing them.

A cache file is named by a sha256 over everything its contents depend on: the layers up to the
boundary (their config and weights), the preprocessing spec (input size, normalization), the data
(labels, and each image file's path, size and modification time, or the in-memory pixels), the
augmentation (mirrored or not) and the dtype policy. Change any of these and the key changes.

Files live in ``$EDGESMITH_CACHE_DIR`` (default ``~/.cache/edgesmith/features``) as ``<key>.npz``,
written atomically; an unreadable or inconsistent file is recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith._keras import keras
from edgesmith.data.datasets import Split
from edgesmith.data.spec import PreprocessSpec
from edgesmith.errors import RunDirError
from edgesmith.runs import atomic_path

log = logging.getLogger(__name__)
CACHE_ENV = "EDGESMITH_CACHE_DIR"
FORMAT = "edgesmith-boundary-features-v1"
Arrays = tuple[np.ndarray, np.ndarray]


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "edgesmith" / "features"


def features_key(lower: keras.Model, spec: PreprocessSpec, split: Split, *, flip: bool, policy: str) -> str:
    """The sha256 naming the boundary activations of ``split`` under ``lower`` (see the module docstring)."""
    digest = hashlib.sha256(FORMAT.encode())
    settings = {"layers": layer_configs(lower), "spec": spec.to_dict(), "flip": flip, "policy": policy}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for weights in lower.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    _hash_split(digest, split)
    return digest.hexdigest()


def layer_configs(model: keras.Model) -> list[tuple[str, dict]]:
    """Each layer's class and configuration without its name: Keras numbers auto-named layers per process
    (``input_1``, ``input_2``), so names would give the same layers a new key in every process."""
    return [(type(layer).__name__, {k: v for k, v in layer.get_config().items() if k != "name"})
            for layer in model.layers]


def _hash_split(digest: hashlib._Hash, split: Split) -> None:
    digest.update(np.ascontiguousarray(split.labels).tobytes())
    if split.images is not None:
        digest.update(np.ascontiguousarray(split.images).tobytes())
    _hash_files(digest, split.files if split.files is not None else ())
    if split.records is not None:  # shard rows: which records, of which shard files
        digest.update(np.ascontiguousarray(split.records).tobytes())
        _hash_files(digest, split.shards.paths)


def _hash_files(digest: hashlib._Hash, names: Any) -> None:
    """Each file's resolved path, size and modification time (not its bytes: 60,000 JPEGs would take seconds).

    Resolved, so ``--data ../shared/data/cifar10`` and the absolute path a run records share one cache.
    """
    for name in names:
        stat = os.stat(name)
        digest.update(f"{os.path.realpath(name)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())


def cached_features(key: str, rows: int, compute: Callable[[], Arrays]) -> Arrays:
    """(features, labels) from the cache file for ``key``, or from ``compute()`` (then written to the cache)."""
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        loaded = _load(path, rows)
        if loaded is not None:
            return loaded
    started = time.perf_counter()
    features, labels = compute()
    _save(path, features, labels, time.perf_counter() - started)
    return features, labels


def _load(path: Path, rows: int) -> Arrays | None:
    started = time.perf_counter()
    try:
        with np.load(path) as stored:
            features, labels, seconds = stored["features"], stored["labels"], float(stored["seconds"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("feature cache %s is unreadable (%s); recomputing it", path, exc)
        return None
    if len(features) != rows or len(labels) != rows:
        log.warning("feature cache %s holds %d rows, expected %d; recomputing it", path, len(features), rows)
        return None
    loaded = time.perf_counter() - started
    log.info("feature cache hit: %d activations loaded from %s in %.1f s instead of computed in %.1f s "
             "(%.1f s saved)", rows, path, loaded, seconds, seconds - loaded)
    return features, labels


def _save(path: Path, features: np.ndarray, labels: np.ndarray, seconds: float) -> None:
    try:
        with atomic_path(path) as tmp:
            np.savez(tmp, features=features, labels=labels, seconds=np.float64(seconds))
    except (RunDirError, OSError) as exc:
        log.warning("could not write the feature cache %s (%s); training continues without it", path, exc)
        return
    log.info("feature cache: wrote %s (%.0f MB)", path, path.stat().st_size / 1e6)
