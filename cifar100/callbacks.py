"""Hard-example mining and the callback set of a run. Every callback watches the validation split."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from cifar100.config import Config
from cifar100.sampling import TrainBatches


def per_example_cross_entropy(model: keras.Model, images: np.ndarray, labels: np.ndarray,
                              batch_size: int = 256) -> np.ndarray:
    """Categorical cross-entropy of each example, in inference mode (no augmentation, no dropout)."""
    probabilities = model.predict(images, batch_size=batch_size, verbose=0)
    return -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0))


def mining_probabilities(losses: np.ndarray, strength: float, floor: float) -> np.ndarray:
    """Draw probabilities from per-example losses: (loss / mean) ** strength, mixed with a uniform floor.

    Every example keeps at least floor / N; the rest of the mass goes to the high-loss examples.
    """
    n = len(losses)
    weights = (np.maximum(losses, 0) / max(float(np.mean(losses)), 1e-12)) ** strength
    if not np.isfinite(weights).all() or weights.sum() <= 0:
        weights = np.ones(n)
    return floor / n + (1 - floor) * weights / weights.sum()


class HardExampleMining(keras.callbacks.Callback):
    """Every `every` epochs, scores (a `fraction` of) the training examples by their cross-entropy and makes
    the sampler draw the hardest more often. Logs its cost as `hem_seconds`; keeps the hardest examples."""

    def __init__(self, sampler: TrainBatches, every: int = 1, fraction: float = 1.0, strength: float = 1.0,
                 floor: float = 0.5, keep: int = 64, seed: int = 0, batch_size: int = 256):
        super().__init__()
        self.sampler, self.every, self.fraction = sampler, every, fraction
        self.strength, self.floor, self.keep, self.batch_size = strength, floor, keep, batch_size
        self.rng = np.random.default_rng(seed)
        self.losses = np.full(len(sampler.images), np.nan)  # latest known loss of each example
        self.hardest_indices = np.array([], dtype=np.int64)
        self.hardest_losses = np.array([], dtype=np.float64)

    def score(self) -> float:
        """Score a sample of the training set and update the sampler. Returns the seconds it took."""
        started = time.perf_counter()
        n = len(self.sampler.images)
        count = max(1, int(round(self.fraction * n)))
        chosen = np.arange(n) if count >= n else np.sort(self.rng.choice(n, size=count, replace=False))
        self.losses[chosen] = per_example_cross_entropy(self.model, self.sampler.images[chosen],
                                                        self.sampler.labels[chosen], self.batch_size)
        known = np.where(np.isnan(self.losses), np.nanmean(self.losses), self.losses)
        self.sampler.set_probabilities(mining_probabilities(known, self.strength, self.floor))
        order = chosen[np.argsort(-self.losses[chosen])][: self.keep]
        self.hardest_indices, self.hardest_losses = order, self.losses[order]
        return time.perf_counter() - started

    def on_epoch_end(self, epoch, logs=None):
        seconds = self.score() if (epoch + 1) % self.every == 0 else 0.0
        if logs is not None:
            logs["hem_seconds"] = seconds


class EpochTimer(keras.callbacks.Callback):
    """Adds to the logs `epoch_seconds` (the whole epoch, validation included), `train_images_per_second`
    (training steps only) and the `learning_rate` the epoch ran with."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.perf_counter()
        self._train_seconds, self._batches = 0.0, 0

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._train_seconds += time.perf_counter() - self._batch_started
        self._batches += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._epoch_started
            logs["train_images_per_second"] = self._batches * self.batch_size / max(self._train_seconds, 1e-9)
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class TrimHistory(keras.callbacks.Callback):
    """On (re)start, drops rows of history.csv from the epoch the run restarts at, so that a resumed run's
    history has no repeat. Runs after BackupAndRestore, which has then settled the restart epoch."""

    def __init__(self, history: Path, metadata: Path, start_epoch: int):
        super().__init__()
        self.history, self.metadata, self.start_epoch = Path(history), Path(metadata), start_epoch

    def on_train_begin(self, logs=None):
        restart = self.start_epoch
        if self.metadata.exists():
            restart = json.loads(self.metadata.read_text())["epoch"]
        trim_history(self.history, restart)


