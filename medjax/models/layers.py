"""Shared linen building blocks, rank-agnostic (2-D and 3-D): convolution, conv-norm-act."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax import ops

Dtype = Any

# He-normal over fan-out: the conv init of torchvision's and MONAI's ResNets (convs feed a norm).
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
  """N-D convolution (channels-last), the one conv every medjax model uses.

  It owns its kernel like ``nn.Conv`` (same parameter name, shape and init) and computes through
  ``medjax.ops.conv``, which picks the convolution's implementation for the backend.

  Attributes:
    features: output channels.
    kernel_size: one size per spatial dim, or an int used for every dim of the input.
    strides: int or one per spatial dim.
    use_bias: add a bias (off before a norm layer).
    padding: ``"SAME"`` or ``"VALID"``.
  """

  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  use_bias: bool = False
  padding: str = "SAME"
  dtype: Dtype | None = None
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()

  @nn.compact
  def weights(self, in_features: int, nd: int) -> tuple[jax.Array, jax.Array | None]:
    """The kernel ``[*kernel_size, in_features, features]`` and the bias (``None`` without
    ``use_bias``), float32: for a caller that convolves through another op than ``ops.conv``."""
    ks = (self.kernel_size,) * nd if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    kernel = self.param("kernel", self.kernel_init, ks + (in_features, self.features), jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias else None)
    return kernel, bias

  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x: ``[B, *spatial, C]``. Returns: ``[B, *spatial', features]``."""
    nd = x.ndim - 2
    st = (self.strides,) * nd if isinstance(self.strides, int) else tuple(self.strides)
    kernel, bias = self.weights(x.shape[-1], nd)
    dtype = self.dtype or x.dtype
    y = ops.conv(x.astype(dtype), kernel.astype(dtype), st, self.padding)
    return y if bias is None else y + bias.astype(dtype)


class ConvNormAct(nn.Module):
  """Conv → norm → activation (``act=None`` skips the activation).

  ``norm="batch"`` (default) or ``"group"`` (8 groups, or one per 4 channels when fewer): group
  norm keeps no running statistics, so evaluation normalises exactly as training did — what a
  per-slice encoder needs, whose batch statistics mix slices of very different content.
  ``zero_init_scale`` starts the norm's scale at 0, so a residual branch ending here starts as
  the identity (Goyal et al. 2017).
  """

  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  act: Callable[[jax.Array], jax.Array] | None = nn.relu
  zero_init_scale: bool = False
  norm: str = "batch"
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv(self.features, self.kernel_size, self.strides, dtype=self.dtype,
             kernel_init=he_normal_fan_out)(x)
    scale_init = nn.initializers.zeros if self.zero_init_scale else nn.initializers.ones
    if self.norm == "batch":
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       scale_init=scale_init, dtype=self.dtype)(x)
    elif self.norm == "group":
      groups = 8 if self.features % 8 == 0 else max(1, self.features // 4)
      x = nn.GroupNorm(num_groups=groups, epsilon=1e-5, scale_init=scale_init,
                       dtype=self.dtype)(x)
    else:
      raise ValueError(f"norm must be 'batch' or 'group', got {self.norm!r}")
    return self.act(x) if self.act is not None else x
