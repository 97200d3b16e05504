"""Fine-tune ImageNet-pretrained Keras backbones on CIFAR-100, with images upsampled inside the model."""

import os


def tf_logs_shown() -> bool:
    """True when the user asked for every TensorFlow C++ log line (CIFAR100_TF_LOGS=1)."""
    return os.environ.get("CIFAR100_TF_LOGS", "").strip().lower() in ("1", "true", "yes", "on")


if not tf_logs_shown():  # before TensorFlow is imported (cifar100.keras_internals filters the rest)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
