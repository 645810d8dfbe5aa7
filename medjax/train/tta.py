"""Test-time augmentation by flips: a prediction averaged over every flip of chosen axes.

nnU-Net mirrors its segmentations this way (`sliding_window_predict`'s ``mirror_axes``); for a
classifier trained with random flips, averaging the flipped and plain predictions removes the
flip the network happens to prefer. Axes are spatial (as the ``flip`` transform's, batch axis
excluded): a batch's axis is ``a + 1``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def flip_sets(spatial_axes: Sequence[int], ndim: int) -> list[tuple[int, ...]]:
  """Every subset of ``spatial_axes`` as batch axes, the empty one (no flip) first.

  Raises:
    ValueError: an axis outside ``[0, ndim)``.
  """
  axes = sorted({int(a) for a in spatial_axes})
  if any(not 0 <= a < ndim for a in axes):
    raise ValueError(f"flip axes {list(spatial_axes)} must be spatial axes in [0, {ndim})")
  return [tuple(a + 1 for a in subset) for r in range(len(axes) + 1)
          for subset in itertools.combinations(axes, r)]


def flip_averaged(predict: Callable[[jax.Array], jax.Array], images: jax.Array,
                  spatial_axes: Sequence[int], plain: jax.Array | None = None) -> jax.Array:
  """The mean of ``predict`` over every flip of ``images [B, *spatial, C]`` along
  ``spatial_axes``: for per-image predictions (class probabilities), which flips leave in place.

  Args:
    plain: ``predict(images)`` where the caller has it already.
  """
  flips = flip_sets(spatial_axes, images.ndim - 2)
  total = predict(images) if plain is None else plain
  for axes in flips[1:]:
    total = total + predict(jnp.flip(images, axes))
  return total / len(flips)
