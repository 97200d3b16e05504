"""One device, every GPU of a machine, or several machines, with tf.distribute; and the settings that follow
the hardware (mixed precision, XLA)."""

from __future__ import annotations

import contextlib

from cifar100.keras_fixes import keras, reduce_structures_one_by_one


def gpus() -> list:
    if keras.backend.backend() != "tensorflow":
        return []
    import tensorflow as tf

    return tf.config.list_logical_devices("GPU")


def strategy(distribution: str):
    """auto: MirroredStrategy over 2+ GPUs, else the default strategy; mirrored: over every GPU; multi-worker:
    MultiWorkerMirroredStrategy from TF_CONFIG (worker 0 is the chief). batch_size is the global batch."""
    if keras.backend.backend() != "tensorflow":
        if distribution in ("auto", "none"):
            return OneDevice()
        raise ValueError(f"distribution={distribution!r} needs the TensorFlow backend")
    import tensorflow as tf

    if distribution == "multi-worker":
        found = tf.distribute.MultiWorkerMirroredStrategy()
        reduce_structures_one_by_one(found)
        return found
    if distribution == "mirrored" or distribution == "auto" and len(gpus()) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


class OneDevice:
    """The default strategy's stand-in on backends other than TensorFlow."""

    def scope(self):
        return contextlib.nullcontext()


def is_chief(found) -> bool:
    """Only the chief writes the run folder: worker 0 of a multi-worker run, and every single process."""
    return getattr(getattr(found, "extended", None), "should_checkpoint", True)


def precision(setting: str) -> str:
    """The dtype policy: auto is float16 with a GPU."""
    if setting == "bfloat16":
        return "mixed_bfloat16"
    return "mixed_float16" if setting == "true" or setting == "auto" and gpus() else "float32"


def jit_compile(setting: str):
    return "auto" if setting == "auto" else setting == "true"
