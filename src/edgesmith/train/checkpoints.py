"""Resumable training: a killed run, run again, continues from its last completed epoch.

Layout under the checkpoint folder (``<run>/train/checkpoints`` in a run directory)::

    fingerprint.json        the recipe and data the checkpoints belong to (a different one discards them)
    <phase>/backup/         keras BackupAndRestore: model weights, optimizer state and epoch, every epoch
    <phase>/state.json      per-epoch history and early-stopping state (best, wait), every epoch
    <phase>/best.npz        the best weights so far (early stopping restores them at the end)
    <phase>/done_weights.h5 the weights after a phase finished, with done.json (its history): a rerun skips it

The whole folder is removed once training finishes.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith._keras import keras
from edgesmith.runs import atomic_path, read_json, write_json

log = logging.getLogger(__name__)
History = dict[str, list[float]]


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Early stopping on validation accuracy whose state (and the phase's history) survives a restart.

    ``history`` holds every epoch of the phase, including those run before a restart; ``resumed_from``
    is the number of epochs that were already done when this fit started (0 for a fresh start).
    """

    def __init__(self, phase: str, patience: int, state_dir: Path | None = None) -> None:
        super().__init__(monitor="val_accuracy", patience=patience, restore_best_weights=True, mode="max")
        self.phase, self.state_dir = phase, state_dir
        self.history: History = {}
        self.resumed_from = 0
        self._first_epoch = True

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        self.history, self.resumed_from, self._first_epoch = {}, 0, True
        if self.state_dir is not None and (self.state_dir / "state.json").is_file():
            self._load_state()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._first_epoch and epoch > 0:  # BackupAndRestore set the starting epoch from its checkpoint
            self.resumed_from = epoch
            self.history = {k: v[:epoch] for k, v in self.history.items()}
            log.info("resuming %s from epoch %d (its checkpoint holds %d finished epochs)", self.phase, epoch, epoch)
        self._first_epoch = False

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        super().on_epoch_end(epoch, logs)
        if self.state_dir is not None:
            self._save_state()

    def _save_state(self) -> None:
        state = {"history": self.history, "best": float(self.best), "wait": self.wait, "best_epoch": self.best_epoch}
        if self.best_weights is not None:
            with atomic_path(self.state_dir / "best.npz") as tmp:
                np.savez(tmp, *self.best_weights)
        write_json(self.state_dir / "state.json", state)

    def _load_state(self) -> None:
        state = read_json(self.state_dir / "state.json")
        self.history = state["history"]
        self.best, self.wait, self.best_epoch = state["best"], state["wait"], state["best_epoch"]
        best = self.state_dir / "best.npz"
        if best.is_file():
            with np.load(best) as stored:
                self.best_weights = [stored[f"arr_{i}"] for i in range(len(stored.files))]


class PhaseCheckpoints:
    """The checkpoints of one ``train()`` call; with ``root = None`` nothing is saved or resumed."""

    def __init__(self, root: str | Path | None, fingerprint: dict[str, Any]) -> None:
        self.root = Path(root) if root is not None else None
        if self.root is not None:
            self._claim(json.loads(json.dumps(fingerprint, default=str)))

    def _claim(self, fingerprint: dict[str, Any]) -> None:
        """Keep the folder's checkpoints only if they were made by the same recipe on the same data."""
        path = self.root / "fingerprint.json"
        if path.is_file() and read_json(path) != fingerprint:
            log.warning("%s: checkpoints from another recipe or data set; starting training from scratch", self.root)
            shutil.rmtree(self.root, ignore_errors=True)
        write_json(path, fingerprint)

    def phase_dir(self, phase: str) -> Path | None:
        if self.root is None:
            return None
        folder = self.root / phase
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def finished(self, phase: str, model: keras.Model) -> History | None:
        """The history of ``phase`` if a previous run finished it (its final weights are loaded into ``model``)."""
        folder = self.phase_dir(phase)
        if folder is None or not (folder / "done.json").is_file():
            return None
        model.load_weights(str(folder / "done_weights.h5"))
        log.info("phase %s already finished before the restart: loaded its weights from %s", phase, folder)
        return read_json(folder / "done.json")

    def callbacks(self, phase: str, patience: int) -> tuple[ResumableEarlyStopping, list[keras.callbacks.Callback]]:
        """The early-stopping callback (it holds the phase's history) and the list to pass to ``fit``."""
        folder = self.phase_dir(phase)
        stopper = ResumableEarlyStopping(phase, patience, folder)
        if folder is None:
            return stopper, [stopper]
        # the backup is deleted by finish() once the phase's final weights are safely on disk
        backup = keras.callbacks.BackupAndRestore(str(folder / "backup"), delete_checkpoint=False)
        return stopper, [stopper, backup]

    def finish(self, phase: str, model: keras.Model, history: History) -> None:
        """Record a finished phase: its final weights and history; drop its per-epoch state."""
        folder = self.phase_dir(phase)
        if folder is None:
            return
        with atomic_path(folder / "done_weights.h5") as tmp:
            model.save_weights(str(tmp))
        write_json(folder / "done.json", history)
        for name in ("backup", "state.json", "best.npz"):
            path = folder / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Training finished: the checkpoints are no longer needed."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
