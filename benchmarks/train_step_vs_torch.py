r"""Train-step throughput of ResNet-18 on 28² images: medjax vs PyTorch + MONAI, same process.

Also measures the Grain input pipeline (real PneumoniaMNIST, the config's train transforms) in
batches/s against the rate at which the train step consumes them.

  pip install -e ".[bench]"   # torch (2.13 CPU here) and monai
  MEDJAX_DATA_DIR=../shared/data python benchmarks/train_step_vs_torch.py [--batch 128 --steps 10]

Both frameworks use every core: PyTorch with ``torch.set_num_threads(os.cpu_count())``, JAX with
one host device per core (as ``launch.py`` sets up) and the batch split over them. Prints one JSON
line with both rates and the ratios; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
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


def medjax_resnet_step(batch_size: int, spatial: tuple[int, ...], model_name: str,
                       mesh_devices: int, **model_kwargs):
  """The loop's own train step for registered ``model_name`` (built with ``model_kwargs``) on a
  fixed random ``[batch, *spatial, 1]`` batch: a callable that runs one step and returns the
  loss (fetched, as the loop does every step)."""
  from configs import common
  from medjax import registry
  from medjax.train import loop, optim, sharding, tasks
  from medjax.train.state import TrainState

  cfg = common.get_base_config()
  mesh = sharding.make_mesh(mesh_devices)
  model = registry.lookup(f"models.{model_name}")(num_classes=2, **model_kwargs)
  tx = optim.make_optimizer(cfg.optim, 1000)
  repl, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)

  def init():
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *spatial, 1)), train=False)
    return TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                      batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]),
                      rng=jax.random.PRNGKey(1), ema={}, apply_fn=model.apply, tx=tx)

  state = jax.jit(init, out_shardings=repl)()
  train_step = jax.jit(loop.make_train_step(tasks.classification()), in_shardings=(repl, data),
                       out_shardings=(repl, repl), donate_argnums=0)
  rng = np.random.default_rng(0)
  batch = sharding.to_global({
      "image": rng.standard_normal((batch_size, *spatial, 1), np.float32),
      "label": rng.integers(0, 2, batch_size)}, mesh)

  def step() -> float:
    nonlocal state
    state, out = train_step(state, batch)
    return float(out["loss"])

  return step


def time_medjax(batch_size: int, steps: int, spatial: tuple[int, ...], model_name: str,
                mesh_devices: int, stem_stride: int | None = 1, **model_kwargs) -> float:
  """Images/s of `medjax_resnet_step` (``stem_stride`` passed to the model unless None)."""
  if stem_stride is not None:
    model_kwargs["stem_stride"] = stem_stride
  step = medjax_resnet_step(batch_size, spatial, model_name, mesh_devices, **model_kwargs)
  for _ in range(2):  # compile + warm-up, each step waited for as in the timed loop
    step()
  t = time.perf_counter()
  for _ in range(steps):
    step()
  return batch_size * steps / (time.perf_counter() - t)


def time_torch(batch_size: int, steps: int, spatial: tuple[int, ...],
               stem_stride: int = 1, device: str = "cpu") -> float:
  import torch
  from monai.networks.nets import resnet18
  from unet_step_vs_monai import torch_device

  dev = torch_device(device)
  model = resnet18(spatial_dims=len(spatial), n_input_channels=1, num_classes=2,
                   conv1_t_size=3, conv1_t_stride=stem_stride, no_max_pool=True).to(dev)
  x = torch.randn(batch_size, 1, *spatial, device=dev)
  y = torch.randint(0, 2, (batch_size,), device=dev)
  return torch_images_per_s(model, x, y, steps)


def torch_images_per_s(model, x, y, steps: int) -> float:
  """Inputs/s of ``model``'s AdamW + cross-entropy train step on ``(x, y)``, after 2 warm-ups."""
  import torch

  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()

  for _ in range(2):
    step()
  t = time.perf_counter()
  for _ in range(steps):
    step()
  return len(x) * steps / (time.perf_counter() - t)


def time_pipeline(batch_size: int, batches: int, workers: int | None) -> tuple[float, int]:
  """``(batches/s, workers)`` of the PneumoniaMNIST config's train stream; ``workers=None``
  resolves its ``data.workers`` for this backend, as the training loop does."""
  from configs import pneumoniamnist_resnet18
  from medjax.data import pipeline, sources, transforms

  cfg = pneumoniamnist_resnet18.get_config()
  if workers is None:
    workers = pipeline.resolve_workers(cfg.data.workers, jax.default_backend())
  src, _ = sources.medmnist_source("pneumoniamnist", "train")
  it = iter(pipeline.train_dataset(src, transforms.parse(cfg.data.train_transforms),
                                   global_batch_size=batch_size, seed=0,
                                   num_threads=cfg.data.num_threads,
                                   prefetch=cfg.data.prefetch, workers=workers))
  next(it)  # starts the threads and worker processes
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches / (time.perf_counter() - t)
  it.close()
  return rate, workers


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--size", type=int, default=28)
  p.add_argument("--dims", type=int, default=2, choices=(2, 3))
  p.add_argument("--mesh_devices", type=int, default=-1,
                 help="devices on the data axis (-1: one per core; 1: the single-device baseline)")
  p.add_argument("--stem_stride", type=int, default=1)
  p.add_argument("--skip_pipeline", action="store_true")
  p.add_argument("--pipeline_workers", type=int, default=None,
                 help="Grain worker processes (default: the config's data.workers, resolved for "
                      "this backend as in training)")
  p.add_argument("--torch_device", default="cpu", choices=("cpu", "cuda"),
                 help="where PyTorch runs; JAX runs on its default backend (a GPU when it has one)")
  a = p.parse_args()
  spatial = (a.size,) * a.dims
  jax_ips = time_medjax(a.batch, a.steps, spatial, "resnet18", a.mesh_devices, a.stem_stride)
  torch_ips = time_torch(a.batch, a.steps, spatial, a.stem_stride, a.torch_device)
  result = {"shape": list(spatial), "batch": a.batch, "stem_stride": a.stem_stride,
            "cores": os.cpu_count(), "malloc_kept": MALLOC_KEPT,
            "jax_backend": jax.default_backend(),
            "torch_device": a.torch_device, "mesh_devices": a.mesh_devices if a.mesh_devices > 0 else
            jax.device_count(), "medjax_images_per_s": round(jax_ips, 1),
            "torch_monai_images_per_s": round(torch_ips, 1),
            "ratio_medjax_over_torch": round(jax_ips / torch_ips, 3)}
  if not a.skip_pipeline and a.dims == 2 and a.size == 28:
    bps, workers = time_pipeline(a.batch, max(4 * a.steps, 100), a.pipeline_workers)
    result["pipeline_workers"] = workers
    result["pipeline_batches_per_s"] = round(bps, 2)
    result["pipeline_over_step_consumption"] = round(bps / (jax_ips / a.batch), 2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
