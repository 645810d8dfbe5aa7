"""Faults around checkpoints: corrupted checkpoints, a full disk, a run that diverges but stays
finite. In-process on the synthetic MedMNIST file, copying one finished tiny run."""

import glob
import logging
import os
import shutil
import signal
import subprocess
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import write_synthetic_medmnist
from helpers import config, final_params, launch, launch_module, override_flags, tail

from medjax.io.errors import CheckpointCorruptError, DiskFullError
from medjax.train import loop, preemption
from medjax.train.checkpoint import Checkpointer
from medjax.train.divergence import DivergedError, DivergenceRule
from medjax.train.state import TrainState

STEPS = 6
# Checkpoints at every step (all kept), so a copy can stand for the run killed after any step.
EVERY_STEP = {"train.checkpoint_every_steps": 1, "train.keep_checkpoints": 10}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """``(data_dir, workdir, summary)`` of one uninterrupted 6-step run, checkpointed every step."""
  root = tmp_path_factory.mktemp("faults")
  data = write_synthetic_medmnist(str(root))
  workdir = str(root / "ref")
  return data, workdir, loop.train_and_evaluate(config(data, STEPS, **EVERY_STEP), workdir)


def _killed_copy(workdir, dest, after):
  """A copy of the finished run as it was when killed after step ``after``."""
  shutil.copytree(workdir, dest)
  for d in glob.glob(os.path.join(dest, "checkpoints", "*")):
    if int(os.path.basename(d)) > after:
      shutil.rmtree(d)
  os.remove(os.path.join(dest, "summary.json"))
  return str(dest)


def _largest_array_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True),
             key=os.path.getsize)


def _corrupt(step_dir, kind):
  """Damages one saved step the way a bad disk, a full copy or a careless hand would."""
  if kind == "truncated":
    path = _largest_array_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)
  elif kind == "bytes_flipped":  # inside array data: Orbax restores it without an error
    path = _largest_array_file(step_dir)
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 2, len(data) // 2 + 8):
      data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
  elif kind == "iterator_json_emptied":
    open(glob.glob(os.path.join(step_dir, "data", "*.json"))[0], "w").close()
  elif kind == "ocdbt_manifest_deleted":
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
  else:
    raise ValueError(kind)


CORRUPTIONS = ("truncated", "bytes_flipped", "iterator_json_emptied", "ocdbt_manifest_deleted")


def _tiny_state(value):
  params = {"w": jnp.arange(3000, dtype=jnp.float32) + value}
  tx = optax.sgd(0.1)
  return TrainState(step=jnp.asarray(value, jnp.int32), params=params, batch_stats={},
                    opt_state=tx.init(params), rng=jax.random.PRNGKey(0), ema={}, apply_fn=None,
                    tx=tx)


def _tiny_checkpoints(directory, steps=(1, 2, 3)):
  """Checkpoints of a small state and a Grain iterator advanced ``step`` records at each step."""
  ckpt = Checkpointer(directory, keep=10)
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  for step in steps:
    next(it)
    ckpt.save(step, _tiny_state(step), it)
  ckpt.close()


@pytest.mark.parametrize("recorded", [True, False], ids=["sha256_record", "orbax_only"])
@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corrupt_latest_checkpoint_is_skipped_and_set_aside(tmp_path, caplog, kind, recorded):
  if kind == "bytes_flipped" and not recorded:
    pytest.skip("Orbax decodes flipped array bytes without an error: only the record sees them")
  directory = str(tmp_path / "checkpoints")
  _tiny_checkpoints(directory)
  _corrupt(os.path.join(directory, "3"), kind)
  if not recorded:  # as saved before the record existed
    os.remove(os.path.join(directory, "3", "sha256.json"))
  ckpt = Checkpointer(directory, keep=10)
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore_latest(_tiny_state(0), it)
  assert step == 2 and int(state.step) == 2 and next(it) == 2  # state and data position of 2
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.arange(3000) + 2)
  lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith("checkpoint step 3 skipped: "), lines
  # Nothing saved is lost: the broken step is kept aside, out of Orbax's sight.
  assert sorted(os.listdir(directory)) == ["1", "2", "corrupt-3"]
  assert ckpt.all_steps() == [1, 2]


