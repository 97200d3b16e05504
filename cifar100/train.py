"""A training run: a Config in, a run folder out (models/<run>/).

Two phases: the backbone frozen while the head learns, then fine-tuning at a lower learning rate with
BatchNorm in inference mode. Without pretrained weights there is nothing to keep frozen: phase 1 is skipped
and every layer, BatchNorm included, trains from the start. A run killed at any point and started again
with the same run folder resumes where it stopped.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from cifar100 import data, distribution, head, keras_internals, models, results, run_folder, tflogs
from cifar100 import mining as hem
from cifar100.callbacks import EpochLine, callback_set, write_tensorboard
from cifar100.compiling import compile_model, learning_rate_for, precision_policy
from cifar100.config import Config, ConfigError
from cifar100.datasplit import Splits, prepare_data, splits_key
from cifar100.errors import RunError
from cifar100.sampling import TrainBatches, one_hot
from cifar100.tflogs import keras  # Keras, imported without TensorFlow's start-up lines
from cifar100.validation import validate

PHASE1_WEIGHTS = "phase1.weights.h5"


def save_class_info(run_dir: Path, dataset: data.Dataset) -> None:
    info = {"kind": dataset.kind, "synthetic": dataset.synthetic, "class_names": dataset.class_names,
            "coarse_names": dataset.coarse_names,
            "fine_to_coarse": None if dataset.fine_to_coarse is None else dataset.fine_to_coarse.tolist()}
    run_folder.write_json(run_dir / "classes.json", info)


def fit_phase(model: keras.Model, config: Config, run_dir: Path, phase: str, *, sampler: TrainBatches,
              validation: tuple[np.ndarray, np.ndarray], epochs: tuple[int, int],
              mining: keras.callbacks.Callback | None, verbose: int | str,
              extra_callbacks: list[keras.callbacks.Callback] | tuple = (),
              inference: keras.Model | None = None) -> None:
    """One phase of training of `model` (the training model) over `epochs` = (start, end): from `start` (or
    where a killed run of this phase stopped) to `end`, counted from the run's first epoch. The best epoch's
    `inference` model (default: `model`) is saved as best.keras."""
    start_epoch, end_epoch = epochs
    backup = run_dir / "backup" / phase
    committed = run_folder.settle_phase(run_dir, backup, start_epoch)
    if (backup / "latest.weights.h5").exists():  # BackupAndRestore loads it into the model and its optimiser
        run_folder.check_weights_file(backup / "latest.weights.h5", model, copies=3)
    restored = run_folder.load_callback_state(backup, committed) if committed > start_epoch else None
    if restored and restored.get("stopped"):
        end_epoch = committed  # early stopping had ended this phase: only restore its weights
    if committed > start_epoch:
        print(f"resuming phase {phase!r} after epoch {committed} (of epochs {start_epoch + 1}-{end_epoch})")
    if restored and mining is not None and restored.get("mining"):
        mining.set_state(restored["mining"])
    callbacks = callback_set(config, run_dir, phase, sampler, mining, run_folder.best_val_accuracy(run_dir), restored,
                             start_epoch, inference=inference)
    keras_internals.forget_restored_epoch(model)  # else it would start where a previous fit's backup was
    # shuffle=False: the sampler draws each epoch's order itself; Keras would also shuffle the batches with
    # Python's global `random`, whose state a resumed process does not share with the one that was stopped
    model.fit(keras_internals.fit_input(sampler), validation_data=validation, initial_epoch=start_epoch,
              epochs=end_epoch, shuffle=False,
              callbacks=[tflogs.quiet_first_steps(), *callbacks, *extra_callbacks, EpochLine()], verbose=verbose)
    refuse_a_diverged_phase(run_dir, phase)


def refuse_a_diverged_phase(run_dir: Path, phase: str) -> None:
    """Stop the run, before anything is evaluated, when its loss became NaN or infinite (TerminateOnNaN
    then ended the phase): nothing trained after that epoch, and the settings need changing."""
    rows = run_folder.history_rows(run_dir)
    loss = rows[-1].get("loss") if rows else None
    if loss and not math.isfinite(float(loss)):
        raise RunError(f"phase {phase!r}: the training loss became {loss} at epoch {int(rows[-1]['epoch'])}, "
                       "and TerminateOnNaN stopped the run; nothing was evaluated. Lower the phase's learning "
                       "rate (head_learning_rate, finetune_learning_rate) or set clipnorm, which trains a new run")


PHASES = ("head", "finetune")


def run(config: Config, verbose: int | str = "auto", callbacks: list | None = None, splits: Splits | None = None,
        model: keras.Model | None = None) -> Path:
    """Train (or resume) the run described by `config`, both phases and the evaluation; returns its run folder.

    The notebook takes the same steps one by one (see Training)."""
    training = Training(config, verbose=verbose, callbacks=callbacks, splits=splits, model=model)
    try:
        for phase in PHASES:
            training.set_phase(phase)
            training.compile(phase)
            training.fit(phase)
        return training.finish()
    finally:
        training.close()


class Training:
    """One run's training, a step at a time, with the run folder's bookkeeping done here:

        training = Training(config)       # validates the settings, claims the run folder (or finds it finished)
        training.set_phase("head")        # freeze the backbone: only the head trains
        training.compile("head")          # the phase's optimiser, learning-rate schedule, loss and metrics
        training.fit("head")              # the callbacks; a phase done earlier is skipped, a killed one resumes
        training.set_phase("finetune")    # unfreeze the top finetune_fraction of the backbone (BatchNorm stays)
        training.compile("finetune")
        training.fit("finetune")
        run_dir = training.finish()       # the best checkpoint on validation and, once, on the test set

    `splits` (prepare_data) and `model` (models.new_model), when the caller already has them for these settings,
    are used instead of loading the data and building the model again (the notebook does this). Progress
    is recorded in the run folder (state.json, the phase-1 weights, BackupAndRestore's backup), so that a
    process killed at any point resumes where it stopped. `callbacks` are added to Keras' fit. Under a
    multi-worker distribution only the chief writes the run folder; every other worker works in a
    temporary folder (seeded from the chief's, to resume from the same point) removed by `close`.
    """

    def __init__(self, config: Config, verbose: int | str = "auto", callbacks: list | None = None,
                 splits: Splits | None = None, model: keras.Model | None = None):
        validate(config)  # before anything is read or written
        if config.hem and config.hem_mode == "selective" and keras.backend.backend() != "tensorflow":
            raise ConfigError(f"setting 'hem_mode': 'selective' needs Keras' TensorFlow backend, not "
                              f"{keras.backend.backend()!r} (it backpropagates batches whose size varies from "
                              "step to step, which a jit-compiled JAX step does not allow); use hem_mode=reweight")
        self.config, self.verbose, self.callbacks = config, verbose, list(callbacks or [])
        self.run_dir, self.worker_dir = config.run_dir(), None
        self.phase = self.compiled = None  # the phase set_phase last set, and the one compile last compiled for
        run_folder.check_model_format(self.run_dir)
        self.done = run_folder.finished(self.run_dir) and \
            Config.load(self.run_dir / "config.json").identity() == config.identity()
        if self.done:
            print(f"finished run found: {self.run_dir} holds these settings' results; nothing to train")
            return
        given = splits is not None and splits.config_key == splits_key(config)
        self.splits = splits if given else prepare_data(config)
        self.strategy, cluster = distribution.make_strategy(config.distribution, config.distribution_timeout)
        if model is None or getattr(model, "built_for", None) != config.identity() or _distributed(self.strategy):
            # a model given is reused on one device only
            model = models.new_model(config, self.splits.dataset.num_classes, self.strategy)
        self.model = model  # the inference model: what best.keras holds
        with self.strategy.scope():  # the augmentation's random streams are variables
            self.fit_model = models.training_model(model, config)  # what fit trains: augmentation + model
        if cluster is not None and not cluster.is_chief:
            self.run_dir = self.worker_dir = distribution.worker_folder(config.run_dir(), cluster.index)
        with run_folder.RunLock(self.run_dir):
            resuming = run_folder.claim(config, self.run_dir)
            self.done = run_folder.finished(self.run_dir)
            if self.done:
                print(f"run {self.run_dir} is complete: see {self.run_dir / 'results.json'}")
                return
            print(("resuming" if resuming else "starting") + f" run {self.run_dir}"
                  + (f" on {self.strategy.num_replicas_in_sync} replicas"
                     if self.strategy.num_replicas_in_sync > 1 else ""))
            if not given:  # the notebook's data cell has described the data it passes
                print(self.splits.dataset.describe())
            save_class_info(self.run_dir, self.splits.dataset)
        self.train_data = (self.splits.x_train, self.splits.y_train)  # copied out of the dataset once
        self.sampler, self.mining = self._pipeline()
        self.validation = (self.splits.x_val, one_hot(self.splits.y_val, self.splits.dataset.num_classes))
        self.pretrained = config.weights is not None
        self.head = None  # phase 1's model on cached features (head_features="cached")
        self.started = time.perf_counter()

    def check(self, config: Config) -> None:
        """Refuse to go on when `config` (the notebook's settings now) is not the one this training was made for."""
        if config.identity() != self.config.identity() or config.run_dir() != self.config.run_dir():
            changes = "; ".join(config.differences(self.config)) or "the run folder"
            raise RunError(f"the settings changed since this training was made ({changes}): run the phase-1 "
                           "cell (it makes the training) and then this one")

    def _pipeline(self) -> tuple[TrainBatches, keras.callbacks.Callback | None]:
        """A phase's training batches and mining callback, made afresh for each attempt at a phase."""
        config, num_classes = self.config, self.splits.dataset.num_classes
        sampler = TrainBatches(*self.train_data, num_classes, config.batch_size,
                               seed=config.seed, mix=config.augment if config.augment in ("mixup", "cutmix") else None,
                               weighted=config.hem and config.hem_mode == "reweight")
        return sampler, hem.make_mining(config, sampler, self.fit_model)

    def _phase_done(self, phase: str) -> bool:
        state = run_folder.read_state(self.run_dir)
        if phase == "head":
            return (self.run_dir / PHASE1_WEIGHTS).exists() and "head_epochs_done" in state
        return bool(state.get("finetune_done"))

    def _nothing_to_train(self, phase: str) -> bool:
        """True when `phase` has no training to do: the run is finished, the phase was done earlier, or
        phase 1 without pretrained weights (a head on frozen random features is skipped)."""
        return self.done or self._phase_done(phase) or (phase == "head" and not self.pretrained)

    def set_phase(self, phase: str) -> None:
        """Freeze (phase 'head': the backbone) or unfreeze (phase 'finetune': the top finetune_fraction of the
        backbone, BatchNorm kept in inference mode with pretrained weights) the model's layers."""
        if not self.done:
            models.set_phase(self.fit_model, phase, self.config.finetune_fraction, self.pretrained)
            self.phase = phase
            counts = models.count_parameters(self.model)
            print(f"phase {phase!r}: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters")

    def compile(self, phase: str) -> None:
        """Compile for `phase` (after set_phase: Keras reads which weights train when it compiles)."""
        if self._nothing_to_train(phase):
            return
        if self.phase != phase:
            raise RunError(f"call set_phase({phase!r}) before compile({phase!r}): a phase trains the layers "
                           "that set_phase leaves trainable")
        self.sampler, self.mining = self._pipeline()
        config, target, steps = self.config, self.fit_model, len(self.sampler)
        if phase == "head" and config.head_features == "cached":
            with self.strategy.scope():
                self.head = target = head.head_model(self.model)
            images = len(self.splits.train_indices) * (2 if config.augment != "none" else 1)
            steps = -(-images // config.batch_size)
        epochs = config.head_epochs if phase == "head" else config.finetune_epochs
        base = config.head_learning_rate if phase == "head" else config.finetune_learning_rate
        with self.strategy.scope():
            compile_model(target, learning_rate_for(base, config, epochs, steps), config)
        peak = learning_rate_for(base, config.replace(lr_schedule="plateau"), epochs, steps)
        run_folder.write_state(self.run_dir, **{f"{phase}_compiled": {  # peak: after warm-up, before any decay
            "optimizer": config.optimizer, "learning_rate": float(peak),
            "schedule": config.lr_schedule, "jit_compile": bool(getattr(target, "jit_compile", False))}})
        self.compiled = phase

    def fit(self, phase: str) -> None:
        """Train `phase` with the callbacks; a phase done earlier is skipped, one a killed process left
        unfinished resumes at its last finished epoch."""
        if self.done:
            return
        if self._phase_done(phase):
            print(f"phase {phase!r} was finished earlier in {self.run_dir}: its weights are used")
            if phase == "head":
                self._load_phase1()
            return
        if self.compiled != phase and not (phase == "head" and not self.pretrained):
            raise RunError(f"call compile({phase!r}) before fit({phase!r}): each attempt at a phase starts from a "
                           "freshly compiled optimiser, as a resumed process does")
        self.compiled = None
        with run_folder.RunLock(self.run_dir):
            if phase == "head":
                self._fit_head()
            else:  # from phase 1's weights and mining state (a phase resumed mid-way then restores its own)
                self._load_phase1()
                _restore_mining(self.mining, self.run_dir, "head")
                start = run_folder.read_state(self.run_dir)["head_epochs_done"]
                fit_phase(self.fit_model, self.config, self.run_dir, "finetune", sampler=self.sampler,
                          validation=self.validation, epochs=(start, start + self.config.finetune_epochs),
                          mining=self.mining, verbose=self.verbose, extra_callbacks=self.callbacks,
                          inference=self.model)
                run_folder.write_state(self.run_dir, finetune_done=True)

    def _load_phase1(self) -> None:
        """The model's weights as phase 1 left them; the optimiser compiled for the phase is kept as it is."""
        run_folder.check_weights_file(self.run_dir / PHASE1_WEIGHTS, self.model)
        with warnings.catch_warnings():  # the file's optimiser (none, or phase 1's) is deliberately not loaded
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            self.model.load_weights(self.run_dir / PHASE1_WEIGHTS)

    def _fit_head(self) -> None:
        config = self.config
        self.model.set_weights(self.model.initial_weights)  # phase 1 (re)starts from the initial weights
        keras.mixed_precision.set_global_policy(precision_policy(config.mixed_precision))
        keras.utils.set_random_seed(config.seed)
        if not self.pretrained:
            print("no pretrained weights: phase 1 (a head on frozen random features) is skipped")
            (self.run_dir / run_folder.HISTORY).unlink(missing_ok=True)
        elif config.head_features == "cached":
            head.train_on_features(self.model, self.head, config, self.run_dir, self.splits,
                                   mining_columns=self.mining is not None, verbose=self.verbose,
                                   callbacks=self.callbacks)
        else:
            fit_phase(self.fit_model, config, self.run_dir, "head", sampler=self.sampler, validation=self.validation,
                      epochs=(0, config.head_epochs), mining=self.mining, verbose=self.verbose,
                      extra_callbacks=self.callbacks, inference=self.model)
        tmp = self.run_dir / f".{PHASE1_WEIGHTS}"
        self.model.save_weights(tmp)
        os.replace(tmp, self.run_dir / PHASE1_WEIGHTS)
        run_folder.write_state(self.run_dir, head_epochs_done=len(run_folder.history_rows(self.run_dir)))
        if config.tensorboard and self.pretrained:  # phase 1 on cached features is atomic: logged once done
            write_tensorboard(self.run_dir)

    def finish(self) -> Path:
        """Evaluate the best checkpoint and write results.json; the backups go. Returns the run folder."""
        if not self.done:
            with run_folder.RunLock(self.run_dir):
                results.write(self.config, self.run_dir, self.splits, self.mining, time.perf_counter() - self.started)
                run_folder.write_state(self.run_dir, finished=True)
                shutil.rmtree(self.run_dir / "backup", ignore_errors=True)
                shutil.rmtree(self.run_dir / run_folder.CHECKPOINTS, ignore_errors=True)
            self.done = True
        return self.config.run_dir()

    def close(self) -> None:
        """Remove a non-chief worker's temporary folder."""
        if self.worker_dir is not None:
            shutil.rmtree(self.worker_dir, ignore_errors=True)


def _distributed(strategy) -> bool:
    """True for a tf.distribute strategy (even of one replica): its model must be built inside its scope."""
    return type(strategy).__name__ not in ("_DefaultDistributionStrategy", "_NoStrategy")


def _restore_mining(mining: keras.callbacks.Callback | None, run_dir: Path, phase: str) -> None:
    """A run resumed after a finished phase continues with the mining state that phase ended with."""
    state = run_folder.last_callback_state(run_dir / "backup" / phase)
    if mining is not None and state and state.get("mining"):
        mining.set_state(state["mining"])
