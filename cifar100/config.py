"""A run's settings: a dataclass, named presets, `key=value` parsing, the check that refuses what cannot work,
and the errors a user can cause. Imports nothing of the package and no TensorFlow."""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
from dataclasses import dataclass, fields


class UserError(Exception):
    """Bad input: a setting, a file, a folder. The message says what, where, what was expected and found."""


class ConfigError(UserError, ValueError):
    """A setting cannot work."""


class DatasetError(UserError):
    """A dataset file or folder is missing, unsafe, corrupt or inconsistent."""


class RunError(UserError):
    """A run folder or model file cannot be used as asked (locked, damaged, or another run's)."""


def shown(value, limit: int = 60) -> str:
    """A value from a file or a user, safe in a message: bounded, its control characters escaped."""
    try:
        text = reprlib.repr(value)
    except (ValueError, RecursionError):  # an int of 4,300+ digits, a deep structure
        text = f"a {type(value).__name__}"
    return printable(text[:limit])


def printable(text) -> str:
    """`text` with control characters (terminal escapes) escaped."""
    text = str(text)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


# The backbones: keras.applications class, input preprocessing (see cifar100.data.preprocessing), minimum size.
BACKBONES = {
    "resnet50": ("ResNet50", "caffe", 32),
    "xception": ("Xception", "tf", 71),
    "mobilenetv2": ("MobileNetV2", "tf", 32),
    "mobilenetv3small": ("MobileNetV3Small", "none", 32),
    "efficientnetv2b0": ("EfficientNetV2B0", "none", 32),
    "convnext_tiny": ("ConvNeXtTiny", "none", 32),
}
CHOICES = {
    "backbone": tuple(BACKBONES),
    "head_features": ("live", "cached"),  # cached: the frozen backbone runs once, the head trains on features
    "optimizer": ("adam", "adamw", "sgd"),
    "lr_schedule": ("plateau", "cosine"),  # plateau: ReduceLROnPlateau; cosine: warm-up, then cosine to 0
    "augment": ("none", "basic", "randaugment"),  # basic: flip and shift by up to 4 px
    "interpolation": ("bilinear", "nearest", "bicubic", "area"),
    "mixed_precision": ("auto", "true", "false", "bfloat16"),  # auto: float16 with a GPU
    "jit_compile": ("auto", "true", "false"),  # auto: XLA with a GPU
    "distribution": ("auto", "mirrored", "multi-worker", "none"),  # auto: mirrored over 2+ GPUs
}


@dataclass
class Config:
    """Everything that defines a run, saved as config.json in its folder."""

    preset: str | None = None
    backbone: str = "mobilenetv3small"
    image_size: int = 96  # upsampled from 32 px inside the model
    weights: str | None = "imagenet"  # "imagenet", None (random) or a .weights.h5 file
    data_dir: str = "cifar-100-python"
    runs_dir: str = "models"
    val_fraction: float = 0.1  # carved from the training set, stratified: the test set is never watched
    max_train_images: int | None = None  # a stratified cap on the training images
    seed: int = 0
    batch_size: int = 64
    head_epochs: int = 2  # phase 1: the backbone frozen
    head_learning_rate: float = 1e-3
    head_features: str = "live"
    finetune_epochs: int = 3  # phase 2: the top finetune_fraction of the backbone trains too
    finetune_learning_rate: float = 1e-4
    finetune_fraction: float = 1.0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "plateau"
    warmup_epochs: int = 0
    dropout: float = 0.2
    label_smoothing: float = 0.0
    augment: str = "basic"
    interpolation: str = "bilinear"
    reduce_lr_patience: int = 2
    reduce_lr_factor: float = 0.3
    early_stopping_patience: int = 4
    hem: bool = False  # hard-example mining: weight each example's loss by its cross-entropy
    hem_every: int = 1  # score the training examples every k epochs
    hem_fraction: float = 0.2  # the fraction of them scored each time
    hem_strength: float = 1.0  # weight = (loss / mean loss) ** strength ...
    hem_floor: float = 0.5  # ... and at least this (mean weight 1)
    mixed_precision: str = "auto"
    jit_compile: str = "auto"
    distribution: str = "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def changed(self) -> dict:
        """The settings that differ from the preset's (but where data and runs live): they name the run."""
        base = make_config(self.preset if self.preset in PRESETS else None)
        return {k: v for k, v in self.to_dict().items()
                if k not in ("preset", "data_dir", "runs_dir") and v != getattr(base, k)}

    def identity(self) -> dict:
        """What the run learns from: all settings but the preset's name and the runs folder."""
        return {k: v for k, v in self.to_dict().items() if k not in ("preset", "runs_dir")}

    @classmethod
    def from_dict(cls, content: dict, where: str = "settings") -> Config:
        """A Config from a saved dict (settings this version does not know are ignored), checked."""
        if not isinstance(content, dict):
            raise ConfigError(f"{where}: expected a JSON object of settings, found {shown(content)}")
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in content.items() if k in known})
        try:
            validate(config)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return config


