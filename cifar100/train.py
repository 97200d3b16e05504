"""A training run: a Config in, a run folder out (models/<run>/).

Two phases: the backbone frozen while the head learns, then fine-tuning at a lower learning rate with
BatchNorm in inference mode. Without pretrained weights there is nothing to keep frozen: phase 1 is skipped
and every layer, BatchNorm included, trains from the start. A run killed at any point and started again
with the same run folder resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from cifar100 import data, distribution, head, models, run_folder
from cifar100 import mining as hem
from cifar100.callbacks import EpochTimer, callback_set, reduce_lr_on_plateau
from cifar100.config import Config, ConfigError, validate
from cifar100.sampling import TrainBatches, one_hot

PHASE1_WEIGHTS = "phase1.weights.h5"


@dataclass
class Splits:
    """The run's data: training and validation come from the training set; test is touched at the end."""

    dataset: data.Dataset
    train_indices: np.ndarray
    val_indices: np.ndarray
    config_key: tuple = ()  # the settings the splits were made for (_splits_key)

    @property
    def x_train(self):
        return self.dataset.x_train[self.train_indices]

    @property
    def y_train(self):
        return self.dataset.y_train[self.train_indices]

    @property
    def x_val(self):
        return self.dataset.x_train[self.val_indices]

    @property
    def y_val(self):
        return self.dataset.y_train[self.val_indices]


def prepare_data(config: Config, dataset: data.Dataset | None = None) -> Splits:
    """Load the dataset (unless given), carve the stratified validation split, and apply the cap on training
    images. The cap leaves validation whole: the callbacks need a steady signal more than it saves time."""
    dataset = dataset if dataset is not None else data.load(config.data_dir)
    train_idx, val_idx = data.split(dataset.y_train, config.val_fraction, config.seed)
    cap = config.max_train_images
    if cap is not None and cap < len(train_idx):
        train_idx = train_idx[data.stratified_subset(dataset.y_train[train_idx], cap, config.seed)]
    return Splits(dataset, train_idx, val_idx, _splits_key(config))


def _splits_key(config: Config) -> tuple:
    """The settings that decide the splits: splits made for other settings are not reused."""
    return (os.path.normpath(config.data_dir), config.val_fraction, config.max_train_images, config.seed)


def jit_setting(value: str):
    """The `jit_compile` argument for Keras: 'auto' lets Keras decide (XLA when every layer supports it, not
    on a CPU-only TensorFlow machine, not under tf.distribute); 'true'/'false' force it."""
    value = str(value).lower()
    return "auto" if value == "auto" else value == "true"


def resolve_flag(value: str) -> bool:
    """'auto' means on when a GPU is visible."""
    value = str(value).lower()
    if value == "auto":
        return bool(gpu_names())
    return value == "true"


def precision_policy(setting: str) -> str:
    """The Keras dtype policy of a `mixed_precision` setting."""
    if str(setting).lower() == "bfloat16":
        return "mixed_bfloat16"
    return "mixed_float16" if resolve_flag(setting) else "float32"


def gpu_names() -> list[str]:
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_physical_devices("GPU")]
    if keras.backend.backend() == "jax":
        import jax

        return [str(d) for d in jax.devices() if d.platform == "gpu"]
    return []


def learning_rate_for(learning_rate: float, config: Config, epochs: int, steps_per_epoch: int):
    """A phase's learning rate: the number itself ('plateau'), or warm-up plus cosine decay ('cosine') over the
    phase's steps. Scaled by batch_size / reference_batch_size only when reference_batch_size is set."""
    if config.reference_batch_size:
        learning_rate = distribution.scaled_learning_rate(learning_rate, config.batch_size,
                                                          config.reference_batch_size)
    if config.lr_schedule != "cosine":
        return learning_rate
    total = max(1, epochs * steps_per_epoch)
    warmup = min(config.warmup_epochs * steps_per_epoch, total - 1)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(learning_rate, total)
    return keras.optimizers.schedules.CosineDecay(0.0, total - warmup, warmup_target=learning_rate,
                                                  warmup_steps=warmup)


