"""oneDNN's convolutions (the CPU kernels PyTorch runs) called from XLA:CPU through its FFI.

XLA:CPU's own convolutions are slow where oneDNN is fast (its 2-D kernel gradient, and 3-D
convolutions generally). ``onednn_conv.cc`` holds three XLA FFI handlers (forward, input
gradient, kernel gradient); `conv` is a custom-VJP convolution over them, and `conv_transpose`
its adjoint (the input-gradient handler run forward).

3×3×3 stride-1 convolutions have medjax's own handlers: ``winograd_conv.cc``, Winograd's
F(2×2×2, 3×3×3) (3.4× fewer multiply-adds; oneDNN's Winograd is 2-D and AVX-512 only), forward
and kernel gradient (the input gradient is a forward call). They run where `winograd_applies`
(the U-Net's 3-D convolutions). The same library holds ``norm_act.cc``, the fused instance norm
+ leaky ReLU of ``norm_act``.

The handlers are compiled on first use, not at install: against the FFI headers of the jaxlib
that will load them (so the two always match) and the oneDNN wheel (``onednn-cpu-gomp``, GNU
OpenMP), with the system's C++ compiler (``$CXX``, else ``g++``), into ``$MEDJAX_CACHE_DIR``
(default ``~/.cache/medjax``), keyed by everything that goes into the build. Where any of that
is missing (another platform, no compiler, no wheel) or ``MEDJAX_ONEDNN=0`` is set,
`available()` is False, one log line says why, and ``conv`` keeps XLA's lowerings: same
results, slower. Nothing here is imported unless ``medjax.ops`` chose a CPU op, or
``medjax.host`` found that JAX will run on the CPU.

Threads: each call gets this process's cores divided by its CPU devices, since XLA starts the
calls of several devices together. Over a mesh each device convolves its own share of the batch
(`_partitioned`: without that rule XLA gathers the whole batch onto every device first).
``docs/performance-kernels.md`` has the measurements behind these choices.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
from typing import Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from medjax.io.atomic import atomic_path

SOURCES = tuple(os.path.join(os.path.dirname(__file__), name)
                for name in ("onednn_conv.cc", "winograd_conv.cc", "norm_act.cc"))
LIBRARY_DIST, HEADERS_DIST = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
_TARGETS = {"forward": "MedjaxConvForward", "input_grad": "MedjaxConvBackwardData",
            "kernel_grad": "MedjaxConvBackwardKernel", "winograd": "MedjaxConvWinograd",
            "winograd_kernel_grad": "MedjaxConvWinogradKernelGrad",
            "instance_norm_leaky_relu": "MedjaxInstanceNormLeakyReluForward",
            "instance_norm_leaky_relu_grad": "MedjaxInstanceNormLeakyReluBackward"}

# A/B switch for the Winograd forward (`winograd_applies`); off, oneDNN's direct one runs.
WINOGRAD = True
# Where it runs: "auto" (CPUs with AVX2 + FMA but no AVX-512), "1" (every AVX2 + FMA CPU) or "0".
# On AVX-512 CPUs oneDNN's direct 3-D kernels already run near the cores' float32 peak, and this
# AVX2 Winograd has half that vector width, so there it is left off unless asked for.
WINOGRAD_CPUS = os.environ.get("MEDJAX_WINOGRAD", "auto")
# Below this many output voxels per call the Winograd forward is slower than oneDNN's: its
# kernel transform, done at every call, outweighs the multiply-adds it saves.
WINOGRAD_MIN_VOXELS = 4096
_PREFIX = "medjax_onednn_"
_WARNING_LINES = 40  # of the compiler's warnings, logged when a build has any

Padding = Sequence[tuple[int, int]]


class BuildError(RuntimeError):
  """The oneDNN handlers could not be built or loaded; the message says why."""


def cache_dir() -> str:
  """Where compiled handlers are kept: ``$MEDJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/medjax``."""
  if os.environ.get("MEDJAX_CACHE_DIR"):
    return os.environ["MEDJAX_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "medjax")


def _dist_file(dist: str, suffix: str) -> str:
  """The installed file of distribution ``dist`` whose path ends with ``suffix``."""
  try:
    files = importlib.metadata.distribution(dist).files or []
  except importlib.metadata.PackageNotFoundError:
    raise BuildError(f"the {dist!r} wheel is not installed (pip install {dist})") from None
  for f in files:
    if str(f).endswith(suffix):
      return os.path.realpath(f.locate())
  raise BuildError(f"the {dist!r} wheel has no file ending in {suffix!r}")


def _compiler() -> str:
  cxx = os.environ.get("CXX", "g++")
  path = shutil.which(cxx)
  if path is None:
    raise BuildError(f"no C++ compiler {cxx!r} on PATH (set $CXX)")
  return path


def build() -> str:
  """Compiles the ``*.cc`` handlers unless an identical build is cached; returns the library
  path. Compiler warnings, if any, are logged.

  Raises:
    BuildError: no oneDNN wheel, no compiler, or the compiler failed (its last lines quoted).
  """
  if platform.system() != "Linux" or platform.machine() != "x86_64":
    raise BuildError(f"oneDNN convolutions are built for Linux x86-64, not "
                     f"{platform.system()} {platform.machine()}")
  library = _dist_file(LIBRARY_DIST, "libdnnl.so")
  header = _dist_file(HEADERS_DIST, os.path.join("oneapi", "dnnl", "dnnl.hpp"))
  include = os.path.dirname(os.path.dirname(os.path.dirname(header)))
  cxx = _compiler()
  source = b""
  for path in SOURCES:
    with open(path, "rb") as f:
      source += f.read()
  # Warnings on for medjax's sources; the jaxlib and oneDNN headers are -isystem, so theirs (which
  # medjax cannot fix) stay out of the log.
  command = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-Wall", "-Wextra",
             *SOURCES, "-isystem", jax.ffi.include_dir(), "-isystem", include, library,
             f"-Wl,-rpath,{os.path.dirname(library)}"]
  key = hashlib.sha256(source + repr((command, jaxlib.__version__)).encode()).hexdigest()[:16]
  out = os.path.join(cache_dir(), f"onednn_conv_{key}.so")
  if os.path.exists(out):
    return out
  os.makedirs(cache_dir(), exist_ok=True)
  # Written under a temporary name and renamed (medjax.io.atomic): processes building at once
  # each finish their own file, and no process ever loads a half-written one.
  with atomic_path(out, suffix=".so") as tmp:
    done = subprocess.run(command + ["-o", tmp], capture_output=True, text=True)
    if done.returncode:
      tail = "\n".join(done.stderr.strip().splitlines()[-5:])
      raise BuildError(f"{os.path.basename(cxx)} failed on {', '.join(SOURCES)}:\n{tail}")
    if done.stderr.strip():  # built, with warnings: shown once, when the library is built
      lines = done.stderr.strip().splitlines()
      shown = "\n".join(lines[:_WARNING_LINES])
      if len(lines) > _WARNING_LINES:
        shown += f"\n... ({len(lines) - _WARNING_LINES} more lines)"
      logging.warning("%s warned building %s:\n%s", os.path.basename(cxx), out, shown)
  return out


@functools.cache
def _load() -> str | None:
  """Builds, loads and registers the handlers once; the reason when they are unavailable."""
  if os.environ.get("MEDJAX_ONEDNN", "1") == "0":
    return "MEDJAX_ONEDNN=0"
  try:
    library = ctypes.cdll.LoadLibrary(build())
    for name, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(_PREFIX + name, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
    _WINOGRAD_CPU.append(int(library.MedjaxWinogradSupported()))
  except (BuildError, OSError, AttributeError) as e:
    logging.warning("oneDNN convolutions unavailable, XLA's are used (slower on CPU): %s", e)
    return str(e)
  return None


_WINOGRAD_CPU: list[int] = []  # the library's CPU check (bit 0: AVX2 + FMA, bit 1: AVX-512F)


def avx2_fma() -> bool:
  """Whether the handlers built here can run their AVX2 + FMA kernels on this CPU."""
  return available() and bool(_WINOGRAD_CPU[0] & 1)


def _winograd_cpu() -> bool:
  """Whether this CPU runs the Winograd forward (``MEDJAX_WINOGRAD``; see `WINOGRAD_CPUS`)."""
  if WINOGRAD_CPUS not in ("auto", "0", "1"):
    raise ValueError(f"MEDJAX_WINOGRAD={WINOGRAD_CPUS!r}: expected auto, 0 or 1")
  if WINOGRAD_CPUS == "0" or not avx2_fma():
    return False
  return WINOGRAD_CPUS == "1" or not _WINOGRAD_CPU[0] & 2


def available() -> bool:
  """Whether `conv` can run here (building the handlers on the first call)."""
  return _load() is None


def target(name: str) -> str:
  """The registered FFI name of handler ``name`` (a key of ``_TARGETS``), after `available()`."""
  if name not in _TARGETS:
    raise KeyError(f"no handler {name!r}; expected one of {sorted(_TARGETS)}")
  return _PREFIX + name


def threads_per_call() -> int:
  """OpenMP threads for one call: this process's cores over its CPU devices, at least 1."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, (cores or 1) // len(jax.local_devices(backend="cpu")))


