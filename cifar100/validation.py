"""Refusing a Config that cannot work, before any data is read, any model is built or any file is written:
each number within its meaning, each choice among its values, the backbone known, the weights readable."""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path

from cifar100.config import CHOICES, Config, ConfigError
from cifar100.errors import shown

# The meaning of each number: (kind, lower bound, upper bound); a number alone means >=, None no bound.
_INT, _FLOAT = "integer", "number"
RANGES: dict[str, tuple] = {
    "image_size": (_INT, 1, "<= 1024"), "batch_size": (_INT, 1, "<= 65536"), "seed": (_INT, 0, "< 4294967296"),
    "head_epochs": (_INT, 1, "<= 100000"), "finetune_epochs": (_INT, 1, "<= 100000"),
    "max_train_images": (_INT, 1, "<= 100000000"), "warmup_epochs": (_INT, 0, "<= 100000"),
    "weight_decay": (_FLOAT, ">= 0", None), "clipnorm": (_FLOAT, "> 0", None),
    "reduce_lr_patience": (_INT, 0, "<= 100000"), "early_stopping_patience": (_INT, 0, "<= 100000"),
    "hem_every": (_INT, 1, "<= 100000"), "hem_keep": (_INT, 1, "<= 100000"),
    "reference_batch_size": (_INT, 1, "<= 65536"),
    "head_learning_rate": (_FLOAT, "> 0", None), "finetune_learning_rate": (_FLOAT, "> 0", None),
    "val_fraction": (_FLOAT, "> 0", "< 1"), "finetune_fraction": (_FLOAT, "> 0", "<= 1"),
    "dropout": (_FLOAT, ">= 0", "< 1"), "label_smoothing": (_FLOAT, ">= 0", "< 1"),
    "reduce_lr_factor": (_FLOAT, "> 0", "< 1"), "hem_fraction": (_FLOAT, "> 0", "<= 1"),
    "hem_strength": (_FLOAT, ">= 0", None), "hem_floor": (_FLOAT, ">= 0", "<= 1"),
    "hem_selectivity": (_FLOAT, "> 0", "<= 1"), "hem_window": (_INT, 1, "<= 10000000"),
    "distribution_timeout": (_FLOAT, "> 0", "<= 604800"), "progressive_size": (_INT, 1, "<= 1024"),
    "progressive_epochs": (_INT, 0, "<= 100000"),
}


def _check_number(name: str, value) -> None:
    """Refuse a number of the wrong type, not finite, or outside the setting's meaning."""
    kind, low, high = RANGES[name]
    field_type = {f.name: str(f.type) for f in fields(Config)}[name]
    if value is None and "None" in field_type:
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == _INT and not is_int:
        raise ConfigError(f"setting '{name}' must be an integer, got {shown(value)}")
    if kind == _FLOAT and not (is_int or isinstance(value, float)):
        raise ConfigError(f"setting '{name}' must be a number, got {shown(value)}")
    if not is_int and not math.isfinite(value):
        raise ConfigError(f"setting '{name}' must be a finite number, got {shown(value)}")
    for bound in (low, high):
        if bound is None:
            continue
        op, limit = bound.split() if isinstance(bound, str) else (">=", bound)
        limit = float(limit) if "." in str(limit) else int(limit)  # an int is compared exactly, however large
        ok = {">": value > limit, ">=": value >= limit, "<": value < limit, "<=": value <= limit}[op]
        if not ok:
            allowed = " and ".join(f"{b}" if isinstance(b, str) else f">= {b}" for b in (low, high) if b is not None)
            raise ConfigError(f"setting '{name}' must be {allowed}, got {shown(value)}")


