"""Sweep workers: one environment (and core set, or GPUs) per concurrently running member."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import subprocess
import sys
from typing import Any

from medjax.sweep.spec import SweepError

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


@dataclasses.dataclass
class Worker:
  """Where one member at a time runs.

  Attributes:
    env: its environment (on GPUs with ``CUDA_VISIBLE_DEVICES`` set).
    cores: the cores it is pinned to; None: not pinned.
    host_devices: at most this many XLA host devices per member (CPU); None on GPUs.
    label: for people.
  """
  env: dict[str, str] = dataclasses.field(repr=False)
  cores: set[int] | None
  host_devices: int | None
  label: str

  def member_env(self, config: dict[str, Any]) -> dict[str, str]:
    """The environment of a member with ``config`` (its config.json). On CPU: one host device
    where oneDNN's convolutions thread over the worker's cores (as ``medjax.host``), else the
    most host devices, up to ``host_devices``, that divide both of its batch sizes."""
    if self.host_devices is None:
      return dict(self.env)
    from medjax import host  # may import JAX, whose CPU client stays unstarted here
    batch = math.gcd(config["train"]["batch_size"], config["eval"]["batch_size"])
    n = 1 if host.cpu_kernels_available(self.env) else max(
        d for d in range(1, self.host_devices + 1) if batch % d == 0)
    xla = self.env.get("XLA_FLAGS", "").split() + [f"--xla_force_host_platform_device_count={n}"]
    return dict(self.env, XLA_FLAGS=" ".join(xla))


def make_workers(count: int | None, env: dict[str, str] | None = None,
                 members_per_device: int = 1) -> list[Worker]:
  """``count`` workers (default: one per GPU, else 1) over the visible GPUs or CPU cores.

  With ``members_per_device`` > 1 (GPUs only), that many workers share each GPU (default
  ``count``: GPUs × that), round robin, with JAX's memory preallocation off so that each member
  takes only what it uses: for small models that leave a large GPU mostly idle.
  """
  env = dict(os.environ if env is None else env)
  if count is not None and count < 1:
    raise SweepError(f"--sweep_workers must be >= 1, got {count}")
  if members_per_device < 1:
    raise SweepError(f"--members_per_device must be >= 1, got {members_per_device}")
  gpus = visible_gpus(env)
  if members_per_device > 1:
    if not gpus:
      raise SweepError("--members_per_device shares GPUs between members, and no GPU is "
                       "visible; on CPU, --sweep_workers sets how many members run at once")
    count = count or len(gpus) * members_per_device
    if count > len(gpus) * members_per_device:
      raise SweepError(f"--sweep_workers={count} is more than --members_per_device="
                       f"{members_per_device} on each of the {len(gpus)} visible GPU(s)")
    shared = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return [Worker(dict(shared, CUDA_VISIBLE_DEVICES=gpus[i % len(gpus)]), None, None,
                   f"GPU {gpus[i % len(gpus)]} (shared by up to {members_per_device})")
            for i in range(count)]
  if gpus:
    count = count or len(gpus)
    if count > len(gpus):
      raise SweepError(f"--sweep_workers={count} but {len(gpus)} GPU(s) are visible; members run "
                       "one process per GPU (or several GPUs each) unless --members_per_device "
                       "lets several share one")
    per = len(gpus) // count
    groups = [gpus[i * per:(i + 1) * per] for i in range(count)]
    return [Worker(dict(env, CUDA_VISIBLE_DEVICES=",".join(g)), None, None, f"GPU {','.join(g)}")
            for g in groups]
  count = count or 1
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
      list(range(os.cpu_count() or 1))
  per = max(1, len(cores) // count)
  worker_env = without_device_count(env)
  pin = hasattr(os, "sched_setaffinity") and len(cores) >= count
  workers = []
  for i in range(count):
    mine = set(cores[i * per:(i + 1) * per]) if pin else None
    where = f"cores {sorted(mine)}" if mine else "all cores"
    workers.append(Worker(dict(worker_env), mine, per, f"up to {per} CPU device(s), {where}"))
  return workers


def without_device_count(env: dict[str, str]) -> dict[str, str]:
  """``env`` with no XLA host device count in its ``XLA_FLAGS`` (each member gets its own)."""
  return dict(env, XLA_FLAGS=_DEVICE_COUNT.sub("", env.get("XLA_FLAGS", "")).strip())


def visible_gpus(env: dict[str, str]) -> list[str]:
  """``CUDA_VISIBLE_DEVICES`` entries of the GPUs JAX would use; ``[]`` on a CPU-only setup.

  JAX is asked in a throwaway process: initialised here, it would hold a context (and, by default,
  75% of the memory) on every GPU for the whole sweep.
  """
  platforms = [p for p in env.get("JAX_PLATFORMS", "").split(",") if p]
  if platforms and not {"cuda", "gpu"} & set(platforms):
    return []
  if not (importlib.metadata.entry_points(group="jax_plugins") or
          importlib.util.find_spec("jax_plugins")):
    return []  # no accelerator plugin installed: CPU jaxlib only
  code = "import jax; print(sum(d.platform == 'gpu' for d in jax.local_devices()))"
  try:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false"), timeout=600,
                         check=True)
    n = int(out.stdout.split()[-1])
  except (subprocess.SubprocessError, OSError, ValueError, IndexError):
    return []
  visible = env.get("CUDA_VISIBLE_DEVICES")
  ids = [v for v in visible.split(",") if v] if visible else [str(i) for i in range(n)]
  return ids[:n]
