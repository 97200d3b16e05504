"""The callbacks of a phase: Keras' own (checkpoints, schedules, early stopping, backup) and the run's
(epoch timing, resume state, commits). Every callback watches the validation split."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from cifar100 import run_folder
from cifar100.batches import EpochOrder, TrainBatches
from cifar100.config import Config, RunError, first_line
from cifar100.keras_internals import keras  # Keras, imported without TensorFlow's start-up lines
from cifar100.mining import COUNTERS, HardExampleMining, SelectiveBackprop


class EpochTimer(keras.callbacks.Callback):
    """Logs where an epoch's time went (`epoch_seconds`: all; `train_seconds`, `val_seconds`, `other_seconds`),
    `train_images_per_second` (over the training steps only) and the `learning_rate` the epoch ended with."""

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


class ProgressiveResizing(keras.callbacks.Callback):
    """Epochs before `first_full_epoch` train at `size` px, later ones (and all validation) at full size. The size
    depends on the epoch alone, so a resumed run trains as an uninterrupted one; each change retraces the step."""

    def __init__(self, size: int, first_full_epoch: int):
        super().__init__()
        self.size, self.first_full_epoch = size, first_full_epoch

    def on_epoch_begin(self, epoch, logs=None):
        from cifar100.keras_internals import Upsample

        layer = self.model.get_layer("upsample")
        if not isinstance(layer, Upsample):
            raise TypeError("progressive resizing needs a model built with progressive_size set")
        size = self.size if epoch < self.first_full_epoch else None
        if layer.training_size != size:
            layer.training_size = size
            self.model.make_train_function(force=True)
            print(f"progressive resizing: epoch {epoch + 1} trains at {size or layer.height} px")


class ResumeState(keras.callbacks.Callback):
    """Saves, before BackupAndRestore commits an epoch, the state its backup lacks (ReduceLROnPlateau, EarlyStopping,
    mining) as backup/<phase>/callbacks-<epoch>.json, and puts it back when the phase resumes: the run continues
    exactly as if it had not been stopped."""

    KEEP = 3  # the files of the last epochs: a kill before a commit leaves the committed epoch's

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
        self.save(self.backup_dir, epoch + 1, state)

    @classmethod
    def save(cls, backup_dir: Path, epochs_done: int, state: dict) -> None:
        backup_dir = Path(backup_dir)
        backup_dir.mkdir(parents=True, exist_ok=True)
        run_folder.write_json(backup_dir / f"callbacks-{epochs_done:04d}.json", state)
        for old in cls._saved(backup_dir)[:-cls.KEEP]:
            old.unlink()

    @staticmethod
    def _saved(backup_dir: Path) -> list[Path]:
        """The files saved, by epoch (by name, epoch 10000 would come before 9999)."""
        found = {int(m.group(1)): path for path in Path(backup_dir).glob("callbacks-*.json")
                 if (m := re.fullmatch(r"callbacks-(\d{1,9})\.json", path.name))}
        return [found[epoch] for epoch in sorted(found)]

    @classmethod
    def load(cls, backup_dir: Path, epochs_done: int | None = None, required: bool = False) -> dict | None:
        """The state saved after `epochs_done` epochs (None: the last saved), each value checked; None when there is
        none, unless `required` (a committed epoch's state): then a RunError names the missing file."""
        saved = cls._saved(backup_dir) if epochs_done is None else \
            [Path(backup_dir) / f"callbacks-{epochs_done:04d}.json"]
        path = saved[-1] if saved else None
        if path is None or not (path.exists() or path.is_symlink()):
            if required:
                raise RunError(f"{path}: missing: the state of the callbacks (early stopping, the learning-rate "
                               f"schedule, mining) after epoch {epochs_done}, which is committed. Nothing was "
                               f"changed: restore it, or delete {backup_dir} to train this phase again from its start")
            return None
        state = run_folder.read_json(path, "callback state")
        numbers = {"reduce_lr": ("wait", "best", "cooldown_counter"),
                   "early_stopping": ("wait", "best", "best_epoch", "stopped_epoch")}
        for key, names in numbers.items():
            part = state.get(key)
            if part is None and key == "reduce_lr":
                continue
            if not isinstance(part, dict) or set(part) != set(names) or not all(
                    _best(part[name]) if name == "best" else _count(part[name]) for name in names):
                raise RunError(f"{path}: damaged callback state: {key} is not {{{', '.join(names)}}} (a number or "
                               f"null; counts of epochs); delete the run folder {path.parents[2]} to start over")
        if not isinstance(state.get("stopped"), bool) or not isinstance(state.get("mining"), dict | None):
            raise RunError(f"{path}: damaged callback state (stopped, mining); delete the run folder "
                           f"{path.parents[2]} to start over")
        return state


def _number(value):
    return None if value is None else float(value)


def _best(value) -> bool:
    """A callback's best value: null, or a number (infinite before the first epoch that improves)."""
    return value is None or isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _count(value) -> bool:
    """A count of epochs (wait, cooldown, an epoch's index)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**6


class CommitEpoch(keras.callbacks.Callback):
    """After BackupAndRestore wrote its backup: mark the epoch committed, then make its checkpoint best.keras."""

    def __init__(self, run_dir: Path, backup_dir: Path):
        super().__init__()
        self.run_dir, self.backup_dir = Path(run_dir), Path(backup_dir)

    def on_epoch_end(self, epoch, logs=None):
        run_folder.mark_committed(self.backup_dir)
        run_folder.publish_checkpoint(self.run_dir, epoch + 1)


class CheckedBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore (double checkpoint, kept after fit), whose backup of another model is a RunError naming it,
    not a traceback from inside fit."""

    def __init__(self, backup_dir: Path):
        super().__init__(backup_dir, double_checkpoint=True, delete_checkpoint=False)
        self.backup_dir = Path(backup_dir)

    def on_train_begin(self, logs=None):
        try:
            super().on_train_begin(logs)
        except (ValueError, KeyError) as exc:  # what Keras' loader raises for weights of other shapes or names
            if not (self.backup_dir / "latest.weights.h5").exists():
                raise
            raise RunError(f"{self.backup_dir / 'latest.weights.h5'}: not a backup of this run's model "
                           f"({type(exc).__name__}: {first_line(exc)}). Nothing was changed: "
                           f"delete {self.backup_dir} to train this phase again from its start") from None


class InferenceCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint saving `inference` (fit's model without the training augmentation); None: fit's model."""

    def __init__(self, inference: keras.Model | None, filepath, **kwargs):
        super().__init__(filepath, **kwargs)
        self.inference = inference

    def set_model(self, model):
        super().set_model(self.inference if self.inference is not None else model)


class EpochLine(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, leaving the timing and mining counters (in history.csv) out of an epoch's line. Put it
    last among the callbacks: Keras then uses it instead of adding its own."""

    QUIET = ("epoch_seconds", "train_seconds", "val_seconds", "other_seconds", "train_images_per_second",
             *COUNTERS)  # EpochTimer's, and mining's counters

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, {k: v for k, v in (logs or {}).items() if k not in self.QUIET})


class TensorBoardLog(keras.callbacks.Callback):
    """history.csv as TensorBoard scalars in run_dir/logs, written after each commit: one event file per epoch and
    split, so an epoch redone after a kill is logged once (Keras' TensorBoard: twice) and a missed one filled in."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = Path(run_dir)

    def on_epoch_end(self, epoch, logs=None):
        write_tensorboard(self.run_dir)


def write_tensorboard(run_dir: Path) -> None:
    """Write the history rows that have no TensorBoard event file yet (named as Keras' TensorBoard names them)."""
    try:
        import tensorflow as tf
    except ImportError:  # another backend without TensorFlow installed: no TensorBoard logs
        return
    logs = Path(run_dir) / "logs"
    if logs.is_symlink():
        raise RunError(f"{logs}: a symbolic link in the run folder; this project writes only regular files there")
    run_folder.refuse_links(logs)
    written = {(path.parent.name, path.name.rsplit(".", 2)[-2]) for path in logs.glob("*/*.epoch-*.v2")}
    for row in run_folder.history_rows(run_dir):
        epoch = int(row["epoch"])
        for split in ("train", "validation"):
            if (split, f"epoch-{epoch:06d}") in written:  # each split's file apart: a kill may fall between
                continue
            validation = split == "validation"
            values = {key.removeprefix("val_"): value for key, value in row.items()
                      if key != "epoch" and value and key.startswith("val_") == validation}
            folder = logs / split
            folder.mkdir(parents=True, exist_ok=True)
            writer = tf.summary.create_file_writer(str(folder), filename_suffix=f".epoch-{epoch:06d}.v2")
            with writer.as_default():
                for key, value in values.items():
                    if math.isfinite(float(value)):  # nan: a column this phase does not fill
                        tf.summary.scalar(f"epoch_{key}", float(value), step=epoch)
            writer.close()


class HistoryLog(keras.callbacks.CSVLogger):
    """CSVLogger, counting epochs from 1 as Keras' progress bar and the figures do."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + 1, logs)


def reduce_lr_on_plateau(config: Config) -> keras.callbacks.ReduceLROnPlateau | None:
    """The plateau schedule's callback; None under the cosine schedule, which sets the rate itself."""
    if config.lr_schedule == "cosine":
        return None
    return keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=config.reduce_lr_factor,
                                             patience=config.reduce_lr_patience, min_lr=1e-6, verbose=1)


def callback_set(config: Config, run_dir: Path, phase: str, sampler: TrainBatches,
                 mining: HardExampleMining | SelectiveBackprop | None,
                 best_so_far: float | None, restored: dict | None, start_epoch: int = 0,
                 inference: keras.Model | None = None) -> list[keras.callbacks.Callback]:
    """The callbacks of a phase starting at `start_epoch`, in the order they must run at an epoch's end;
    checkpoints hold `inference` (default: fit's model). An epoch is committed once BackupAndRestore and
    CommitEpoch have run: what comes before is redone after a kill (run_folder.settle_phase drops its
    traces), what comes after is finished at the restart."""
    backup = run_dir / "backup" / phase
    checkpoints = run_dir / run_folder.CHECKPOINTS
    checkpoints.mkdir(exist_ok=True)
    reduce_lr = reduce_lr_on_plateau(config)
    # the small epochs of progressive resizing score low at full size: early stopping watches only full-size ones
    first_full = start_epoch + config.progressive_epochs if phase == "finetune" and config.progressive_size else 0
    early_stopping = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", start_from_epoch=first_full,
                                                   patience=config.early_stopping_patience, verbose=1)
    callbacks: list[keras.callbacks.Callback] = [EpochOrder(sampler), EpochTimer(config.batch_size)]
    if first_full:
        callbacks.insert(0, ProgressiveResizing(config.progressive_size, first_full))
    if mining is not None:
        callbacks.append(mining)
    callbacks += [
        keras.callbacks.TerminateOnNaN(),
        InferenceCheckpoint(inference, checkpoints / run_folder.CHECKPOINT_PATTERN, monitor="val_accuracy",
                            mode="max", save_best_only=True, initial_value_threshold=best_so_far, verbose=0),
        *([reduce_lr] if reduce_lr is not None else []),
        early_stopping,
        HistoryLog(run_dir / run_folder.HISTORY, append=True),
        ResumeState(backup, reduce_lr, early_stopping, mining, restored),
        CheckedBackupAndRestore(backup),
        CommitEpoch(run_dir, backup),  # the epoch counts as done once this has run
        *([TensorBoardLog(run_dir)] if config.tensorboard else []),
    ]
    return callbacks
