r"""Whole-volume sliding-window inference: medjax vs MONAI's `sliding_window_inference`, same process.

  pip install -e ".[bench]"   # torch (2.13 CPU here) and monai
  python benchmarks/sliding_window_vs_monai.py [--volume 64,96,80 --patch 40,56,40
                                                --features 16,32,64,128 --batch_size 4
                                                --repeats 5 --mirror]

Both sides predict class probabilities of one random single-channel volume with a 3-D U-Net of
the same configuration (the MSD Hippocampus recipe by default: four stages of 16–128 features,
strides 1, 2, 2, 2, 3 classes), each with its own random weights in eval mode (only time is
compared, so the weights need not match):
- medjax: ``UNet`` applied through a jitted ``apply_fn`` with one host device per core (as
  ``launch.py`` sets up) and each batch of windows split over them (``--mesh_devices 1``: one
  device, as ``infer.segment.Segmenter`` runs), called by ``sliding_window_predict``.
- MONAI: ``DynUNet`` (as in ``unet_step_vs_monai.py``) under ``torch.inference_mode()`` with
  ``torch.set_num_threads(cores)``, called by ``sliding_window_inference``, then a softmax.
The work is the same on both sides: overlap 0.5, Gaussian blending with sigma 0.125 × patch,
``--batch_size`` windows per network call and the same windows (both counts are printed; the
last batch of each holds the windows left over). ``--mirror`` averages the logits of all
8 flip combinations: medjax with ``mirror_axes=(0, 1, 2)`` per batch of windows, MONAI with the
flips done by hand around ``sliding_window_inference``. Timed: numpy volume in, numpy
probabilities out.

After one warm-up each (medjax's compiles), ``--repeats`` predictions alternate (medjax, MONAI,
medjax, ...). Prints one JSON line with the median seconds per volume and ratio = MONAI time /
medjax time (> 1: medjax is faster); nothing is hard-coded. ``--compare NAME`` also times, in
the same rounds, medjax with one of its speed-ups turned off, and adds ``medjax_no_NAME_s`` and
``NAME_speedup`` (the median of the per-round time ratios): ``winograd`` runs oneDNN's direct
3×3×3 forward instead of the Winograd one (``medjax.ops.cpu.onednn.WINOGRAD``); ``fold`` builds
the decoder's up-sampled maps instead of folding them into the convolutions that read them
(``medjax.ops.cpu.upsample_fold.FOLD``). Repeat the flag to compare several.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from medjax import host  # noqa: E402

# As launch.py, before JAX or PyTorch starts. Freed memory is kept for the whole process, so for
# both frameworks (MEDJAX_KEEP_FREED_MEMORY=0: for neither); the JSON line says which.
MALLOC_KEPT = host.prepare()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from unet_step_vs_monai import NUM_CLASSES, dynunet  # noqa: E402  (the same network)

OVERLAP = 0.5
SIGMA_SCALE = 0.125


def _switches():
  """``--compare``'s names: (module, flag) of each speed-up that can be turned off."""
  from medjax.ops.cpu import onednn, upsample_fold
  return {"winograd": (onednn, "WINOGRAD"), "fold": (upsample_fold, "FOLD")}


SWITCHES = _switches()


def medjax_predictor(features: tuple[int, ...], patch: tuple[int, ...], batch_size: int,
                     mirror: bool, mesh_devices: int):
  """``(predict, devices)``: ``predict(volume [*spatial, 1]) -> probabilities [*spatial, K]``."""
  from medjax.infer.sliding_window import sliding_window_predict
  from medjax.models.unet import UNet
  from medjax.train import sharding

  mesh = sharding.make_mesh(mesh_devices)
  if batch_size % mesh.devices.size:
    raise SystemExit(f"--batch_size {batch_size} does not split over {mesh.devices.size} devices;"
                     " pass --mesh_devices")
  model = UNet(num_classes=NUM_CLASSES, features=features, norm="instance")
  repl, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *patch, 1))),
                      out_shardings=repl)()
  apply = sharding.one_at_a_time(
      jax.jit(lambda v, x: model.apply(v, x, train=False), in_shardings=(repl, data),
              out_shardings=data), mesh)

  def predict(volume: np.ndarray) -> np.ndarray:
    return sliding_window_predict(lambda x: apply(variables, x), volume, patch, NUM_CLASSES,
                                  overlap=OVERLAP, batch_size=batch_size,
                                  mirror_axes=(0, 1, 2) if mirror else (), gaussian=True,
                                  sigma_scale=SIGMA_SCALE, batch_multiple=mesh.devices.size)

  return predict, mesh.devices.size


