"""Ensembles of segmentation runs: the folds of a cross-validation, or 2-D and 3-D configs.

`Ensemble` averages its members' softmax probabilities, each from its own sliding window and
mirroring, before the argmax, as nnU-Net ensembles folds and configurations. Members must
preprocess identically (`preprocessing_mismatch`): the probabilities are averaged on the one
preprocessed grid and restored to the input's grid once. Networks, patch sizes and 2-D/3-D may
differ.

`fold_runs` finds the runs of a cross-validation folder (one per fold, configs equal but for
`PER_FOLD_KEYS`: what ``launch.py --sweep`` makes of a ``get_sweep()`` over ``data.fold``);
`load_segmenter` turns what a user names (one run, several, a cross-validation folder, or the
configurations ``evaluate --choose`` chose) into a `Segmenter` or an `Ensemble` carrying the
post-processing decision to apply.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from medjax import planning
from medjax.infer.segment import Segmenter, match_channels, plan_channels
from medjax.infer.trained import read_run_config, read_run_plan
from medjax.io.errors import MedjaxIOError
from medjax.io.volume import Volume
from medjax.metrics import postprocessing as pp
from medjax.planning.preprocessing import preprocess, restore_geometry

# The plan keys that decide how an image is preprocessed and what the classes are: members of an
# ensemble must agree on all of them.
PREPROCESSING_KEYS = ("target_spacing", "normalization", "foreground_intensity", "channels",
                      "num_classes", "class_names", "separate_z_anisotropy", "ignore_label",
                      "regions")


def preprocessing_mismatch(plan: dict[str, Any], other: dict[str, Any]) -> list[str]:
  """``"key: a vs b"`` for each `PREPROCESSING_KEYS` entry where two plans differ."""
  return [f"{k}: {plan.get(k)} vs {other.get(k)}" for k in PREPROCESSING_KEYS
          if plan.get(k) != other.get(k)]


def check_same_preprocessing(workdirs: Sequence[str]) -> dict[str, Any]:
  """The first run's plan, after checking every run's plan preprocesses as it does.

  Raises:
    MedjaxIOError: names the first differing run's ``plan.json`` and the keys.
  """
  plans = [read_run_plan(w) for w in workdirs]
  for workdir, plan in zip(workdirs[1:], plans[1:]):
    diff = preprocessing_mismatch(plans[0], plan)
    if diff:
      raise MedjaxIOError(
          os.path.join(workdir, "plan.json"),
          f"preprocesses differently from {workdirs[0]} ({'; '.join(diff)}); an ensemble "
          "averages the probabilities of runs with the same spacing, normalisation, channels and "
          "classes")
  return plans[0]


# The config keys a cross-validation's folds may differ in: the fold, and the seed, so that each
# fold's network starts from its own initialisation (as nnU-Net's folds do; members that start
# alike agree more, and an ensemble of them corrects less).
PER_FOLD_KEYS = ("data.fold", "seed")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def fold_runs(folder: str) -> list[str]:
  """The runs of a cross-validation folder, in fold order.

  Its subfolders that hold a segmentation run (``config.json``) must be one config's folds: the
  configs equal but for `PER_FOLD_KEYS`, every fold ``0 .. data.folds - 1`` exactly once.

  Raises:
    MedjaxIOError: naming the folder or the run at fault.
  """
  folder = os.path.abspath(folder)
  if not os.path.isdir(folder):
    raise MedjaxIOError(folder, "no such folder")
  configs = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if os.path.isfile(os.path.join(path, "config.json")):
      config = read_run_config(path)
      if config.get("task") == "segmentation":
        configs[path] = config
  if not configs:
    raise MedjaxIOError(folder, "no segmentation runs in its subfolders: a cross-validation "
                        "folder holds one run per fold (launch.py --sweep over data.fold, or "
                        "launch.py --config.data.fold=k --workdir <folder>/fold<k>)")
  first_path, first = next(iter(configs.items()))
  base = {k: v for k, v in _flat(first).items() if k not in PER_FOLD_KEYS}
  by_fold: dict[int, str] = {}
  for path, config in configs.items():
    flat = {k: v for k, v in _flat(config).items() if k not in PER_FOLD_KEYS}
    diff = sorted(k for k in set(base) | set(flat) if base.get(k) != flat.get(k))
    if diff:
      raise MedjaxIOError(path, f"its config differs from {os.path.basename(first_path)}'s in "
                          f"{', '.join(diff[:6])}; a cross-validation folder holds the folds of "
                          "one config, differing only in data.fold and seed")
    fold = int(config["data"]["fold"])
    if fold in by_fold:
      raise MedjaxIOError(path, f"fold {fold} again (also {os.path.basename(by_fold[fold])})")
    by_fold[fold] = path
  folds = int(first["data"]["folds"])
  missing = sorted(set(range(folds)) - set(by_fold))
  if missing:
    raise MedjaxIOError(folder, f"fold(s) {', '.join(map(str, missing))} of {folds} missing "
                        f"(found {', '.join(map(str, sorted(by_fold)))})")
  return [by_fold[k] for k in range(folds)]


class Ensemble:
  """Segmentation runs whose probabilities (softmax, or sigmoid per region) are averaged; used
  as a `Segmenter` is.

  Attributes:
    members: one `Segmenter` per run.
    plan: the first member's plan (every member preprocesses as it says).
    postprocessing: a keep-largest-component decision for predict to apply, or None.
  """

  def __init__(self, workdirs: Sequence[str], batch_size: int = 4,
               postprocessing: dict[str, Any] | None = None):
    workdirs = [os.path.abspath(w) for w in workdirs]
    if not workdirs:
      raise ValueError("an ensemble needs at least one run")
    check_same_preprocessing(workdirs)  # before any checkpoint is read
    self.members = [Segmenter(w, batch_size=batch_size) for w in workdirs]
    self.plan = self.members[0].plan
    self.config = self.members[0].config
    self.postprocessing = postprocessing

  @property
  def workdirs(self) -> list[str]:
    return [m.workdir for m in self.members]

  @property
  def step(self) -> list[int]:
    """Each member's checkpoint step."""
    return [m.step for m in self.members]

  @property
  def channels(self) -> tuple[str, ...]:
    return plan_channels(self.plan)

  @property
  def trained_with_dropout(self) -> bool:
    """Zero-filling a channel needs every member trained with modality dropout."""
    return all(m.trained_with_dropout for m in self.members)

  def predict(self, image: Volume, mirror: bool = True, overlap: float = 0.5,
              channels: Sequence[str] | None = None, fill_missing: bool = False) -> Volume:
    """The members' mean class probabilities ``[i, j, k, K]`` on ``image``'s own grid;
    arguments as `Segmenter.predict`."""
    image = match_channels(image, self.channels, channels, fill_missing,
                           self.trained_with_dropout)
    canonical = image.to_canonical()
    array, _, props = preprocess(canonical, None, self.plan)
    total = None
    for member in self.members:
      probs = member.probabilities(array, mirror, overlap)
      total = probs if total is None else total + probs
    restored = restore_geometry(total / len(self.members), props,
                                regions=planning.plan_regions(self.plan) is not None)
    return Volume.from_affine(restored, canonical.affine).reoriented(image.affine)