def test_no_intact_checkpoint_is_one_expected_error_and_moves_nothing(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _tiny_checkpoints(directory, steps=(1, 2))
  _corrupt(os.path.join(directory, "1"), "truncated")
  _corrupt(os.path.join(directory, "2"), "bytes_flipped")
  with pytest.raises(CheckpointCorruptError) as raised:
    Checkpointer(directory).restore_latest(_tiny_state(0))
  message = str(raised.value)
  assert "no intact checkpoint" in message and "step 2:" in message and "step 1:" in message
  assert "\n" not in message
  assert launch_module()._is_expected_error(raised.value)  # one `error:` line, exit 2
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_corrupt_checkpoints_fall_back_and_the_run_ends_as_if_uninterrupted(finished, tmp_path,
                                                                            caplog):
  data, ref, summary = finished
  # Killed after step 5, with each of the four corruptions in one of steps 5, 4, 3, 2: the run
  # must go back to step 1, skipping each with its own line, and end where the reference did.
  cut = _killed_copy(ref, tmp_path / "cut", after=5)
  for step, kind in zip((5, 4, 3, 2), CORRUPTIONS):
    _corrupt(os.path.join(cut, "checkpoints", str(step)), kind)
  with caplog.at_level(logging.WARNING):
    resumed = loop.train_and_evaluate(config(data, STEPS, **EVERY_STEP), cut)
  skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert [m.split(":")[0] for m in skipped] == [f"checkpoint step {s} skipped" for s in (5, 4, 3, 2)]
  assert resumed["final"] == summary["final"] and resumed["best"] == summary["best"]
  a, b = final_params(cut), final_params(ref)
  assert int(a["step"]) == STEPS
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a["params"], b["params"])
  assert max(jax.tree.leaves(diffs)) <= 1e-6
  assert all(os.path.isdir(os.path.join(cut, "checkpoints", f"corrupt-{s}")) for s in (2, 3, 4, 5))


def test_sigterm_saves_at_the_next_step_boundary_and_resume_is_exact(finished, tmp_path):
  data, ref, summary = finished
  workdir = str(tmp_path / "run")
  # Evaluated and saved only at the last step: a checkpoint before it is the signal's doing.
  at_end = {"eval.every_steps": STEPS, "train.keep_checkpoints": 10}
  # 4 host devices, as this process has (conftest), so both compile the same steps.
  p = launch(workdir, override_flags({"data.dir": data, "train.steps": STEPS, "mesh.data": 1,
                                      **at_end}), devices=4)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + 120
  while not (os.path.exists(metrics) and open(metrics).read().strip()):  # step 1 is logged
    assert p.poll() is None and time.monotonic() < deadline, "no step logged"
    time.sleep(0.02)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == preemption.EXIT_STATUS == 143 and "Traceback" not in out, tail(out)
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(saved) == 1 and saved[0] < STEPS, saved
  assert f"preempted: stopped by a signal after step {saved[0]} of {STEPS}" in out, tail(out)
  resumed = loop.train_and_evaluate(config(data, STEPS, **at_end), workdir)
  assert resumed["final"] == summary["final"]
  a, b = final_params(workdir), final_params(ref)
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a["params"], b["params"])
  assert max(jax.tree.leaves(diffs)) <= 1e-6


