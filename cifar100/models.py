"""The backbones, the inference model (saved and exported; Keras' own layers only, so any process can load it)
and the training model `fit` trains: augmentation in front of the same layers, weights shared, never saved."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar100 import keras_internals
from cifar100.config import Config, ConfigError, first_line
from cifar100.keras_internals import keras  # Keras, imported without TensorFlow's start-up lines

layers, ops = keras.layers, keras.ops

BACKBONE_LAYER = "backbone"


@dataclass(frozen=True)
class Backbone:
    """What the project needs to know about one backbone."""

    constructor: Callable[..., keras.Model]
    preprocessing: str  # its input convention (preprocessing_layers): caffe | tf | none
    min_size: int
    has_imagenet: bool = True


CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocessing_layers(mode: str) -> list[layers.Layer]:
    """The backbone's input convention on 0..255 RGB, as Keras layers (a saved model carries them): tf scales
    to [-1, 1]; caffe is RGB -> BGR minus the ImageNet mean, a frozen Dense(3); none: the backbone rescales."""
    if mode == "tf":
        return [layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")]
    if mode == "caffe":
        rgb_to_bgr = np.eye(3, dtype="float32")[::-1]
        bias = -np.array(CAFFE_MEAN_BGR, dtype="float32")
        return [layers.Dense(3, trainable=False, name="preprocess",
                             kernel_initializer=keras.initializers.Constant(rgb_to_bgr),
                             bias_initializer=keras.initializers.Constant(bias))]
    if mode == "none":
        return []
    raise ValueError(f"unknown preprocessing mode {mode!r}")


def tiny_cnn(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg", name="tinycnn"):
    """A small CNN with the keras.applications signature: for the smoke preset and tests (no ImageNet weights)."""
    if weights not in (None,) and not str(weights).endswith(".weights.h5"):
        raise ValueError("tinycnn has no pretrained weights")
    inputs = keras.Input(input_shape)
    x = inputs
    for width in (32, 64):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)  # short runs: statistics that keep up with training
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x) if pooling == "avg" else layers.GlobalMaxPooling2D()(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model


apps = keras.applications
BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone(apps.ResNet50, "caffe", min_size=32),
    "xception": Backbone(apps.Xception, "tf", min_size=71),
    "efficientnetv2b0": Backbone(apps.EfficientNetV2B0, "none", min_size=32),
    "convnext_tiny": Backbone(apps.ConvNeXtTiny, "none", min_size=32),
    "mobilenetv2": Backbone(apps.MobileNetV2, "tf", min_size=32),
    "mobilenetv3small": Backbone(apps.MobileNetV3Small, "none", min_size=32),
    "tinycnn": Backbone(tiny_cnn, "tf", min_size=8, has_imagenet=False),
}


def augmentation_layers(config: Config) -> list[layers.Layer]:
    """Augmentation on the 32x32 images (cheap), active in training only. MixUp/CutMix live in the sampler."""
    if config.augment == "none":
        return []
    seed = config.seed * 10  # each layer its own stream: RandomFlip, RandomShift and RandAugment draw apart
    augment = [layers.RandomFlip("horizontal", seed=seed),
               keras_internals.RandomShift(4, seed=seed + 1, name="random_shift")]
    if config.augment == "randaugment":
        augment.append(layers.RandAugment(value_range=(0, 255), seed=seed + 2))
    return augment


def build_backbone(config: Config) -> keras.Model:
    spec = BACKBONES[config.backbone]
    # progressive resizing feeds the backbone several sizes: leave its input size open
    size = None if config.progressive_size else config.image_size
    kwargs = dict(include_top=False, weights=config.weights, input_shape=(size, size, 3), pooling="avg")
    try:
        model = spec.constructor(**kwargs)
    except ValueError as exc:
        if config.weights not in (None, "imagenet"):
            raise ConfigError(f"setting 'weights': {config.weights} does not fit backbone '{config.backbone}' "
                              f"(is it another architecture's file?): {first_line(exc)}") from None
        raise
    except Exception as exc:  # keras.utils.get_file raises a bare Exception("URL fetch failure ...")
        if config.weights == "imagenet" and "fetch failure" in str(exc):
            raise ConfigError(f"setting 'weights': could not download {config.backbone}'s ImageNet weights (no "
                              f"network?): {first_line(exc)}. Use a local file (weights=PATH to a "
                              ".weights.h5 file) or weights=None (random)") from None
        raise
    return model


def build_model(config: Config, num_classes: int = 100, backbone: keras.Model | None = None) -> keras.Model:
    """The inference model: raw (None, 32, 32, 3) uint8 images in, `num_classes` probabilities (float32) out.
    Saved as best.keras and exported. `backbone` replaces the registry's (benchmarks pass a trivial one)."""
    spec = BACKBONES[config.backbone]
    inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1.0, name="to_float")(inputs)  # uint8 -> the compute dtype
    if config.image_size != 32:
        upsample = layers.Resizing(config.image_size, config.image_size, interpolation=config.interpolation,
                                   name="upsample")
        x = keras_internals.call_in_inference_mode_by_default(upsample, x)
    for layer in preprocessing_layers(spec.preprocessing):
        x = layer(x)
    if backbone is None:
        backbone = build_backbone(config)
    backbone.name = BACKBONE_LAYER
    x = backbone(x)  # pretrained: its BatchNorm layers are frozen, so they run in inference mode (set_phase)
    x = layers.Dropout(config.dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="classifier")(x)
    return keras.Model(inputs, outputs, name=f"{config.backbone}_{config.image_size}px")


