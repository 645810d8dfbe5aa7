"""Instance norm + leaky ReLU fused on the CPU: ``norm_act.cc``'s two passes each way.

XLA:CPU runs the pair as separate reductions and elementwise passes, several times the memory
traffic of the fused handlers (built into the library of ``onednn``). Where `fused_applies`,
`instance_norm_leaky_relu` calls them; elsewhere it is ``medjax.ops.xla``'s form. Equal up to
float rounding; ``docs/performance-kernels.md`` has the figures.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from medjax.ops import xla
from medjax.ops.cpu import conv, onednn

# Benchmarks' A/B switch, read at trace time: False runs ``medjax.ops.xla``'s form everywhere.
FUSED = True


def fused_applies(x: jax.Array) -> bool:
  """Whether `instance_norm_leaky_relu` of ``x`` runs the fused handlers: where the convolutions
  run on oneDNN (float32, rank 3–5, handlers built), channels in multiples of 8 (the kernels'
  AVX2 vectors), an AVX2 + FMA CPU."""
  return FUSED and x.shape[-1] % 8 == 0 and conv.onednn_applies(x) and onednn.avx2_fma()


def instance_norm_leaky_relu(x: jax.Array, scale: jax.Array, bias: jax.Array,
                             epsilon: float = 1e-5, negative_slope: float = 0.01) -> jax.Array:
  """Normalises ``x [B, *spatial, C]`` over its spatial axes per sample and channel, scales and
  shifts it by ``scale``, ``bias [C]``, then applies a leaky ReLU.

  Fused where `fused_applies`; otherwise ``medjax.ops.xla``'s form. Equal up to float rounding.
  """
  if not fused_applies(x):
    return xla.instance_norm_leaky_relu(x, scale, bias, epsilon, negative_slope).astype(x.dtype)
  return _fused(x, scale.astype(jnp.float32), bias.astype(jnp.float32), float(epsilon),
                float(negative_slope))


def _ffi(name: str, results, *operands, **attrs):
  return jax.ffi.ffi_call(onednn.target(name), results, vmap_method="sequential")(
      *operands, **attrs, threads=np.int64(onednn.threads_per_call()))


def _forward_call(x, scale, bias, epsilon, slope):
  stats = jax.ShapeDtypeStruct((x.shape[0], x.shape[-1]), jnp.float32)
  return _ffi("instance_norm_leaky_relu", (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats,
                                           stats), x, scale, bias,
              epsilon=np.float32(epsilon), slope=np.float32(slope))


def _backward_call(x, scale, bias, mean, rstd, dy, slope):
  per_sample = jax.ShapeDtypeStruct(mean.shape, jnp.float32)
  return _ffi("instance_norm_leaky_relu_grad",
              (jax.ShapeDtypeStruct(x.shape, jnp.float32), per_sample, per_sample),
              x, scale, bias, mean, rstd, dy, slope=np.float32(slope))


@functools.cache
def _split_over_batch(direction: str, rank: int):
  """The handler as a call XLA's partitioner splits over the batch: every operand and result
  with a batch axis keeps the samples it has (each sample is normalised alone), ``scale`` and
  ``bias`` are replicated. Without this rule XLA gathers the whole batch onto every device.
  Under ``vmap`` (which custom partitioning does not batch) the handler runs per element."""
  spatial = " ".join(f"s{i}" for i in range(rank - 2))
  x, stats = f"b {spatial} c", "b c"
  if direction == "forward":
    rule, batched = f"{x}, c, c -> {x}, {stats}, {stats}", (True, False, False)
  else:
    rule = f"{x}, c, c, {stats}, {stats}, {x} -> {x}, {stats}, {stats}"
    batched = (True, False, False, True, True, True)

  plain = _forward_call if direction == "forward" else _backward_call

  def partition(*static_and_shapes):
    *static, mesh, arg_shapes, result_shape = static_and_shapes
    del result_shape
    spec = arg_shapes[0].sharding.spec
    sample = NamedSharding(mesh, PartitionSpec(spec[0] if len(spec) else None))
    replicated = NamedSharding(mesh, PartitionSpec())
    return (mesh, lambda *operands: plain(*operands, *static), (sample,) * 3,
            tuple(sample if b else replicated for b in batched))

  def sharding_rule(*args):
    del args
    return rule

  statics = (3, 4) if direction == "forward" else (6,)

  @functools.partial(custom_partitioning, static_argnums=statics)
  def call(*args):
    return plain(*args)

  call.def_partition(partition=partition, sharding_rule=sharding_rule)

  def split(*args):
    operands, static = args[:len(batched)], args[len(batched):]

    @jax.custom_batching.custom_vmap
    def run(*operands):
      return call(*operands, *static)

    @run.def_vmap
    def _(axis_size, in_batched, *operands):
      del axis_size
      axes = tuple(0 if b else None for b in in_batched)
      out = jax.vmap(lambda *o: plain(*o, *static), in_axes=axes)(*operands)
      return out, (True,) * 3

    return run(*operands)

  return split


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x, scale, bias, epsilon, slope):
  return _split_over_batch("forward", x.ndim)(x, scale, bias, epsilon, slope)[0]


def _fused_fwd(x, scale, bias, epsilon, slope):
  y, mean, rstd = _split_over_batch("forward", x.ndim)(x, scale, bias, epsilon, slope)
  return y, (x, scale, bias, mean, rstd)


def _fused_bwd(epsilon, slope, residuals, dy):
  del epsilon  # in rstd already
  x, scale, bias, mean, rstd = residuals
  dx, dscale, dbias = _split_over_batch("backward", x.ndim)(x, scale, bias, mean, rstd, dy,
                                                            slope)
  # Per-sample sums added over the batch here, where XLA adds them across devices too.
  return dx, dscale.sum(0), dbias.sum(0)


_fused.defvjp(_fused_fwd, _fused_bwd)