def make_optimizer(learning_rate, config: Config) -> keras.optimizers.Optimizer:
    clip = {"clipnorm": config.clipnorm} if config.clipnorm else {}
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay, **clip)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True,
                                    weight_decay=config.weight_decay or None, **clip)
    return keras.optimizers.Adam(learning_rate, **clip)


def compile_model(model: keras.Model, learning_rate, config: Config) -> None:
    """`learning_rate`: a number or a Keras schedule (see learning_rate_for)."""
    model.compile(
        optimizer=make_optimizer(learning_rate, config),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy", keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
        jit_compile=jit_setting(config.jit_compile),
    )


def save_class_info(run_dir: Path, dataset: data.Dataset) -> None:
    info = {"kind": dataset.kind, "synthetic": dataset.synthetic, "class_names": dataset.class_names,
            "coarse_names": dataset.coarse_names,
            "fine_to_coarse": None if dataset.fine_to_coarse is None else dataset.fine_to_coarse.tolist()}
    run_folder.write_json(run_dir / "classes.json", info)


def fit_phase(model: keras.Model, config: Config, run_dir: Path, phase: str, *, sampler: TrainBatches,
              validation: tuple[np.ndarray, np.ndarray], epochs: tuple[int, int],
              mining: keras.callbacks.Callback | None, verbose: int | str,
              extra_callbacks: list[keras.callbacks.Callback] | tuple = ()) -> None:
    """One phase of training over `epochs` = (start, end): from `start` (or where a killed run of this phase
    stopped) to `end`, counted from the run's first epoch."""
    start_epoch, end_epoch = epochs
    backup = run_dir / "backup" / phase
    committed = run_folder.settle_phase(run_dir, backup, start_epoch)
    restored = run_folder.load_callback_state(backup, committed) if committed > start_epoch else None
    if restored and restored.get("stopped"):
        end_epoch = committed  # early stopping had ended this phase: only restore its weights
    if restored and mining is not None and restored.get("mining"):
        mining.set_state(restored["mining"])
    callbacks = callback_set(config, run_dir, phase, sampler, mining, run_folder.best_val_accuracy(run_dir), restored)
    # Keras keeps the epoch that BackupAndRestore restored in a previous fit() and would start this phase
    # there (keras/src/backend/*/trainer.py: `self._initial_epoch or initial_epoch`); clear it.
    model._initial_epoch = None
    # shuffle=False: the sampler draws each epoch's order itself; Keras would also shuffle the batches with
    # Python's global `random`, whose state a resumed process does not share with the one that was stopped
    model.fit(sampler, validation_data=validation, initial_epoch=start_epoch, epochs=end_epoch, shuffle=False,
              callbacks=callbacks + list(extra_callbacks), verbose=verbose)


def new_model(config: Config, num_classes: int, strategy=None) -> keras.Model:
    """The run's model as training starts it: the precision policy set, the seed set (the head's initial
    weights), built under `strategy`'s scope. Its initial weights are kept (`model.initial_weights`), so that
    a phase 1 that starts again (a killed run, an interrupted notebook cell) starts from them."""
    keras.mixed_precision.set_global_policy(precision_policy(config.mixed_precision))
    keras.utils.set_random_seed(config.seed)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = models.build_model(config, num_classes)  # a weights file that does not fit fails here
    model.initial_weights = model.get_weights()
    model.built_for = config.identity()
    return model


