"""oneDNN's convolutions (the CPU kernels PyTorch runs) called from XLA:CPU through its FFI.

XLA:CPU's own convolutions are slow where oneDNN is fast: its 2-D kernel gradient runs at half
oneDNN's speed, and its 3-D convolutions a quarter (``conv_lowering``'s docstring has the
figures). oneDNN is the library made for the job, so medjax calls it: ``onednn_conv.cc`` holds
three XLA FFI handlers (forward, input gradient, kernel gradient), and `conv` is a custom-VJP
convolution over them.

The handlers are compiled on first use, not at install: against the FFI headers of the jaxlib
that will load them (so the two always match) and the oneDNN wheel (``onednn-cpu-gomp``, GNU
OpenMP), with the system's C++ compiler (``$CXX``, else ``g++``), into
``$MEDJAX_CACHE_DIR`` (default ``~/.cache/medjax``), keyed by everything that goes into the
build. Where any of that is missing — another platform, no compiler, no wheel — or
``MEDJAX_ONEDNN=0`` is set, `available()` is False, one log line says why, and
``conv_lowering`` keeps XLA's lowerings: same results, slower.

Threads: each call gets this process's cores divided by its CPU devices, since XLA starts the
calls of several devices together. oneDNN then runs them one after another (2 devices: 349 ms a
step where one pinned core takes 156 ms; cause not found), so ``medjax.host`` keeps one CPU
device and lets each convolution thread over every core.
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
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

SOURCE = os.path.join(os.path.dirname(__file__), "onednn_conv.cc")
LIBRARY_DIST, HEADERS_DIST = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
_TARGETS = {"forward": "MedjaxConvForward", "input_grad": "MedjaxConvBackwardData",
            "kernel_grad": "MedjaxConvBackwardKernel"}
_PREFIX = "medjax_onednn_"

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
  """Compiles ``onednn_conv.cc`` unless an identical build is cached; returns the library path.

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
  with open(SOURCE, "rb") as f:
    source = f.read()
  command = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", SOURCE,
             "-I", jax.ffi.include_dir(), "-I", include, library,
             f"-Wl,-rpath,{os.path.dirname(library)}"]
  key = hashlib.sha256(source + repr((command, jaxlib.__version__)).encode()).hexdigest()[:16]
  out = os.path.join(cache_dir(), f"onednn_conv_{key}.so")
  if os.path.exists(out):
    return out
  os.makedirs(cache_dir(), exist_ok=True)
  # Written under a temporary name and renamed: processes building at once each finish their own
  # file, and no process ever loads a half-written one.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
  os.close(fd)
  try:
    done = subprocess.run(command + ["-o", tmp], capture_output=True, text=True)
    if done.returncode:
      tail = "\n".join(done.stderr.strip().splitlines()[-5:])
      raise BuildError(f"{os.path.basename(cxx)} failed on {SOURCE}:\n{tail}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
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
  except (BuildError, OSError, AttributeError) as e:
    logging.warning("oneDNN convolutions unavailable, XLA's are used (slower on CPU): %s", e)
    return str(e)
  return None


def available() -> bool:
  """Whether `conv` can run here (building the handlers on the first call)."""
  return _load() is None


def threads_per_call() -> int:
  """OpenMP threads for one call: this process's cores over its CPU devices, at least 1."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, (cores or 1) // len(jax.local_devices(backend="cpu")))


def _call(target: str, out_shape: Sequence[int], a: jax.Array, b: jax.Array,
          strides: Sequence[int], padding: Padding) -> jax.Array:
  return jax.ffi.ffi_call(_PREFIX + target, jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32),
                          vmap_method="sequential")(
      a, b, strides=np.asarray(strides, np.int64),
      pad_lo=np.asarray([lo for lo, _ in padding], np.int64),
      pad_hi=np.asarray([hi for _, hi in padding], np.int64),
      threads=np.int64(threads_per_call()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
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
  out = [(n + lo + hi - k) // s + 1
         for n, k, s, (lo, hi) in zip(x.shape[1:-1], kernel.shape[:-2], strides, padding)]
  return _call("forward", (x.shape[0], *out, kernel.shape[-1]), x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, grad):
  x, kernel = residuals
  return (_call("input_grad", x.shape, grad, kernel, strides, padding),
          _call("kernel_grad", kernel.shape, x, grad, strides, padding))


conv.defvjp(_conv_fwd, _conv_bwd)
