"""End-to-end tests of the training loop on a small synthetic MedMNIST file (CPU, 4 fake devices)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import pneumoniamnist_resnet18
from medjax.train import loop

from conftest import REPO, write_synthetic_medmnist


def _config(data_dir, steps=6, **overrides):
  c = pneumoniamnist_resnet18.get_config("runlocal")
  c.data.dir = data_dir
  c.train.steps = steps
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _final_params(workdir, step=None):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = step or mngr.latest_step()
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))
  mngr.close()
  return restored


def _rel_diff(a, b):
  """||a - b|| / ||b|| over all leaves: per-leaf ratios blow up on near-zero leaves, where Adam
  turns summation-order noise in a ~0 gradient into an lr-sized step."""
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_train_and_evaluate_writes_a_complete_workdir(synthetic_medmnist, tmp_path):
  workdir = str(tmp_path / "run")
  summary = loop.train_and_evaluate(_config(synthetic_medmnist), workdir)
  assert summary["steps"] == 6
  for name in ("config.json", "metrics.jsonl", "results.md", "plots/curves.png",
               "plots/roc_val.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  history = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in history if "val/auc" in r] == [2, 4, 6]
  assert 0.0 <= summary["best"]["auc"] <= 1.0
  assert summary["best_step"] in (2, 4, 6)
  # A second call resumes from the last checkpoint and does nothing more.
  again = loop.train_and_evaluate(_config(synthetic_medmnist), workdir)
  assert again["best"] == summary["best"]


def test_learns_the_synthetic_task(tmp_path):
  data = write_synthetic_medmnist(str(tmp_path), n_train=256, n_val=64)
  c = _config(data, steps=30, **{"train.batch_size": 32, "eval.every_steps": 30})
  summary = loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert summary["best"]["auc"] > 0.95, summary


def test_data_parallel_matches_single_device(synthetic_medmnist, tmp_path):
  assert jax.device_count() == 4
  one = loop.train_and_evaluate(_config(synthetic_medmnist, **{"mesh.data": 1}),
                                str(tmp_path / "one"))
  four = loop.train_and_evaluate(_config(synthetic_medmnist, **{"mesh.data": 4}),
                                 str(tmp_path / "four"))
  assert one["steps"] == four["steps"]
  assert _rel_diff(_final_params(str(tmp_path / "four"))["params"],
                       _final_params(str(tmp_path / "one"))["params"]) <= 1e-5


def test_workdir_of_another_experiment_is_refused(synthetic_medmnist, tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(_config(synthetic_medmnist, steps=2), workdir)
  with pytest.raises(loop.ConfigMismatchError, match="optim.lr"):
    loop.train_and_evaluate(_config(synthetic_medmnist, steps=2, **{"optim.lr": 0.5}), workdir)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(synthetic_medmnist,
                                                                     tmp_path):
  workdir = str(tmp_path / "run")
  # A huge learning rate diverges within a few steps; evaluation/checkpoint every step.
  c = _config(synthetic_medmnist, steps=40, **{"optim.lr": 1e12, "optim.warmup_fraction": 0.0,
                                                "eval.every_steps": 1})
  with pytest.raises(loop.NonFiniteLossError, match=r"step (\d+).*Last good checkpoint"):
    loop.train_and_evaluate(c, workdir)
  restored = _final_params(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored["params"]))


def _launch(workdir, data_dir, steps, extra=(), **popen):
  cmd = [sys.executable, os.path.join(REPO, "launch.py"),
         "--config", os.path.join(REPO, "configs/pneumoniamnist_resnet18.py:runlocal"),
         "--workdir", workdir, f"--config.data.dir={data_dir}", f"--config.train.steps={steps}",
         "--config.train.record_batches=True", "--config.eval.every_steps=0",
         "--config.train.checkpoint_every_steps=1", *extra]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def test_sigkill_mid_run_then_resume_equals_uninterrupted(synthetic_medmnist, tmp_path):
  steps = 14
  ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
  ref = _launch(ref_dir, synthetic_medmnist, steps)
  out, _ = ref.communicate(timeout=300)
  assert ref.returncode == 0, out
  cut = _launch(cut_dir, synthetic_medmnist, steps)
  # Kill once a few checkpoints exist; saves happen every step, so the kill may land mid-save.
  ckpt = os.path.join(cut_dir, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline:
    done = [d for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    if len(done) >= 2 and max(map(int, done)) >= 5:
      break
    time.sleep(0.05)
  cut.send_signal(signal.SIGKILL)
  cut.wait()
  killed_at = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert killed_at < steps, "the run finished before it could be killed"
  resumed = _launch(cut_dir, synthetic_medmnist, steps)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  a, b = _final_params(cut_dir), _final_params(ref_dir)
  assert int(a["step"]) == int(b["step"]) == steps
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a["params"], b["params"])
  assert max(jax.tree.leaves(diffs)) <= 1e-6
  digests = lambda d: [json.loads(x)["digest"] for x in open(os.path.join(d, "batches.jsonl"))]
  assert digests(cut_dir) == digests(ref_dir)
  assert len(digests(ref_dir)) == steps


def test_unknown_key_and_wrong_type_name_the_key(synthetic_medmnist, tmp_path):
  for flag, needle in (("--config.optim.lrr=0.1", "lrr"),
                       ("--config.train.batch_size=big", "batch_size")):
    p = _launch(str(tmp_path / "x"), synthetic_medmnist, 2, extra=[flag])
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    assert needle in out, out[-2000:]
