"""Evaluating finished runs: ``python -m medjax.evaluate`` and its figures.

The metrics themselves live in `medjax.metrics` (below training, which selects checkpoints with
them); ``classification``, ``segmentation`` and ``metrics`` here re-export them under their old
names, and ``report`` the training report's functions beside the slice-attention figure.
"""