def monai_predictor(features: tuple[int, ...], patch: tuple[int, ...], batch_size: int,
                    mirror: bool, device: str = "cpu"):
  """``(predict, windows)``: ``predict(volume [*spatial, 1]) -> probabilities [K, *spatial]``;
  ``windows[0]`` counts the windows the network has seen."""
  import torch
  from monai.inferers import sliding_window_inference

  model = dynunet(features, device=device)
  model.eval()
  windows = [0]

  def network(x: torch.Tensor) -> torch.Tensor:
    windows[0] += x.shape[0]
    return model(x)

  flips = [d for r in range(4) for d in itertools.combinations((2, 3, 4), r)] if mirror else [()]

  def predict(volume: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
      image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, -1, 0)))[None].to(device)
      total = None
      for dims in flips:
        x = torch.flip(image, dims) if dims else image
        logits = sliding_window_inference(x, roi_size=patch, sw_batch_size=batch_size,
                                          predictor=network, overlap=OVERLAP, mode="gaussian",
                                          sigma_scale=SIGMA_SCALE)
        logits = torch.flip(logits, dims) if dims else logits
        total = logits if total is None else total + logits
      return torch.softmax(total / len(flips), dim=1)[0].cpu().numpy()

  return predict, windows


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--volume", default="64,96,80", help="volume size, 3 comma-separated ints")
  p.add_argument("--patch", default="40,56,40", help="patch size, 3 comma-separated ints")
  p.add_argument("--features", default="16,32,64,128", help="channels per stage, comma-separated")
  p.add_argument("--batch_size", type=int, default=4, help="windows per network call")
  p.add_argument("--mirror", action="store_true", help="average over all 8 flips (TTA)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--mesh_devices", type=int, default=-1,
                 help="medjax devices the windows are split over (-1: one per core)")
  p.add_argument("--torch_device", default="cpu", choices=("cpu", "cuda"),
                 help="where PyTorch runs; JAX runs on its default backend (a GPU when it has one)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--compare", action="append", default=[], choices=sorted(SWITCHES),
                 help="also time medjax with this speed-up off (repeatable)")
  a = p.parse_args()
  volume_shape = tuple(int(s) for s in a.volume.split(","))
  patch = tuple(int(s) for s in a.patch.split(","))
  features = tuple(int(f) for f in a.features.split(","))
  if len(volume_shape) != 3 or len(patch) != 3 or len(features) < 3:
    p.error("--volume and --patch need 3 sizes, --features at least 3 stages (DynUNet's minimum)")

  from medjax.infer.sliding_window import window_starts

  volume = np.random.default_rng(a.seed).standard_normal((*volume_shape, 1), np.float32)
  padded = [max(v, s) for v, s in zip(volume_shape, patch)]  # both pad a short axis to the patch
  jax_windows = math.prod(len(s) for s in window_starts(padded, patch, OVERLAP))
  jax_predict, devices = medjax_predictor(features, patch, a.batch_size, a.mirror,
                                          a.mesh_devices)
  th_predict, th_seen = monai_predictor(features, patch, a.batch_size, a.mirror,
                                        a.torch_device)

  t = time.perf_counter()
  jax_out = jax_predict(volume)
  print(f"medjax warm-up (compile included): {time.perf_counter() - t:.1f} s")
  predictors = {"medjax": jax_predict}
  for name in a.compare:
    module, flag = SWITCHES[name]
    without, _ = medjax_predictor(features, patch, a.batch_size, a.mirror, a.mesh_devices)
    setattr(module, flag, False)  # read while tracing: the warm-up compiles it switched off
    np.testing.assert_allclose(without(volume), jax_out, atol=1e-4)
    setattr(module, flag, True)
    predictors[f"medjax_no_{name}"] = without
  th_out = th_predict(volume)
  flips = 8 if a.mirror else 1
  th_windows = th_seen[0] // flips
  print(f"windows: medjax {jax_windows} (in {math.ceil(jax_windows / a.batch_size)} batches of "
        f"{a.batch_size}), MONAI {th_windows}; x{flips} flips")
  if th_windows != jax_windows:
    print(f"WARNING: the window counts differ ({jax_windows} vs {th_windows}): not the same work")
  if jax_out.shape != volume_shape + (NUM_CLASSES,) or th_out.shape != (NUM_CLASSES,) + volume_shape:
    raise SystemExit(f"unexpected output shapes: medjax {jax_out.shape}, MONAI {th_out.shape}")

  predictors["monai"] = th_predict
  times = {name: [] for name in predictors}
  for _ in range(a.repeats):
    for name, predict in predictors.items():
      t = time.perf_counter()
      predict(volume)
      times[name].append(time.perf_counter() - t)

  jax_s, th_s = statistics.median(times["medjax"]), statistics.median(times["monai"])
  compared = {}
  for name in a.compare:
    off = times[f"medjax_no_{name}"]
    compared[f"medjax_no_{name}_s"] = round(statistics.median(off), 4)
    compared[f"{name}_speedup"] = round(statistics.median(
        b / f for b, f in zip(off, times["medjax"])), 3)
  print(json.dumps({
      "volume": list(volume_shape), "patch": list(patch), "features": list(features),
      "batch_size": a.batch_size, "mirror": a.mirror, "repeats": a.repeats,
      "cores": os.cpu_count(), "malloc_kept": MALLOC_KEPT,
      "jax_backend": jax.default_backend(),
      "torch_device": a.torch_device, "medjax_devices": devices, "windows_medjax": jax_windows,
      "windows_monai": th_windows, "medjax_s": round(jax_s, 4), "monai_s": round(th_s, 4),
      "ratio_monai_over_medjax_time": round(th_s / jax_s, 3), **compared}))


if __name__ == "__main__":
  main()
