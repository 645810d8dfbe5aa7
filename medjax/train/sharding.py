"""Device mesh and shardings: batch split over the ``data`` axis, state replicated (no pmap)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def make_mesh(num_data: int = -1) -> Mesh:
  """A 1-D mesh named ``data`` over ``num_data`` devices (-1: all devices of all processes)."""
  devices = jax.devices()
  n = len(devices) if num_data == -1 else num_data
  if not 0 < n <= len(devices):
    raise ValueError(f"mesh.data={num_data} but {len(devices)} devices are visible")
  return Mesh(np.asarray(devices[:n]), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("data"))


def device_memory_bytes() -> int | None:
  """Memory of this process's first device, where the backend reports it (GPUs, TPUs)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
  """Assembles each process's share of a batch into global arrays sharded on ``data``.

  Args:
    local_batch: numpy arrays with leading dim ``global_batch / process_count``.
  """
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def one_at_a_time(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """``fn``, returning only once its result is ready where ``mesh`` spans several CPU devices.

  XLA:CPU (jaxlib 0.10.2) can deadlock when two programs with collectives are in flight at once
  on several host devices: one device never reaches the collective, and after 40 s XLA aborts
  the process ("Termination timeout for `all gather ...`"). A jitted all-gather called in a loop
  with 3 busy processes beside it aborted within about 100 calls; waiting for each result before
  the next call, it ran 300,000 calls clean (``tests/train/test_sharding.py`` repeats this).
  Programs over such a mesh therefore run one at a time: the training loop and `evaluate` wait
  for every step's output already, and other callers of several programs in a row wrap them
  here. On one device or another backend, ``fn`` comes back unchanged.
  """
  devices = mesh.devices.flat
  if mesh.devices.size == 1 or any(d.platform != "cpu" for d in devices):
    return fn

  def waited(*args, **kwargs):
    return jax.block_until_ready(fn(*args, **kwargs))

  return waited
