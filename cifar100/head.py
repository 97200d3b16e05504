"""Phase 1 on cached features (`head_features="cached"`): the frozen backbone runs once, not every epoch.

With the backbone frozen, every epoch of phase 1 computes the same backbone features again; on a CPU that
forward pass is nearly all of the phase's cost. Here the features of the training images and of their
mirror images (the horizontal flip, the one augmentation that survives caching) and of the validation
images are computed once, in inference mode, and the head (dropout + softmax layer, the model's own layers)
trains on them with the run's loss, optimiser, EarlyStopping and, in "plateau" mode, ReduceLROnPlateau.
The phase is short, so it is atomic: a run killed during it does it again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from cifar100 import keras_internals, tflogs
from cifar100.sampling import one_hot
from cifar100.tflogs import keras  # Keras, imported without TensorFlow's start-up lines


def feature_extractor(model: keras.Model) -> keras.Model:
    """uint8 32x32 images -> the backbone's pooled features (the input of the head), weights shared."""
    return keras.Model(model.inputs, model.get_layer("dropout").input, name="features")


def head_model(model: keras.Model) -> keras.Model:
    """The model's head (its own dropout and classifier layers, weights shared) on backbone features."""
    width = model.get_layer("dropout").input.shape[-1]
    inputs = keras.Input((width,), name="features")
    outputs = model.get_layer("classifier")(model.get_layer("dropout")(inputs))
    return keras.Model(inputs, outputs, name="head")


class FeatureBatches(keras.utils.PyDataset):
    """Batches of cached features and one-hot labels, in an order that is a function of (seed, epoch)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int, seed: int):
        super().__init__()
        self.features, self.labels, self.num_classes = features, labels, num_classes
        self.batch_size, self.seed = batch_size, seed
        self.order = np.arange(len(features))

    def __len__(self) -> int:
        return -(-len(self.features) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.order = np.random.default_rng([self.seed, 7, epoch]).permutation(len(self.features))

    def __getitem__(self, index: int):
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.features[chosen], one_hot(self.labels[chosen], self.num_classes)


class DrawOrder(keras.callbacks.Callback):
    def __init__(self, batches: FeatureBatches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)


def cached_features(model: keras.Model, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                    batch_size: int, mirror: bool = True) -> dict:
    """Features of the training images (and, with `mirror`, of their mirror images) and of the validation
    images."""
    started = time.perf_counter()
    extractor = feature_extractor(model)

    def features(images):  # in inference mode: no augmentation
        return np.asarray(extractor.predict(images, batch_size=max(batch_size, 128), verbose=0), dtype=np.float32)

    train = np.concatenate([features(x_train), features(x_train[:, :, ::-1])]) if mirror else features(x_train)
    labels = np.concatenate([y_train, y_train]) if mirror else y_train
    return {"train": train, "train_labels": labels, "val": features(x_val),
            "seconds": time.perf_counter() - started}


def train_on_features(model: keras.Model, head: keras.Model, config, run_dir: Path, splits, mining_columns: bool,
                      verbose, callbacks=()) -> None:
    """Phase 1 on cached features: `head` (head_model(model), compiled) trains on them with the run's
    callbacks; best.keras is then the best epoch's full model."""
    from cifar100 import run_folder
    from cifar100.callbacks import EpochLine, EpochTimer, HistoryLog, reduce_lr_on_plateau
    from cifar100.mining import LOG_KEYS, log_keys

    num_classes = splits.dataset.num_classes
    features = cached_features(model, splits.x_train, splits.y_train, splits.x_val, config.batch_size,
                               mirror=config.augment != "none")
    print(f"phase 1 on cached features: the backbone ran once over {len(features['train'])} training images "
          f"({'with' if config.augment != 'none' else 'without'} mirror images) and {len(features['val'])} "
          f"validation images in {features['seconds']:.0f} s")
    batches = FeatureBatches(features["train"], features["train_labels"], num_classes, config.batch_size,
                             config.seed)
    (run_dir / run_folder.HISTORY).unlink(missing_ok=True)  # a killed attempt's rows: this phase starts afresh
    # mining is not applied to the head on features (the backbone, whose cost it saves, does not run); its
    # columns are filled so that history.csv keeps one set of columns across the phases (CSVLogger takes its
    # columns from its first epoch): no example mined, and no scoring pass measured (NaN, not a loss of 0)
    unmined = {key: 0 if key in LOG_KEYS else float("nan") for key in log_keys(config)}
    filler = [keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update(unmined))]
    reduce_lr = reduce_lr_on_plateau(config)
    validation = (features["val"], one_hot(splits.y_val, num_classes))
    head.fit(keras_internals.fit_input(batches), validation_data=validation,
             epochs=config.head_epochs, shuffle=False, verbose=verbose, callbacks=[
                 tflogs.quiet_first_steps(), DrawOrder(batches), EpochTimer(config.batch_size),
                 *(filler if mining_columns else []),
                 keras.callbacks.TerminateOnNaN(), *([reduce_lr] if reduce_lr is not None else []),
                 keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", restore_best_weights=True,
                                               patience=config.early_stopping_patience, verbose=1),
                 HistoryLog(run_dir / run_folder.HISTORY, append=True), *callbacks, EpochLine()])
    from cifar100.train import refuse_a_diverged_phase

    refuse_a_diverged_phase(run_dir, "head")
    tmp = run_dir / ".best.keras"
    model.save(tmp)  # the best epoch's head on the frozen backbone: the run's best model so far
    os.replace(tmp, run_dir / "best.keras")
    run_folder.write_state(run_dir, head_feature_seconds=round(features["seconds"], 1))