def validate(config: Config, check_data: bool = True, check_files: bool = True) -> None:
    """Refuse a config that cannot work, before any data is read, any model is built or any file is written.
    `check_data=False` leaves out the data folder (the notebook downloads it when absent); `check_files=False`
    the weights file and TF_CONFIG too (a saved config.json, read back: its files may be elsewhere now)."""
    from cifar100.models import BACKBONES

    for name in RANGES:
        _check_number(name, getattr(config, name))
    if not isinstance(config.tensorboard, bool):
        raise ConfigError(f"setting 'tensorboard' must be true or false, got {shown(config.tensorboard)}")
    if not isinstance(config.hem, bool):
        raise ConfigError(f"setting 'hem' must be True or False, got {shown(config.hem)}")
    for name in ("name", "data_dir", "runs_dir", "backbone"):
        if not isinstance(getattr(config, name), str):
            raise ConfigError(f"setting '{name}' must be a string, got {shown(getattr(config, name))}")
    if config.name and (config.name in (".", "..") or "/" in config.name or "\\" in config.name):
        raise ConfigError(f"setting 'name': {shown(config.name)} must be a plain folder name (no '/', not '.' or '..')")
    if not isinstance(config.model, str) or not re.fullmatch(r"(|[0-9a-f]{8})", config.model):
        raise ConfigError(f"setting 'model': {shown(config.model)} must be empty (the model cifar100/models.py "
                          "builds) or the 8 hex digits of an edited model's fingerprint")
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"setting '{name}': {shown(getattr(config, name))} is not one of {list(allowed)}")
    if config.backbone not in BACKBONES:
        raise ConfigError(f"setting 'backbone': unknown backbone '{config.backbone}'; "
                          f"choose one of {sorted(BACKBONES)}")
    backbone = BACKBONES[config.backbone]
    if config.image_size < backbone.min_size:
        raise ConfigError(f"setting 'image_size': {config.image_size} px is below {config.backbone}'s minimum "
                          f"input size of {backbone.min_size} px")
    if config.progressive_size is not None:
        if not backbone.min_size <= config.progressive_size < config.image_size:
            raise ConfigError(f"setting 'progressive_size': {config.progressive_size} px must be below image_size "
                              f"({config.image_size} px) and at least {config.backbone}'s minimum input size of "
                              f"{backbone.min_size} px")
        if not 0 < config.progressive_epochs < config.finetune_epochs:
            raise ConfigError(f"setting 'progressive_epochs': {config.progressive_epochs} must be at least 1 and "
                              f"below finetune_epochs ({config.finetune_epochs}): the last epochs train at "
                              "image_size")
        if config.lr_schedule != "cosine":
            raise ConfigError("setting 'progressive_size' needs lr_schedule=cosine: ReduceLROnPlateau would lower the "
                              "learning rate on the small epochs, whose validation (at full size) scores low")
    elif config.progressive_epochs:
        raise ConfigError("setting 'progressive_epochs' needs 'progressive_size' (the size of those epochs)")
    if not check_files:
        return
    if config.distribution == "multi-worker":
        from cifar100.distribution import read_tf_config

        read_tf_config()  # a malformed TF_CONFIG fails here, before anything starts
    _check_weights(config, backbone)
    if check_data and not Path(config.data_dir).is_dir():
        from cifar100.data import _missing_folder_message

        raise ConfigError(f"setting 'data_dir': {_missing_folder_message(Path(config.data_dir))}")


def _check_weights(config: Config, backbone) -> None:
    """'imagenet', None, or a readable Keras .weights.h5 file (HDF5)."""
    if config.weights is None:
        return
    if not isinstance(config.weights, str):
        raise ConfigError(f"setting 'weights' must be 'imagenet', None or a file path, got {shown(config.weights)}")
    if config.weights == "imagenet":
        if not backbone.has_imagenet:
            raise ConfigError(f"setting 'weights': {config.backbone} has no ImageNet weights; use None")
        return
    path = Path(config.weights)
    if not path.is_file():
        raise ConfigError(f"setting 'weights': file {path} not found (use 'imagenet', None, or a path to a "
                          ".weights.h5 file)")
    if not path.name.endswith(".weights.h5"):
        raise ConfigError(f"setting 'weights': {path} is not a .weights.h5 file")
    import h5py

    try:
        with h5py.File(path, "r"):
            pass
    except OSError as exc:
        raise ConfigError(f"setting 'weights': {path} is not a readable Keras weights file (expected HDF5 as "
                          f"written by save_weights; truncated or another format? {str(exc).splitlines()[0]})"
                          ) from None
