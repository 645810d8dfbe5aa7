"""Device mesh and shardings: batch split over the ``data`` axis, state replicated (no pmap)."""

from __future__ import annotations

from typing import Any

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


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
  """Assembles each process's share of a batch into global arrays sharded on ``data``.

  Args:
    local_batch: numpy arrays with leading dim ``global_batch / process_count``.
  """
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
