r"""Train-step throughput of the slice-sequence model (per-slice CNN → bi-LSTM/GRU → attention)
in medjax vs the same network written in PyTorch, same process.

  pip install -e ".[bench]"
  python benchmarks/sequence_step_vs_torch.py [--cell lstm|gru --batch 32 --size 28 --steps 10
                                              --context 2]

The network is ``configs/adrenalmnist3d_lstm.py``'s default: every axial slice of a 28³ volume,
with ``--context`` neighbouring slices on each side as extra channels (zeros beyond the volume),
through ``small_cnn(features=(16, 32, 64))`` (per stage a stride-2 then a stride-1 3×3 conv, each
with batch norm and ReLU; the first stage stride 1), the slices' pooled features through a
bidirectional LSTM (or GRU) with 128 units per direction, tanh attention over slices, a linear
head. PyTorch builds the same layers from ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.LSTM``/``nn.GRU``
(its recurrent cells carry two bias vectors where flax's carry one, so parameter counts differ
slightly; both are printed). Both: AdamW, cross-entropy, random inputs and labels, every core
(``torch.set_num_threads``; JAX one host device per core, as ``launch.py`` sets up).
Prints one JSON line with volumes/s of each and the ratio; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from medjax import host  # noqa: E402

# As launch.py, before JAX or PyTorch starts. Freed memory is kept for the whole process, so for
# both frameworks (MEDJAX_KEEP_FREED_MEMORY=0: for neither); the JSON line says which.
MALLOC_KEPT = host.prepare()

import jax  # noqa: E402
from train_step_vs_torch import time_medjax, torch_images_per_s  # noqa: E402

FEATURES = (16, 32, 64)
HIDDEN = 128


def torch_model(cell: str, context: int):
  import torch
  from torch import nn

  class SliceRNN(nn.Module):
    def __init__(self):
      super().__init__()
      layers, c_in = [], 2 * context + 1
      for i, f in enumerate(FEATURES):
        for stride in ((1 if i == 0 else 2), 1):
          layers += [nn.Conv2d(c_in, f, 3, stride, 1, bias=False), nn.BatchNorm2d(f),
                     nn.ReLU(inplace=True)]
          c_in = f
      self.encoder = nn.Sequential(*layers)
      rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
      self.rnn = rnn(FEATURES[-1], HIDDEN, batch_first=True, bidirectional=True)
      self.attention_hidden = nn.Linear(2 * HIDDEN, HIDDEN)
      self.attention_score = nn.Linear(HIDDEN, 1, bias=False)  # as medjax: softmax ignores it
      self.head = nn.Linear(2 * HIDDEN, 2)

    def forward(self, x):  # [B, T, H, W]
      b, t = x.shape[:2]
      padded = nn.functional.pad(x, (0, 0, 0, 0, context, context))
      slabs = torch.stack([padded[:, k:k + t] for k in range(2 * context + 1)], dim=2)
      f = self.encoder(slabs.reshape(b * t, 2 * context + 1, *x.shape[2:]))
      f = f.mean(dim=(2, 3)).reshape(b, t, -1)
      h, _ = self.rnn(f)
      w = torch.softmax(self.attention_score(torch.tanh(self.attention_hidden(h)))[..., 0], -1)
      return self.head(torch.einsum("bt,btf->bf", w, h))

  return SliceRNN()


def time_torch(cell: str, batch_size: int, steps: int, size: int,
               context: int) -> tuple[float, int]:
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  model = torch_model(cell, context)
  x = torch.randn(batch_size, size, size, size)
  y = torch.randint(0, 2, (batch_size,))
  return torch_images_per_s(model, x, y, steps), sum(p.numel() for p in model.parameters())


def medjax_params(cell: str, size: int, context: int) -> int:
  import jax.numpy as jnp

  from medjax import registry

  model = registry.lookup(f"models.slice_{cell}")(
      num_classes=2, encoder=f"small_cnn(features={FEATURES})", hidden=HIDDEN, context=context)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, size, size, size, 1)), train=False))
  return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cell", default="lstm", choices=("lstm", "gru"))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=28)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--context", type=int, default=2)
  p.add_argument("--mesh_devices", type=int, default=-1)
  a = p.parse_args()
  jax_vps = time_medjax(a.batch, a.steps, (a.size,) * 3, f"slice_{a.cell}", a.mesh_devices,
                        stem_stride=None, encoder=f"small_cnn(features={FEATURES})",
                        hidden=HIDDEN, context=a.context)
  torch_vps, torch_params = time_torch(a.cell, a.batch, a.steps, a.size, a.context)
  print(json.dumps({
      "cell": a.cell, "context": a.context, "volume": [a.size] * 3, "batch": a.batch,
      "cores": os.cpu_count(), "malloc_kept": MALLOC_KEPT, "jax_backend": jax.default_backend(),
      "params_medjax": medjax_params(a.cell, a.size, a.context),
      "params_torch": torch_params, "medjax_volumes_per_s": round(jax_vps, 2),
      "torch_volumes_per_s": round(torch_vps, 2),
      "ratio_medjax_over_torch": round(jax_vps / torch_vps, 3)}))


if __name__ == "__main__":
  main()