def run(config: Config, verbose: int | str = "auto", callbacks: list | None = None, splits: Splits | None = None,
        model: keras.Model | None = None) -> Path:
    """Train (or resume) the run described by `config`; returns its run folder.

    `splits` (prepare_data) and `model` (new_model), when the caller already has them for these settings,
    are used instead of loading the data and building the model again (the notebook does this).
    Progress is recorded in the run folder (state.json, the phase-1 weights, BackupAndRestore's backup),
    so that a process killed at any point resumes where it stopped. `callbacks` are added to Keras' fit.
    Under a multi-worker distribution only the chief writes the run folder; every other worker works in
    a temporary folder (seeded from the chief's, to resume from the same point) removed at the end.
    """
    validate(config)  # before anything is read or written
    if config.hem and config.hem_mode == "selective" and keras.backend.backend() != "tensorflow":
        raise ConfigError(f"setting 'hem_mode': 'selective' needs Keras' TensorFlow backend, not "
                          f"{keras.backend.backend()!r} (it backpropagates batches whose size varies from step "
                          "to step, which a jit-compiled JAX step does not allow); use hem_mode=reweight")
    if run_folder.finished(config.run_dir()) and \
            Config.load(config.run_dir() / "config.json").identity() == config.identity():
        print(f"finished run found: {config.run_dir()} holds these settings' results; nothing to train")
        return config.run_dir()
    if splits is None or splits.config_key != _splits_key(config):
        splits = prepare_data(config)
    strategy, cluster = distribution.make_strategy(config.distribution, config.distribution_timeout)
    if model is None or getattr(model, "built_for", None) != config.identity() or _distributed(strategy):
        model = new_model(config, splits.dataset.num_classes, strategy)  # a given model is reused on one device
    if cluster is None or cluster.is_chief:
        return _run(config, config.run_dir(), splits, strategy, model, verbose, callbacks)
    worker_dir = distribution.worker_folder(config.run_dir(), cluster.index)
    try:
        _run(config, worker_dir, splits, strategy, model, verbose, callbacks)
    finally:
        shutil.rmtree(worker_dir, ignore_errors=True)
    return config.run_dir()


def _distributed(strategy) -> bool:
    """True for a tf.distribute strategy (even of one replica): its model must be built inside its scope."""
    return type(strategy).__name__ not in ("_DefaultDistributionStrategy", "_NoStrategy")


def _run(config: Config, run_dir: Path, splits: Splits, strategy, model, verbose, callbacks) -> Path:
    with run_folder.RunLock(run_dir):
        resuming = run_folder.claim(config, run_dir)
        if run_folder.finished(run_dir):
            print(f"run {run_dir} is complete: see {run_dir / 'results.json'}")
            return run_dir
        _train(config, run_dir, splits, strategy, model, resuming, verbose, callbacks)
    return run_dir


def _train(config: Config, run_dir: Path, splits: Splits, strategy, model, resuming: bool, verbose,
           callbacks) -> None:
    num_classes = splits.dataset.num_classes
    print(("resuming" if resuming else "starting") + f" run {run_dir}"
          + (f" on {strategy.num_replicas_in_sync} replicas" if strategy.num_replicas_in_sync > 1 else ""))
    print(splits.dataset.describe())
    save_class_info(run_dir, splits.dataset)
    mix = config.augment if config.augment in ("mixup", "cutmix") else None
    sampler = TrainBatches(splits.x_train, splits.y_train, num_classes, config.batch_size, seed=config.seed, mix=mix,
                           weighted=config.hem and config.hem_mode == "reweight")
    validation = (splits.x_val, one_hot(splits.y_val, num_classes))
    mining = hem.make_mining(config, sampler, model)
    pretrained = config.weights is not None
    started = time.perf_counter()
    extra = list(callbacks or [])

    def compile_for(target: keras.Model, phase: str, epochs: int, steps_per_epoch: int) -> None:
        base = config.head_learning_rate if phase == "head" else config.finetune_learning_rate
        with strategy.scope():
            compile_model(target, learning_rate_for(base, config, epochs, steps_per_epoch), config)
        peak = learning_rate_for(base, config.replace(lr_schedule="plateau"), epochs, steps_per_epoch)
        run_folder.write_state(run_dir, **{f"{phase}_compiled": {  # peak: after warm-up, before any decay
            "optimizer": config.optimizer, "learning_rate": float(peak),
            "schedule": config.lr_schedule, "jit_compile": bool(getattr(target, "jit_compile", False))}})

    phase1 = run_dir / PHASE1_WEIGHTS
    models.set_phase(model, "head")
    if phase1.exists() and "head_epochs_done" in run_folder.read_state(run_dir):
        model.load_weights(phase1)
        _restore_mining(mining, run_dir, "finetune" if run_folder.read_state(run_dir).get("finetune_done") else "head")
    else:
        model.set_weights(model.initial_weights)  # phase 1 (re)starts from the initial weights
        keras.mixed_precision.set_global_policy(precision_policy(config.mixed_precision))
        keras.utils.set_random_seed(config.seed)
        if not pretrained:
            print("no pretrained weights: phase 1 (a head on frozen random features) is skipped")
            (run_dir / run_folder.HISTORY).unlink(missing_ok=True)
        elif config.head_features == "cached":
            head_on_features(model, config, run_dir, splits, strategy, mining is not None, verbose, compile_for,
                             extra)
        else:
            compile_for(model, "head", config.head_epochs, len(sampler))
            fit_phase(model, config, run_dir, "head", sampler=sampler, validation=validation,
                      epochs=(0, config.head_epochs), mining=mining, verbose=verbose, extra_callbacks=extra)
        tmp = run_dir / f".{PHASE1_WEIGHTS}"
        model.save_weights(tmp)
        os.replace(tmp, phase1)
        run_folder.write_state(run_dir, head_epochs_done=len(run_folder.history_rows(run_dir)))
    head_epochs_done = run_folder.read_state(run_dir)["head_epochs_done"]

    if not run_folder.read_state(run_dir).get("finetune_done"):
        models.set_phase(model, "finetune", config.finetune_fraction, pretrained)
        compile_for(model, "finetune", config.finetune_epochs, len(sampler))
        fit_phase(model, config, run_dir, "finetune", sampler=sampler, validation=validation,
                  epochs=(head_epochs_done, head_epochs_done + config.finetune_epochs), mining=mining,
                  verbose=verbose, extra_callbacks=extra)
        run_folder.write_state(run_dir, finetune_done=True)
    finish(config, run_dir, splits, mining, time.perf_counter() - started)
    run_folder.write_state(run_dir, finished=True)
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    shutil.rmtree(run_dir / run_folder.CHECKPOINTS, ignore_errors=True)


