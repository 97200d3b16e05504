"""The callbacks a phase passes to `fit` besides Keras' own: best.keras (a ModelCheckpoint of the inference
model), hard-example mining, and the run's checkpoint, which saves and restores everything a resume needs."""

from __future__ import annotations

import math
import os
import time

import numpy as np

from cifar100.batches import EpochOrder, TrainBatches
from cifar100.keras_fixes import keras
from cifar100.runs import Run


class BestModel(keras.callbacks.ModelCheckpoint):
    """Keras' ModelCheckpoint of the run's inference model (raw uint8 images in, probabilities out: no
    augmentation, whatever `fit` trains) at its best validation accuracy over both phases, as best.keras,
    written to a temporary file and renamed."""

    def __init__(self, run: Run):
        super().__init__(run.dir / ".new-best.keras", monitor="val_accuracy", mode="max", save_best_only=True)
        self.run, self.best_path = run, run.dir / "best.keras"

    def set_model(self, model):
        super().set_model(self.run.model)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if os.path.exists(self.filepath):
            os.replace(self.filepath, self.best_path)


class HardExampleMining(keras.callbacks.Callback):
    """Emphasises the training examples with the largest categorical cross-entropy: every `every` epochs it
    scores a random `fraction` of them (a forward pass in inference mode), and from the next epoch on weights
    each scored example's loss by (loss / mean loss) ** strength, scaled to mean 1 and at least `floor`."""

    def __init__(self, batches: TrainBatches, every: int = 1, fraction: float = 0.2, strength: float = 1.0,
                 floor: float = 0.5, batch_size: int = 128):
        super().__init__()
        if batches.weights is None:
            raise ValueError("hard-example mining needs TrainBatches(..., weighted=True)")
        self.batches, self.every, self.fraction = batches, every, fraction
        self.strength, self.floor, self.batch_size = strength, floor, batch_size

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        batches = self.batches
        rng = np.random.default_rng([batches.seed, epoch, 7])
        chosen = np.sort(rng.choice(len(batches.labels), max(1, int(len(batches.labels) * self.fraction)), False))
        losses = cross_entropy(self.model.predict(batches.inputs[chosen], batch_size=self.batch_size, verbose=0),
                               batches.labels[chosen])
        weights = (losses / max(losses.mean(), 1e-12)) ** self.strength
        batches.weights[chosen] = self.floor + (1 - self.floor) * weights / max(weights.mean(), 1e-12)
        if logs is not None:
            logs["mined_mean_loss"] = float(losses.mean())


def cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each example's categorical cross-entropy."""
    return -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0))


STATE = {keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter"),
         keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch", "stopped_epoch")}


class RunCheckpoint(keras.callbacks.Callback):
    """The run's one checkpoint, committed after each epoch (Run.save_epoch); at fit's start it gives the other
    callbacks back the state they had (they reset it in their own on_train_begin, so this one comes last)."""

    def __init__(self, run: Run, batches: TrainBatches, others: list):
        super().__init__()
        self.run, self.batches, self.others = run, batches, others
        self.started = time.perf_counter()

    def on_train_begin(self, logs=None):
        saved = self.run.state["callbacks"] if self.run.state["phase"] == self.run.phase else {}
        for index, callback in enumerate(self.others):
            for name in STATE.get(type(callback), ()):
                if _key(index, callback, name) in saved:
                    setattr(callback, name, saved[_key(index, callback, name)])
            if isinstance(callback, BestModel) and "best" in self.run.state["callbacks"]:
                callback.best = self.run.state["callbacks"]["best"]
        if self.batches.weights is not None and "mining" in self.run.arrays and saved:
            self.batches.weights[:] = self.run.arrays["mining"]

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        rate = logs.get("learning_rate", getattr(optimizer, "learning_rate", float("nan")))
        row = {"epoch": epoch + 1, "phase": self.run.phase, **{k: float(v) for k, v in (logs or {}).items()},
               "learning_rate": float(keras.ops.convert_to_numpy(rate)),
               "seconds": round(time.perf_counter() - self.started, 2), "examples": len(self.batches.labels)}
        state = {_key(i, c, name): _plain(getattr(c, name)) for i, c in enumerate(self.others)
                 for name in STATE.get(type(c), ())}
        best = [c.best for c in self.others if isinstance(c, BestModel)]
        state["best"] = _plain(best[0]) if best else self.run.state["callbacks"].get("best", -math.inf)
        done = bool(self.model.stop_training) or epoch + 1 >= self.params["epochs"]
        arrays = {"mining": self.batches.weights} if self.batches.weights is not None else {}
        self.run.save_epoch(row, done, state, arrays)


def _key(index: int, callback, name: str) -> str:
    return f"{type(callback).__name__}{index}.{name}"


def _plain(value):
    return float(value) if isinstance(value, (float, np.floating)) else value


def for_run(run: Run, batches: TrainBatches, callbacks: list) -> list:
    """`callbacks` with what every phase of a run needs: the epoch's order drawn first, the run's checkpoint
    last (TensorBoard's logs and history.csv are written from it)."""
    return [EpochOrder(batches), *callbacks, RunCheckpoint(run, batches, callbacks)]
