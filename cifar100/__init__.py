"""Fine-tune ImageNet-pretrained Keras backbones on CIFAR-100, with images upsampled inside the model."""

import os

if os.environ.get("CIFAR100_TF_LOGS") != "1":  # before TensorFlow is imported: its C++ info lines off
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
