"""Hard-example mining and the callback set of a run. Every callback watches the validation split."""

from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np

from cifar100 import run_folder
from cifar100.config import Config
from cifar100.sampling import EpochOrder, TrainBatches


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
        self.seed = seed
        self.losses = np.full(len(sampler.images), np.nan)  # latest known loss of each example
        self.hardest_indices = np.array([], dtype=np.int64)
        self.hardest_losses = np.array([], dtype=np.float64)

    def score(self, epoch: int = 0) -> float:
        """Score a sample of the training set and update the sampler. Returns the seconds it took."""
        started = time.perf_counter()
        n = len(self.sampler.images)
        count = max(1, int(round(self.fraction * n)))
        rng = np.random.default_rng([self.seed, epoch])
        chosen = np.arange(n) if count >= n else np.sort(rng.choice(n, size=count, replace=False))
        self.losses[chosen] = per_example_cross_entropy(self.model, self.sampler.images[chosen],
                                                        self.sampler.labels[chosen], self.batch_size)
        order = chosen[np.argsort(-self.losses[chosen])][: self.keep]
        self.hardest_indices, self.hardest_losses = order, self.losses[order]
        self._update_sampler()
        return time.perf_counter() - started

    def _update_sampler(self) -> None:
        if np.isnan(self.losses).all():
            self.sampler.set_probabilities(None)
            return
        known = np.where(np.isnan(self.losses), np.nanmean(self.losses), self.losses)
        self.sampler.set_probabilities(mining_probabilities(known, self.strength, self.floor))

    def on_epoch_end(self, epoch, logs=None):
        seconds = self.score(epoch) if (epoch + 1) % self.every == 0 else 0.0
        if logs is not None:
            logs["hem_seconds"] = seconds

    def get_state(self) -> dict:
        """What a resumed run needs to continue exactly: the known losses and the hardest examples."""
        return {"losses": [None if np.isnan(v) else float(v) for v in self.losses],
                "hardest_indices": self.hardest_indices.tolist(), "hardest_losses": self.hardest_losses.tolist()}

    def set_state(self, state: dict) -> None:
        losses = np.array([np.nan if v is None else v for v in state["losses"]], dtype=np.float64)
        if losses.shape != self.losses.shape:
            return  # another training set: start afresh
        self.losses = losses
        self.hardest_indices = np.asarray(state["hardest_indices"], dtype=np.int64)
        self.hardest_losses = np.asarray(state["hardest_losses"], dtype=np.float64)
        self._update_sampler()


