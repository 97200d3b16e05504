"""A training run: a Config in, a run folder out (models/<run>/). `run` makes the notebook cells' calls:

    training = Training(config)                     # claims the run folder (or finds the run finished)
    for phase in ("head", "finetune"):
        training.set_phase(phase)                   # what trains: the head alone, then the top of the backbone
        if training.needs(phase):                   # False: done earlier, or the run is finished
            model, batches, validation = training.data(phase)
            model.compile(optimizer=..., loss=..., metrics=...)
            model.fit(batches, validation_data=validation, callbacks=training.callbacks(phase), ...)
            training.end(phase)
    training.finish()                               # the best checkpoint on validation and test: results.json

Without pretrained weights phase 1 is skipped. A killed run started again in its run folder resumes where it stopped.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from cifar100 import data, distribution, evaluate, keras_internals, models, run_folder
from cifar100 import mining as hem
from cifar100.batches import EpochOrder, TrainBatches, cached_activations, one_hot
from cifar100.callbacks import (
    EpochLine,
    EpochTimer,
    HistoryLog,
    ResumeState,
    callback_set,
    reduce_lr_on_plateau,
    write_tensorboard,
)
from cifar100.config import Config, ConfigError, RunError, first_line, shown, validate
from cifar100.data import Splits, prepare_data, splits_key
from cifar100.keras_internals import keras  # Keras, imported without TensorFlow's start-up lines

PHASE1_WEIGHTS = "phase1.weights.h5"
PHASES = ("head", "finetune")


def learning_rate(config: Config, phase: str, steps_per_epoch: int):
    """A phase's learning rate: the number itself ('plateau': ReduceLROnPlateau lowers it), or warm-up plus
    cosine decay ('cosine') over the phase's steps. Scaled by batch_size / reference_batch_size when set."""
    rate = config.head_learning_rate if phase == "head" else config.finetune_learning_rate
    epochs = config.head_epochs if phase == "head" else config.finetune_epochs
    if config.reference_batch_size:
        rate = distribution.scaled_learning_rate(rate, config.batch_size, config.reference_batch_size)
    if config.lr_schedule != "cosine":
        return rate
    total = max(1, epochs * steps_per_epoch)
    warmup = min(config.warmup_epochs * steps_per_epoch, total - 1)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(rate, total)
    return keras.optimizers.schedules.CosineDecay(0.0, total - warmup, warmup_target=rate, warmup_steps=warmup)


def optimizer(config: Config, rate) -> keras.optimizers.Optimizer:
    """The setting `optimizer`: AdamW (with weight_decay), SGD (Nesterov momentum 0.9) or Adam."""
    clip = {"clipnorm": config.clipnorm} if config.clipnorm else {}
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=config.weight_decay, **clip)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, nesterov=True, weight_decay=config.weight_decay or None,
                                    **clip)
    return keras.optimizers.Adam(rate, **clip)


def jit_compile(config: Config):
    """`compile`'s jit_compile: 'auto' lets Keras decide (XLA with a GPU, when every layer allows it)."""
    value = str(config.jit_compile).lower()
    return "auto" if value == "auto" else value == "true"