def training_model(model: keras.Model, config: Config) -> keras.Model:
    """The model `fit` trains: the augmentation, then `model`'s own layers (weights shared). With progressive
    resizing its upsampling is an `Upsample` that can train smaller; the inference model keeps Resizing."""
    inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
    x = inputs
    for layer in model.layers[1:]:  # after the InputLayer
        if layer.name == "upsample":
            continue
        x = layer(x)
        if layer.name == "to_float":
            upsample = [model.get_layer("upsample")] if config.image_size != 32 else []
            if config.progressive_size:
                upsample = [keras_internals.Upsample(config.image_size, config.image_size,
                                                     interpolation=config.interpolation, name="upsample")]
            for training_only in augmentation_layers(config) + upsample:
                x = keras_internals.call_in_inference_mode_by_default(training_only, x)
    return keras.Model(inputs, x, name=f"{model.name}_training")


def backbone_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BACKBONE_LAYER)


def set_phase(model: keras.Model, phase: str, finetune_fraction: float = 1.0, pretrained: bool = True) -> None:
    """'head': the backbone frozen. 'finetune': the top `finetune_fraction` of the backbone's layers train.
    If `pretrained`, BatchNorm stays frozen, which in Keras 3 also keeps it in inference mode (`training=False`
    on the backbone's call would not: fit's `training=True` reaches every nested layer)."""
    with contextlib.suppress(ValueError):  # a phase starts at full size (a stopped fit may have left it small)
        if isinstance(upsample := model.get_layer("upsample"), keras_internals.Upsample):
            upsample.training_size = None
    backbone = backbone_of(model)
    if phase == "head":
        backbone.trainable = False
        return
    if phase != "finetune":
        raise ValueError(f"phase must be 'head' or 'finetune', got {phase!r}")
    backbone.trainable = True
    frozen = int(round(len(backbone.layers) * (1 - finetune_fraction)))
    for index, layer in enumerate(backbone.layers):
        if index < frozen or (pretrained and isinstance(layer, layers.BatchNormalization)):
            layer.trainable = False


