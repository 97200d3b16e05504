"""Fine-tune ImageNet-pretrained Keras backbones on CIFAR-100, with images upsampled inside the model."""

from cifar100 import tflogs as _tflogs

_tflogs.set_default_level()  # before TensorFlow is imported; CIFAR100_TF_LOGS=1 shows its C++ log lines

__version__ = "0.1.0"