def _call(target: str, out_shape: Sequence[int], a: jax.Array, b: jax.Array,
          strides: Sequence[int], padding: Padding) -> jax.Array:
  if not available():  # also registers the handlers, on the first call
    raise BuildError(f"the oneDNN convolutions are unavailable: {_load()}")
  return jax.ffi.ffi_call(_PREFIX + target, jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32),
                          vmap_method="sequential")(
      a, b, strides=np.asarray(strides, np.int64),
      pad_lo=np.asarray([lo for lo, _ in padding], np.int64),
      pad_hi=np.asarray([hi for _, hi in padding], np.int64),
      threads=np.int64(threads_per_call()))


def _sharding_rule(target: str, rank: int) -> str:
  """The call's dimensions for the partitioner: x ``b s… c``, kernel ``k… c o``, y ``b t… o``."""
  def dims(prefix):
    return " ".join(f"{prefix}{i}" for i in range(rank))
  x, kernel, y = f"b {dims('s')} c", f"{dims('k')} c o", f"b {dims('t')} o"
  return {"forward": f"{x}, {kernel} -> {y}",        # (x, kernel) -> y
          "winograd": f"{x}, {kernel} -> {y}",
          "input_grad": f"{y}, {kernel} -> {x}",     # (dy, kernel) -> dx
          "kernel_grad": f"{x}, {y} -> {kernel}",  # (x, dy) -> dkernel
          "winograd_kernel_grad": f"{x}, {y} -> {kernel}"}[target]


