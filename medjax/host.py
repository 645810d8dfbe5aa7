"""Set-up of the host process, done once before JAX starts: every CPU core a device, memory kept.

Both must run before JAX creates its CPU client (its first array or device query): the device
count is read from ``XLA_FLAGS`` then, and glibc binds each XLA worker thread to a malloc arena
when that thread first allocates.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def use_every_core() -> None:
  """One XLA host device per core, unless ``XLA_FLAGS`` already sets a count.

  XLA:CPU runs each device's convolutions on one thread, so the data-parallel mesh needs one
  device per core to use them all.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count="
                               f"{os.cpu_count() or 1}").strip()


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory in the process instead of returning it to the kernel.

  XLA:CPU allocates each execution's temporaries (tens to hundreds of MB) with ``malloc`` from
  its worker threads and frees them when the execution ends. glibc serves such a block with a
  fresh ``mmap`` (a thread's arena cannot hold more than 64 MB, and blocks over 32 MB are mapped
  anyway) and unmaps it on free, so every execution page-faults all of it in again: on the 2-core
  VM, 17k faults and ~35 ms per call of the 3-D U-Net forward (145 → 116 ms without them).
  One arena, no mapped blocks and no trimming keep the memory for the next call. The cost: the
  process keeps its peak heap until it exits, and all threads share one malloc lock.

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
  use_every_core()
  return keep_freed_memory()
