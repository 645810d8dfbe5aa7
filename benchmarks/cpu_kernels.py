r"""Whole-step A/B timings of each CPU kernel choice in ``medjax/ops/cpu``, in one process.

  python benchmarks/cpu_kernels.py [--rounds 3 --steps 1 --only unet3d_onednn_vs_xla]
  python benchmarks/cpu_kernels.py --only unet3d_upsample_fold --rounds 5 --steps 3

Every kernel medjax keeps for the CPU has to earn its place on a whole train step (and, for the
3-D U-Net, on sliding-window inference). Each comparison builds the real step twice, once per
variant (the switches of ``medjax.ops.cpu`` set while it is traced and run), then for
``--rounds`` rounds times ``--steps`` steps of each variant in turn, so both see the same load.
Prints one JSON line per comparison: each variant's median seconds per step, the ratio of the
medians, and the median of the per-round ratios (``> 1``: the kernel is faster), plus the CPU's
AVX-512 / AVX2 flags. ``docs/performance-kernels.md`` has the results and what they decided.

Variants run as ``launch.py`` would set them up: with oneDNN, one device whose calls each use
every core; without it (XLA's convolutions run one thread each), one device per core, the batch
split over them. The process therefore has one host device per core, and the oneDNN variants'
calls are given every core (``onednn.threads_per_call``) while they are traced.

Comparisons (the hippocampus config: U-Net 16–128 features, deep supervision, patch 40×56×40,
batch 4; ResNet-18 2-D: PneumoniaMNIST's 28², batch 128; ResNet-18 3-D: AdrenalMNIST3D's 28³,
stem kernel 3 and stride 2 (its ``cpu`` variant), ``--resnet3d_batch``):
- ``*_onednn_vs_xla``: oneDNN's convolutions (and the fused norm) vs XLA:CPU's lowerings.
- ``unet3d_winograd``, ``sliding_window_winograd``: Winograd forced on (``MEDJAX_WINOGRAD=1``'s
  setting) vs oneDNN's direct 3×3×3 kernels.
- ``unet3d_fused_norm``: the fused instance norm + leaky ReLU vs XLA's form, both on oneDNN.
- ``unet3d_upsample_fold``: the decoder's up-sampling folded into the convolution that reads it
  (``ops/cpu/upsample_fold.py``) vs the up-sampled map built, concatenated and convolved, both on
  oneDNN; ``unet3d_upsample_fold_no_ds`` the same without deep supervision (``--only`` only).
- ``*_lowerings_vs_native``: without oneDNN, ``ops/cpu/conv.py``'s lowerings vs
  ``lax.conv_general_dilated`` itself.
- ``--parts`` (instead of the above): the lowerings vs the lowerings without one part (tap
  channels, the depth fold, im2col for tiny outputs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# One host device per core, before JAX starts (see the module docstring); host.prepare() keeps it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={CORES}").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from unet_step_vs_monai import MALLOC_KEPT, NUM_CLASSES, medjax_step  # noqa: E402,F401

from medjax.ops.cpu import conv, norm_act, onednn, upsample_fold  # noqa: E402

FEATURES, PATCH, BATCH = (16, 32, 64, 128), (40, 56, 40), 4  # configs/hippocampus_unet3d.py


def _cpu_flags() -> dict[str, bool]:
  flags = set()
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("flags"):
        flags = set(line.split(":", 1)[1].split())
        break
  return {"avx512f": "avx512f" in flags, "avx2": "avx2" in flags, "fma": "fma" in flags}


# A variant: how many devices its mesh spans, and the module switches set while it runs.
ONEDNN = {"devices": 1, "switches": {}}
XLA_LOWERINGS = {"devices": CORES, "switches": {(conv, "ONEDNN"): False}}
XLA_NATIVE = {"devices": CORES, "switches": {(conv, "ONEDNN"): False, (conv, "LOWERINGS"): False}}
WINOGRAD_ON = {"devices": 1, "switches": {(onednn, "WINOGRAD_CPUS"): "1"}}
WINOGRAD_OFF = {"devices": 1, "switches": {(onednn, "WINOGRAD_CPUS"): "0"}}
UNFUSED = {"devices": 1, "switches": {(norm_act, "FUSED"): False}}
UNFOLDED = {"devices": 1, "switches": {(upsample_fold, "FOLD"): False}}
# The lowerings with one of their parts off (``--parts``).
NO_TAP_CHANNELS = {"devices": CORES, "switches": {**XLA_LOWERINGS["switches"],
                                                  (conv, "TAP_CHANNELS"): False}}
NO_FOLD = {"devices": CORES, "switches": {**XLA_LOWERINGS["switches"],
                                          (conv, "FOLD_MAX_CHANNELS"): 0}}
NO_PATCHES = {"devices": CORES, "switches": {**XLA_LOWERINGS["switches"],
                                             (conv, "SMALL_OUTPUT_PIXELS"): 0}}


@contextlib.contextmanager
def switched(variant, handlers: set[str]):
  """Within it, ``variant``'s switches are set (and oneDNN's calls use every core on a one-device
  mesh); the FFI handlers traced are added to ``handlers``."""
  switches = dict(variant["switches"])
  if variant["devices"] == 1:
    switches[(onednn, "threads_per_call")] = lambda: CORES
  ffi_call = jax.ffi.ffi_call

  def recording(target, *args, **kwargs):
    handlers.add(target.removeprefix("medjax_onednn_"))
    return ffi_call(target, *args, **kwargs)

  switches[(jax.ffi, "ffi_call")] = recording
  saved = {key: getattr(*key) for key in switches}
  for (module, name), value in switches.items():
    setattr(module, name, value)
  try:
    yield
  finally:
    for (module, name), value in saved.items():
      setattr(module, name, value)


def unet_step(devices: int, deep_supervision: bool = True):
  """The hippocampus U-Net's train step (``benchmarks/unet_step_vs_monai.py``'s)."""
  rng = np.random.default_rng(0)
  batch = rng.standard_normal((BATCH, *PATCH, 1), np.float32)
  labels = rng.integers(0, NUM_CLASSES, (BATCH, *PATCH)).astype(np.int32)
  return medjax_step(FEATURES, PATCH, batch, labels, deep_supervision, devices)[0]


def unet_step_no_ds(devices: int):
  """`unet_step` without deep supervision (``unet_step_vs_monai.py``'s default)."""
  return unet_step(devices, deep_supervision=False)


def resnet_step(dims: int, batch_size: int, devices: int):
  """ResNet-18's train step on random ``[batch, 28…, 1]`` images, as the MedMNIST configs set
  it up (3-D: stem kernel 3, no pooling, stride 2 as the config's ``cpu`` variant)."""
  from train_step_vs_torch import medjax_resnet_step

  kwargs = {"stem_kernel": 3, "stem_stride": 2, "stem_pool": False} if dims == 3 else {}
  return medjax_resnet_step(batch_size, (28,) * dims, "resnet18", devices, **kwargs)


def sliding_window(devices: int, volume_shape: tuple[int, ...]):
  """The U-Net's sliding-window inference of one volume
  (``benchmarks/sliding_window_vs_monai.py``'s)."""
  from sliding_window_vs_monai import medjax_predictor

  predict, _ = medjax_predictor(FEATURES, PATCH, BATCH, False, devices)
  volume = np.random.default_rng(0).standard_normal((*volume_shape, 1), np.float32)
  return lambda: float(predict(volume)[..., 0].mean())


def comparisons(a) -> dict[str, tuple]:
  """``name -> (build(devices) -> step, kernel variant, baseline variant)``."""
  volume = tuple(int(s) for s in a.volume.split(","))
  resnet2d = lambda d: resnet_step(2, 128, d)  # noqa: E731
  resnet3d = lambda d: resnet_step(3, a.resnet3d_batch, d)  # noqa: E731
  window = lambda d: sliding_window(d, volume)  # noqa: E731
  # Where the default already leaves Winograd off (AVX-512 CPUs), its "off" is the default step.
  winograd_off = WINOGRAD_OFF if onednn._winograd_cpu() else ONEDNN
  return {
      "resnet2d_onednn_vs_xla": (resnet2d, ONEDNN, XLA_LOWERINGS),
      "unet3d_onednn_vs_xla": (unet_step, ONEDNN, XLA_LOWERINGS),
      "unet3d_winograd": (unet_step, WINOGRAD_ON, winograd_off),
      "sliding_window_winograd": (window, WINOGRAD_ON, winograd_off),
      "unet3d_fused_norm": (unet_step, ONEDNN, UNFUSED),
      "unet3d_upsample_fold": (unet_step, ONEDNN, UNFOLDED),
      "unet3d_upsample_fold_no_ds": (unet_step_no_ds, ONEDNN, UNFOLDED),
      "resnet2d_lowerings_vs_native": (resnet2d, XLA_LOWERINGS, XLA_NATIVE),
      "resnet3d_lowerings_vs_native": (resnet3d, XLA_LOWERINGS, XLA_NATIVE),
      "unet3d_lowerings_vs_native": (unet_step, XLA_LOWERINGS, XLA_NATIVE),
      # --parts: each part of the lowerings against the lowerings without it.
      "unet3d_tap_channels": (unet_step, XLA_LOWERINGS, NO_TAP_CHANNELS),
      "unet3d_depth_fold": (unet_step, XLA_LOWERINGS, NO_FOLD),
      "resnet3d_depth_fold": (resnet3d, XLA_LOWERINGS, NO_FOLD),
      "resnet3d_patches": (resnet3d, XLA_LOWERINGS, NO_PATCHES),
  }


PARTS = ("unet3d_tap_channels", "unet3d_depth_fold", "resnet3d_depth_fold", "resnet3d_patches")
# Run only when named with --only (the default run stays under 10 minutes).
NAMED_ONLY = ("unet3d_upsample_fold_no_ds",)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=3, help="rounds, each timing every variant")
  p.add_argument("--steps", type=int, default=1, help="timed steps per variant and round")
  p.add_argument("--resnet3d_batch", type=int, default=8,
                 help="3-D ResNet-18 batch (the config's is 32; XLA's native 3-D convolutions "
                      "take seconds per image)")
  p.add_argument("--volume", default="64,96,80", help="sliding-window volume, 3 ints")
  p.add_argument("--only", action="append", default=[], help="run only these comparisons")
  p.add_argument("--parts", action="store_true",
                 help=f"run the comparisons of the lowerings' parts ({', '.join(PARTS)}), "
                      "left out by default to keep the run under 10 minutes")
  a = p.parse_args()
  table = comparisons(a)
  unknown = set(a.only) - set(table)
  if unknown:
    p.error(f"unknown comparisons {sorted(unknown)}; expected some of {sorted(table)}")
  if not onednn.available():
    raise SystemExit(f"oneDNN's handlers are unavailable here: {onednn._load()}")
  cpu = {"cores": CORES, **_cpu_flags(), "jax": jax.__version__}
  print(json.dumps({"cpu": cpu}), flush=True)

  built = {}  # (build, variant) -> (step, handlers, seconds of its first two steps)
  for name, (build, kernel, baseline) in table.items():
    if (name not in a.only) if a.only else ((name in PARTS) != a.parts or name in NAMED_ONLY):
      continue
    variants = {"kernel": kernel, "baseline": baseline}
    steps, handlers, compile_s = {}, {}, {}
    for label, variant in variants.items():
      key = (id(build), id(variant))  # a step built once serves every comparison
      if key not in built:
        traced = set()
        with switched(variant, traced):
          t = time.perf_counter()
          step = build(variant["devices"])
          step()  # compiles
          step()
          built[key] = (step, traced, round(time.perf_counter() - t, 1))
      steps[label], handlers[label], compile_s[label] = built[key]
    times = {label: [] for label in variants}
    ratios = []
    for r in range(a.rounds):
      # Alternate which goes first, so neither always follows the other.
      order = list(variants) if r % 2 == 0 else list(variants)[::-1]
      medians = {}
      for label in order:
        with switched(variants[label], set()):
          round_times = []
          for _ in range(a.steps):
            t = time.perf_counter()
            steps[label]()
            round_times.append(time.perf_counter() - t)
        times[label] += round_times
        medians[label] = statistics.median(round_times)
      ratios.append(medians["baseline"] / medians["kernel"])
    kernel_s, baseline_s = (statistics.median(times[k]) for k in ("kernel", "baseline"))
    print(json.dumps({
        "comparison": name, "kernel_s": round(kernel_s, 4), "baseline_s": round(baseline_s, 4),
        "speedup": round(baseline_s / kernel_s, 3),
        "speedup_per_round_median": round(statistics.median(ratios), 3),
        "per_round": [round(x, 3) for x in ratios],
        "devices": {k: v["devices"] for k, v in variants.items()},
        "handlers": {k: sorted(v) for k, v in handlers.items()},
        "first_two_steps_s": compile_s, "rounds": a.rounds, "steps": a.steps,
        "avx512f": cpu["avx512f"]}), flush=True)


if __name__ == "__main__":
  main()