def trim_history(path: Path, first_dropped_epoch: int) -> None:
    """Keep the header and the rows of epochs before `first_dropped_epoch`, rewriting the file in place."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) < first_dropped_epoch]
    if kept != lines:
        with open(path, "w") as handle:  # same file, so CSVLogger's open handle appends after the kept rows
            handle.writelines(kept)


class PublishCheckpoint(keras.callbacks.Callback):
    """Moves the checkpoint that ModelCheckpoint just wrote to its final name in one atomic rename,
    so that a kill while a checkpoint is being written never leaves a broken best.keras behind."""

    def __init__(self, partial: Path, final: Path):
        super().__init__()
        self.partial, self.final = Path(partial), Path(final)

    def on_epoch_end(self, epoch, logs=None):
        if self.partial.exists():
            os.replace(self.partial, self.final)


def _readable_backup(weights: Path, metadata: Path) -> bool:
    import h5py

    if not (weights.exists() and metadata.exists()):
        return False
    try:
        with h5py.File(weights, "r"):
            json.loads(metadata.read_text())["epoch"]
        return True
    except (OSError, ValueError, KeyError):
        return False


def repair_backup(backup_dir: Path) -> str:
    """Make BackupAndRestore's folder safe to restore from after a kill.

    Keras writes the backup in place (weights, then the epoch), so a kill during a save can leave a
    truncated weights file or weights without their epoch. Then the previous backup (double_checkpoint)
    is put back, or, without one, the folder is removed so the phase restarts cleanly.
    Returns what was done: "ok", "previous", "removed" or "none".
    """
    backup_dir = Path(backup_dir)
    weights, metadata = backup_dir / "latest.weights.h5", backup_dir / "training_metadata.json"
    if not backup_dir.exists():
        return "none"
    if _readable_backup(weights, metadata):
        return "ok"
    previous_weights, previous_metadata = Path(f"{weights}.bkp"), Path(f"{metadata}.bkp")
    if _readable_backup(previous_weights, previous_metadata):
        shutil.copyfile(previous_weights, weights)
        shutil.copyfile(previous_metadata, metadata)
        return "previous"
    shutil.rmtree(backup_dir)
    return "removed"


def make_mining(config: Config, sampler: TrainBatches) -> HardExampleMining | None:
    if not config.hem:
        return None
    return HardExampleMining(sampler, every=config.hem_every, fraction=config.hem_fraction,
                             strength=config.hem_strength, floor=config.hem_floor, keep=config.hem_keep,
                             seed=config.seed, batch_size=max(config.batch_size, 128))


def callback_set(config: Config, run_dir: Path, phase: str, start_epoch: int, mining: HardExampleMining | None,
                 best_so_far: float | None) -> list[keras.callbacks.Callback]:
    """The callbacks of one phase, in the order they must run at the end of an epoch."""
    partial = run_dir / ".best.partial.keras"
    backup = run_dir / "backup" / phase
    callbacks: list[keras.callbacks.Callback] = [EpochTimer(config.batch_size)]
    if mining is not None:
        callbacks.append(mining)
    callbacks += [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.ModelCheckpoint(partial, monitor="val_accuracy", mode="max", save_best_only=True,
                                        initial_value_threshold=best_so_far, verbose=0),
        PublishCheckpoint(partial, run_dir / "best.keras"),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=config.reduce_lr_factor,
                                          patience=config.reduce_lr_patience, min_lr=1e-6, verbose=1),
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=config.early_stopping_patience,
                                      restore_best_weights=True, verbose=1),
        keras.callbacks.CSVLogger(run_dir / "history.csv", append=True),
        # last: the backup is written only after everything else of the epoch is recorded
        keras.callbacks.BackupAndRestore(backup, double_checkpoint=True),
        TrimHistory(run_dir / "history.csv", backup / "training_metadata.json", start_epoch),
    ]
    return callbacks
