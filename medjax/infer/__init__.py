"""Whole-image inference: sliding-window prediction with Gaussian blending and mirror TTA."""

from medjax.infer.sliding_window import (  # noqa: F401
  blend_weights,
  gaussian_importance_map,
  sliding_window_predict,
  window_starts,
)
