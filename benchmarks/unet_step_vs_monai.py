r"""3-D U-Net train-step time: medjax `UNet` vs MONAI `DynUNet` in PyTorch, same process.

  pip install -e ".[bench]"   # torch (2.13 CPU here) and monai
  python benchmarks/unet_step_vs_monai.py [--features 16,32,64,128 --patch 40,56,40 --batch 4
                                           --steps 20 --warmup 3 --deep_supervision]

The defaults are the MSD Hippocampus recipe (``configs/hippocampus_unet3d.py``): four stages of
16–128 features, strides 1, 2, 2, 2, patch 40×56×40, batch 4, 3 classes, one input channel.
Inputs are random normals and labels random integers in ``[0, 3)``.

One timed step is forward + Dice/CE loss + backward + AdamW update, ending with the loss on the
host:
- medjax: the training loop's own step (``loop.make_train_step(tasks.segmentation())``: jitted
  ``jax.value_and_grad`` of the loss, optax AdamW from ``optim.make_optimizer``, no clipping),
  with one host device per core (as ``launch.py`` sets up) and the batch split over them.
- PyTorch: ``DynUNet(kernel_size=[3]*S, strides=[1, 2, ...], filters=features)`` with its default
  norm and activation (instance norm with affine scale/shift, leaky ReLU 0.01: the same as
  medjax's), ``res_block=False`` and ``trans_bias=True`` (medjax's transposed convs have a bias),
  ``DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)`` (the Dice
  medjax's segmentation task uses), ``torch.optim.AdamW``, ``torch.set_num_threads(cores)``.
``--deep_supervision`` turns it on for both: medjax's heads at full, 1/2, ... resolution against
down-sampled labels; DynUNet's (``deep_supr_num = S - 2``, the same heads) up-sampled to full
resolution, its design; both weighted as nnU-Net (``losses.deep_supervision_weights``).

Parameter counts of both networks are printed and should be equal. After ``--warmup`` steps each
(medjax's first compiles), ``--steps`` steps alternate between the frameworks (medjax, torch,
medjax, ...), so both see the same machine load. Prints one JSON line with the median seconds per
step, voxels/s (batch × patch voxels per second) and ratio = torch time / medjax time (> 1: medjax
is faster); nothing is hard-coded.
"""

from __future__ import annotations

import argparse
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

NUM_CLASSES = 3


def medjax_step(features: tuple[int, ...], patch: tuple[int, ...], batch: np.ndarray,
                labels: np.ndarray, deep_supervision: bool, mesh_devices: int):
  """``(step, param_count, devices)``: ``step()`` runs one train step and returns the loss."""
  from configs import common
  from medjax.models.unet import UNet
  from medjax.train import loop, optim, sharding, tasks
  from medjax.train.state import TrainState

  cfg = common.get_base_config().optim
  cfg.name, cfg.grad_clip_norm = "adamw", 0.0
  mesh = sharding.make_mesh(mesh_devices)
  model = UNet(num_classes=NUM_CLASSES, features=features, norm="instance",
               deep_supervision=deep_supervision)
  tx = optim.make_optimizer(cfg, 1000)
  repl, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)

  def init():
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *patch, 1)), train=False)
    return TrainState(step=jnp.zeros((), jnp.int32), params=v["params"], batch_stats={},
                      opt_state=tx.init(v["params"]), rng=jax.random.PRNGKey(1), ema={},
                      apply_fn=model.apply, tx=tx)

  state = jax.jit(init, out_shardings=repl)()
  count = sum(p.size for p in jax.tree.leaves(state.params))
  train_step = jax.jit(loop.make_train_step(tasks.segmentation()), in_shardings=(repl, data),
                       out_shardings=(repl, repl), donate_argnums=0)
  global_batch = sharding.to_global({"image": batch, "label": labels[..., None]}, mesh)

  def step() -> float:
    nonlocal state
    state, out = train_step(state, global_batch)
    return float(out["loss"])  # the loop fetches the loss every step too

  return step, count, mesh.devices.size


def torch_device(name: str):
  """The torch device to compare on: all CPU threads, or CUDA with cuDNN's autotuner on (as
  MONAI's and nnU-Net's trainers set it)."""
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  if name == "cuda":
    if not torch.cuda.is_available():
      raise SystemExit("--torch_device cuda: this torch sees no CUDA device")
    torch.backends.cudnn.benchmark = True
  return torch.device(name)