def compile_model(model: keras.Model, rate, config: Config) -> None:
    """What the notebook's phase cells write out: the run's optimiser, loss and metrics."""
    model.compile(optimizer=optimizer(config, rate),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
                  metrics=["accuracy", keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
                  jit_compile=jit_compile(config))


def compile_differences(config: Config, phase: str, steps_per_epoch: int, model: keras.Model) -> list[str]:
    """'what: compiled (settings: expected)' where `model`'s optimiser or loss is not the one the settings give."""
    expected_loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    found = {"optimizer": _described_optimizer(getattr(model.optimizer, "inner_optimizer", model.optimizer)),
             "loss": _described_loss(model.loss)}
    expected = {"optimizer": _described_optimizer(optimizer(config, learning_rate(config, phase, steps_per_epoch))),
                "loss": _described_loss(expected_loss)}
    return _differences("", found, expected)


def _described_optimizer(optimizer: keras.optimizers.Optimizer) -> dict:
    described = keras.optimizers.serialize(optimizer)
    described["config"]["weight_decay"] = described["config"].get("weight_decay") or None  # 0: none
    return described


def _described_loss(loss) -> dict:
    loss = keras.losses.get(loss) if isinstance(loss, str) else loss  # "categorical_crossentropy": the function
    if loss is keras.losses.categorical_crossentropy:
        loss = keras.losses.CategoricalCrossentropy()  # the same loss, without label smoothing
    if isinstance(loss, keras.losses.Loss):
        return {"class_name": type(loss).__name__, "config": loss.get_config()}
    return {"class_name": getattr(loss, "__name__", type(loss).__name__), "config": {}}


def _differences(where: str, found, expected) -> list[str]:
    what = where.rstrip(".").replace(".config.", ".")
    if isinstance(found, dict) and isinstance(expected, dict):
        if found.get("class_name") != expected.get("class_name"):
            return [f"{what}: {found.get('class_name')} (settings: {expected.get('class_name')})"]
        keys = [key for key in {**expected, **found} if key not in ("name", "module", "registered_name")]
        return [line for key in keys for line in _differences(f"{where}{key}.", found.get(key), expected.get(key))]
    numbers = all(isinstance(v, float | int) and not isinstance(v, bool) for v in (found, expected))
    if numbers and math.isclose(found, expected, rel_tol=1e-6) or not numbers and found == expected:
        return []
    return [f"{what}: {_shown(found)} (settings: {_shown(expected)})"]


def _shown(value) -> str:
    """A compiled value in a message: a number in 6 digits, a schedule by its class."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value["class_name"] if isinstance(value, dict) and "class_name" in value else shown(value)


def run(config: Config, verbose: int | str = "auto", callbacks: list | None = None, splits: Splits | None = None,
        model: keras.Model | None = None) -> Path:
    """Train (or resume) `config`'s run, both phases and the evaluation; returns its run folder."""
    training = Training(config, splits=splits, model=model)
    try:
        for phase in PHASES:
            training.set_phase(phase)
            if training.needs(phase):
                trainee, batches, validation = training.data(phase)
                with training.strategy.scope():
                    compile_model(trainee, learning_rate(config, phase, len(batches)), config)
                first, last = training.epochs(phase)
                trainee.fit(batches, validation_data=validation, initial_epoch=first, epochs=last, shuffle=False,
                            callbacks=training.callbacks(phase, extra=callbacks), verbose=verbose)
                training.end(phase)
        return training.finish()
    finally:
        training.close()
        keras_internals.release_held_stderr()  # fit failed in its first step: what it held back is shown


def save_class_info(run_dir: Path, dataset: data.Dataset) -> None:
    info = {"kind": dataset.kind, "synthetic": dataset.synthetic, "class_names": dataset.class_names,
            "coarse_names": dataset.coarse_names,
            "fine_to_coarse": None if dataset.fine_to_coarse is None else dataset.fine_to_coarse.tolist()}
    run_folder.write_json(run_dir / "classes.json", info)


def cached_features(model: keras.Model, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                    batch_size: int, mirror: bool = True) -> dict:
    """The backbone's pooled features (the head's input) of the training images (and, with `mirror`, of their
    mirror images, as examples of their own: the one augmentation that survives caching) and of validation."""
    cached = cached_activations(models.feature_extractor(model), x_train, x_val, 2 if mirror else 1, 0, batch_size,
                                np.float32)
    train = np.concatenate(list(cached["train"].swapaxes(0, 1)))  # the images, then their mirror images
    return {"train": train, "train_labels": np.concatenate([y_train] * cached["train"].shape[1]),
            "val": cached["val"], "seconds": cached["seconds"]}


class Training:
    """One run's bookkeeping for the cells (and `run`) that compile and fit: the run folder, each phase's batches,
    callbacks and epochs. `splits` and `model`, given for these settings, are reused. Under multi-worker only the
    chief writes the run folder; the others use a temporary folder that `close` removes."""

    def __init__(self, config: Config, splits: Splits | None = None, model: keras.Model | None = None,
                 training_model: keras.Model | None = None):
        validate(config)  # before anything is read or written
        self.fingerprint = None  # what the run's model is (models.fingerprint of the training model)
        if model is not None:  # a model edited in the notebook trains into a folder of its own
            built_for = getattr(model, "built_for", config.identity())
            if built_for != config.identity():
                changes = "; ".join(config.differences(Config(**{**config.to_dict(), **built_for})))
                raise RunError(f"the model was built for other settings ({changes}): build it again (the model cell)")
            config, self.fingerprint, training_model = models.identify(config, model, training_model)
            if not hasattr(model, "initial_weights"):  # phase 1 starts from these, whenever it starts again
                model.initial_weights = model.get_weights()
        elif config.model:
            raise ConfigError(f"setting 'model': {config.model} is the fingerprint of a model edited in a notebook, "
                              "which cifar100/models.py cannot build: train it there (the model passed to "
                              "train.Training); leave the setting empty to train the model models.py builds")
        if config.hem and config.hem_mode == "selective" and keras.backend.backend() != "tensorflow":
            raise ConfigError(f"setting 'hem_mode': 'selective' needs Keras' TensorFlow backend, not "
                              f"{keras.backend.backend()!r} (it backpropagates batches whose size varies from "
                              "step to step, which a jit-compiled JAX step does not allow); use hem_mode=reweight")
        self.config = config
        self.run_dir, self.worker_dir = config.run_dir(), None
        self.phase = None  # the phase set_phase last set
        self.strategy = distribution.NoStrategy()
        run_folder.check_model_format(self.run_dir)
        self.done = run_folder.finished(self.run_dir) and \
            Config.load(self.run_dir / "config.json").identity() == config.identity()
        if self.done:
            if run_folder.read_state(self.run_dir).get("model_fingerprint"):  # what the run trained
                classes = len(data.read_classes(self.run_dir)["class_names"])
                current = self.fingerprint or models.recipe_fingerprint(config, classes)
                run_folder.check_fingerprint(self.run_dir, current, models.earlier_fingerprint(config, classes))
            print(f"finished run found: {self.run_dir} holds these settings' results; nothing to train")
            return
        given = splits is not None and splits.config_key == splits_key(config)
        self.splits = splits if given else prepare_data(config)
        classes = self.splits.dataset.num_classes
        if model is not None and model.outputs[0].shape[-1] != classes:  # before a folder is claimed for it
            raise RunError(f"the model gives {model.outputs[0].shape[-1]} probabilities, the data have {classes} "
                           "classes: build it with dataset.num_classes (the model cell)")
        self.strategy, cluster = distribution.make_strategy(config.distribution, config.distribution_timeout)
        if config.model and distribution.is_distributed(self.strategy):
            raise ConfigError("a model edited in the notebook trains on one device: set distribution=none, or "
                              "build the model in cifar100/models.py (it is then built under the distribution)")
        if model is None or distribution.is_distributed(self.strategy):  # a model given is used on one device
            model, training_model = models.new_model(config, self.splits.dataset.num_classes, self.strategy), None
        self.model = model  # the inference model: what best.keras holds
        if training_model is None:  # models.py's model (new_model has its fingerprint)
            with self.strategy.scope():  # the augmentation's random streams are variables
                training_model = models.training_model(model, config)
            self.fingerprint = models.recipe_fingerprint(config, self.splits.dataset.num_classes)
        self.fit_model = training_model  # what fit trains: the augmentation, then the model's layers
        if cluster is not None and not cluster.is_chief:
            self.run_dir = self.worker_dir = distribution.worker_folder(config.run_dir(), cluster.index)
        self.lock = run_folder.RunLock(self.run_dir, trains=True).acquire()  # held until finish() or close()
        try:
            resuming = run_folder.claim(config, self.run_dir, self.fingerprint,
                                        models.earlier_fingerprint(config, self.splits.dataset.num_classes))
            self.done = run_folder.finished(self.run_dir)
            if not self.done:
                save_class_info(self.run_dir, self.splits.dataset)
        except BaseException:
            self.lock.release()
            raise
        if self.done:
            self.lock.release()
            print(f"run {self.run_dir} is complete: see {self.run_dir / 'results.json'}")
            return
        replicas = self.strategy.num_replicas_in_sync
        print(("resuming" if resuming else "starting") + f" run {self.run_dir}"
              + (f" on {replicas} replicas" if replicas > 1 else ""))
        if not given:  # the notebook's data cell has described the data it passes
            print(self.splits.dataset.describe())
        self.train_data = (self.splits.x_train, self.splits.y_train)  # copied out of the dataset once
        self.validation = (self.splits.x_val, one_hot(self.splits.y_val, self.splits.dataset.num_classes))
        self.pretrained = config.weights is not None
        self.cached = config.head_features == "cached"
        self.attempt = None  # what data() prepared for the phase being trained
        self.started = time.perf_counter()

    def check(self, config: Config) -> None:
        """Refuse to go on when `config` (the notebook's settings now) is not the one this training was made for."""
        config = config.replace(model=self.config.model)
        if config.identity() != self.config.identity() or config.run_dir() != self.config.run_dir():
            changes = "; ".join(config.differences(self.config)) or "the run folder"
            raise RunError(f"the settings changed since this training was made ({changes}): run the phase-1 "
                           "cell (it makes the training) and then this one")

    def set_phase(self, phase: str) -> None:
        """Freeze the backbone ('head') or unfreeze its top finetune_fraction (BatchNorm frozen if pretrained)."""
        if not self.done:
            models.set_phase(self.fit_model, phase, self.config.finetune_fraction, self.pretrained)
            self.phase = phase
            counts = models.count_parameters(self.model)
            print(f"phase {phase!r}: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters")

    def _phase_done(self, phase: str) -> bool:
        state = run_folder.read_state(self.run_dir)
        if phase != "head":
            return bool(state.get("finetune_done"))
        done = state.get("head_epochs_done")
        if done is not None and not ((self.run_dir / PHASE1_WEIGHTS).exists() and done <= self.config.head_epochs):
            raise RunError(f"{self.run_dir / 'state.json'}: records phase 1 done after {done} epochs, but "
                           + (f"{PHASE1_WEIGHTS} is missing" if done <= self.config.head_epochs else
                              f"the phase has {self.config.head_epochs}")
                           + f"; restore the run folder, or delete {self.run_dir} to start over")
        return (self.run_dir / PHASE1_WEIGHTS).exists() and done is not None

    def needs(self, phase: str) -> bool:
        """True when `phase` has training to do; False when finished, skipped, or done earlier (its weights loaded)."""
        if self.done:
            print(f"phase {phase!r}: nothing to train, the run is finished (to train otherwise, change the settings: "
                  "they name the run)")
            return False
        if self.phase != phase:
            raise RunError(f"call set_phase({phase!r}) first: a phase trains the layers that set_phase leaves "
                           "trainable")
        if self._phase_done(phase):
            print(f"phase {phase!r} was finished earlier in {self.run_dir}: its weights are used")
            if phase == "head":
                self._load_phase1()
            return False
        if phase == "head" and not self.pretrained:
            print("no pretrained weights: phase 1 (a head on frozen random features) is skipped")
            self._start_phase1()
            (self.run_dir / run_folder.HISTORY).unlink(missing_ok=True)
            self._phase1_done()
            return False
        return True

    def data(self, phase: str) -> tuple[keras.Model, object, tuple]:
        """Start an attempt at `phase`: (the model to compile and fit, training batches, validation data). Phase 1 on
        cached features trains the head alone on features computed here; an unfinished phase resumes (epochs())."""
        if not self.needs(phase):
            raise RunError(f"phase {phase!r} has nothing to train (training.needs({phase!r}) is False)")
        config, num_classes = self.config, self.splits.dataset.num_classes
        if phase == "head":
            self._start_phase1()
        elif not self._phase_done("head"):
            raise RunError("phase 'finetune' starts from phase 1's weights: run phase 'head' first (set_phase, "
                           "needs, and for a phase with training to do: data, compile, fit, end)")
        else:  # from phase 1's weights (a phase resumed mid-way then restores its own)
            self._load_phase1()
        if phase == "head" and self.cached:
            features = cached_features(self.model, *self.train_data, self.splits.x_val,
                                       models.inference_batch_size(config), mirror=config.augment != "none")
            print(f"phase 1 on cached features: the backbone ran once over {len(features['train'])} training "
                  f"images ({'with' if config.augment != 'none' else 'without'} mirror images) and "
                  f"{len(features['val'])} validation images in {features['seconds']:.0f} s")
            sampler = TrainBatches(features["train"], features["train_labels"], num_classes, config.batch_size,
                                   seed=config.seed)
            with self.strategy.scope():
                trainee = models.head_model(self.model)
            self.attempt = {"phase": phase, "sampler": sampler, "mining": None, "model": trainee, "optimizer": None,
                            "features_seconds": features["seconds"], "epochs": (0, config.head_epochs)}
            return trainee, keras_internals.fit_input(sampler), (features["val"], one_hot(self.splits.y_val,
                                                                                          num_classes))
        trainee, validation, activation_seconds = self.fit_model, self.validation, None
        if phase == "finetune" and config.finetune_features == "cached":  # the top trains on the bottom's outputs
            with self.strategy.scope():
                bottom, trainee, cut = models.split_backbone(self.model, config.finetune_fraction)
            cached = cached_activations(bottom, self.train_data[0], self.splits.x_val, config.views(), config.seed,
                                        models.inference_batch_size(config))
            print(f"phase 2 on cached activations: the backbone up to {cut} ran once over {config.views()} "
                  f"view(s) of {len(cached['train'])} training images and {len(cached['val'])} validation images "
                  f"in {cached['seconds']:.0f} s ({(cached['train'].nbytes + cached['val'].nbytes) / 2**30:.2f} GiB)")
            sampler = TrainBatches(cached["train"], self.train_data[1], num_classes, config.batch_size,
                                   seed=config.seed, views=True)
            validation = (cached["val"], validation[1])
            activation_seconds = cached["seconds"]
        else:
            sampler = TrainBatches(*self.train_data, num_classes, config.batch_size, seed=config.seed,
                                   mix=config.augment if config.augment in ("mixup", "cutmix") else None,
                                   weighted=config.hem and config.hem_mode == "reweight")
        mining = hem.make_mining(config, sampler, self.fit_model)
        start = 0 if phase == "head" else run_folder.read_state(self.run_dir)["head_epochs_done"]
        end = start + (config.head_epochs if phase == "head" else config.finetune_epochs)
        if phase == "finetune":
            _restore_mining(mining, self.run_dir, "head")
        backup = self.run_dir / "backup" / phase
        committed = run_folder.settle_phase(self.run_dir, backup, start, end)
        if (backup / "latest.weights.h5").exists():  # BackupAndRestore loads it into the model and its optimiser
            evaluate.check_weights_file(backup / "latest.weights.h5", trainee, copies=3)
        restored = ResumeState.load(backup, committed, required=True) if committed > start else None
        if restored and restored.get("stopped"):
            end = committed  # early stopping had ended this phase: only restore its weights
        if committed > start:
            print(f"resuming phase {phase!r} after epoch {committed} (of epochs {start + 1}-{end})")
        if restored and mining is not None:
            mining.set_state(restored.get("mining"))
        keras_internals.forget_restored_epoch(trainee)  # else it would start where a previous fit's backup was
        self.attempt = {"phase": phase, "sampler": sampler, "mining": mining, "model": trainee,
                        "optimizer": getattr(trainee, "optimizer", None), "restored": restored, "epochs": (start, end),
                        "features_seconds": activation_seconds}
        return trainee, keras_internals.fit_input(sampler), validation

    def _attempt(self, phase: str) -> dict:
        if not self.attempt or self.attempt["phase"] != phase:
            raise RunError(f"call training.data({phase!r}) first: each attempt at a phase starts there, from a "
                           "freshly compiled model, as a resumed process does")
        return self.attempt

    def epochs(self, phase: str) -> tuple[int, int]:
        """fit's (initial_epoch, epochs), counted from the run's first epoch: a stopped phase resumes after its last."""
        return self._attempt(phase)["epochs"]

    def callbacks(self, phase: str, extra: list | None = None) -> list[keras.callbacks.Callback]:
        """The phase's callbacks (callbacks.callback_set, or the short set of phase 1 on cached features), then
        `extra`, then the progress line (last: Keras then uses it instead of its own)."""
        attempt, config = self._attempt(phase), self.config
        self._record_compile(phase, attempt["model"])
        quiet = keras_internals.QuietFirstSteps()
        if phase == "head" and self.cached:  # a short phase, atomic: a kill during it does it again
            (self.run_dir / run_folder.HISTORY).unlink(missing_ok=True)
            reduce_lr = reduce_lr_on_plateau(config)
            # no mining here, but its columns are filled (NaN: no scoring pass): history.csv keeps one set of columns
            unmined = {key: 0 if key in hem.LOG_KEYS else float("nan") for key in hem.log_keys(config)}
            return [quiet, EpochOrder(attempt["sampler"]), EpochTimer(config.batch_size),
                    *([keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update(unmined))]
                      if unmined else []),
                    keras.callbacks.TerminateOnNaN(), *([reduce_lr] if reduce_lr is not None else []),
                    keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", restore_best_weights=True,
                                                  patience=config.early_stopping_patience, verbose=1),
                    HistoryLog(self.run_dir / run_folder.HISTORY, append=True), *(extra or []), EpochLine()]
        return [quiet, *callback_set(config, self.run_dir, phase, attempt["sampler"], attempt["mining"],
                                     run_folder.best_val_accuracy(self.run_dir), attempt["restored"],
                                     attempt["epochs"][0], inference=self.model), *(extra or []), EpochLine()]

    def _record_compile(self, phase: str, model: keras.Model) -> None:
        """Refuse a compile other than the settings' (they name the run); record it (results.json's
        "optimization"; the peak rate: after warm-up)."""
        if getattr(model, "optimizer", None) is None or model.optimizer is self.attempt["optimizer"]:
            raise RunError(f"compile the model that training.data({phase!r}) gave before fit: a phase trains with "
                           "a freshly compiled optimiser, as a resumed process does")
        changed = compile_differences(self.config, phase, len(self.attempt["sampler"]), model)
        if changed:
            raise ConfigError(f"phase {phase!r} was compiled otherwise than the settings say ({'; '.join(changed)}): "
                              "they name the run's folder, so compile with what they give, as the notebook's cell "
                              f"does (optimizer=train.optimizer(config, train.learning_rate(config, {phase!r}, "
                              "len(batches))), loss=CategoricalCrossentropy(label_smoothing=config.label_smoothing)),"
                              " and make a change in the settings (optimizer, weight_decay, clipnorm, "
                              f"{phase}_learning_rate, lr_schedule, warmup_epochs, label_smoothing); nothing was "
                              "trained")
        inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # under mixed_float16's loss scaling
        peak = learning_rate(self.config.replace(lr_schedule="plateau"), phase, 1)
        run_folder.write_state(self.run_dir, **{f"{phase}_compiled": {
            "optimizer": type(inner).__name__.lower(), "learning_rate": float(peak),
            "schedule": self.config.lr_schedule, "jit_compile": bool(getattr(model, "jit_compile", False))}})

    def end(self, phase: str) -> None:
        """After fit: refuse a phase whose loss diverged, then record the phase as done."""
        attempt = self._attempt(phase)
        self.attempt = None
        refuse_a_diverged_phase(self.run_dir, phase)
        if phase == "head" and self.cached:  # the best epoch's head on the frozen backbone: best.keras
            run_folder.save_atomic(self.run_dir / "best.keras", self.model.save)
            run_folder.write_state(self.run_dir, head_feature_seconds=round(attempt["features_seconds"], 1))
        if phase == "head":
            self._phase1_done()
        else:
            seconds = attempt["features_seconds"]  # cached activations: this attempt's (a resumed one computed them)
            run_folder.write_state(self.run_dir, finetune_done=True,
                                   **({"finetune_activation_seconds": round(seconds, 1)} if seconds else {}))

    def _phase1_done(self) -> None:
        run_folder.save_atomic(self.run_dir / PHASE1_WEIGHTS, self.model.save_weights)
        run_folder.write_state(self.run_dir, head_epochs_done=len(run_folder.history_rows(self.run_dir)))
        if self.config.tensorboard and self.pretrained:  # phase 1 on cached features is logged once done
            write_tensorboard(self.run_dir)

    def _load_phase1(self) -> None:
        """The model's weights as phase 1 left them (the file's optimiser, none or phase 1's, is not loaded)."""
        path = self.run_dir / PHASE1_WEIGHTS
        evaluate.check_weights_file(path, self.model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            try:
                self.model.load_weights(path)
            except (ValueError, KeyError) as exc:  # Keras' loader, on weights of other shapes or names
                raise RunError(f"{path}: not phase 1's weights of this run's model ({type(exc).__name__}: "
                               f"{first_line(exc)}); restore it, or delete the run folder "
                               f"{self.run_dir} to start over") from None

    def _start_phase1(self) -> None:
        """Phase 1 (re)starts from the initial weights, precision policy and seed, whenever it starts again."""
        self.model.set_weights(self.model.initial_weights)
        keras.mixed_precision.set_global_policy(models.precision_policy(self.config.mixed_precision))
        keras.utils.set_random_seed(self.config.seed)

    def finish(self) -> Path:
        """Evaluate the best checkpoint and write results.json; the backups go. Returns the run folder."""
        if not self.done:
            if not self._phase_done("finetune"):
                raise RunError("call finish() once phase 'finetune' has ended (training.end('finetune')): the run "
                               f"in {self.run_dir} is not trained to its end yet")
            evaluate.write_results(self.config, self.run_dir, self.splits, time.perf_counter() - self.started,
                                   self.model if self.config.model else None)
            run_folder.write_state(self.run_dir, finished=True)
            shutil.rmtree(self.run_dir / "backup", ignore_errors=True)
            shutil.rmtree(self.run_dir / run_folder.CHECKPOINTS, ignore_errors=True)
            self.done = True
            self.lock.release()
        return self.run_dir if self.worker_dir is None else self.config.run_dir()

    def close(self) -> None:
        """Let go of the run folder; remove a non-chief worker's temporary folder."""
        if getattr(self, "lock", None) is not None:
            self.lock.release()
        if self.worker_dir is not None:
            shutil.rmtree(self.worker_dir, ignore_errors=True)

    def __del__(self):  # a training the notebook no longer holds (its cell was run again) lets go of the folder
        if getattr(self, "lock", None) is not None:
            self.lock.release()


def refuse_a_diverged_phase(run_dir: Path, phase: str) -> None:
    """Stop the run before anything is evaluated when its loss became NaN or infinite (TerminateOnNaN ended it)."""
    rows = run_folder.history_rows(run_dir)
    loss = rows[-1].get("loss") if rows else None
    if loss and not math.isfinite(float(loss)):
        raise RunError(f"phase {phase!r}: the training loss became {loss} at epoch {int(rows[-1]['epoch'])}, "
                       "and TerminateOnNaN stopped the run; nothing was evaluated. Lower the phase's learning "
                       "rate (head_learning_rate, finetune_learning_rate) or set clipnorm, which trains a new run")


def _restore_mining(mining: keras.callbacks.Callback | None, run_dir: Path, phase: str) -> None:
    """A run resumed after a finished phase continues with the mining state that phase ended with."""
    state = ResumeState.load(run_dir / "backup" / phase)
    if mining is not None and state:
        mining.set_state(state.get("mining"))