@functools.cache
def _partitioned(target: str):
  """``target``'s call as ``(a, b, out_shape, strides, padding) -> out``, split over the batch.

  XLA's partitioner cannot see inside an FFI call, so by itself it gathers the whole batch onto
  every device before the call: several devices would each convolve the global batch. This rule
  keeps each device on its own images, as XLA's convolution does: the batch-sharded operands
  stay sharded and the kernel is replicated; the kernel gradient, a sum over the batch, is each
  device's partial sum added over the batch's mesh axes.

  Where a computation runs on one device, JAX lowers this as the plain call, so its HLO, and
  its persistent compilation cache key, are the same in every process
  (tests/ops/cpu/test_compilation_cache.py). Over several devices the partitioning call's
  ``backend_config`` is a per-process id, so each process compiles such a step afresh.
  """

  @functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
  def call(a, b, out_shape, strides, padding):
    return _call(target, out_shape, a, b, strides, padding)

  def partition(out_shape, strides, padding, mesh, arg_shapes, result_shape):
    del result_shape
    spec = arg_shapes[0].sharding.spec
    axes = spec[0] if len(spec) else None  # the mesh axes of the batch; None: not split
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    parts = int(np.prod([mesh.shape[n] for n in names]))
    batch, replicated = NamedSharding(mesh, PartitionSpec(axes)), NamedSharding(mesh,
                                                                               PartitionSpec())
    if target.endswith("kernel_grad"):
      def lower(x, dy):
        partial = _call(target, out_shape, x, dy, strides, padding)
        return jax.lax.psum(partial, names) if names else partial
      return mesh, lower, replicated, (batch, batch)

    def lower(a, b):
      return _call(target, (out_shape[0] // parts, *out_shape[1:]), a, b, strides, padding)
    return mesh, lower, batch, (batch, replicated)

  def sharding_rule(out_shape, strides, padding, mesh, arg_shapes, result_shape):
    del out_shape, padding, mesh, arg_shapes, result_shape
    return _sharding_rule(target, len(strides))

  call.def_partition(partition=partition, sharding_rule=sharding_rule)
  return call


def _split_call(target: str, out_shape: Sequence[int], a: jax.Array, b: jax.Array,
                strides: Sequence[int], padding: Padding) -> jax.Array:
  """`_call` through `_partitioned`; under ``vmap`` (which custom partitioning does not batch),
  the plain call, one mapped element after another."""
  out_shape, strides = tuple(int(n) for n in out_shape), tuple(strides)
  padding = tuple(tuple(p) for p in padding)

  @jax.custom_batching.custom_vmap
  def split(a, b):
    return _partitioned(target)(a, b, out_shape, strides, padding)

  @split.def_vmap
  def _(axis_size, in_batched, a, b):
    del axis_size
    axes = tuple(0 if batched else None for batched in in_batched)
    return jax.vmap(lambda a, b: _call(target, out_shape, a, b, strides, padding),
                    in_axes=axes)(a, b), True

  return split(a, b)


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
         padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """Convolution of float32 ``x [B, *spatial, C]`` with ``kernel [*k, C, O]`` by oneDNN.

  Args:
    x, kernel: float32, 1 to 3 spatial dims.
    strides: one per spatial dim.
    padding: ``(low, high)`` zero padding per spatial dim (as ``lax.conv_general_dilated``).

  Returns:
    ``[B, *spatial', O]``, equal to XLA's convolution up to float rounding.
  """
  strides = tuple(strides)
  if all(k == 1 for k in kernel.shape[:-2]) and any(s > 1 for s in strides) and not any(
      lo or hi for lo, hi in padding):
    # A strided 1×1 convolution reads only every s-th voxel: taken here, it leaves oneDNN a
    # unit-stride one. oneDNN 3.2's strided 1×1 kernel-gradient path (jit_1x1 with its
    # "reduce to unit stride" copy) corrupted the heap in tests/ops/cpu/test_onednn.py
    # ("double free or corruption" under MALLOC_CHECK_=3, in about 2 runs of 3).
    x = x[(slice(None), *(slice(None, None, s) for s in strides))]
    strides = (1,) * len(strides)
  return _conv(x, kernel, strides, tuple(padding))


def winograd_applies(x_shape: Sequence[int], kernel_shape: Sequence[int],
                     strides: Sequence[int], padding: Padding) -> bool:
  """Whether `conv`'s forward runs ``winograd_conv.cc`` (F(2×2×2, 3×3×3)) instead of oneDNN:
  3-D, 3×3×3 kernel, stride 1, channels in multiples of 8, at least ``WINOGRAD_MIN_VOXELS``
  output voxels, a CPU it is meant for (`WINOGRAD_CPUS`). Its gradients are Winograd's too: the
  input gradient a forward call with the kernel flipped (`_input_grad`), the kernel gradient
  its own handler (`_kernel_grad`)."""
  if not (WINOGRAD and len(x_shape) == 5 and tuple(kernel_shape[:3]) == (3, 3, 3)
          and all(s == 1 for s in strides) and x_shape[-1] % 8 == 0
          and kernel_shape[-1] % 8 == 0 and all(lo >= 0 and hi >= 0 for lo, hi in padding)):
    return False
  voxels = x_shape[0] * np.prod([n + lo + hi - 2 for n, (lo, hi) in zip(x_shape[1:-1], padding)])
  return voxels >= WINOGRAD_MIN_VOXELS and _winograd_cpu()


def _forward(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
             padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """The convolution's value: Winograd where `winograd_applies`, else oneDNN's direct one."""
  out = [(n + lo + hi - k) // s + 1
         for n, k, s, (lo, hi) in zip(x.shape[1:-1], kernel.shape[:-2], strides, padding)]
  target = "winograd" if winograd_applies(x.shape, kernel.shape, strides, padding) else "forward"
  return _split_call(target, (x.shape[0], *out, kernel.shape[-1]), x, kernel, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
          padding: tuple[tuple[int, int], ...]) -> jax.Array:
  return _forward(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _input_grad(grad: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                padding: tuple[tuple[int, int], ...], x_shape: Sequence[int]) -> jax.Array:
  """The convolution's adjoint applied to ``grad``. For a 3×3×3 stride-1 kernel that is itself
  a convolution (kernel flipped, channels swapped, padding ``2 - pad``), so Winograd runs it
  where `winograd_applies`; elsewhere oneDNN's input-gradient primitive."""
  # `winograd_applies` checks the rest (3×3×3, stride 1, channels, these pads ≥ 0).
  pads = tuple((2 - lo, 2 - hi) for lo, hi in padding)
  flipped_shape = (*kernel.shape[:-2], kernel.shape[-1], kernel.shape[-2])
  if winograd_applies(grad.shape, flipped_shape, strides, pads):
    flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], -1, -2)
    return _forward(grad, flipped, strides, pads)
  return _split_call("input_grad", x_shape, grad, kernel, strides, padding)


def _kernel_grad(x: jax.Array, grad: jax.Array, kernel_shape: Sequence[int],
                 strides: tuple[int, ...], padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """The kernel gradient of the convolution of ``x`` given the output's ``grad``: Winograd's
  (``winograd_conv.cc``) where `winograd_applies`, else oneDNN's."""
  target = ("winograd_kernel_grad" if winograd_applies(x.shape, kernel_shape, strides, padding)
            else "kernel_grad")
  return _split_call(target, kernel_shape, x, grad, strides, padding)


def _conv_bwd(strides, padding, residuals, grad):
  x, kernel = residuals
  return (_input_grad(grad, kernel, strides, padding, x.shape),
          _kernel_grad(x, grad, kernel.shape, strides, padding))


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_transpose(y: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                   padding: tuple[tuple[int, int], ...], x_shape: Sequence[int]) -> jax.Array:
  """The adjoint of ``conv(·, kernel, strides, padding)`` on inputs of ``x_shape``, applied to
  ``y``: a transposed convolution, ``[B, *t, O] -> x_shape = [B, *s, C]`` for ``kernel [*k, C, O]``.
  """
  return _conv_transpose(y, kernel, tuple(strides), tuple(tuple(p) for p in padding),
                         tuple(int(n) for n in x_shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_transpose(y, kernel, strides, padding, x_shape):
  return _input_grad(y, kernel, strides, padding, x_shape)


def _conv_transpose_fwd(y, kernel, strides, padding, x_shape):
  return _conv_transpose(y, kernel, strides, padding, x_shape), (y, kernel)


def _conv_transpose_bwd(strides, padding, x_shape, residuals, grad):
  # out = Aᵀy for A = conv(·, kernel): d/dy = A·grad, and d/dkernel of <conv(grad, kernel), y>.
  y, kernel = residuals
  return (_forward(grad, kernel, strides, padding),
          _kernel_grad(grad, y, kernel.shape, strides, padding))


_conv_transpose.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)
