"""End-to-end tests of the training loop on a small synthetic MedMNIST file (CPU, 4 fake devices)."""

import contextlib
import json
import logging as std_logging
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import computed_once, write_multilabel_medmnist, write_synthetic_medmnist
from helpers import config as _config
from helpers import final_params as _final_params
from helpers import launch
from helpers import rel_diff as _rel_diff

from medjax.train import loop, tasks
from medjax.train.state import TrainState


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


@pytest.mark.parametrize("on_device", ["off", "on"])  # on: flips and mixup inside the step
def test_learns_the_synthetic_task(tmp_path, on_device):
  data = write_synthetic_medmnist(str(tmp_path), n_train=256, n_val=64)
  c = _config(data, steps=30, **{"train.batch_size": 32, "eval.every_steps": 30,
                                 "data.on_device": on_device})
  summary = loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert summary["best"]["auc"] > 0.95, summary
  assert summary["data"] == ("device" if on_device == "on" else "grain")


def test_data_parallel_matches_single_device(synthetic_medmnist, tmp_path):
  assert jax.device_count() == 4
  one = loop.train_and_evaluate(_config(synthetic_medmnist, **{"mesh.data": 1}),
                                str(tmp_path / "one"))
  four = loop.train_and_evaluate(_config(synthetic_medmnist, **{"mesh.data": 4}),
                                 str(tmp_path / "four"))
  assert one["steps"] == four["steps"]
  assert _rel_diff(_final_params(str(tmp_path / "four"))["params"],
                       _final_params(str(tmp_path / "one"))["params"]) <= 1e-5


def test_grain_worker_processes_train_the_same_model(synthetic_medmnist, tmp_path):
  once = {"eval.every_steps": 0}  # evaluated and saved at the end only: the batches are the test
  threads = loop.train_and_evaluate(_config(synthetic_medmnist, **{"data.workers": 0, **once}),
                                    str(tmp_path / "threads"))
  workers = loop.train_and_evaluate(_config(synthetic_medmnist, **{"data.workers": 2, **once}),
                                    str(tmp_path / "workers"))
  assert threads["steps"] == workers["steps"]
  assert _rel_diff(_final_params(str(tmp_path / "workers"))["params"],
                   _final_params(str(tmp_path / "threads"))["params"]) == 0.0


@contextlib.contextmanager
def absltest_warnings():
  """The messages absl logs at WARNING or above while the block runs."""
  from absl import logging as absl_logging

  lines = []
  handler = std_logging.Handler(std_logging.WARNING)
  handler.emit = lambda record: lines.append(record.getMessage())
  absl_logging.get_absl_logger().addHandler(handler)
  try:
    yield lines
  finally:
    absl_logging.get_absl_logger().removeHandler(handler)


