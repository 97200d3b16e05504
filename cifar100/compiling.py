"""How a model is compiled for a phase: the precision policy, XLA, the optimiser, the learning-rate schedule,
the loss and the metrics, each from the run's Config."""

from __future__ import annotations

from cifar100 import distribution
from cifar100.config import Config
from cifar100.tflogs import keras  # Keras, imported without TensorFlow's start-up lines


def jit_setting(value: str):
    """The `jit_compile` argument for Keras: 'auto' lets Keras decide (XLA when every layer supports it, not
    on a CPU-only TensorFlow machine, not under tf.distribute); 'true'/'false' force it."""
    value = str(value).lower()
    return "auto" if value == "auto" else value == "true"


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


def gpu_names() -> list[str]:
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_physical_devices("GPU")]
    if keras.backend.backend() == "jax":
        import jax

        return [str(d) for d in jax.devices() if d.platform == "gpu"]
    return []


def learning_rate_for(learning_rate: float, config: Config, epochs: int, steps_per_epoch: int):
    """A phase's learning rate: the number itself ('plateau'), or warm-up plus cosine decay ('cosine') over the
    phase's steps. Scaled by batch_size / reference_batch_size only when reference_batch_size is set."""
    if config.reference_batch_size:
        learning_rate = distribution.scaled_learning_rate(learning_rate, config.batch_size,
                                                          config.reference_batch_size)
    if config.lr_schedule != "cosine":
        return learning_rate
    total = max(1, epochs * steps_per_epoch)
    warmup = min(config.warmup_epochs * steps_per_epoch, total - 1)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(learning_rate, total)
    return keras.optimizers.schedules.CosineDecay(0.0, total - warmup, warmup_target=learning_rate,
                                                  warmup_steps=warmup)


def make_optimizer(learning_rate, config: Config) -> keras.optimizers.Optimizer:
    clip = {"clipnorm": config.clipnorm} if config.clipnorm else {}
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay, **clip)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True,
                                    weight_decay=config.weight_decay or None, **clip)
    return keras.optimizers.Adam(learning_rate, **clip)


def compile_model(model: keras.Model, learning_rate, config: Config) -> None:
    """`learning_rate`: a number or a Keras schedule (see learning_rate_for)."""
    model.compile(
        optimizer=make_optimizer(learning_rate, config),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy", keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
        jit_compile=jit_setting(config.jit_compile),
    )


