"""Cross-validation folds: nnU-Net's seeded k-fold split of a dataset's cases, written once; and
the hold-out cases a config keeps out of every fold."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

from sklearn.model_selection import KFold

from medjax.io.atomic import atomic_write_json
from medjax.io.errors import MedjaxIOError
from medjax.io.msd import MSDDataset


def hash_holdout(case_ids: Sequence[str], count: int) -> list[str]:
  """``count`` cases chosen by a fixed hash of their ids (the lowest SHA-1 hex digests), sorted.

  The choice depends on the ids alone, not on their order or on any seed, so a config can write
  the list out and anyone can check it (``data.holdout``).
  """
  ids = sorted(set(case_ids))
  if not 0 <= count <= len(ids):
    raise ValueError(f"cannot hold out {count} of {len(ids)} cases")
  return sorted(sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())[:count])


def without_holdout(dataset: MSDDataset, holdout: Sequence[str]) -> MSDDataset:
  """``dataset`` without the ``holdout`` cases: neither planned, preprocessed nor in any fold.

  Raises:
    ValueError: a hold-out id that is not a case of the dataset (``data.holdout``).
  """
  holdout = set(holdout or ())
  if not holdout:
    return dataset
  unknown = sorted(holdout - {c.case_id for c in dataset.cases})
  if unknown:
    raise ValueError(f"data.holdout: {', '.join(unknown[:5])} not among the cases of "
                     f"{dataset.root}")
  return dataclasses.replace(dataset, cases=tuple(c for c in dataset.cases
                                                  if c.case_id not in holdout))


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
