"""Phase 1 on cached features (`head_features="cached"`): the frozen backbone runs once, not every epoch.

With the backbone frozen, every epoch of phase 1 computes the same backbone features again; on a CPU that
forward pass is nearly all of the phase's cost. Here the features of the training images and of their
mirror images (the horizontal flip, the one augmentation that survives caching) and of the validation
images are computed once, in inference mode, and the head (dropout + softmax layer, the model's own layers)
trains on them with the run's loss, optimiser, EarlyStopping and, in "plateau" mode, ReduceLROnPlateau.
The phase is short, so it is atomic: a run killed during it does it again.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from cifar100.sampling import one_hot


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
