"""Pickled objects (scikit-learn models and the like): written atomically, loaded only when vouched for.

Unpickling runs whatever code the file names, so a pickle is a program, not data. ``load_pickle``
therefore loads a file only if a run directory vouches for it: the file lies inside a run directory
whose ``manifest.json`` records it (or a folder holding it) as a stage output, and its sha256 still
matches the recorded one, i.e. edgesmith wrote it and nothing changed it since. Anything else needs
``trust=True`` (``--trust`` on the command line), which the user should give only for a file whose
source they trust.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
from pathlib import Path
from typing import Any, NoReturn

from edgesmith.errors import ModelError, RunDirError, TrustError
from edgesmith.runs import MANIFEST, RunDir, atomic_path

log = logging.getLogger(__name__)
_USER_TRUSTS = False  # set by the command line's --trust for the whole command


def trust_everything(enabled: bool = True) -> None:
    """Vouch for every file this process loads (``--trust``): Lambda layers and unrecorded pickles load."""
    global _USER_TRUSTS
    _USER_TRUSTS = enabled
    if enabled:
        log.warning("--trust: Keras Lambda layers and pickles not recorded by a run directory will be loaded; "
                    "they run arbitrary code, so use it only for files from a source you trust")


def trusted(trust: bool = False) -> bool:
    """Whether a load is vouched for: by its caller (``trust``) or by ``--trust`` on the command line."""
    return trust or _USER_TRUSTS


def _joblib() -> Any | None:
    if importlib.util.find_spec("joblib") is None:
        return None
    import joblib

    return joblib


def save_pickle(obj: Any, path: str | Path) -> Path:
    """Pickle ``obj`` to ``path`` atomically (joblib if installed, else pickle) and return the path.

    The file is written under a temporary name and renamed when complete. Record it as a stage output
    (``RunDir.record_stage``) so that ``load_pickle`` can later verify it without ``trust``.

    Raises:
        RunDirError: the folder cannot be written.
    """
    path = Path(path)
    joblib = _joblib()
    with atomic_path(path) as tmp:
        if joblib is not None:
            joblib.dump(obj, tmp)
        else:
            with open(tmp, "wb") as handle:
                pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def load_pickle(path: str | Path, *, trust: bool = False) -> Any:
    """Load a pickled object, verified by its run directory's manifest unless ``trust`` is set.

    Args:
        path: the pickle file.
        trust: load it even if no run directory vouches for it. Only for a file from a trusted source:
            unpickling can run arbitrary code.

    Raises:
        ModelError: the file does not exist or is not a readable pickle.
        TrustError: without ``trust``: the file is not inside a run directory, its manifest does not
            record it, or its sha256 does not match the recorded one.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: pickle file does not exist; check the path or re-run the stage that writes it")
    if not trusted(trust):
        verify_recorded(path)
    return _unpickle(path)


def verify_recorded(path: str | Path) -> None:
    """Raise TrustError unless a run directory's manifest records ``path`` with a matching sha256."""
    path = Path(path)
    run = RunDir.enclosing(path)
    if run is None:
        _refuse(path, f"it is not inside an edgesmith run directory (no {MANIFEST} in any folder above it)")
    try:
        output = run.output_holding(path)
    except RunDirError as exc:
        _refuse(path, f"its run directory's manifest cannot be read ({exc})")
    if output is None:
        _refuse(path, f"the manifest {run.manifest_path} does not record it as a stage output")
    if not run.output_intact(output):
        _refuse(path, f"its sha256 does not match the one recorded in {run.manifest_path} "
                      f"for {output['path']} (changed since edgesmith wrote it)")


def _refuse(path: Path, reason: str) -> NoReturn:
    raise TrustError(
        f"{path}: refused to unpickle: {reason}; unpickling can run arbitrary code, so pass --trust "
        "(trust=True) only if the file's source is trusted"
    )


def _unpickle(path: Path) -> Any:
    joblib = _joblib()
    try:
        if joblib is not None:
            return joblib.load(path)
        with open(path, "rb") as handle:
            return pickle.load(handle)
    except Exception as exc:  # a foreign or truncated file fails in many ways (EOFError, UnpicklingError, ...)
        raise ModelError(
            f"{path}: not a readable pickle ({type(exc).__name__}: {str(exc)[:200]}); re-run the stage that writes it"
        ) from None