def dynunet(features: tuple[int, ...], deep_supervision: bool = False, device: str = "cpu"):
  """MONAI's DynUNet configured as medjax's UNet (same blocks, widths and parameter count), on
  ``device`` (``"cpu"``: all threads)."""
  from monai.networks.nets import DynUNet

  n = len(features)
  return DynUNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, kernel_size=[3] * n,
                 strides=[1] + [2] * (n - 1), upsample_kernel_size=[2] * (n - 1),
                 filters=list(features), norm_name=("instance", {"affine": True}),
                 act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
                 res_block=False, trans_bias=True, deep_supervision=deep_supervision,
                 deep_supr_num=max(n - 2, 1)).to(torch_device(device))


def torch_step(features: tuple[int, ...], batch: np.ndarray, labels: np.ndarray,
               deep_supervision: bool, device: str = "cpu"):
  """``(step, param_count, model)``: ``step()`` runs one train step and returns the loss."""
  import torch
  from monai.losses import DiceCELoss

  from medjax.train.losses import deep_supervision_weights

  model = dynunet(features, deep_supervision, device)
  model.train()
  count = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
  loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
  x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(batch, -1, 1))).to(device)  # NCDHW
  y = torch.from_numpy(labels[:, None].astype(np.int64)).to(device)

  def step() -> float:
    opt.zero_grad(set_to_none=True)
    out = model(x)
    if deep_supervision:  # [B, heads, C, *spatial], every head up-sampled to full resolution
      w = deep_supervision_weights(out.shape[1])
      loss = sum(float(wi) * loss_fn(out[:, i], y) for i, wi in enumerate(w) if wi > 0)
    else:
      loss = loss_fn(out, y)
    loss.backward()
    opt.step()
    return loss.item()

  return step, count, model


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--features", default="16,32,64,128", help="channels per stage, comma-separated")
  p.add_argument("--patch", default="40,56,40", help="patch size, 3 comma-separated ints")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=20, help="timed steps per framework")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps per framework first")
  p.add_argument("--deep_supervision", action="store_true")
  p.add_argument("--mesh_devices", type=int, default=-1,
                 help="medjax devices on the data axis (-1: one per core; 1: a single device)")
  p.add_argument("--torch_device", default="cpu", choices=("cpu", "cuda"),
                 help="where PyTorch runs; JAX runs on its default backend (a GPU when it has one)")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  features = tuple(int(f) for f in a.features.split(","))
  patch = tuple(int(s) for s in a.patch.split(","))
  if len(patch) != 3 or len(features) < 3:
    p.error("--patch needs 3 sizes and --features at least 3 stages (DynUNet's minimum)")

  rng = np.random.default_rng(a.seed)
  batch = rng.standard_normal((a.batch, *patch, 1), np.float32)
  labels = rng.integers(0, NUM_CLASSES, (a.batch, *patch)).astype(np.int32)
  jax_step, jax_params, devices = medjax_step(features, patch, batch, labels,
                                              a.deep_supervision, a.mesh_devices)
  th_step, th_params, _ = torch_step(features, batch, labels, a.deep_supervision,
                                     a.torch_device)
  print(f"parameters: medjax {jax_params:,}  DynUNet {th_params:,}"
        + ("" if jax_params == th_params else
           f"  (differ by {th_params - jax_params:+,}: DynUNet's blocks differ from medjax's)"))

  t = time.perf_counter()
  for _ in range(a.warmup):
    jax_loss = jax_step()
  print(f"medjax warm-up (compile included): {time.perf_counter() - t:.1f} s")
  for _ in range(a.warmup):
    th_loss = th_step()
  times = {"medjax": [], "torch": []}
  for _ in range(a.steps):
    for name, step in (("medjax", jax_step), ("torch", th_step)):
      t = time.perf_counter()
      loss = step()
      times[name].append(time.perf_counter() - t)
      if not math.isfinite(loss):
        raise FloatingPointError(f"{name} loss is {loss}")
      jax_loss, th_loss = (loss, th_loss) if name == "medjax" else (jax_loss, loss)

  jax_s, th_s = statistics.median(times["medjax"]), statistics.median(times["torch"])
  voxels = a.batch * math.prod(patch)
  print(json.dumps({
      "features": list(features), "patch": list(patch), "batch": a.batch,
      "deep_supervision": a.deep_supervision, "steps": a.steps, "cores": os.cpu_count(),
      "malloc_kept": MALLOC_KEPT, "jax_backend": jax.default_backend(),
      "torch_device": a.torch_device,
      "medjax_devices": devices, "params_medjax": jax_params, "params_monai": th_params,
      "medjax_s_per_step": round(jax_s, 4), "monai_s_per_step": round(th_s, 4),
      "medjax_voxels_per_s": round(voxels / jax_s), "monai_voxels_per_s": round(voxels / th_s),
      "medjax_last_loss": round(jax_loss, 4), "monai_last_loss": round(th_loss, 4),
      "ratio_torch_over_medjax_time": round(th_s / jax_s, 3)}))


if __name__ == "__main__":
  main()