class EpochTimer(keras.callbacks.Callback):
    """Adds to the logs where an epoch's time went: `epoch_seconds` (all of it, validation included),
    `train_seconds` (the training steps), `val_seconds` (the validation pass), `other_seconds` (the rest:
    the data pipeline's start, callbacks), and `train_images_per_second` (over the training steps only) and
    the `learning_rate` the epoch ended with."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.perf_counter()
        self._train_seconds, self._val_seconds, self._batches = 0.0, 0.0, 0

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._train_seconds += time.perf_counter() - self._batch_started
        self._batches += 1

    def on_test_begin(self, logs=None):
        self._val_started = time.perf_counter()

    def on_test_end(self, logs=None):
        if hasattr(self, "_epoch_started"):
            self._val_seconds += time.perf_counter() - self._val_started

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            total = time.perf_counter() - self._epoch_started
            logs["epoch_seconds"] = total
            logs["train_seconds"] = self._train_seconds
            logs["val_seconds"] = self._val_seconds
            logs["other_seconds"] = max(0.0, total - self._train_seconds - self._val_seconds)
            logs["train_images_per_second"] = self._batches * self.batch_size / max(self._train_seconds, 1e-9)
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class ResumeState(keras.callbacks.Callback):
    """Saves, at the end of each epoch and before BackupAndRestore commits it, what Keras' backup does not
    hold: the state of ReduceLROnPlateau, EarlyStopping and hard-example mining. At the start of a resumed
    phase it puts that state back, so that the run continues exactly as if it had not been stopped."""

    def __init__(self, backup_dir: Path, reduce_lr, early_stopping, mining, restored: dict | None = None):
        super().__init__()
        self.backup_dir, self.reduce_lr, self.early_stopping = Path(backup_dir), reduce_lr, early_stopping
        self.mining, self.restored = mining, restored

    def on_train_begin(self, logs=None):  # after the callbacks' own resets: they come earlier in the list
        if not self.restored:
            return
        for callback, key in ((self.reduce_lr, "reduce_lr"), (self.early_stopping, "early_stopping")):
            for name, value in (self.restored.get(key) or {}).items():
                if callback is not None:
                    setattr(callback, name, value)

    def on_epoch_end(self, epoch, logs=None):
        state = {
            "reduce_lr": None if self.reduce_lr is None else {
                "wait": self.reduce_lr.wait, "best": _number(self.reduce_lr.best),
                "cooldown_counter": self.reduce_lr.cooldown_counter},
            "early_stopping": {"wait": self.early_stopping.wait, "best": _number(self.early_stopping.best),
                               "best_epoch": self.early_stopping.best_epoch,
                               "stopped_epoch": self.early_stopping.stopped_epoch},
            "stopped": bool(self.model.stop_training),
            "mining": self.mining.get_state() if self.mining is not None else None,
        }
        run_folder.save_callback_state(self.backup_dir, epoch + 1, state)


def _number(value):
    return None if value is None else float(value)


class CommitEpoch(keras.callbacks.Callback):
    """After BackupAndRestore wrote its backup: mark the epoch committed, then make its checkpoint (if it
    wrote one) best.keras."""

    def __init__(self, run_dir: Path, backup_dir: Path):
        super().__init__()
        self.run_dir, self.backup_dir = Path(run_dir), Path(backup_dir)

    def on_epoch_end(self, epoch, logs=None):
        run_folder.mark_committed(self.backup_dir)
        run_folder.publish_checkpoint(self.run_dir, epoch + 1)


def make_mining(config: Config, sampler: TrainBatches) -> HardExampleMining | None:
    if not config.hem:
        return None
    return HardExampleMining(sampler, every=config.hem_every, fraction=config.hem_fraction,
                             strength=config.hem_strength, floor=config.hem_floor, keep=config.hem_keep,
                             seed=config.seed, batch_size=max(config.batch_size, 128))


def reduce_lr_on_plateau(config: Config) -> keras.callbacks.ReduceLROnPlateau | None:
    """The plateau schedule's callback; None under the cosine schedule, which sets the rate itself."""
    if config.lr_schedule == "cosine":
        return None
    return keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=config.reduce_lr_factor,
                                             patience=config.reduce_lr_patience, min_lr=1e-6, verbose=1)


def callback_set(config: Config, run_dir: Path, phase: str, sampler: TrainBatches, mining: HardExampleMining | None,
                 best_so_far: float | None, restored: dict | None) -> list[keras.callbacks.Callback]:
    """The callbacks of one phase, in the order they must run at the end of an epoch.

    An epoch is committed once BackupAndRestore has written its backup and CommitEpoch has recorded it; what
    comes before is redone if a kill strikes first (run_folder.settle_phase drops its traces), what comes
    after (publishing the checkpoint) is finished at the restart.
    """
    backup = run_dir / "backup" / phase
    checkpoints = run_dir / run_folder.CHECKPOINTS
    checkpoints.mkdir(exist_ok=True)
    reduce_lr = reduce_lr_on_plateau(config)
    early_stopping = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max",
                                                   patience=config.early_stopping_patience, verbose=1)
    callbacks: list[keras.callbacks.Callback] = [EpochOrder(sampler), EpochTimer(config.batch_size)]
    if mining is not None:
        callbacks.append(mining)
    callbacks += [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.ModelCheckpoint(checkpoints / run_folder.CHECKPOINT_PATTERN, monitor="val_accuracy",
                                        mode="max", save_best_only=True, initial_value_threshold=best_so_far,
                                        verbose=0),
        *([reduce_lr] if reduce_lr is not None else []),
        early_stopping,
        keras.callbacks.CSVLogger(run_dir / run_folder.HISTORY, append=True),
        ResumeState(backup, reduce_lr, early_stopping, mining, restored),
        keras.callbacks.BackupAndRestore(backup, double_checkpoint=True, delete_checkpoint=False),
        CommitEpoch(run_dir, backup),  # the epoch counts as done once this has run
    ]
    return callbacks
