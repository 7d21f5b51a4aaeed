"""Run directories: layout, manifest.json and atomic writes.

A run directory explains itself: every stage records its resolved config, its inputs and outputs
(with sha256) and its metrics in ``manifest.json``. Every file is written under a temporary name
and renamed into place when complete, so an interrupted run never leaves a half-written artifact.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgesmith.errors import RunDirError

MANIFEST = "manifest.json"
STAGES = ("train", "optimize", "export", "bench")
# OS errors that mean "this place cannot be written" (the user's to fix), not a bug
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}


def files_under(path: str | Path) -> list[Path]:
    """The file itself, or a folder's files (recursively) in sorted order."""
    path = Path(path)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def disk_bytes(path: str | Path) -> int:
    """Bytes on disk of a file, or the sum over a folder's files."""
    return sum(file.stat().st_size for file in files_under(path))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (a folder hashes its files in sorted order)."""
    digest = hashlib.sha256()
    for file in files_under(path):
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    Raises:
        RunDirError: the folder cannot be written (full disk, read-only, no permission, a file in
            the way); the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    with _unwritable_as_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix, suffix = f".{target.stem}.", f".tmp{target.suffix}"
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.unlink()
    try:
        with _unwritable_as_error(target):
            yield tmp_path
            os.replace(tmp_path, target)
    finally:
        _remove(tmp_path)


@contextlib.contextmanager
def _unwritable_as_error(target: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if isinstance(exc, RunDirError) or exc.errno not in UNWRITABLE:
            raise
        raise RunDirError(
            f"cannot write {target} ({exc.strerror or exc}); free disk space, fix the folder's permissions "
            "or choose another --out"
        ) from None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (sorted keys are not forced: dict order is kept for readability)."""
    return write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def jsonable(data: Any) -> Any:
    """``data`` as it reads back from JSON (tuples become lists, NumPy scalars plain numbers)."""
    return json.loads(json.dumps(data, default=_json_default))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: not found; run the stage that writes it first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc}); delete it and re-run the stage") from None
    except OSError as exc:
        raise RunDirError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class RunDir:
    """A run directory and its manifest.

    Args:
        path: the folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path, *, force: bool = False) -> RunDir:
        """Create a new run directory; refuse to reuse one holding a manifest unless ``force``."""
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise RunDirError(f"{run.path} is a file, not a folder; choose another --out")
        if run.manifest_path.exists() and not force:
            raise RunDirError(
                f"{run.path} already holds a run; pass --force to overwrite it, --resume to continue it "
                "or --out to choose another folder"
            )
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            probe = run.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(
                f"{run.path}: cannot write here ({exc.strerror or exc}); choose another --out"
            ) from None
        stale = run.path / "train" / "checkpoints"  # a forced rerun starts over; it must not resume from these
        if force and stale.is_dir():
            shutil.rmtree(stale)
        write_json(run.manifest_path, {"created": _now(), "stages": {}})
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open an existing run directory (one that holds a manifest)."""
        run = cls(path)
        if not run.manifest_path.is_file():
            raise RunDirError(
                f"{run.path}: not a run directory (no {MANIFEST}); run `edgesmith run` or `train` first"
            )
        return run

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def stage_dir(self, stage: str) -> Path:
        folder = self.path / stage
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def manifest(self) -> dict[str, Any]:
        data = read_json(self.manifest_path)
        if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
            raise RunDirError(
                f"{self.manifest_path}: not an edgesmith manifest (expected a JSON object with a 'stages' "
                "table); restore it or start a new run with --force"
            )
        return data

    def update_manifest(self, **fields: Any) -> None:
        data = self.manifest()
        data.update(fields)
        write_json(self.manifest_path, data)

    def record_stage(
        self,
        stage: str,
        *,
        config: Any,
        inputs: dict[str, str | Path],
        outputs: dict[str, str | Path],
        metrics: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record a finished stage: its config, inputs and outputs with sha256, and its metrics."""
        entry = {
            "finished": _now(),
            "config": config,
            "inputs": {k: self._describe_file(v) for k, v in inputs.items()},
            "outputs": {k: self._describe_file(v) for k, v in outputs.items()},
            "metrics": metrics or {},
        }
        data = self.manifest()
        data.setdefault("stages", {})[stage] = entry
        write_json(self.manifest_path, data)
        return entry

    def forget_stages(self, stages: tuple[str, ...] | list[str]) -> None:
        """Drop the records of stages about to run again, so a stale record never passes for a finished one."""
        data = self.manifest()
        for stage in stages:
            data.get("stages", {}).pop(stage, None)
        write_json(self.manifest_path, data)

    def stage_output(self, stage: str, key: str) -> Path:
        """Path of an output a finished stage recorded, e.g. ``stage_output("train", "model")``."""
        stage_entry = self.manifest().get("stages", {}).get(stage)
        if not stage_entry:
            raise RunDirError(f"{self.path}: stage {stage!r} has not finished; run `edgesmith {stage}` first")
        try:
            return self.path / stage_entry["outputs"][key]["path"]
        except KeyError:
            raise RunDirError(
                f"{self.path}: stage {stage!r} recorded no output {key!r} "
                f"(it has: {', '.join(stage_entry['outputs'])})"
            ) from None

    def stage_outputs(self, stage: str) -> dict[str, Path]:
        entry = self.manifest().get("stages", {}).get(stage, {})
        return {k: self.path / v["path"] for k, v in entry.get("outputs", {}).items()}

    @classmethod
    def enclosing(cls, path: str | Path) -> RunDir | None:
        """The nearest run directory above ``path`` (a parent folder holding a manifest), or None."""
        for folder in Path(path).resolve().parents:
            if (folder / MANIFEST).is_file():
                return cls(folder)
        return None

    def output_holding(self, path: str | Path) -> dict[str, Any] | None:
        """The recorded output (its manifest entry) that is ``path`` or a folder holding it, or None."""
        target = Path(path).resolve()
        for entry in self.manifest().get("stages", {}).values():
            for output in entry.get("outputs", {}).values():
                recorded = (self.path / output["path"]).resolve()
                if recorded == target or recorded in target.parents:
                    return output
        return None

    def output_intact(self, output: dict[str, Any]) -> bool:
        """Whether a recorded output still exists with the sha256 recorded for it."""
        path = self.path / output["path"]
        return "sha256" in output and path.exists() and sha256_file(path) == output["sha256"]

    def changed_outputs(self, stage: str) -> list[str]:
        """Names of a finished stage's outputs that are missing or changed since it recorded them.

        An output recorded without a sha256 (it did not exist when the stage finished) is not checked.
        """
        outputs = self.manifest().get("stages", {}).get(stage, {}).get("outputs", {})
        return [key for key, out in outputs.items() if "sha256" in out and not self.output_intact(out)]

    def _describe_file(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        shown = os.path.relpath(path, self.path) if path.is_absolute() or path.exists() else str(path)
        if not path.exists():
            return {"path": shown}
        size = disk_bytes(path)
        return {"path": shown, "bytes": size, "sha256": sha256_file(path)}
