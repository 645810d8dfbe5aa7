"""Set-up of the host process, done once before JAX starts: every CPU core a device, memory kept.

Both must run before JAX creates its CPU client (its first array or device query): the device
count is read from ``XLA_FLAGS`` then, and glibc binds each XLA worker thread to a malloc arena
when that thread first allocates.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
from typing import Mapping

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def use_every_core() -> None:
  """Makes the CPU backend's convolutions use every core, unless ``XLA_FLAGS`` sets a device count.

  Where medjax's CPU kernels run (`cpu_kernels_available`), each call is threaded over all of
  this process's cores, so XLA keeps its one CPU device. Without them, XLA:CPU runs each
  convolution on one thread, and the data-parallel mesh needs one host device per core.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    return
  if not cpu_kernels_available():
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count="
                               f"{os.cpu_count() or 1}").strip()


def cpu_kernels_available(env: Mapping[str, str] | None = None) -> bool:
  """Whether a process with environment ``env`` (default: this one's) runs medjax's CPU kernels
  (``medjax.ops.cpu``), which thread each call over every core, so one CPU device is enough.

  Compiles them on the first call (seconds, once, cached), but only where JAX will run on the
  CPU. That is judged without starting JAX, whose device count must still be settable by
  ``XLA_FLAGS``: the first entry of ``JAX_PLATFORMS`` where it is set, else whether an
  accelerator plugin (CUDA, ROCm, TPU) is installed. A host with a plugin but no accelerator is
  thus treated as an accelerator host (False: one device per core); should its JAX then run on
  the CPU, ``medjax.ops`` still builds and uses the kernels, threaded over each device's share.
  """
  if not _jax_runs_on_cpu(os.environ if env is None else env):
    return False
  from medjax.ops.cpu import onednn  # imports JAX, which is fine: its CPU client starts later
  return onednn.available()


def _jax_runs_on_cpu(env: Mapping[str, str]) -> bool:
  """Whether JAX's default backend will be the CPU, as far as can be told without starting it."""
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms[0] == "cpu"
  return not _accelerator_plugin_installed()


def _accelerator_plugin_installed() -> bool:
  """Whether JAX would find a plugin for an accelerator (``jax_plugins``, or libtpu)."""
  return bool(importlib.metadata.entry_points(group="jax_plugins")
              or importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu"))


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory in the process instead of returning it to the kernel.

  XLA:CPU allocates each execution's temporaries (tens to hundreds of MB) with ``malloc`` from
  its worker threads and frees them when the execution ends. glibc serves such a block with a
  fresh ``mmap`` (a thread's arena cannot hold more than 64 MB, and blocks over 32 MB are mapped
  anyway) and unmaps it on free, so every execution page-faults all of it in again
  (``docs/performance-kernels.md``). One arena, no mapped blocks and no trimming keep the memory
  for the next call. The cost: the process keeps its peak heap until it exits, and all threads
  share one malloc lock.

  ``MEDJAX_KEEP_FREED_MEMORY=0`` in the environment turns it off.

  Returns:
    True where glibc took the settings; False when turned off or elsewhere (other C libraries),
    changing nothing.
  """
  if os.environ.get("MEDJAX_KEEP_FREED_MEMORY", "1") == "0":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (AttributeError, OSError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(mallopt(param, value) == 1 for param, value in settings)


def prepare() -> bool:
  """Both of the above, as ``launch.py`` and the benchmarks start; returns whether freed memory
  is kept."""
  kept = keep_freed_memory()  # first: before any thread of JAX's or oneDNN's allocates
  use_every_core()
  return kept
