"""Cross-validation folds: nnU-Net's seeded k-fold split of a dataset's cases, written once."""

from __future__ import annotations

import json
import os
from typing import Sequence

from sklearn.model_selection import KFold

from medjax.io.atomic import atomic_write_json
from medjax.io.errors import MedjaxIOError


def make_folds(case_ids: Sequence[str], path: str, folds: int = 5, seed: int = 12345
               ) -> list[dict[str, list[str]]]:
  """The k-fold split (nnU-Net's: sorted ids, shuffled KFold with seed 12345), written once.

  An existing file is reused as it is, so every later run and fold sees the same split; it must
  cover exactly ``case_ids``.
  """
  ids = sorted(case_ids)
  if os.path.exists(path):
    with open(path) as f:
      splits = json.load(f)
    covered = sorted(i for s in splits for i in s["val"])
    if covered != ids:
      raise MedjaxIOError(path, "the split file does not cover this dataset's cases; delete it "
                          "to make a new one")
    return splits
  kfold = KFold(n_splits=folds, shuffle=True, random_state=seed)
  splits = [{"train": [ids[i] for i in tr], "val": [ids[i] for i in va]}
            for tr, va in kfold.split(ids)]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_write_json(path, splits, indent=1)
  return splits