def test_workdir_of_another_experiment_is_refused(synthetic_medmnist, tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(_config(synthetic_medmnist, steps=2), workdir)
  with pytest.raises(loop.ConfigMismatchError, match="optim.lr"):
    loop.train_and_evaluate(_config(synthetic_medmnist, steps=2, **{"optim.lr": 0.5}), workdir)

  # A run started before medjax gained a setting resumes with the setting's value, and its
  # config.json takes it; a setting the code no longer has still refuses.
  path = os.path.join(workdir, "config.json")
  saved = json.load(open(path))
  del saved["train"]["mixup"]
  json.dump(saved, open(path, "w"))
  c = _config(synthetic_medmnist, steps=2)
  with absltest_warnings() as logged:
    loop.train_and_evaluate(c, workdir)
  assert len([ln for ln in logged if f"train.mixup={c.train.mixup}" in ln]) == 1, logged
  assert json.load(open(path))["train"]["mixup"] == c.train.mixup
  saved["train"]["mixup"], saved["train"]["retired_setting"] = c.train.mixup, 1
  json.dump(saved, open(path, "w"))
  with pytest.raises(loop.ConfigMismatchError, match="train.retired_setting: 1 → '<missing>'"):
    loop.train_and_evaluate(_config(synthetic_medmnist, steps=2), workdir)


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
  flags = [f"--config.data.dir={data_dir}", f"--config.train.steps={steps}",
           "--config.train.record_batches=True", "--config.eval.every_steps=0",
           "--config.train.checkpoint_every_steps=1", *extra]
  return launch(workdir, flags, devices=2, **popen)


def test_sigkill_mid_run_then_resume_equals_uninterrupted(synthetic_medmnist, tmp_path):
  """Killed runs resume to the uninterrupted run's weights and batches, whether they read their
  data through Grain or from device memory (``data.on_device``): so the device path also gives
  Grain's batches. No random transform here (the device path draws its own, by design)."""
  steps = 10
  same = ["--config.data.train_transforms=to_float|normalize(0.5, 0.5)"]
  ref_dir = str(tmp_path / "ref")
  cuts = {str(tmp_path / "grain"): ["--config.data.on_device=off"],
          str(tmp_path / "device"): ["--config.data.on_device=on"]}
  # The reference and the runs to be killed start together.
  ref = _launch(ref_dir, synthetic_medmnist, steps, same)
  running = {d: _launch(d, synthetic_medmnist, steps, same + f) for d, f in cuts.items()}
  # Kill each once a few checkpoints exist; saves happen every step, so a kill may land mid-save.
  deadline = time.time() + 240
  while running and time.time() < deadline:
    for d in list(running):
      ckpt = os.path.join(d, "checkpoints")
      done = [x for x in os.listdir(ckpt) if x.isdigit()] if os.path.isdir(ckpt) else []
      if len(done) >= 2 and max(map(int, done)) >= 3:
        running[d].send_signal(signal.SIGKILL)
        running[d].wait()
        killed_at = max(int(x) for x in os.listdir(ckpt) if x.isdigit())
        assert killed_at < steps, f"{d}: the run finished before it could be killed"
        del running[d]
    time.sleep(0.05)
  assert not running, f"no checkpoint from {list(running)} in time"
  out, _ = ref.communicate(timeout=300)
  assert ref.returncode == 0, out
  resumed = {d: _launch(d, synthetic_medmnist, steps, same + f) for d, f in cuts.items()}
  for p in resumed.values():
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
  b = _final_params(ref_dir)
  digests = lambda d: [json.loads(x)["digest"] for x in open(os.path.join(d, "batches.jsonl"))]
  assert len(digests(ref_dir)) == steps
  assert digests(str(tmp_path / "grain")) == digests(ref_dir)
  for d, path in ((ref_dir, "grain"), *zip(cuts, ("grain", "device"))):
    assert json.load(open(os.path.join(d, "summary.json")))["data"] == path, d
  for d in cuts:
    a = _final_params(d)
    assert int(a["step"]) == int(b["step"]) == steps
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a["params"], b["params"])
    assert max(jax.tree.leaves(diffs)) <= 1e-6, d


def test_batches_prefetched_to_the_devices_train_the_same_run(synthetic_medmnist, tmp_path,
                                                             monkeypatch):
  """On an accelerator (faked: JAX says "gpu", the ops take their XLA forms) Grain's batches
  reach the step already placed (data.device_prefetch), same batches, same run."""
  kw = {"train.record_batches": True, "data.workers": 0, "data.on_device": "off"}
  loop.train_and_evaluate(_config(synthetic_medmnist, **kw), str(tmp_path / "host"))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  placed = []
  real = loop.pipeline.train_dataset
  monkeypatch.setattr(loop.pipeline, "train_dataset", lambda *a, **k: placed.append(
      k["device_sharding"]) or real(*a, **k))
  loop.train_and_evaluate(_config(synthetic_medmnist, **kw), str(tmp_path / "ahead"))
  assert placed and placed[0] is not None
  digests = lambda d: open(os.path.join(d, "batches.jsonl")).read()
  assert digests(tmp_path / "ahead") == digests(tmp_path / "host")
  assert _rel_diff(_final_params(str(tmp_path / "ahead"))["params"],
                   _final_params(str(tmp_path / "host"))["params"]) <= 1e-4


def test_multilabel_data_trains_with_one_sigmoid_per_label(tmp_path):
  folder = write_multilabel_medmnist(str(tmp_path))
  c = _config(folder, steps=2, **{"data.name": "chestmnist", "eval.every_steps": 2})
  summary = loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert set(summary["best"]) == {"acc", "auc", "nll"}
  assert os.path.exists(tmp_path / "run" / "plots" / "roc_val.png")


def test_eval_split_test_is_used_when_the_file_has_one(tmp_path):
  data = write_synthetic_medmnist(str(tmp_path), with_test=True)
  summary = loop.train_and_evaluate(_config(data, steps=2, **{"eval.split": "test"}),
                                    str(tmp_path / "run"))
  assert summary["split"] == "test"
  assert "| test |" in open(tmp_path / "run" / "results.md").read()


@pytest.fixture(scope="module")
def synthetic_volumes(tmp_path_factory):
  # One folder for every worker: it is part of the shared sequence run's config.
  return computed_once(tmp_path_factory, "synthetic_volumes", lambda root: write_synthetic_medmnist(
      root, flag="adrenalmnist3d", n_train=32, n_val=8, ndim=3))


