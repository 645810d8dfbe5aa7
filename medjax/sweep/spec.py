"""A sweep's spec: ``get_sweep()`` expanded into named members, each checked against the config
and turned into launch.py flags, before anything runs."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import random
import re
import warnings
from typing import Any, Iterator, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from medjax.train import runs

Overrides = dict[str, Any]

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")  # characters kept in a member's folder name
_MAX_NAME = 100


class SweepError(ValueError):
  """A sweep that cannot run as declared (spec, keys, values, workers); raised before any member
  starts."""


def load_spec(config_arg: str) -> Any:
  """``get_sweep(arg)`` from the config file in ``config_arg`` (``path.py`` or ``path.py:arg``,
  as given to ``--config``)."""
  path, *arg = config_arg.split(":", 1)
  spec = importlib.util.spec_from_file_location("medjax_sweep_config", path)
  if spec is None or not os.path.exists(path):
    raise SweepError(f"{path}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path} has no get_sweep(); --sweep needs one beside get_config() "
                     "(formats: medjax/sweep/__init__.py)")
  return module.get_sweep(*arg)


def split_slurm(spec: Any) -> tuple[Any, dict[str, Any]]:
  """``spec`` without its ``"slurm"`` entry, and that entry: the sbatch settings of a dict spec
  (grid or method) for ``--sweep_backend=slurm`` (`medjax.sweep.slurm.SlurmSettings`)."""
  if isinstance(spec, dict) and "slurm" in spec:
    spec = dict(spec)
    return spec, spec.pop("slurm")
  return spec, {}


def expand(spec: Any) -> list[Overrides]:
  """The members of a sweep spec (grid, random search or list; see the module docstring).

  Returns:
    One ``{dotted key: value}`` dict per member, in a fixed order.
  """
  if isinstance(spec, (list, tuple)):
    if not all(isinstance(m, dict) for m in spec):
      raise SweepError("a sweep given as a list must hold one {key: value} dict per member")
    members = [dict(m) for m in spec]
  elif isinstance(spec, dict) and "method" in spec:
    extra = set(spec) - {"method", "count", "seed", "space"}
    if extra:
      raise SweepError(f"unknown sweep fields {sorted(extra)}; a sweep with a method has "
                       "'method', 'space' and, for random, 'count' and 'seed'")
    space = spec.get("space")
    if spec["method"] == "grid":
      members = _grid(space)
    elif spec["method"] == "random":
      members = _random(space, spec.get("count"), spec.get("seed", 0))
    else:
      raise SweepError(f"unknown sweep method {spec['method']!r}; use 'grid' or 'random'")
  elif isinstance(spec, dict):
    members = _grid(spec)
  else:
    raise SweepError(f"get_sweep() returned a {type(spec).__name__}; expected a dict (grid or "
                     "random search) or a list of override dicts")
  if not members:
    raise SweepError("the sweep has no members")
  for m in members:
    for k in m:
      if not isinstance(k, str) or not k:
        raise SweepError(f"sweep keys are dotted config paths like 'optim.lr'; got {k!r}")
  return [{k: _plain(v) for k, v in m.items()} for m in members]


def _grid(space: Any) -> list[Overrides]:
  if not isinstance(space, dict) or not space:
    raise SweepError("a grid sweep maps config keys to lists of values, e.g. "
                     "{'optim.lr': [1e-3, 3e-3]}")
  axes = []
  for key, values in space.items():
    values = values.tolist() if hasattr(values, "tolist") else values  # numpy arrays
    values = values if isinstance(values, list) else [values]
    if not values:
      raise SweepError(f"sweep key {key!r} has an empty list of values")
    axes.append(values)
  return [dict(zip(space, combo)) for combo in itertools.product(*axes)]


def _random(space: Any, count: Any, seed: Any) -> list[Overrides]:
  if not isinstance(space, dict) or not space:
    raise SweepError("a random sweep needs a 'space': {key: distribution}")
  if not isinstance(count, int) or count < 1:
    raise SweepError(f"a random sweep needs 'count' >= 1, got {count!r}")
  rng = random.Random(seed)  # the stdlib generator: its stream is stable across versions
  return [{k: _draw(k, d, rng) for k, d in space.items()} for _ in range(count)]


def _draw(key: str, dist: Any, rng: random.Random) -> Any:
  if isinstance(dist, list):
    dist = ("choice", dist)
  if not (isinstance(dist, tuple) and dist and isinstance(dist[0], str)):
    return dist  # a fixed value
  name, *args = dist
  if name == "choice" and len(args) == 1 and len(args[0]) > 0:
    return rng.choice(list(args[0]))
  if name in ("uniform", "loguniform", "randint") and len(args) == 2:
    lo, hi = args
    if name == "randint" and isinstance(lo, int) and isinstance(hi, int) and lo <= hi:
      return rng.randint(lo, hi)
    if name == "uniform" and lo <= hi:
      return _round(rng.uniform(lo, hi))
    if name == "loguniform" and 0 < lo <= hi:
      return _round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
  raise SweepError(f"sweep key {key!r}: {dist!r} is not a distribution; use ('choice', [values])"
                   ", ('uniform', lo, hi), ('loguniform', lo, hi) with 0 < lo <= hi, or "
                   "('randint', lo, hi) with ints (a fixed tuple value goes in a choice)")


def _round(x: float) -> float:
  return float(f"{x:.3g}")


def _plain(v: Any) -> Any:
  """numpy scalars as Python ones: their repr (``np.float64(0.1)``) is no command-line value."""
  if not isinstance(v, (str, bytes)) and hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
    return v.item()
  return v


def member_names(members: Sequence[Overrides]) -> list[str]:
  """Stable folder names, e.g. ``m00_lr=0.001_wd=0.0001``: the index keeps them unique, and the
  values are there for people. The names depend only on the members, so a re-run finds the same
  folders."""
  keys = list(dict.fromkeys(k for m in members for k in m))
  short = {k: _initials(k.rsplit(".", 1)[-1]) for k in keys}
  counts = {s: list(short.values()).count(s) for s in short.values()}
  short = {k: (k if counts[s] > 1 else s) for k, s in short.items()}
  width = max(2, len(str(len(members) - 1)))
  names = []
  for i, m in enumerate(members):
    parts = [f"m{i:0{width}d}"] + [f"{short[k]}={_format(v)}" for k, v in m.items()]
    names.append(_UNSAFE.sub("-", "_".join(parts))[:_MAX_NAME])
  return names


def _initials(word: str) -> str:
  parts = [p for p in word.split("_") if p]
  return "".join(p[0] for p in parts) if len(parts) > 1 else word


def _format(v: Any) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------
# Members → checked configs and launch flags.
# ---------------------------------------------------------------------------------------------

def override_flags(overrides: Overrides) -> list[str]:
  """``--config.<key>=<value>`` flags that launch.py parses back into exactly ``overrides``."""
  out = []
  for k, v in overrides.items():
    if isinstance(v, ml_collections.ConfigDict):
      v = v.to_dict()
    out.append(f"--config.{k}={v if isinstance(v, str) else repr(v)}")
  return out


def parse_config(config_arg: str, flag_list: Sequence[str]) -> ml_collections.ConfigDict:
  """The locked config that ``launch.py --config <config_arg> <flag_list>`` would train."""
  argv = ["launch.py", f"--config={config_arg}", *flag_list]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True,
                                           sys_argv=argv)
  with warnings.catch_warnings():  # ml_collections loads the file with the old load_module()
    warnings.simplefilter("ignore", DeprecationWarning)
    values(argv)
  return holder.value


def check_members(config_arg: str, base: Overrides, members: Sequence[Overrides],
                  names: Sequence[str]) -> list[ml_collections.ConfigDict]:
  """Parses every member's config as its launch.py will, before anything runs.

  Args:
    config_arg: the ``--config`` value (``path.py`` or ``path.py:arg``).
    base: the sweep command's own ``--config.*`` overrides, applied to every member.
    members: the members' overrides.
    names: the members' names, for messages.

  Returns:
    Each member's config.

  Raises:
    SweepError: naming the key of an unknown key, a value of the wrong type, or a key both swept
      and set on the command line.
  """
  base_config = parse_config(config_arg, override_flags(base))
  for m, name in zip(members, names):
    for key in m:
      if key in base:
        raise SweepError(f"{key} is swept and also set by --config.{key}; drop one of them")
      if not _has_key(base_config, key):
        close = difflib.get_close_matches(key, list(_flat_keys(base_config)), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SweepError(f"sweep key {key!r} (member {name}) is not in the config of "
                         f"{config_arg}{hint}")
  configs = []
  for m, name in zip(members, names):
    try:
      c = parse_config(config_arg, override_flags(base) + override_flags(m))
    except (flags.Error, TypeError, ValueError, KeyError, AttributeError) as e:
      raise SweepError(f"member {name}: {e}") from None
    for key, want in m.items():
      got = _get(c, key)
      got = got.to_dict() if isinstance(got, ml_collections.ConfigDict) else got
      if got != want or isinstance(got, bool) != isinstance(want, bool):
        raise SweepError(f"sweep key {key!r} (member {name}): {want!r} reaches the config as "
                         f"{got!r}; give a value of the field's type")
    configs.append(c)
  return configs


def _has_key(config: ml_collections.ConfigDict, key: str) -> bool:
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
  for k in config:
    v = config[k]
    yield prefix + k
    if isinstance(v, ml_collections.ConfigDict):
      yield from _flat_keys(v, f"{prefix}{k}.")


@dataclasses.dataclass
class Member:
  """One sweep member: its overrides, its run folder, and what became of it."""
  index: int
  name: str
  overrides: Overrides
  workdir: str
  config: dict[str, Any]  # the config.json its run writes
  status: str = "pending"  # pending | running | done | failed | stopped
  error: str = ""

  def finished(self) -> bool:
    """Whether its run ended (`runs.is_finished`) with this member's config."""
    try:
      with open(os.path.join(self.workdir, "config.json")) as f:
        saved = json.load(f)
    except (OSError, ValueError):
      return False
    return saved == self.config and runs.is_finished(self.workdir, saved)
