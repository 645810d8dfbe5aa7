"""Grain data sources, transforms and pipelines."""

from medjax.data import (
    segmentation,  # noqa: F401  (registers transforms.patch)
    transforms,  # noqa: F401  (registers the transforms)
)
