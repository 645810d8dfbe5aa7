"""Grain data sources, transforms and pipelines."""

from medjax.data import transforms  # noqa: F401  (registers the transforms)
