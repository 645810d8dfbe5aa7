"""Fine-tuning: a run that starts from another run's weights (``config.init_from``).

Modelled on big_vision's ``config.model_init`` and ``model_load = dict(dont_load=[...])``: the
source is a run folder (its best checkpoint, else its latest) or one checkpoint folder
(``<run>/checkpoints/<step>``), read without writing anything there. Parameters and BatchNorm
statistics are matched by their '/'-joined paths (``enc0_0/Conv_0/kernel``); regexes
(``re.search``) over those paths name the ones to keep freshly initialised (``init_skip``, e.g.
a head whose class count differs) and, in the optimiser, the ones to freeze (``optim.freeze``,
`freeze_labels`). ``init_subtree`` / ``init_from_subtree`` load one part of the model from one
part of the source: a slice-sequence model's ``encoder`` from a 2-D ResNet run's root, say.

Only a run's first start reads the source: a resumed run restores its own checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

from medjax.io.errors import MedjaxIOError
from medjax.train.checkpoint import load_variables

# The variable collections a source fills: the weights and the BatchNorm statistics.
COLLECTIONS = ("params", "batch_stats")


class InitMismatchError(ValueError):
  """The source's parameters do not fit the model; names every one that does not."""

  users_error = True  # one line, exit 2 (medjax.io.errors.is_users_error)


def has_checkpoint(workdir: str) -> bool:
  """Whether ``workdir`` holds a saved step, so that the run resumes instead of initialising."""
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def read_source(path: str) -> tuple[dict[str, Any], str]:
  """``(variables, where)``: the evaluated variables (the EMA's when the run kept one) of the run
  folder or checkpoint folder ``path``, and ``"<checkpoints>/<step>"`` as read.

  Raises:
    MedjaxIOError: ``path`` is neither, or holds no checkpoint.
  """
  path = os.path.abspath(os.path.expanduser(path))
  best_metric, step = "auc", None  # a checkpoint folder names its step: no metric is read
  if os.path.isfile(os.path.join(path, "config.json")):
    directory = os.path.join(path, "checkpoints")
    try:
      with open(os.path.join(path, "config.json")) as f:
        best_metric = json.load(f)["eval"]["best_metric"]
    except (OSError, ValueError, KeyError) as e:
      raise MedjaxIOError(os.path.join(path, "config.json"),
                          f"init_from: not a readable run config ({e})") from None
  elif os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
    directory, step = os.path.dirname(path), int(os.path.basename(path))
  else:
    raise MedjaxIOError(path, "init_from: not a medjax run folder (config.json, checkpoints/) "
                        "nor one of its checkpoints (checkpoints/<step>)")
  variables, step = load_variables(directory, best_metric, step, what="init_from: ")
  return jax.device_get(variables), os.path.join(directory, str(step))


def _flat(tree: Any) -> dict[str, Any]:
  return traverse_util.flatten_dict(dict(tree or {}), sep="/")


def _under(path: str, subtree: str) -> str | None:
  """``path`` relative to ``subtree`` ('' for the whole model), or None outside it."""
  if not subtree:
    return path
  return path[len(subtree) + 1:] if path.startswith(subtree + "/") else None


def check_patterns(params: Any, patterns: Sequence[str], setting: str) -> None:
  """Every regex of ``patterns`` matches a parameter path: a typo would skip or freeze nothing.

  Raises:
    ValueError: names the setting, the pattern and a few of the paths.
  """
  paths = list(_flat(params))
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{setting}: {pattern!r} is not a regular expression ({e})") from None
    if not any(regex.search(p) for p in paths):
      raise ValueError(f"{setting}: {pattern!r} matches no parameter of the model (its paths "
                       f"look like {', '.join(paths[:4])}, ...)")


def select(target: dict[str, Any], source: dict[str, Any], where: str, skip: Sequence[str] = (),
           subtree: str = "", from_subtree: str = "") -> dict[str, dict[str, np.ndarray]]:
  """The source arrays that initialise ``target``'s variables: ``{collection: {path: array}}``.

  Args:
    target: the model's ``{"params", "batch_stats"}`` (arrays or shapes: only shapes are read).
    source: the source's variables (`read_source`).
    where: the source, for messages.
    skip: regexes over the target's paths (without the collection) left as initialised.
    subtree: the part of the model to load ('' the whole); the rest is left as initialised.
    from_subtree: the part of the source it is read from ('' the whole).

  Raises:
    InitMismatchError: a variable to load is missing in the source or has another shape; every
      such variable is named, with both shapes.
    ValueError: a ``skip`` pattern matches nothing, or nothing at all would be loaded.
  """
  check_patterns(target.get("params"), skip, "init_skip")
  regexes = [re.compile(p) for p in skip]
  chosen: dict[str, dict[str, np.ndarray]] = {}
  problems = []
  for collection in COLLECTIONS:
    have = _flat(source.get(collection))
    chosen[collection] = {}
    for path, value in _flat(target.get(collection)).items():
      rest = _under(path, subtree)
      if rest is None or any(r.search(path) for r in regexes):
        continue
      from_path = f"{from_subtree}/{rest}" if from_subtree else rest
      if from_path not in have:
        problems.append(f"{collection}/{path}: not in the checkpoint"
                        + (f" (as {from_path})" if from_path != path else ""))
      elif tuple(have[from_path].shape) != tuple(value.shape):
        problems.append(f"{collection}/{path}: checkpoint {tuple(have[from_path].shape)}, "
                        f"model {tuple(value.shape)}")
      else:
        chosen[collection][path] = np.asarray(have[from_path], value.dtype)
  if problems:
    raise InitMismatchError(
        f"init_from={where}: {len(problems)} variables do not fit the model: "
        f"{'; '.join(problems)}. List them in init_skip (regexes over '/'-joined paths, e.g. "
        "'^head') to keep them freshly initialised")
  if not chosen["params"]:
    raise ValueError(f"init_from={where}: nothing to load (init_subtree={subtree!r} holds no "
                     "parameter, or init_skip skips them all)")
  return chosen


def start_from(state: Any, chosen: dict[str, dict[str, np.ndarray]],
               sharding: jax.sharding.Sharding) -> Any:
  """``state`` (a fresh `TrainState`) with the ``chosen`` variables put in (and in its EMA),
  placed with ``sharding``; the optimiser state is the fresh one's."""
  variables = jax.device_get({c: getattr(state, c) for c in COLLECTIONS})
  merged = {}
  for collection in COLLECTIONS:
    flat = {**_flat(variables[collection]), **chosen.get(collection, {})}
    merged[collection] = traverse_util.unflatten_dict(flat, sep="/") if flat else {}
  place = lambda tree: jax.tree.map(
      lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index]), tree)
  # The EMA gets buffers of its own: the train step donates the state, and a buffer may not be
  # donated twice.
  ema = place(merged) if state.ema_decay else state.ema
  merged = place(merged)
  return state.replace(params=merged["params"], batch_stats=merged["batch_stats"], ema=ema)


def freeze_labels(patterns: Sequence[str]):
  """``params -> labels`` for ``optax.multi_transform``: ``"frozen"`` where a regex of
  ``patterns`` matches the '/'-joined path, ``"train"`` elsewhere."""
  regexes = [re.compile(p) for p in patterns]

  def labels(params):
    return traverse_util.path_aware_map(
        lambda path, _: "frozen" if any(r.search("/".join(path)) for r in regexes) else "train",
        params)

  return labels
