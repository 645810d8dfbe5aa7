"""Flax linen models, registered by name (``medjax.registry.lookup("models.resnet18")``)."""

from medjax.models import resnet, unet  # noqa: F401  (importing them registers the models)
from medjax.models.resnet import ResNet, ResNet18, ResNet34, ResNet50  # noqa: F401
from medjax.models.unet import UNet  # noqa: F401