@pytest.fixture
def small_tmpfs(tmp_path):
  """A 2 MiB tmpfs mounted at ``tmp_path/disk`` for the test (root only)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                     capture_output=True, text=True)
  if p.returncode:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_earlier_ones(finished,
                                                                               small_tmpfs):
  data, ref, _ = finished
  cut = _killed_copy(ref, small_tmpfs / "run", after=3)
  # Fill the disk but for 32 KiB: the logs still fit, the next checkpoint (~120 KiB) does not.
  st = os.statvfs(cut)
  with open(small_tmpfs / "ballast", "wb") as f:
    f.write(b"\0" * (st.f_bavail * st.f_frsize - 32 * 1024))
  with pytest.raises(DiskFullError) as raised:
    loop.train_and_evaluate(config(data, STEPS, **EVERY_STEP), cut)
  message = str(raised.value)
  assert f"tmpfs (device tmpfs) mounted at {small_tmpfs}" in message, message
  assert message.startswith(os.path.join(cut, "checkpoints")) and "checkpoint 4" in message
  assert launch_module()._is_expected_error(raised.value)
  os.remove(small_tmpfs / "ballast")
  for step in (1, 2, 3):  # intact: each restores to exactly what the reference saved
    a, b = final_params(cut, step), final_params(ref, step)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_finite_divergence_stops_the_run_and_names_the_last_good_checkpoint(tmp_path):
  data = write_synthetic_medmnist(str(tmp_path))
  workdir = str(tmp_path / "run")
  # lr 30 blows the weights up, but the loss stays finite (rc 0 before). Evaluated and saved
  # every step, keeping the last 2 and the best: the last before the divergence must survive.
  with pytest.raises(DivergedError, match=r"running median .* Last good checkpoint: step \d+"
                     ) as raised:
    loop.train_and_evaluate(config(data, 20, **{"optim.lr": 30.0, "eval.every_steps": 1}),
                            workdir)
  assert launch_module()._is_expected_error(raised.value)
  message = str(raised.value)
  good = int(message.rsplit("Last good checkpoint: step ", 1)[1].split()[0])
  first_high = int(message.split(" steps from step ")[1].split()[0])
  # The loss of step 3 is that of the weights saved at step 2: 1 is the last good one.
  assert good == first_high - 2 and int(message.split(":")[0].split()[1]) < 20
  params = final_params(workdir, good)["params"]
  assert max(float(np.max(np.abs(x))) for x in jax.tree.leaves(params)) < 10


# Training losses logged by the quickstart (configs/pneumoniamnist_resnet18.py, every 10th step
# of 432, mixup: the noisiest of the recipes) and the first steps of the same run at optim.lr=30.
QUICKSTART = [0.421, 0.137, 0.251, 0.536, 0.109, 0.112, 0.280, 0.090, 0.366, 0.156, 0.306, 0.072,
              0.253, 0.135, 0.062, 0.060, 0.339, 0.104, 0.090, 0.040, 0.216, 0.273, 0.204, 0.036,
              0.112, 0.269, 0.230, 0.050, 0.417, 0.080, 0.038, 0.033, 0.019, 0.395, 0.274, 0.075,
              0.029, 0.303, 0.073, 0.031, 0.028, 0.293, 0.397, 0.030]
QUICKSTART_LR30 = [0.85, 0.769, 377, 652, 519, 452, 106, 398, 250, 233, 79.1, 38.3]


def test_divergence_rule_defaults_spare_the_quickstart_and_stop_lr_30():
  from configs import common

  t = common.get_base_config().train
  rule = lambda: DivergenceRule(t.divergence_factor, t.divergence_window, t.divergence_patience)
  healthy = rule()
  assert not any(healthy.update(i, x) for i, x in enumerate(QUICKSTART, 1))
  diverging = rule()
  fired = [i for i, x in enumerate(QUICKSTART_LR30, 1) if diverging.update(i, x)]
  assert fired[0] == 7 and diverging.first_high_step == 3
  off = DivergenceRule(0.0, t.divergence_window, t.divergence_patience)
  assert not any(off.update(i, x) for i, x in enumerate(QUICKSTART_LR30, 1))
