"""Fine-tune ImageNet-pretrained Keras backbones on CIFAR-100, with images upsampled inside the model."""

__version__ = "0.1.0"
