"""Flip test-time augmentation: `medjax.train.tta` (the training loop's evaluation averages with
it too) under its old address."""

from medjax.train.tta import flip_averaged, flip_sets  # noqa: F401
