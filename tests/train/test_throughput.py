"""Throughput logging: steps/s, images (voxels)/s, input-wait share; MFU only where a peak is
known (GPUs, TPUs), from XLA's cost analysis of the compiled step."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from medjax.train import throughput


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "train/loss" in r]


@pytest.mark.parametrize("kind, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 80GB HBM3", "float32", 494.5e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
    ("TPU v5 lite", "float32", 197e12),
    ("TPU v4", "bf16", 275e12),
    ("cpu", "bf16", None),
    ("Some New Accelerator", "bf16", None),
])
def test_peak_by_device_kind(kind, precision, peak):
  assert throughput.peak_flops(kind, precision) == peak


def test_step_flops_are_xla_s_count_of_the_compiled_step():
  a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
  assert throughput.step_flops(jax.jit(lambda a, b: a @ b), a, b) == 2 * 64 * 32 * 16


def test_metrics_of_an_interval():
  meter = throughput.Throughput(images_per_step=8, voxels_per_image=1000, peak=1e9)
  meter.flops_per_step = 1e6
  for _ in range(4):
    meter.waited(0.0)
    meter.stepped()
  m = meter.metrics()
  assert m["time/steps_per_second"] == pytest.approx(1 / m["time/seconds_per_step"])
  assert m["time/images_per_second"] == pytest.approx(8 * m["time/steps_per_second"])
  assert m["time/voxels_per_second"] == pytest.approx(1000 * m["time/images_per_second"])
  assert m["time/mfu"] == pytest.approx(1e6 * m["time/steps_per_second"] / 1e9)
  assert m["time/input_wait_fraction"] == 0.0
  meter.waited(1e9)  # longer than the interval: the share is capped at all of it
  meter.stepped()
  assert meter.metrics()["time/input_wait_fraction"] == 1.0
  assert "time/mfu" not in throughput.Throughput(8).metrics()


def test_a_cpu_run_logs_throughput_but_no_mfu(learned_run, seg_run):
  records = _records(learned_run[0])
  assert records and all(0.0 <= r["time/input_wait_fraction"] <= 1.0 for r in records)
  for r in records:
    assert r["time/images_per_second"] == pytest.approx(32 * r["time/steps_per_second"])
    assert "time/mfu" not in r and "time/voxels_per_second" not in r
  (seg,) = _records(seg_run[0])
  assert seg["time/voxels_per_second"] == pytest.approx(16**3 * seg["time/images_per_second"])
  assert "time/mfu" not in seg


def test_mfu_is_logged_where_the_device_has_a_known_peak(synthetic_medmnist, tmp_path,
                                                         monkeypatch):
  """The loop's MFU path, run on the CPU by giving its device kind a (made-up) peak."""
  from helpers import config

  from medjax.train import loop

  monkeypatch.setattr(throughput, "_BF16_PEAKS", (("cpu", 1e12),))
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(config(synthetic_medmnist, steps=2), workdir)
  records = _records(workdir)
  assert len(records) == 2
  # float32 on a kind that is not a TPU: half the bf16 peak, as on NVIDIA GPUs.
  flops = [r["time/mfu"] * 0.5e12 / r["time/steps_per_second"] for r in records]
  assert all(0 < r["time/mfu"] < 1 for r in records)
  assert flops[0] > 1e6 and flops[1] == pytest.approx(flops[0], rel=1e-9)  # one step's FLOPs