def head_on_features(model: keras.Model, config: Config, run_dir: Path, splits: Splits, strategy,
                     with_mining: bool, verbose, compile_for, extra_callbacks=()) -> None:
    """Phase 1 on cached backbone features (see cifar100/head.py); best.keras is the best epoch's model."""
    num_classes = splits.dataset.num_classes
    features = head.cached_features(model, splits.x_train, splits.y_train, splits.x_val, config.batch_size,
                                    mirror=config.augment != "none")
    print(f"phase 1 on cached features: the backbone ran once over {len(features['train'])} training images "
          f"({'with' if config.augment != 'none' else 'without'} mirror images) and {len(features['val'])} "
          f"validation images in {features['seconds']:.0f} s")
    batches = head.FeatureBatches(features["train"], features["train_labels"], num_classes, config.batch_size,
                                  config.seed)
    with strategy.scope():
        small = head.head_model(model)
    compile_for(small, "head", config.head_epochs, len(batches))
    (run_dir / run_folder.HISTORY).unlink(missing_ok=True)  # a killed attempt's rows: this phase starts afresh
    # mining is not applied to the head on features (the backbone, whose cost it saves, does not run); its
    # columns are filled so that history.csv keeps one set of columns across the phases
    filler = [keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: logs.update(dict.fromkeys(hem.LOG_KEYS, 0)))]
    reduce_lr = reduce_lr_on_plateau(config)
    small.fit(batches, validation_data=(features["val"], one_hot(splits.y_val, num_classes)),
              epochs=config.head_epochs, shuffle=False, verbose=verbose, callbacks=[
                  head.DrawOrder(batches), EpochTimer(config.batch_size), *(filler if with_mining else []),
                  keras.callbacks.TerminateOnNaN(), *([reduce_lr] if reduce_lr is not None else []),
                  keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", restore_best_weights=True,
                                                patience=config.early_stopping_patience, verbose=1),
                  keras.callbacks.CSVLogger(run_dir / run_folder.HISTORY, append=True), *extra_callbacks])
    tmp = run_dir / ".best.keras"
    model.save(tmp)  # the best epoch's head on the frozen backbone: the run's best model so far
    os.replace(tmp, run_dir / "best.keras")
    run_folder.write_state(run_dir, head_feature_seconds=round(features["seconds"], 1))


