r"""Exports a trained model's embeddings, one row per case, for use outside medjax.

  python -m medjax.infer.features --workdir runs/adrenal_lstm --split train,val --out feats

For each split, ``<out>/<split>.npy`` holds the embeddings ``[N, F]`` (float32, rows in the
split's case order) and ``<out>/<split>.csv`` the same rows as ``index, label, f0 … f{F-1}``
(``index`` is the case's position in the split file, so rows join back to the data), plus
``<out>/features.json`` describing the run, checkpoint and columns. Plain NumPy and CSV: what
scikit-learn, pandas, R or a radiomics table reads without medjax.

The embedding is what each model sows as ``intermediates/embedding``: the pooled features before
the head (ResNet 2-D/3-D, the slice-sequence models' pooled state, the 2.5-D ResNet). Prediction
is batched and jitted, with a progress bar.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np
from absl import app, flags, logging

from medjax.infer.trained import TrainedModel
from medjax.io.errors import exit_on_users_error


def export_features(workdir: str, splits: list[str], out: str, *, step: int | None = None,
                    batch_size: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Writes each split's embeddings to ``out`` (see the module docstring); returns the metadata.

  Raises:
    ValueError: the run's model sows no embedding.
  """
  trained = TrainedModel.load(workdir, step)
  os.makedirs(out, exist_ok=True)
  meta: dict[str, Any] = {"workdir": trained.workdir, "step": trained.step,
                          "model": trained.config.model.name, "data": trained.config.data.name,
                          "class_names": list(trained.class_names), "splits": {}}
  for split in splits:
    pred = trained.predict(trained.source(split), batch_size=batch_size, progress=progress)
    if "embedding" not in pred:
      raise ValueError(f"{trained.workdir}: model {trained.config.model.name!r} sows no "
                       "'embedding' intermediate, so it has no features to export")
    emb = pred["embedding"].astype(np.float32)
    labels = pred["label"].reshape(len(emb), -1)
    np.save(os.path.join(out, f"{split}.npy"), emb)
    with open(os.path.join(out, f"{split}.csv"), "w", newline="") as f:
      w = csv.writer(f)
      label_cols = ["label"] if labels.shape[1] == 1 else [f"label_{n}" for n in
                                                            trained.class_names]
      w.writerow(["index", *label_cols, *(f"f{i}" for i in range(emb.shape[1]))])
      for i, y, e in zip(pred["index"], labels, emb):
        w.writerow([int(i), *(int(v) for v in y), *(f"{v:.7g}" for v in e)])
    meta["splits"][split] = {"cases": int(len(emb)), "dim": int(emb.shape[1]),
                             "npy": f"{split}.npy", "csv": f"{split}.csv"}
  with open(os.path.join(out, "features.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


@exit_on_users_error
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax reports every read at INFO
  args = flags.FLAGS
  splits = [s for s in args.split.split(",") if s]
  meta = export_features(args.workdir, splits, args.out, step=args.step,
                         batch_size=args.batch_size)
  for split, m in meta["splits"].items():
    print(f"{split}: {m['cases']} × {m['dim']} → {os.path.join(args.out, m['npy'])}, {m['csv']}")


if __name__ == "__main__":  # flags defined here only, so importing the module defines none
  from medjax import host

  host.keep_freed_memory()  # before JAX starts (see medjax/host.py)
  flags.DEFINE_string("workdir", None, "a finished medjax run", required=True)
  flags.DEFINE_string("split", "val", "comma-separated splits, e.g. train,val")
  flags.DEFINE_string("out", None, "output folder", required=True)
  flags.DEFINE_integer("step", None, "checkpoint step (default: best on validation)")
  flags.DEFINE_integer("batch_size", None, "default: the run's eval batch size")
  app.run(main)
