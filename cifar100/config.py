"""A run's settings (dataclass, presets, `--set key=value` overrides, the check that refuses what cannot work),
and the errors a user can cause, each naming the file or setting, what was expected and what was found."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import reprlib
import unicodedata
from dataclasses import dataclass, fields
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: a setting, a file, a folder. The message says what, where, and what to do."""


class ConfigError(UserError, ValueError):
    """A setting cannot work. The message names the setting and says why."""


class DatasetError(UserError):
    """A dataset file or folder is missing, unsafe, corrupt or inconsistent. The message says which."""


class RunError(UserError):
    """A run folder cannot be used as asked (locked by another process, damaged, or holding other settings)."""


def shown(value, limit: int = 60) -> str:
    """A value read from a file, safe to put in a message: bounded in length, its control characters
    escaped, and an integer too long to print (Python refuses over 4,300 digits) named by its size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    try:
        text = reprlib.repr(value)
    except (ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return printable(text[:limit])


def first_line(exc: BaseException) -> str:
    """An exception's message in one bounded line (Keras' and h5py's run over many)."""
    return (str(exc).strip().splitlines() or [""])[0][:300]


def printable(text: str) -> str:
    """`text` with control and format characters (terminal escapes, bidi overrides) escaped: safe to print."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


AUGMENTATIONS = ("none", "basic", "randaugment", "mixup", "cutmix")
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5")
AUTO_FLAGS = ("auto", "true", "false")
PRECISIONS = AUTO_FLAGS + ("bfloat16",)
DISTRIBUTIONS = ("auto", "mirrored", "multi-worker", "none")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("plateau", "cosine")
HEAD_FEATURES = ("live", "cached")
FINETUNE_FEATURES = ("live", "cached")
HEM_MODES = ("reweight", "selective")
CHOICES = {"augment": AUGMENTATIONS, "interpolation": INTERPOLATIONS, "distribution": DISTRIBUTIONS,
           "mixed_precision": PRECISIONS, "jit_compile": AUTO_FLAGS, "optimizer": OPTIMIZERS,
           "lr_schedule": SCHEDULES, "head_features": HEAD_FEATURES, "finetune_features": FINETUNE_FEATURES,
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
    # "cached": the head trains on backbone features computed once (images and mirrors); "live": each epoch, augmented
    head_features: str = "live"
    # phase 2: fine-tuning (BatchNorm layers stay in inference mode)
    finetune_epochs: int = 3
    finetune_learning_rate: float = 1e-4
    finetune_fraction: float = 1.0  # fraction of the backbone's layers, from the top, that fine-tune
    # "cached": the layers below that fraction run once, over `finetune_views` views of each training image (the
    # image, its mirror, then shifted copies of both; None: 2, or 1 with augment=none), and phase 2 trains the top
    # on those activations; "live": each epoch runs the whole backbone on freshly augmented images
    finetune_features: str = "live"
    finetune_views: int | None = None
    # progressive resizing: the first `progressive_epochs` fine-tuning epochs train at `progressive_size` px
    # (cheaper), the rest at `image_size`; validation, evaluation and the saved model always use image_size
    progressive_size: int | None = None
    progressive_epochs: int = 0
    # both phases' optimiser and schedule: "plateau": ReduceLROnPlateau lowers the rate; "cosine": linear warm-up
    # for `warmup_epochs`, then a cosine to 0 at the phase's last step (no ReduceLROnPlateau)
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
    # "reweight": a scoring pass weights each example's loss; "selective": backprop only high-loss examples
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
    # the batch size the learning rates were chosen for: k times larger scales them k times (None: as they are)
    reference_batch_size: int | None = None
    distribution_timeout: float = 300.0  # seconds to wait for the other workers of a multi-worker run
    tensorboard: bool = True  # each epoch's metrics in the run folder's logs/: `tensorboard --logdir models`
    # "": the model models.py builds; else the fingerprint of a notebook-edited model (set by train.Training)
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
        """The run folder's name: `name` when set, else the preset plus what differs from it plus a hash of the
        settings that define training (e.g. `cpu-small-hem=True-1a2b3c`), so other settings never share a folder."""
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
                and canonical(getattr(self, f.name)) != canonical(getattr(preset, f.name))}

    def views(self) -> int:
        """How many views of each training image phase 2 on cached activations computes."""
        return self.finetune_views or (1 if self.augment == "none" else 2)

    def identity(self) -> dict:
        """The settings that define what the run learns: all but its name, preset and where it is saved."""
        return {key: value for key, value in self.to_dict().items() if key not in NOT_IDENTITY}

    def settings_hash(self) -> str:
        """6 hex digits of a hash of the identity. Only settings that differ from the Config defaults enter
        it, so that a new setting (whose default keeps the old behaviour) does not change old runs' hashes."""
        defaults = Config()
        changed = {key: canonical(value) for key, value in self.identity().items()
                   if canonical(value) != canonical(getattr(defaults, key))}
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
        """'setting: other's value -> this value' for each setting that differs (3 and 3.0 do not); `names` renames
        settings (the notebook says HARD_EXAMPLE_MINING for hem)."""
        names = names or {}
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{names.get(k, k)}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items()
                if canonical(theirs.get(k)) != canonical(v)]

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
    # Sized for a 2-core CPU (docs/benchmarks.md): phase 1 on cached features, then warm-up + cosine fine-tuning.
    "cpu-small": dict(backbone="mobilenetv3small", image_size=160, batch_size=64, max_train_images=10000,
                      head_features="cached", head_epochs=10, finetune_epochs=8, finetune_learning_rate=3e-4,
                      lr_schedule="cosine", warmup_epochs=1, label_smoothing=0.1),
    # Seconds, for tests: a tiny CNN from random weights at 32 px (nothing pretrained, so every layer trains).
    "smoke": dict(backbone="tinycnn", image_size=32, weights=None, batch_size=32, max_train_images=1000,
                  head_epochs=1, head_learning_rate=3e-3, finetune_epochs=5, finetune_learning_rate=3e-3,
                  augment="none", dropout=0.0, hem_fraction=0.5),
}


