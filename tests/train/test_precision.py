"""``train.precision="bf16"``: the PneumoniaMNIST and Hippocampus ``runlocal`` configs train in
bfloat16 with float32 weights, agree with float32 to bf16 precision and resume exactly."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import computed_once, write_msd, write_synthetic_medmnist
from helpers import config, final_params, seg_config

from medjax.train import loop

STEPS = 4


def _config(kind, data, precision):
  if kind == "classification":
    c = config(data, steps=STEPS)
  else:
    c = seg_config(data, steps=STEPS, **{"eval.every_steps": 2})
  c.train.precision = precision
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps, c.train.keep_checkpoints = 1, 10
  return c


def _runs(tmp_path_factory, kind):
  """Workdirs of the float32 and the bf16 run of ``kind``'s config, trained once."""

  def train(root):
    if kind == "classification":
      data = write_synthetic_medmnist(os.path.join(root, "data"))
    else:
      data = write_msd(os.path.join(root, "msd"), n=6)
    out = {}
    for precision in ("float32", "bf16"):
      out[precision] = os.path.join(root, precision)
      loop.train_and_evaluate(_config(kind, data, precision), out[precision])
    return data, out

  return computed_once(tmp_path_factory, f"precision_{kind}", train)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_bf16_losses_agree_with_float32_on_the_first_steps(tmp_path_factory, kind):
  _, runs = _runs(tmp_path_factory, kind)
  f32, bf16 = _losses(runs["float32"]), _losses(runs["bf16"])
  assert len(f32) == len(bf16) == STEPS
  # bf16 keeps 8 significant bits (relative rounding 2^-9); a loss sums many rounded terms and the
  # weights drift apart step by step, so within 2^-7 on the first steps.
  np.testing.assert_allclose(bf16[:3], f32[:3], rtol=1e-2)
  assert bf16 != f32, "bf16 computed exactly what float32 did: the precision was not applied"


@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_bf16_checkpoints_stay_float32_and_resume_exactly(tmp_path_factory, tmp_path, kind):
  data, runs = _runs(tmp_path_factory, kind)
  done = final_params(runs["bf16"])
  dtypes = {a.dtype for a in jax.tree.leaves((done["params"], done["opt_state"], done["ema"]))
            if jnp.issubdtype(a.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  # The run as if killed after step 2: its workdir less the later checkpoints and the marker.
  cut = str(tmp_path / "cut")
  shutil.copytree(runs["bf16"], cut)
  for step in range(3, STEPS + 1):
    shutil.rmtree(os.path.join(cut, "checkpoints", str(step)))
  os.remove(os.path.join(cut, "summary.json"))
  loop.train_and_evaluate(_config(kind, data, "bf16"), cut)
  resumed = final_params(cut)
  assert int(resumed["step"]) == STEPS
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), resumed["params"],
                       done["params"])
  assert max(jax.tree.leaves(diffs)) == 0.0


def test_a_run_saved_before_these_settings_resumes_as_float32(tmp_path_factory, tmp_path, caplog):
  data, runs = _runs(tmp_path_factory, "classification")
  old = str(tmp_path / "old")
  shutil.copytree(runs["float32"], old)
  path = os.path.join(old, "config.json")
  saved = json.load(open(path))
  new_keys = ("init_from", "init_skip", "init_subtree", "init_from_subtree")
  for key in new_keys:
    del saved[key]
  del saved["train"]["precision"], saved["optim"]["freeze"]
  json.dump(saved, open(path, "w"))
  for step in range(3, STEPS + 1):
    shutil.rmtree(os.path.join(old, "checkpoints", str(step)))
  os.remove(os.path.join(old, "summary.json"))
  with caplog.at_level("WARNING"):
    loop.train_and_evaluate(_config("classification", data, "float32"), old)
  (warning,) = [r.getMessage() for r in caplog.records if "predates" in r.getMessage()]
  assert all(k in warning for k in ("train.precision='float32'", "optim.freeze=[]", *new_keys))
  a, b = final_params(old), final_params(runs["float32"])
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a["params"]),
                                                  jax.tree.leaves(b["params"])))