PRESETS: dict[str, dict] = {
    # The original project's runs, upsampled to each backbone's native size, on all of CIFAR-100.
    "seed-resnet50": dict(backbone="resnet50", image_size=224, head_epochs=3, finetune_epochs=20),
    "seed-xception": dict(backbone="xception", image_size=299, batch_size=48, head_epochs=3, finetune_epochs=20),
    # The original 32 px baseline: the same backbone, no upsampling.
    "no-upsampling": dict(backbone="resnet50", image_size=32, batch_size=128, head_epochs=3, finetune_epochs=20),
    # Sized for a 2-core CPU, on a 10,000-image subset (docs/benchmarks.md): phase 1 on cached features, then
    # warm-up + cosine fine-tuning with label smoothing.
    "cpu-small": dict(backbone="mobilenetv3small", image_size=160, max_train_images=10000, head_features="cached",
                      head_epochs=10, finetune_epochs=8, finetune_learning_rate=3e-4, lr_schedule="cosine",
                      warmup_epochs=1, label_smoothing=0.1),
    # Seconds, for tests and the demo: MobileNetV3Small at 32 px from random weights on 1,000 images.
    "smoke": dict(backbone="mobilenetv3small", image_size=32, weights=None, batch_size=32, max_train_images=1000,
                  head_epochs=1, head_learning_rate=3e-3, finetune_epochs=3, finetune_learning_rate=3e-3,
                  augment="none", dropout=0.0, hem_fraction=0.5),
}


def parse_value(key: str, text: str):
    """A `key=value` string as the setting's type."""
    kind = {f.name: str(f.type) for f in fields(Config)}[key]
    lowered = text.strip().lower()
    if lowered in ("none", "null") and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            return {"true": True, "false": False, "1": True, "0": False}[lowered]
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except (KeyError, ValueError):
        raise ConfigError(f"setting '{key}': cannot read {shown(text)} as {kind}") from None
    return text


def parse_sets(items: list[str]) -> dict:
    """`key=value` strings (the command line's --set) as settings of their types; unknown keys kept as text for
    make_config to name."""
    names = {f.name for f in fields(Config)}
    pairs = [item.split("=", 1) for item in items]
    for pair in pairs:
        if len(pair) != 2:
            raise ConfigError(f"--set {shown(pair[0])}: expected key=value")
    return {key.strip(): parse_value(key.strip(), value) if key.strip() in names else value for key, value in pairs}


def make_config(preset: str | None = None, overrides: dict | list[str] | None = None) -> Config:
    """A Config from a preset and overrides (a dict, or 'key=value' strings), checked."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"preset {shown(preset)} is unknown: choose one of {sorted(PRESETS)}")
    names = sorted(f.name for f in fields(Config))
    overrides = parse_sets(overrides) if isinstance(overrides, list) else overrides or {}
    for key in overrides:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=2)
            hint = f": did you mean {' or '.join(close)}?" if close else f"; the settings are {', '.join(names)}"
            raise ConfigError(f"unknown setting {shown(key)}{hint}")
    config = Config(**{**PRESETS.get(preset, {}), "preset": preset, **overrides})
    validate(config)
    return config


# Each number's kind and range: (integer?, lowest, highest, lowest excluded?)
RANGES = {
    "image_size": (True, 1, 1024), "batch_size": (True, 1, 65536), "seed": (True, 0, 2**32 - 1),
    "head_epochs": (True, 0, 10**5), "finetune_epochs": (True, 0, 10**5), "max_train_images": (True, 1, 10**8),
    "warmup_epochs": (True, 0, 10**5), "reduce_lr_patience": (True, 0, 10**5),
    "early_stopping_patience": (True, 0, 10**5), "hem_every": (True, 1, 10**5),
    "head_learning_rate": (False, 0, 10, True), "finetune_learning_rate": (False, 0, 10, True),
    "weight_decay": (False, 0, 10), "val_fraction": (False, 0, 0.9, True), "finetune_fraction": (False, 0, 1, True),
    "dropout": (False, 0, 0.99), "label_smoothing": (False, 0, 0.99), "reduce_lr_factor": (False, 0, 0.99, True),
    "hem_fraction": (False, 0, 1, True), "hem_strength": (False, 0, 10), "hem_floor": (False, 0, 1),
}


def validate(config: Config) -> None:
    """Refuse settings that cannot work, in one line each, before anything is read, built or written."""
    for name, (integer, low, high, *open_low) in RANGES.items():
        value = getattr(config, name)
        if value is None and name == "max_train_images":
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (integer and not isinstance(value, int)) or not math.isfinite(value) \
                or not low <= value <= high or (open_low and value == low):
            what = "an integer" if integer else "a number"
            above = f"above {low}" if open_low else f"from {low}"
            raise ConfigError(f"setting '{name}' must be {what} {above} to {high}, got {shown(value)}")
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"setting '{name}': {shown(getattr(config, name))} is not one of {list(allowed)}")
    if not isinstance(config.hem, bool):
        raise ConfigError(f"setting 'hem' must be true or false, got {shown(config.hem)}")
    for name in ("data_dir", "runs_dir"):
        value = getattr(config, name)
        if not isinstance(value, str) or not value or not value.isprintable():
            raise ConfigError(f"setting '{name}' must be a folder path, got {shown(value)}")
    if not (config.weights is None or isinstance(config.weights, str) and config.weights.isprintable()):
        raise ConfigError(f"setting 'weights' must be 'imagenet', None or a .weights.h5 file, got "
                          f"{shown(config.weights)}")
    minimum = BACKBONES[config.backbone][2]
    if config.image_size < minimum:
        raise ConfigError(f"setting 'image_size': {config.image_size} px is below {config.backbone}'s minimum of "
                          f"{minimum} px")
    if config.head_epochs + config.finetune_epochs == 0:
        raise ConfigError("settings 'head_epochs' and 'finetune_epochs' are both 0: nothing would train")
