"""One dataclass holds a run's settings; named presets fill it; `--set key=value` overrides it."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from cifar100.errors import ConfigError  # noqa: F401  (re-exported: cifar100.config.ConfigError)

AUGMENTATIONS = ("none", "basic", "randaugment", "mixup", "cutmix")
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5")
AUTO_FLAGS = ("auto", "true", "false")
PRECISIONS = AUTO_FLAGS + ("bfloat16",)
DISTRIBUTIONS = ("auto", "mirrored", "multi-worker", "none")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("plateau", "cosine")
HEAD_FEATURES = ("live", "cached")
HEM_MODES = ("reweight", "selective")
CHOICES = {"augment": AUGMENTATIONS, "interpolation": INTERPOLATIONS, "distribution": DISTRIBUTIONS,
           "mixed_precision": PRECISIONS, "jit_compile": AUTO_FLAGS, "optimizer": OPTIMIZERS,
           "lr_schedule": SCHEDULES, "head_features": HEAD_FEATURES,
           "hem_mode": HEM_MODES}
# Settings that do not change what a run learns: left out of its identity (the hash in its folder name).
NOT_IDENTITY = ("name", "preset", "runs_dir", "distribution_timeout", "tensorboard")
# Also left out of the readable part of a run's folder name (still in its hash): usually a long path.
NOT_IN_NAME = NOT_IDENTITY + ("data_dir",)
MAX_NAME_LENGTH = 100
MAX_VALUE_LENGTH = 20


@dataclass
class Config:
    """Everything that defines a training run. Saved as config.json in the run folder."""

    name: str = ""  # run folder name under runs_dir; when empty, derived from the settings (see run_name)
    preset: str | None = None  # the preset the settings started from (make_config records it)
    backbone: str = "mobilenetv3small"
    image_size: int = 96  # images are upsampled from 32 px to this size inside the model
    weights: str | None = "imagenet"  # "imagenet", None (random), or a path to a .weights.h5 file
    data_dir: str = "cifar-100-python"
    runs_dir: str = "models"
    val_fraction: float = 0.1  # carved from the training set, stratified; the test set is never used
    max_train_images: int | None = None  # stratified cap on the training images (validation is not capped)
    seed: int = 0
    batch_size: int = 64
    # phase 1: backbone frozen, the head learns
    head_epochs: int = 2
    head_learning_rate: float = 1e-3
    # "cached": the frozen backbone's features are computed once (images and their mirror images) and the
    # head trains on them, instead of running the backbone every epoch; "live": every epoch, augmented
    head_features: str = "live"
    # phase 2: fine-tuning (BatchNorm layers stay in inference mode)
    finetune_epochs: int = 3
    finetune_learning_rate: float = 1e-4
    finetune_fraction: float = 1.0  # fraction of the backbone's layers, from the top, that fine-tune
    # progressive resizing: the first `progressive_epochs` fine-tuning epochs train at `progressive_size` px
    # (cheaper), the rest at `image_size`; validation, evaluation and the saved model always use image_size
    progressive_size: int | None = None
    progressive_epochs: int = 0
    # the optimiser and the learning-rate schedule of both phases: "plateau" keeps the rate until
    # ReduceLROnPlateau lowers it; "cosine" warms up linearly for `warmup_epochs` of the phase, then decays it
    # along a cosine to 0 at the phase's last step (ReduceLROnPlateau is then left out: the schedule sets it)
    optimizer: str = "adam"  # adam | adamw | sgd (Nesterov momentum 0.9)
    weight_decay: float = 0.0  # decoupled weight decay (adamw, sgd)
    clipnorm: float | None = None  # clip each gradient to this norm
    lr_schedule: str = "plateau"  # plateau | cosine
    warmup_epochs: int = 0
    dropout: float = 0.2
    label_smoothing: float = 0.0
    augment: str = "basic"  # none | basic (flip + translate) | randaugment | mixup | cutmix (+ basic)
    interpolation: str = "bilinear"
    # callbacks
    reduce_lr_patience: int = 2
    reduce_lr_factor: float = 0.3
    early_stopping_patience: int = 4
    # hard-example mining (cifar100/mining.py): off by default, as measured (docs/benchmarks.md)
    hem: bool = False
    # "reweight": a scoring pass weights each example's loss; "selective": each step backpropagates only
    # the examples whose loss ranks high (Selective-Backprop)
    hem_mode: str = "reweight"
    hem_every: int = 1  # reweight: score the training examples every k epochs
    hem_fraction: float = 0.2  # reweight: fraction of the training examples scored each time (bounds the cost)
    hem_strength: float = 1.0  # reweight: loss weight = (loss / mean loss) ** strength
    hem_floor: float = 0.5  # reweight: every example keeps a loss weight of at least this (mean weight 1)
    hem_selectivity: float = 0.5  # selective: the fraction of examples backpropagated, on average
    hem_window: int = 1024  # selective: a loss is ranked against this many recent losses
    hem_keep: int = 64  # how many of the hardest training examples results.json keeps (to be shown)
    # speed
    mixed_precision: str = "auto"  # auto (float16 with a GPU) | true (float16) | bfloat16 | false
    jit_compile: str = "auto"  # auto (on with a GPU) | true | false
    # distribution (cifar100/distribution.py): batch_size is the global batch
    distribution: str = "auto"  # auto | mirrored | multi-worker | none
    # on request only: the learning rates were chosen for this batch size; a batch_size k times larger
    # scales them k times (the linear scaling rule). None: the rates are used as they are
    reference_batch_size: int | None = None
    distribution_timeout: float = 300.0  # seconds to wait for the other workers of a multi-worker run
    tensorboard: bool = True  # each epoch's metrics in the run folder's logs/: `tensorboard --logdir models`
    # "": the model cifar100/models.py builds for these settings; else the fingerprint (models.fingerprint)
    # of a model edited in the notebook, which train.Training sets: such a run has a folder of its own
    model: str = ""

    def __post_init__(self):
        # one spelling of each choice, used everywhere: "MixUp" -> "mixup", None -> "none"
        for name in CHOICES:
            value = getattr(self, name)
            if value is None and name == "augment":
                value = "none"
            if isinstance(value, str):
                setattr(self, name, value.strip().lower())
        if isinstance(self.data_dir, str) and self.data_dir:
            self.data_dir = os.path.normpath(self.data_dir)  # "data/", "./data" and "data" are one folder
        if isinstance(self.weights, str) and self.weights.strip().lower() in ("none", "null", "", "random"):
            self.weights = None
        elif isinstance(self.weights, str) and self.weights.strip().lower() == "imagenet":
            self.weights = "imagenet"

    def run_name(self) -> str:
        """The run folder's name: `name` when set, else the preset plus what differs from it plus a hash.

        `cpu-small` is the preset as it is; `cpu-small-hem=True-head_learning_rate=0.003-1a2b3c` changes
        two settings. The 6-hex-digit hash covers every setting that defines training (not the data
        folder's name in the readable part, nor where the run is saved), so other settings never share
        a folder and the same settings always find theirs.
        """
        if self.name:
            return self.name
        base = self.preset or "custom"
        changed = self.changed_from_preset()
        if not changed and self.data_dir == _preset_config(self.preset).data_dir:
            return base
        readable = "-".join([base] + [f"{key}={_name_value(value)}" for key, value in changed.items()])
        return f"{readable[:MAX_NAME_LENGTH].rstrip('-')}-{self.settings_hash()}"

    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name()

    def changed_from_preset(self) -> dict:
        """The settings (but the data folder) that differ from the preset's, in the order of the fields."""
        preset = _preset_config(self.preset)
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NOT_IN_NAME
                and _canonical(getattr(self, f.name)) != _canonical(getattr(preset, f.name))}

    def identity(self) -> dict:
        """The settings that define what the run learns: all but its name, preset and where it is saved."""
        return {key: value for key, value in self.to_dict().items() if key not in NOT_IDENTITY}

    def settings_hash(self) -> str:
        """6 hex digits of a hash of the identity. Only settings that differ from the Config defaults enter
        it, so that a new setting (whose default keeps the old behaviour) does not change old runs' hashes."""
        defaults = Config()
        changed = {key: _canonical(value) for key, value in self.identity().items()
                   if _canonical(value) != _canonical(getattr(defaults, key))}
        return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:6]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from cifar100.run_folder import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Config:
        """The settings saved in a run folder's config.json; a damaged file gives a RunError naming it."""
        from cifar100.run_folder import read_json
        from cifar100.validation import validate

        try:
            config = cls.from_dict(read_json(path, "config.json"))
            validate(config, check_data=False, check_files=False)  # a file from elsewhere: each value checked
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return config

    @classmethod
    def from_dict(cls, content: dict) -> Config:
        """A Config from a saved dict; settings this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in content.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"saved settings do not fit: {exc}") from None

    def differences(self, other: Config, names: dict[str, str] | None = None) -> list[str]:
        """'setting: other's value -> this value' for each setting that differs (3 and 3.0 do not).

        For a refused run folder, `config.differences(saved)` lists each setting's value there and the value
        asked for now. `names` renames settings in the lines (the notebook says HARD_EXAMPLE_MINING for hem).
        """
        names = names or {}
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{names.get(k, k)}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items()
                if _canonical(theirs.get(k)) != _canonical(v)]

    def training_differences(self, other: Config, names: dict[str, str] | None = None) -> list[str]:
        """`differences` in the settings that define training only (not the run's name, preset or place)."""
        return self.differences(other.replace(**{k: v for k, v in self.to_dict().items() if k in NOT_IDENTITY}),
                                names)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict] = {
    # The original project's two runs, upsampled to each backbone's native size.
    "seed-resnet50": dict(backbone="resnet50", image_size=224, batch_size=64, head_epochs=3, finetune_epochs=20,
                          finetune_learning_rate=1e-4, max_train_images=None),
    "seed-xception": dict(backbone="xception", image_size=299, batch_size=48, head_epochs=3, finetune_epochs=20,
                          finetune_learning_rate=1e-4, max_train_images=None),
    # The original 32 px baseline: same backbone, no upsampling.
    "no-upsampling": dict(backbone="resnet50", image_size=32, batch_size=128, head_epochs=3, finetune_epochs=20,
                          finetune_learning_rate=1e-4),
    # Sized for a 2-core CPU, measured on real images (docs/benchmarks.md, "cpu-small on real images"):
    # phase 1 on cached features, then a warm-up + cosine fine-tuning. On CIFAR-100 it trains on a
    # stratified 10,000 of the 45,000 training images (100 a class); validation keeps its 5,000.
    "cpu-small": dict(backbone="mobilenetv3small", image_size=160, batch_size=64, max_train_images=10000,
                      head_features="cached", head_epochs=10, finetune_epochs=8, finetune_learning_rate=3e-4,
                      lr_schedule="cosine", warmup_epochs=1, label_smoothing=0.1),
    # Seconds, for tests and a first look: a tiny CNN from random weights at 32 px.
    # Random weights: no head phase (nothing pretrained to keep frozen), every layer trains from the start.
    "smoke": dict(backbone="tinycnn", image_size=32, weights=None, batch_size=32, max_train_images=1000,
                  head_epochs=1, head_learning_rate=3e-3, finetune_epochs=5, finetune_learning_rate=3e-3,
                  augment="none", dropout=0.0, hem_fraction=0.5),
}