def _restore_mining(mining: keras.callbacks.Callback | None, run_dir: Path, phase: str) -> None:
    """A run resumed after a finished phase continues with the mining state that phase ended with."""
    state = run_folder.last_callback_state(run_dir / "backup" / phase)
    if mining is not None and state and state.get("mining"):
        mining.set_state(state["mining"])


def finish(config: Config, run_dir: Path, splits: Splits, mining: keras.callbacks.Callback | None,
           seconds: float) -> dict:
    """Evaluate the best checkpoint on validation and (once) on test; write results.json."""
    from cifar100 import evaluate

    best = keras.saving.load_model(run_dir / "best.keras")
    val = evaluate.basic_metrics(best, splits.x_val, splits.y_val, splits.dataset.num_classes,
                                 max(config.batch_size, 128))
    rows = run_folder.history_rows(run_dir)
    state = run_folder.read_state(run_dir)
    # the speed of training on images (phase 1 on cached features trains on features, not images)
    image_rows = rows[state.get("head_epochs_done", 0):] if config.head_features == "cached" else rows
    speeds = [float(r["train_images_per_second"]) for r in image_rows if r.get("train_images_per_second")]
    feature_seconds = float(state.get("head_feature_seconds") or 0)
    results = {
        "run": config.run_name(),
        "backbone": config.backbone,
        "image_size": config.image_size,
        "data": {"kind": splits.dataset.kind, "path": str(splits.dataset.path), "synthetic": splits.dataset.synthetic,
                 "official": splits.dataset.official,
                 "train_images": int(len(splits.train_indices)), "val_images": int(len(splits.val_indices)),
                 "test_images": int(len(splits.dataset.y_test))},
        "validation": val,
        "epochs_run": len(rows),
        "best_epoch": int(np.argmax([float(r["val_accuracy"]) for r in rows])) if rows else None,
        "wall_seconds_this_process": round(seconds, 1),
        "train_seconds_total": round(feature_seconds + sum(float(r["epoch_seconds"]) for r in rows
                                                           if r.get("epoch_seconds")), 1),
        "head_feature_seconds": feature_seconds or None,
        "seconds_outside_steps_per_epoch": _mean(r.get("other_seconds") for r in image_rows),
        # what each phase's optimiser was given (after any scaling asked with reference_batch_size)
        "optimization": {phase: state.get(f"{phase}_compiled") for phase in ("head", "finetune")},
        "train_images_per_second": round(float(np.median(speeds)), 1) if speeds else None,
        "mining": _mining_totals(config, rows),
        "environment": environment(),
    }
    if mining is not None:  # the hardest training examples for the best model, to be shown
        indices, losses = hem.hardest_examples(best, splits.x_train, splits.y_train, config.hem_fraction,
                                               config.hem_keep, config.seed, max(config.batch_size, 128))
        results["hardest_examples"] = {"train_set_indices": splits.train_indices[indices].tolist(),
                                       "labels": splits.y_train[indices].tolist(),
                                       "losses": [round(float(v), 4) for v in losses]}
    run_folder.write_json(run_dir / "results.json", results)
    results["test"] = evaluate.evaluate_run(run_dir, dataset=splits.dataset)  # the test set, once, at the end
    return results


def _mining_totals(config: Config, rows: list[dict]) -> dict | None:
    """What hard-example mining did over the run: examples and seconds of its scoring and training passes."""
    if not config.hem:
        return None
    totals = {key: sum(float(r.get(key) or 0) for r in rows) for key in hem.LOG_KEYS}
    return {"mode": config.hem_mode, **{k: round(v, 1) if k.endswith("seconds") else int(v) for k, v in totals.items()}}


def _mean(values) -> float | None:
    numbers = [float(v) for v in values if v not in (None, "")]
    return round(float(np.mean(numbers)), 2) if numbers else None


def environment() -> dict:
    versions = {}
    for name in ("tensorflow", "jax"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = module.__version__
    return {"python": sys.version.split()[0], "keras": keras.__version__, "backend": keras.backend.backend(),
            **versions, "numpy": np.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "gpus": gpu_names() or None,
            "device": ", ".join(gpu_names()) or f"CPU ({os.cpu_count()} cores)"}
