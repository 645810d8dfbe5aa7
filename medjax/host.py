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
  """Makes the CPU backend's convolutions use every core, unless ``XLA_FLAGS`` sets a device count.

  Where medjax's oneDNN convolutions run (``medjax.models.onednn``), each one is threaded over
  all of this process's cores, so XLA keeps its one CPU device. Without them, XLA:CPU runs each
  convolution on one thread, and the data-parallel mesh needs one host device per core. Measured
  on 2 cores (ResNet-18 train step, 28², batch 128): one device with oneDNN 136 images/s, two
  devices with oneDNN 142 (72 before its calls were split over the mesh), two devices with XLA's
  convolutions 85.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    return
  from medjax.models import onednn  # imports JAX, which is fine: its CPU client starts later
  if not onednn.available():
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
  kept = keep_freed_memory()  # first: before any thread of JAX's or oneDNN's allocates
  use_every_core()
  return kept