# Written by ``python -m medjax.evaluate --choose`` (`medjax.evaluate.choice`): the configurations
# (cross-validation folders, relative to the file's folder) chosen on out-of-fold predictions.
CHOICE_FILENAME = "choice.json"


def read_choice(folder: str) -> list[str]:
  """The cross-validation folders a choice folder's ``choice.json`` names, as absolute paths.

  Raises:
    MedjaxIOError: not JSON, or without a list of ``configurations``.
  """
  path = os.path.join(folder, CHOICE_FILENAME)
  try:
    with open(path) as f:
      configurations = json.load(f).get("configurations")
  except (json.JSONDecodeError, AttributeError) as e:
    raise MedjaxIOError(path, f"not a choice written by medjax.evaluate --choose ({e})") from None
  if not isinstance(configurations, list) or not configurations or not all(
      isinstance(c, str) for c in configurations):
    raise MedjaxIOError(path, "'configurations' must be a list of cross-validation folders")
  return [os.path.normpath(os.path.join(os.path.abspath(folder), c)) for c in configurations]


def resolve_runs(workdirs: str | Sequence[str]) -> tuple[list[str], str | None]:
  """What a user named → (run folders, the ``postprocessing.json`` that goes with them).

  Each entry is a run (a folder with ``config.json``), a cross-validation folder, which stands
  for its folds (`fold_runs`), or a choice folder (``choice.json``, written by ``evaluate
  --choose``), which stands for the folds of the configurations it chose. The decision is the
  named folder's when exactly one cross-validation or choice folder was named.
  """
  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  runs, decisions = [], []
  for w in workdirs:
    if os.path.isfile(os.path.join(w, "config.json")):
      runs.append(os.path.abspath(w))
    elif os.path.isfile(os.path.join(w, CHOICE_FILENAME)):
      runs += [r for folder in read_choice(w) for r in fold_runs(folder)]
      decisions.append(os.path.join(w, pp.FILENAME))  # written with the choice
    elif not any(os.path.isfile(os.path.join(w, d, "config.json"))
                 for d in (os.listdir(w) if os.path.isdir(w) else ())):
      read_run_config(w)  # neither a run nor a folder of runs: the error every command gives
    else:
      runs += fold_runs(w)
      decision = pp.find_decision(w)
      if decision:
        decisions.append(decision)
  return runs, decisions[0] if len(decisions) == 1 and len(workdirs) == 1 else None


def load_segmenter(workdirs: str | Sequence[str], step: int | None = None, batch_size: int = 4,
                   postprocessing: str = "auto") -> Segmenter | Ensemble:
  """A `Segmenter` (one run) or an `Ensemble` (several, or a cross-validation folder).

  Args:
    workdirs: a run, several runs, or a cross-validation folder (`resolve_runs`).
    step: the checkpoint of a single run (default: its best).
    postprocessing: ``"auto"``: a named cross-validation folder's ``postprocessing.json`` if it
      has one; ``"none"``: no post-processing; else the path of a decision to apply.

  Raises:
    MedjaxIOError: a run or decision file that cannot be read, or runs that preprocess
      differently; ValueError: ``step`` with several runs.
  """
  runs, found = resolve_runs(workdirs)
  decision = None
  if postprocessing == "auto":
    decision = pp.read_decision(found) if found else None
  elif postprocessing != "none":
    decision = pp.read_decision(postprocessing)
  if len(runs) == 1:
    model = Segmenter(runs[0], step, batch_size)
    model.postprocessing = decision
    return model
  if step is not None:
    raise ValueError(f"step={step} picks one run's checkpoint; an ensemble of {len(runs)} runs "
                     "uses each run's best")
  return Ensemble(runs, batch_size, decision)


def labels_of(probabilities: Volume, plan: dict[str, Any],
              decision: dict[str, Any] | None = None) -> Volume:
  """The label map ``[i, j, k, 1]`` (uint8) of a run's output probabilities (the argmax, or the
  regions' order: `medjax.planning.label_map`), post-processed by ``decision``
  (`medjax.metrics.postprocessing.apply_postprocessing`)."""
  labels = planning.label_map(probabilities.array, plan)
  return probabilities.replace(array=pp.apply_postprocessing(labels, decision))
