"""Leakage checks: which rows each part of an ensemble was fitted on, and where it is evaluated.

A stacked meta-model fitted on rows its members were trained on learns how members behave on data they
memorised, not on new data; an ensemble evaluated on rows any part was fitted on reports a number that
means nothing. Rows are identified by their file path (image folders), shard file and record (shards) or a
hash of their pixels (in-memory sets), so runs that split the same data differently are still compared row by row.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edgesmith.data.datasets import Split
from edgesmith.errors import LeakageError

log = logging.getLogger(__name__)


class LeakageWarning(UserWarning):
    """Rows overlap where the user explicitly allowed it (``allow_leakage``)."""


def row_ids(split: Split) -> np.ndarray:
    """Stable identifiers of a split's rows: file paths, shard file and record, else a sha1 of the pixels."""
    if split.files is not None:  # resolved: a relative --data must match a member's recorded absolute path
        return np.asarray([os.path.realpath(name) for name in split.files])
    if split.records is not None:
        return _record_ids(split)
    return np.asarray([hashlib.sha1(image.tobytes()).hexdigest()[:20] for image in split.images])


def _record_ids(split: Split) -> np.ndarray:
    """``<shard file name>#<record in that file>`` for rows streamed from TFRecord shards."""
    starts = np.asarray(split.shards.offsets)
    files = np.searchsorted(starts, split.records, side="right") - 1
    return np.asarray([f"{Path(split.shards.paths[f]).name}#{r - starts[f]}"
                       for f, r in zip(files, split.records, strict=True)])


def _overlap(a: Iterable[str], b: Iterable[str]) -> list[str]:
    return sorted(set(a) & set(b))


def check_meta_rows(meta_rows: np.ndarray, member_rows: dict[str, np.ndarray], *, allow: bool = False,
                    what: str = "meta-model") -> None:
    """Reject (or, with ``allow``, warn about) a meta-model fitted on rows a member was trained on."""
    for member, rows in member_rows.items():
        shared = _overlap(meta_rows, rows)
        if not shared:
            continue
        message = (f"{what} is fitted on {len(shared)} rows that member {member!r} was trained on (e.g. "
                   f"{shared[0]}): its meta-features would not be out-of-sample; fit it on held-out rows "
                   "(ensemble.fit_split = 'val') or use out-of-fold predictions")
        if not allow:
            raise LeakageError(message)
        warnings.warn(message, LeakageWarning, stacklevel=2)
        log.warning("%s", message)


def check_eval_rows(eval_rows: np.ndarray, fitted_rows: dict[str, np.ndarray]) -> None:
    """Evaluation only on held-out data: any overlap with rows a part was fitted on is an error."""
    for part, rows in fitted_rows.items():
        shared = _overlap(eval_rows, rows)
        if shared:
            raise LeakageError(f"evaluation rows include {len(shared)} rows {part!r} was fitted on (e.g. "
                               f"{shared[0]}); evaluate on the held-out test split only")
