"""What `fit` reads: batches of uint8 32x32 images (upsampled later, inside the model) in an order that depends
on (seed, epoch) alone, so a resumed run reads what an uninterrupted one does; the backbone's features computed
once for phase 1; and the backbone's input preprocessing as a Keras layer."""

from __future__ import annotations

import math

import numpy as np

from cifar100.keras_fixes import fit_input, keras, seed_generator_states


class TrainBatches(keras.utils.PyDataset):
    """(inputs, one-hot labels[, loss weights]) batches of uint8 images (N, 32, 32, 3) or cached features, each
    example once an epoch. `weighted`: batches carry per-example loss weights (hard-example mining sets them;
    all 1 until then)."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int, seed: int = 0,
                 weighted: bool = False):
        super().__init__()
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        self.inputs, self.labels, self.num_classes = inputs, np.asarray(labels), num_classes
        self.batch_size, self.seed = batch_size, seed
        self.weights = np.ones(len(labels), np.float32) if weighted else None
        self.set_epoch(0)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))

    def __getitem__(self, index: int):
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        batch = (self.inputs[chosen], np.eye(self.num_classes, dtype=np.float32)[self.labels[chosen]])
        return batch if self.weights is None else batch + (self.weights[chosen],)

    def as_fit_input(self):
        return fit_input(self)


class EpochOrder(keras.callbacks.Callback):
    """Draws the batches' order as each epoch begins, and sets the model's random streams (augmentation, dropout)
    from (seed, epoch): a resumed run draws the same batches and augmentations as an uninterrupted one."""

    def __init__(self, batches: TrainBatches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)
        for layer, state in enumerate(seed_generator_states(self.model)):
            key = int(np.random.SeedSequence([self.batches.seed, epoch, layer]).generate_state(1)[0]) % (2**31 - 2)
            state.assign(np.array([key, 0], dtype=state.dtype))


def cached_features(extractor: keras.Model, images: np.ndarray, mirrors: bool = False,
                    batch_size: int = 128) -> np.ndarray:
    """`extractor`'s outputs in inference mode (float16, to halve the memory) for the images, followed by those of
    their mirror images with `mirrors` (the head's augmentation: 2N examples)."""
    if mirrors:
        images = np.concatenate([images, images[:, :, ::-1]])
    return extractor.predict(images, batch_size=batch_size, verbose=0).astype(np.float16)


CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocessing(mode: str) -> keras.layers.Layer:
    """A backbone's input convention on 0..255 RGB as one Keras layer (so best.keras holds it): "tf" scales to
    [-1, 1]; "caffe" (ResNet50) is RGB -> BGR less the ImageNet mean, a frozen Dense(3); "none": the backbone
    rescales itself."""
    if mode == "tf":
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")
    if mode == "caffe":
        return keras.layers.Dense(3, trainable=False, name="preprocess",
                                  kernel_initializer=keras.initializers.Constant(np.eye(3)[::-1]),
                                  bias_initializer=keras.initializers.Constant(-np.array(CAFFE_MEAN_BGR)))
    return keras.layers.Identity(name="preprocess")
