"""Unsupervised image-fusion losses: the fused image scored against its two sources, no target.

The mix of the fusion literature (SwinFusion, Ma et al. 2022; CDDFuse, Zhao et al. 2023), each
term a per-image mean, images ``[B, H, W, 1]`` (or ``[B, H, W]``) in [0, 1]:

* `ssim_loss`: ``1 - (SSIM(F, A) + SSIM(F, B)) / 2``, structure kept from both sources;
* `gradient_loss`: L1 between ``|∇F|`` and ``max(|∇A|, |∇B|)`` (Sobel, ``|gx| + |gy|`` as
  CDDFuse's ``Sobelxy``): the fused image keeps the stronger edge of the two at every pixel;
* `intensity_loss`: L1 between ``F`` and ``max(A, B)``: the brighter source's intensity (the CT's
  bone, the PET's uptake).

Pure ``jnp``, jit-friendly; each returns ``[B]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _grey(x: jax.Array) -> jax.Array:
  """``[B, H, W]`` float32 from ``[B, H, W]`` or ``[B, H, W, 1]``."""
  x = jnp.asarray(x, jnp.float32)
  return x[..., 0] if x.ndim == 4 else x


def _box_mean(x: jax.Array, win: int) -> jax.Array:
  """Means over every ``win``×``win`` window of ``[B, H, W]`` ('valid': no padding)."""
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, win, win), (1, 1, 1), "VALID") / win**2


def ssim(x: jax.Array, y: jax.Array, win: int = 7, data_range: float = 1.0) -> jax.Array:
  """Mean SSIM per image ``[B]``: a ``win``×``win`` uniform window and the sample covariance,
  Wang et al.'s constants for ``data_range`` (the window `medjax.metrics.fusion.ssim` uses)."""
  x, y = _grey(x), _grey(y)
  ux, uy = _box_mean(x, win), _box_mean(y, win)
  norm = win * win / (win * win - 1.0)
  vx = norm * (_box_mean(x * x, win) - ux * ux)
  vy = norm * (_box_mean(y * y, win) - uy * uy)
  vxy = norm * (_box_mean(x * y, win) - ux * uy)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2))


def sobel_magnitude(x: jax.Array) -> jax.Array:
  """``|gx| + |gy|`` of the 3×3 Sobel filters, ``[B, H, W]``, edges replicated at the border."""
  p = jnp.pad(_grey(x), ((0, 0), (1, 1), (1, 1)), mode="edge")
  h, w = p.shape[1] - 2, p.shape[2] - 2
  at = lambda i, j: p[:, i:i + h, j:j + w]
  gx = (at(0, 2) + 2 * at(1, 2) + at(2, 2)) - (at(0, 0) + 2 * at(1, 0) + at(2, 0))
  gy = (at(2, 0) + 2 * at(2, 1) + at(2, 2)) - (at(0, 0) + 2 * at(0, 1) + at(0, 2))
  return jnp.abs(gx) + jnp.abs(gy)


def ssim_loss(fused: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """``1 - (SSIM(F, A) + SSIM(F, B)) / 2`` per image: 0 when all three are one image."""
  return 1.0 - 0.5 * (ssim(fused, a) + ssim(fused, b))


def gradient_loss(fused: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean ``| |∇F| - max(|∇A|, |∇B|) |`` per image."""
  target = jnp.maximum(sobel_magnitude(a), sobel_magnitude(b))
  return jnp.mean(jnp.abs(sobel_magnitude(fused) - target), axis=(1, 2))


def intensity_loss(fused: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean ``|F - max(A, B)|`` per image."""
  return jnp.mean(jnp.abs(_grey(fused) - jnp.maximum(_grey(a), _grey(b))), axis=(1, 2))


def fusion_loss(fused: jax.Array, sources: jax.Array, ssim_weight: float = 1.0,
                gradient_weight: float = 1.0, intensity_weight: float = 1.0) -> jax.Array:
  """The weighted sum per image ``[B]``; ``sources [B, H, W, 2]`` (A, B as channels)."""
  a, b = sources[..., 0], sources[..., 1]
  return (ssim_weight * ssim_loss(fused, a, b) + gradient_weight * gradient_loss(fused, a, b)
          + intensity_weight * intensity_loss(fused, a, b))