def _sequence_config(data_dir, **overrides):
  from helpers import apply_overrides

  from configs import adrenalmnist3d_lstm

  c = adrenalmnist3d_lstm.get_config("runlocal")
  c.data.dir, c.train.steps, c.train.batch_size = data_dir, 4, 8
  c.train.checkpoint_every_steps, c.train.keep_checkpoints = 1, 10
  c.mesh.data = 1  # one device unless a test says otherwise (helpers.config says why)
  return apply_overrides(c, overrides)


@pytest.fixture(scope="module")
def sequence_run(synthetic_volumes, tmp_path_factory):
  """A finished one-device run of the sequence config, trained once and read by the tests below
  (copied where one writes)."""

  def train(root):
    workdir = os.path.join(root, "one")
    loop.train_and_evaluate(_sequence_config(synthetic_volumes), workdir)
    return workdir

  return computed_once(tmp_path_factory, "sequence_run", train)


def test_sequence_model_data_parallel_matches_single_device(sequence_run, synthetic_volumes,
                                                            tmp_path):
  four = str(tmp_path / "four")
  loop.train_and_evaluate(_sequence_config(synthetic_volumes, **{"mesh.data": 4}), four)
  assert _rel_diff(_final_params(four)["params"], _final_params(sequence_run)["params"]) <= 1e-5


def test_sequence_model_resumes_exactly(sequence_run, synthetic_volumes, tmp_path):
  import shutil

  cut = str(tmp_path / "cut")
  # The same run as if killed after step 2 (every step is checkpointed, so its workdir then is
  # the finished run's less the later checkpoints and the finished-run marker).
  shutil.copytree(sequence_run, cut)
  for d in ("3", "4"):
    shutil.rmtree(os.path.join(cut, "checkpoints", d))
  os.remove(os.path.join(cut, "summary.json"))
  loop.train_and_evaluate(_sequence_config(synthetic_volumes), cut)
  a, b = _final_params(cut), _final_params(sequence_run)
  assert int(a["step"]) == int(b["step"]) == 4
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a["params"], b["params"])
  assert max(jax.tree.leaves(diffs)) <= 1e-6


def test_mixup_blends_neighbouring_images_and_their_losses():
  model = nn.Dense(3)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
  labels = jnp.array([0, 1, 2, 1])
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  tx = optax.sgd(0.1)
  rng = jax.random.PRNGKey(2)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                     opt_state=tx.init(params), rng=rng, ema={},
                     apply_fn=lambda v, x, **_: (model.apply({"params": v["params"]}, x), {}),
                     tx=tx)
  batch = {"image": x, "label": labels}
  _, out = loop.make_train_step(tasks.classification(), mixup=0.4)(state, batch)
  lam = jax.random.beta(jax.random.fold_in(jax.random.fold_in(rng, 0), 1), 0.4, 0.4)
  assert 0.0 < float(lam) < 1.0
  logits = model.apply({"params": params}, lam * x + (1 - lam) * jnp.roll(x, 1, axis=0))
  ce = lambda y: optax.softmax_cross_entropy_with_integer_labels(logits, y)  # noqa: E731
  expected = jnp.mean(lam * ce(labels) + (1 - lam) * ce(jnp.roll(labels, 1)))
  # The step's loss is the blend of both targets' losses on the blended images...
  np.testing.assert_allclose(float(out["loss"]), float(expected), rtol=1e-6)
  # ...which the plain step's loss is not (so the match above is not a coincidence of no mixing).
  _, plain = loop.make_train_step(tasks.classification())(state, batch)
  assert abs(float(plain["loss"]) - float(expected)) > 10 * 1e-6 * float(expected)


@pytest.mark.parametrize("overrides", [{"task": "segmentation", "data.source": "msd",
                                        "train.mixup": 0.2},
                                       {"train.mixup": -0.2}])
def test_mixup_is_refused_for_segmentation_or_below_zero(synthetic_medmnist, tmp_path, overrides):
  c = _config(synthetic_medmnist, **overrides)
  with pytest.raises(ValueError, match="mixup"):
    loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "config.json")


def test_flip_averaging_is_refused_for_segmentation(synthetic_medmnist, tmp_path):
  c = _config(synthetic_medmnist,
              **{"task": "segmentation", "data.source": "msd", "train.mixup": 0.0,
                 "eval.flip_axes": (0,)})
  with pytest.raises(ValueError, match="eval.flip_axes"):
    loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "config.json")


def test_min_steps_is_a_floor_under_epochs_only():
  c = _config("", steps=5).train
  c.min_steps = 400
  assert loop.resolve_steps(c, 4) == 5  # train.steps set: taken as it is
  c.steps, c.epochs = None, 12.0
  assert loop.resolve_steps(c, 4) == 400  # 12 epochs of 4 steps are below the floor
  assert loop.resolve_steps(c, 36) == 432  # 12 epochs of 36 steps are above it
  c.min_steps = 0
  assert loop.resolve_steps(c, 4) == 48
