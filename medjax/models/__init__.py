"""Flax linen models, registered by name (``medjax.registry.lookup("models.resnet18")``)."""

# Importing the modules registers their models.
from medjax.models import image_fusion, resnet, sequence, unet  # noqa: F401
from medjax.models.image_fusion import DenseFusion  # noqa: F401
from medjax.models.resnet import ResNet, ResNet18, ResNet34, ResNet50  # noqa: F401
from medjax.models.sequence import SlicesAsChannels, SliceSequenceClassifier  # noqa: F401
from medjax.models.unet import UNet  # noqa: F401