def fingerprint(model: keras.Model, connections: bool = True) -> str:
    """8 hex digits of what a model computes: each layer's class, config, weight shapes and inputs, nested
    models included; names, trainable flags and dtype policies (the session, the phase and the machine's
    precision, which the settings hold) left out. `connections=False`: as the version before 2026-12-02 wrote
    it, blind to the layers' inputs (Keras gives a call's arguments as tuples, which it did not follow)."""
    def describe(layer):
        try:
            config = layer.get_config()
        except NotImplementedError:  # a layer of one's own without get_config: its class and weights
            config = {}
        kept = {k: v for k, v in config.items() if k not in ("name", "trainable", "layers", "input_layers",
                                                            "output_layers") and not (k == "dtype" and
                                                                                      isinstance(v, dict))}
        parts = [type(layer).__name__, kept, _edges(config, (list, tuple) if connections else list),
                 [list(w.shape) for w in layer.weights] if not isinstance(layer, keras.Model) else []]
        return [parts] + [part for inner in getattr(layer, "layers", []) for part in describe(inner)]

    text = json.dumps(describe(model), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _edges(config: dict, sequences=(list, tuple)) -> list:
    """A functional model's graph as positions: for each layer, the positions of the layers it reads."""
    entries = config.get("layers") if isinstance(config.get("layers"), list) else []
    position = {entry.get("name"): i for i, entry in enumerate(entries) if isinstance(entry, dict)}

    def sources(node):
        if isinstance(node, dict):
            history = node.get("keras_history")
            found = [position.get(history[0])] if isinstance(history, list) and history else []
            return found + [i for value in node.values() for i in sources(value)]
        return [i for value in node for i in sources(value)] if isinstance(node, sequences) else []

    return [sources(entry.get("inbound_nodes", [])) for entry in entries if isinstance(entry, dict)]


def recipe_fingerprint(config: Config, num_classes: int, connections: bool = True) -> str:
    """The fingerprint of the training model built for `config` (random weights: no weights file read)."""
    key = json.dumps([config.identity(), num_classes, connections], sort_keys=True, default=str)
    if key not in _RECIPES:
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(precision_policy(config.mixed_precision))
        try:
            plain = config.replace(weights=None)
            _RECIPES[key] = fingerprint(training_model(build_model(plain, num_classes), config), connections)
        finally:
            keras.mixed_precision.set_global_policy(previous)
    return _RECIPES[key]


_RECIPES: dict[str, str] = {}


def feature_extractor(model: keras.Model) -> keras.Model:
    """uint8 32x32 images -> the backbone's pooled features (the head's input), weights shared."""
    return keras.Model(model.inputs, model.get_layer("dropout").input, name="features")


def head_model(model: keras.Model) -> keras.Model:
    """What follows the backbone (dropout, the classifier, and any layer an edited model adds there), on the
    backbone's features; the layers, and so the weights, are the model's own."""
    return keras.Model(model.get_layer("dropout").input, model.outputs[0], name="head")


def split_backbone(model: keras.Model, finetune_fraction: float) -> tuple[keras.Model, keras.Model, str]:
    """(bottom, top, the cut) for fine-tuning the top `finetune_fraction` of the backbone on cached activations:
    `bottom` takes uint8 images to the output of the cut, the last backbone layer at or below the first one
    set_phase unfreezes whose output is all the layers above read of those below; `top` takes that output to
    the probabilities. Both are made of the model's own layers (and weights)."""
    backbone = backbone_of(model)
    graph = json.loads(json.dumps(backbone.get_config(), default=str))  # its tuples as lists
    names = [entry.get("name") for entry in graph.get("layers", [])]  # layers and ops, in graph order
    layer = {layer.name: layer for layer in backbone.layers}
    if not set(layer) <= set(names):
        raise ConfigError(f"setting 'finetune_features': backbone {backbone.name!r} is not a functional model")
    reads = _edges(graph)
    first = int(round(len(backbone.layers) * (1 - finetune_fraction)))  # set_phase's first trainable layer
    start = names.index(backbone.layers[min(first, len(backbone.layers) - 1)].name)
    for position in range(start, 1, -1):
        crossing = {source for later in reads[position:] for source in later if source < position}
        if len(crossing) == 1 and names[source := crossing.pop()] in layer:
            cut = layer[names[source]]
            break
    else:
        raise ConfigError(f"setting 'finetune_fraction': no layer of {backbone.name!r} below the top "
                          f"{finetune_fraction} alone feeds the layers above it; raise finetune_fraction")
    below = keras.Model(backbone.inputs, cut.output)
    bottom = keras.Model(model.inputs, below(keras_internals.called_on(model, backbone)), name="bottom")
    activations = keras.Input(cut.output.shape[1:], name=cut.name)
    above = keras.Model(cut.output, backbone.outputs[0])
    top = keras.Model(activations, head_model(model)(above(activations)), name="top")
    return bottom, top, cut.name


def inference_batch_size(config: Config) -> int:
    """The prediction batch size: the training batch (at least 128), capped at ~32 MB of upsampled images."""
    per_image = config.image_size * config.image_size * 3 * 4
    return max(1, min(max(config.batch_size, 128), (32 << 20) // per_image))


def gpu_names() -> list[str]:
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_physical_devices("GPU")]
    if keras.backend.backend() == "jax":
        import jax

        return [str(d) for d in jax.devices() if d.platform == "gpu"]
    return []


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


def count_parameters(model: keras.Model) -> dict[str, int]:
    trainable = sum(int(ops.size(w)) for w in model.trainable_weights)
    total = sum(int(ops.size(w)) for w in model.weights)
    return {"trainable": trainable, "frozen": total - trainable, "total": total}


def new_model(config: Config, num_classes: int, strategy=None) -> keras.Model:
    """The run's model as training starts it (precision policy and seed set, under `strategy`'s scope), with
    `model.initial_weights` kept so that a restarted phase 1 starts from them."""
    keras.mixed_precision.set_global_policy(precision_policy(config.mixed_precision))
    keras.utils.set_random_seed(config.seed)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = build_model(config, num_classes)  # a weights file that does not fit fails here
    model.initial_weights = model.get_weights()
    model.built_for = config.identity()
    _RECIPES.setdefault(json.dumps([config.identity(), num_classes, True], sort_keys=True, default=str),
                        fingerprint(training_model(model, config)))
    return model


def identify(config: Config, model: keras.Model, trainee: keras.Model | None) -> tuple[Config, str, keras.Model]:
    """(`config` naming `model`'s run, the fingerprint, the training model): `config` as is when this module
    builds this model (behind `trainee`'s augmentation, default training_model's) for these settings, else with
    the fingerprint as its `model` setting."""
    trainee = trainee or training_model(model, config)
    found = fingerprint(trainee)
    recipe = recipe_fingerprint(config.replace(model=""), int(model.outputs[0].shape[-1]))
    if found != recipe:
        _check_saveable(model)
    return config.replace(model="" if found == recipe else found), found, trainee


def earlier_fingerprint(config: Config, num_classes: int):
    """A function giving the library's model's fingerprint as the version before the graph's connections counted
    computed it (its run folders are taken as this model's; it builds a model, so only asked for a folder whose
    fingerprint differs); None for a model edited in a notebook."""
    return None if config.model else lambda: recipe_fingerprint(config, num_classes, connections=False)


def _check_saveable(model: keras.Model) -> None:
    """Refuse, before it trains, an edited model that best.keras could not hold and plain Keras not read back."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            model.save(Path(folder) / "probe.keras")
            keras.saving.load_model(Path(folder) / "probe.keras", compile=False, safe_mode=True)
        except Exception as exc:  # Keras' saving can fail in any way on a layer it does not know
            raise ConfigError(f"the edited model cannot be saved as best.keras and read back ({type(exc).__name__}: "
                              f"{first_line(exc)}): a layer class "
                              "of one's own needs @keras.saving.register_keras_serializable() and get_config, and "
                              "a Lambda layer is not read back in safe mode") from None