def _preset_config(preset: str | None) -> Config:
    return make_config(preset if preset in PRESETS else None)


def _canonical(value):
    """A value as it is compared: 3 and 3.0 are the same setting."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _name_value(value) -> str:
    """A setting's value as it appears in a folder name: short, and safe on every filesystem."""
    if isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
        if "/" in text or "\\" in text:
            text = re.split(r"[/\\]", text.rstrip("/\\"))[-1]  # a path: its last part
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", text)[:MAX_VALUE_LENGTH]


def _parse_value(key: str, text: str):
    """Turn a `--set key=value` string into the type of the setting."""
    field_type = {f.name: f.type for f in fields(Config)}[key]
    lowered = text.strip().lower()
    if lowered in ("none", "null") and ("None" in str(field_type)):
        return None
    try:
        if "bool" in str(field_type):
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("true", "1", "yes", "on")
        if "int" in str(field_type) and "float" not in str(field_type):
            return int(text)
        if "float" in str(field_type):
            return float(text)
    except ValueError:
        raise ConfigError(f"setting '{key}': cannot read {text!r} as {field_type}") from None
    return text


def make_config(preset: str | None = None, overrides: dict | list[str] | None = None) -> Config:
    """A Config from a preset name plus overrides: a dict, or a list of 'key=value' strings."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"preset '{preset}' is unknown: choose one of {sorted(PRESETS)}")
    config = Config(**PRESETS.get(preset, {}), preset=preset)
    names = {f.name for f in fields(Config)}
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected key=value")
            key, value = item.split("=", 1)
            key = key.strip()
            if key not in names:
                raise ConfigError(f"--set {key}: unknown setting{_did_you_mean(key, names)}")
            pairs[key] = _parse_value(key, value)
        overrides = pairs
    unknown = set(overrides or {}) - names
    if unknown:
        raise ConfigError("; ".join(f"unknown setting {key!r}{_did_you_mean(key, names)}" for key in sorted(unknown)))
    return config.replace(**(overrides or {}))


def _did_you_mean(key: str, names) -> str:
    close = difflib.get_close_matches(key, sorted(names), n=3)
    if close:
        return f": did you mean {' or '.join(repr(name) for name in close)}?"
    return f"; the settings are {', '.join(sorted(names))} (README, 'The command line')"
