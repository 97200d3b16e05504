"""The run's data: the stratified validation split carved from the training set (the test set is never
used for it), and the stratified cap on training images (`max_train_images`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from cifar100 import data
from cifar100.config import Config
from cifar100.errors import DatasetError


def split(labels: np.ndarray, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (train_indices, val_indices) into the *training* set. The test set is never used."""
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    indices = np.arange(len(labels))
    try:
        train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed,
                                              stratify=labels, shuffle=True)
    except ValueError as exc:
        raise DatasetError(f"cannot carve a stratified validation split of {val_fraction:.0%} from "
                         f"{len(labels)} training images: {exc}") from None
    return np.sort(train_idx), np.sort(val_idx)


def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `size` examples with the classes as balanced as the labels allow (seeded)."""
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        rank_in_class[members] = np.arange(len(members))
    chosen = order[np.argsort(rank_in_class[order], kind="stable")[:size]]
    return np.sort(chosen)


@dataclass
class Splits:
    """The run's data: training and validation come from the training set; test is touched at the end."""

    dataset: data.Dataset
    train_indices: np.ndarray
    val_indices: np.ndarray
    config_key: tuple = ()  # the settings the splits were made for (splits_key)

    # the images and labels of each split (both splits index the training set)
    x_train = property(lambda self: self.dataset.x_train[self.train_indices])
    y_train = property(lambda self: self.dataset.y_train[self.train_indices])
    x_val = property(lambda self: self.dataset.x_train[self.val_indices])
    y_val = property(lambda self: self.dataset.y_train[self.val_indices])


def prepare_data(config: Config, dataset: data.Dataset | None = None) -> Splits:
    """Load the dataset (unless given), carve the stratified validation split, and apply the cap on training
    images. The cap leaves validation whole: the callbacks need a steady signal more than it saves time."""
    dataset = dataset if dataset is not None else data.load(config.data_dir)
    train_idx, val_idx = split(dataset.y_train, config.val_fraction, config.seed)
    cap = config.max_train_images
    if cap is not None and cap < len(train_idx):
        train_idx = train_idx[stratified_subset(dataset.y_train[train_idx], cap, config.seed)]
    return Splits(dataset, train_idx, val_idx, splits_key(config))


def splits_key(config: Config) -> tuple:
    """The settings that decide the splits: splits made for other settings are not reused."""
    return (os.path.normpath(config.data_dir), config.val_fraction, config.max_train_images, config.seed)
