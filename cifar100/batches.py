"""Training batches for `fit`: uint8 32x32 images (upsampled later, in the model), every example once per epoch.

Each epoch's order depends on (seed, epoch) alone, drawn by `EpochOrder` as Keras begins the epoch, never on
which batches were read (Keras peeks and reads ahead): a resumed run draws the batches an uninterrupted one does.
"""

from __future__ import annotations

import math

import numpy as np

from cifar100 import keras_internals
from cifar100.keras_internals import keras  # Keras, imported without TensorFlow's start-up lines


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer labels -> float32 one-hot rows, as the categorical cross-entropy takes them."""
    return np.eye(num_classes, dtype=np.float32)[labels]


class TrainBatches(keras.utils.PyDataset):
    """Batches of (uint8 images (B, 32, 32, 3) or cached features (B, ...), one-hot float32 labels (B, C)).
    `weighted`: batches also carry loss weights (B,), all 1 until `set_weights` (decided up front: a batch's
    structure cannot change between epochs). `mix`: "mixup" or "cutmix" blends pairs of images and labels.
    `views`: `images` holds several views of each example (N, V, ...), and each epoch draws one of each."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int,
                 seed: int = 0, mix: str | None = None, mix_alpha: float = 0.2, weighted: bool = False,
                 views: bool = False):
        super().__init__()
        if not views and images.ndim == 4 and (images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3)):
            raise ValueError(f"images must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.num_classes, self.batch_size, self.seed = num_classes, batch_size, seed
        self.mix, self.mix_alpha = mix, mix_alpha
        self.weighted, self.views = weighted, views
        self.weights: np.ndarray | None = None  # None means all 1
        self.set_epoch(0)

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of `epoch` (counted from the run's start)."""
        self.epoch, self.order = epoch, self._draw_order(epoch)
        if self.views:  # one view of each example, drawn apart from the order
            self.view = np.random.default_rng([self.seed, epoch, 1]).integers(self.images.shape[1],
                                                                              size=len(self.images))

    def set_weights(self, weights: np.ndarray | None) -> None:
        """Per-example loss weights for the batches read from now on (None: all 1)."""
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float32)
            if weights.shape != (len(self.images),) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
                raise ValueError("weights must be finite, non-negative, one per training example")
        self.weights = weights

    def _draw_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

    def __getitem__(self, index: int):
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        images = self.images[chosen, self.view[chosen]].astype(np.float32) if self.views else self.images[chosen]
        labels = one_hot(self.labels[chosen], self.num_classes)
        if self.mix:
            images, labels = self._mix(images, labels, np.random.default_rng([self.seed, self.epoch, index]))
        if self.weighted:
            weights = np.ones(len(chosen), np.float32) if self.weights is None else self.weights[chosen]
            return images, labels, weights
        return images, labels

    def _mix(self, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        """MixUp or CutMix of each image with a shuffled partner; labels are mixed in the same proportion."""
        partner = rng.permutation(len(images))
        lam = rng.beta(self.mix_alpha, self.mix_alpha) if self.mix == "mixup" else rng.uniform()
        if self.mix == "mixup":
            mixed = lam * images.astype(np.float32) + (1 - lam) * images[partner].astype(np.float32)
            images = np.rint(mixed).astype(np.uint8)
        else:
            side = int(round(32 * math.sqrt(1 - lam)))
            top, left = rng.integers(0, 32 - side + 1, size=2)
            images = images.copy()
            images[:, top:top + side, left:left + side] = images[partner, top:top + side, left:left + side]
            lam = 1 - side * side / 1024
        return images, lam * labels + (1 - lam) * labels[partner]


class EpochOrder(keras.callbacks.Callback):
    """Draws the sampler's order as Keras begins each epoch and restarts the model's random streams (a weights
    file does not hold them), so a resumed run draws the same augmentations as an uninterrupted one."""

    def __init__(self, sampler: TrainBatches):
        super().__init__()
        self.sampler = sampler

    def on_epoch_begin(self, epoch, logs=None):
        self.sampler.set_epoch(epoch)
        for index, state in enumerate(keras_internals.seed_generator_states(self.model)):
            state.assign(np.array(stream_state(self.sampler.seed, epoch, index), dtype=state.dtype))


def stream_state(seed: int, epoch: int, layer: int) -> list[int]:
    """A Keras seed-generator state [key, counter] of its own for (seed, epoch, layer): no two layers or epochs
    walk one sequence. The key is below 2**31 - 2, as TensorFlow reads it modulo that."""
    key = int(np.random.SeedSequence([seed, epoch, layer]).generate_state(1)[0]) % (2**31 - 2)
    return [key, 0]


def image_views(images: np.ndarray, view: int, seed: int, max_shift: int = 4) -> np.ndarray:
    """View `view` of uint8 images: 0 the images, 1 their mirror images, then shifted copies (by up to `max_shift`
    pixels each way, edges reflected, as augment=basic shifts), mirrored at odd views."""
    if view % 2:
        images = images[:, :, ::-1]
    if view < 2:
        return images
    dy, dx = np.random.default_rng([seed, view]).integers(0, 2 * max_shift + 1, size=2)
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="reflect")
    return padded[:, dy:dy + images.shape[1], dx:dx + images.shape[2]]


def cached_activations(model: keras.Model, x_train: np.ndarray, x_val: np.ndarray, views: int, seed: int,
                       batch_size: int, dtype=np.float16) -> dict:
    """`model`'s outputs, in inference mode: (N, views, ...) for the training images (see image_views) and
    (N, ...) for validation."""
    import time

    started = time.perf_counter()

    def activations(images):
        return keras_internals.predict(model, images, batch_size).astype(dtype)

    train = np.stack([activations(image_views(x_train, view, seed)) for view in range(views)], axis=1)
    return {"train": train, "val": activations(x_val), "seconds": time.perf_counter() - started}
