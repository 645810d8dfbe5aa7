"""Flax linen models, registered by name (``medjax.registry.lookup("models.resnet18")``)."""

from medjax.models import resnet  # noqa: F401  (registers the ResNet family)
from medjax.models.resnet import ResNet, ResNet18, ResNet34, ResNet50  # noqa: F401
