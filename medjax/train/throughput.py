"""Throughput in the run logs: steps/s, images (and voxels)/s, the share of step time spent
waiting for data and, on GPUs and TPUs, model FLOPs utilisation (MFU).

MFU is the compiled train step's FLOPs (XLA's cost analysis of the partitioned module, i.e. one
device's share) times steps per second, over that device's peak (`peak_flops`, by device kind
and precision: dense bf16 tensor-core peaks; float32 on NVIDIA GPUs runs convolutions and
matmuls as TF32, half that). Nothing is logged for MFU on the CPU, whose peak depends on cores,
clock and vector width that JAX does not report.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax

# Dense peak FLOP/s per device (no sparsity) at bf16, by a substring of ``device_kind``, most
# specific first: NVIDIA's and Google's data sheets.
_BF16_PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM (HBM3)
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("TPU v6", 918e12),  # Trillium
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5", 459e12),  # v5p
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops(device_kind: str, precision: str = "bf16") -> float | None:
  """One device's peak FLOP/s for ``precision`` ("bf16" | "float32"), None when unknown (the CPU,
  an unlisted accelerator)."""
  for name, peak in _BF16_PEAKS:
    if name in device_kind:
      # NVIDIA: float32 convolutions and matmuls run as TF32, at half the bf16 rate. TPUs run
      # float32 matmuls as bf16 passes; their bf16 peak is the one quoted.
      return peak / 2 if precision == "float32" and not name.startswith("TPU") else peak
  return None


def step_flops(jitted: Callable, *args: Any) -> float | None:
  """The FLOPs of one call of ``jitted(*args)`` per device, from XLA's cost analysis of the
  compiled module; None when XLA does not report them. Lowering does not run it (donated
  arguments stay valid)."""
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per module
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and math.isfinite(flops) and flops > 0 else None


class Throughput:
  """Accumulates step and input-wait times between two log lines.

  Args:
    images_per_step: the global batch size.
    voxels_per_image: spatial size of one image (segmentation patches: voxels/s is logged), or
      0 to log images/s only.
    peak: the devices' summed peak FLOP/s (None: no MFU).
  """

  def __init__(self, images_per_step: int, voxels_per_image: int = 0,
               peak: float | None = None):
    self.images_per_step, self.voxels_per_image, self.peak = (images_per_step, voxels_per_image,
                                                              peak)
    self.flops_per_step: float | None = None  # of all devices together; set once known
    self._start = time.perf_counter()
    self._wait = 0.0
    self._steps = 0

  def waited(self, seconds: float) -> None:
    """Adds time spent waiting for the next batch."""
    self._wait += seconds

  def stepped(self) -> None:
    self._steps += 1

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` (an evaluation, a checkpoint) out of the current interval."""
    self._start += seconds

  def metrics(self) -> dict[str, float]:
    """The scalars since the last call (``time/...``), then starts a new interval."""
    now = time.perf_counter()
    seconds, steps = max(now - self._start, 1e-9), max(self._steps, 1)
    out = {"time/seconds_per_step": seconds / steps,
           "time/steps_per_second": steps / seconds,
           "time/images_per_second": steps * self.images_per_step / seconds,
           "time/input_wait_fraction": min(1.0, self._wait / seconds)}
    if self.voxels_per_image:
      out["time/voxels_per_second"] = out["time/images_per_second"] * self.voxels_per_image
    if self.peak and self.flops_per_step:
      out["time/mfu"] = self.flops_per_step * steps / seconds / self.peak
    self._start, self._wait, self._steps = now, 0.0, 0
    return out


def device_peak(mesh: jax.sharding.Mesh, precision: str) -> float | None:
  """The summed peak FLOP/s of ``mesh``'s devices (None on the CPU or an unknown kind)."""
  peaks = [peak_flops(d.device_kind, precision) for d in mesh.devices.flat]
  return None if not peaks or None in peaks else float(sum(peaks))