def _preset_config(preset: str | None) -> Config:
    return make_config(preset if preset in PRESETS else None)


def canonical(value):
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


# --- refusing settings that cannot work, before any data is read, any model built or any file written ---

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
    "progressive_epochs": (_INT, 0, "<= 100000"), "finetune_views": (_INT, 1, "<= 64"),
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
    """Refuse a config that cannot work, before anything is read, built or written. `check_data=False` skips the
    data folder; `check_files=False` also the weights file and TF_CONFIG (for a saved config.json read back)."""
    from cifar100.models import BACKBONES

    for name in RANGES:
        _check_number(name, getattr(config, name))
    if not isinstance(config.tensorboard, bool):
        raise ConfigError(f"setting 'tensorboard' must be true or false, got {shown(config.tensorboard)}")
    if not isinstance(config.hem, bool):
        raise ConfigError(f"setting 'hem' must be True or False, got {shown(config.hem)}")
    for name in ("name", "data_dir", "runs_dir", "backbone", "weights"):
        value = getattr(config, name)
        if name != "weights" and not isinstance(value, str):
            raise ConfigError(f"setting '{name}' must be a string, got {shown(value)}")
        if isinstance(value, str) and any(unicodedata.category(char) == "Cc" for char in value):  # from a file
            raise ConfigError(f"setting '{name}': {shown(value)} holds control characters (a NUL, a terminal "
                              "escape): not a name or path")
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
    if config.finetune_features == "cached":
        clash = [(config.finetune_fraction >= 1, "finetune_fraction below 1 (the layers below it are cached)"),
                 (config.augment not in ("none", "basic"), "augment none or basic (flips and shifts are the views)"),
                 (config.augment == "none" and (config.finetune_views or 1) > 1, "finetune_views=1 with augment=none"),
                 (config.progressive_size is not None, "no progressive_size"), (config.hem, "hem off")]
        needs = [what for clashes, what in clash if clashes]
        if needs:
            raise ConfigError(f"setting 'finetune_features': 'cached' needs {'; '.join(needs)}")
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
        found = "is not a regular file" if path.exists() else "not found"
        raise ConfigError(f"setting 'weights': file {path} {found} (use 'imagenet', None, or a path to a "
                          ".weights.h5 file)")
    if not path.name.endswith(".weights.h5"):
        raise ConfigError(f"setting 'weights': {path} is not a .weights.h5 file")
    import h5py

    try:
        with h5py.File(path, "r"):
            pass
    except OSError as exc:
        raise ConfigError(f"setting 'weights': {path} is not a readable Keras weights file (expected HDF5 as "
                          f"written by save_weights; truncated or another format? {first_line(exc)})"
                          ) from None
