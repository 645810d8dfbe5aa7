"""Two ``launch.py`` processes joined by ``jax.distributed`` (gloo over TCP on this machine) train
one model on a split global batch; the result must match a single-process run of the config.

The single-process reference uses one device while the two processes use two each (four in all):
batch norm statistics and the loss are means over the global batch, so neither the process count
nor the device count may change the parameters beyond summation-order noise. One run covers both
splits of the batch (across processes and across each process's devices) and the resume test
restarts it, so the module trains two launch.py pairs in all.
"""

import json
import os
import re
import shutil
import sys
import time

import numpy as np
import portpicker
import pytest
from conftest import computed_once, write_synthetic_medmnist
from helpers import (
  config,
  final_params,
  launch_cmd,
  launch_env,
  outputs_message,
  override_flags,
  rel_diff,
  run_together,
)

from medjax.train import loop

STEPS = 6
# Evaluate every 2 steps and save every step: the resume test restarts from step 5. Batch
# digests (batches.jsonl, process 0's share only) show which data each step read.
OVERRIDES = {"train.steps": STEPS, "eval.every_steps": 2, "train.checkpoint_every_steps": 1,
             "train.record_batches": True}
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  # One folder for every worker: it is part of the shared runs' configs.
  return computed_once(tmp_path_factory, "distributed_data", write_synthetic_medmnist)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """A single-process, single-device run of the same config (in-process), trained once."""

  def train(root):
    workdir = os.path.join(root, "run")
    loop.train_and_evaluate(config(data_dir, **{"mesh.data": 1, **OVERRIDES}), workdir)
    return workdir

  return computed_once(tmp_path_factory, "distributed_reference", train)


def _run_distributed(workdir, data_dir, devices_per_process, expect_rc=0):
  """Runs the config as ``NUM_PROCESSES`` launch.py processes; returns their
  ``(returncode, output)`` after checking that every one exited with ``expect_rc``."""
  port = portpicker.pick_unused_port()
  flags = [f"--config.data.dir={data_dir}", *override_flags(OVERRIDES),
           f"--coordinator=127.0.0.1:{port}", f"--num_processes={NUM_PROCESSES}"]
  cmds = [launch_cmd(workdir, [*flags, f"--process_id={i}"]) for i in range(NUM_PROCESSES)]
  env = launch_env(devices_per_process)
  results = run_together(cmds, [env] * NUM_PROCESSES, timeout=TIMEOUT_S)
  assert all(rc == expect_rc for rc, _ in results), outputs_message(results)
  return results


@pytest.fixture(scope="module")
def distributed_run(data_dir, tmp_path_factory):
  """``(workdir, results)`` of one two-process run, made once and read by the tests below."""

  def train(root):
    workdir = os.path.join(root, "run")
    return workdir, _run_distributed(workdir, data_dir, DEVICES_PER_PROCESS)

  workdir, results = computed_once(tmp_path_factory, "distributed_run", train)
  return workdir, results


def _jsonl(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(ln) for ln in f if ln.strip()]


def _history(workdir):
  """metrics.jsonl records without the wall-clock entries (``time/...``)."""
  records = [{k: v for k, v in r.items() if not k.startswith("time/")}
             for r in _jsonl(workdir, "metrics.jsonl")]
  return [r for r in records if set(r) != {"step"}]


def _best_step(workdir):
  """The best step as results.md reports it."""
  with open(os.path.join(workdir, "results.md")) as f:
    return int(re.search(r"step (\d+) of \d+", f.read()).group(1))


def _checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _assert_same_training(workdir, reference, results):
  mine, ref = final_params(workdir), final_params(reference)
  assert int(mine["step"]) == int(ref["step"]) == STEPS
  for part in ("params", "batch_stats"):
    diff = rel_diff(mine[part], ref[part])
    # Float rounding only: each process's oneDNN kernel gradient sums its half batch in another
    # order than one process sums the whole. After 6 Adam steps that gave up to 1e-5 on AVX-512
    # cores and 1.81e-5 on AVX2 (Zen 3) ones; a wrong gradient or a skipped batch moves the
    # parameters by orders of magnitude more.
    assert diff <= 5e-5, f"{part}: relative difference {diff:.2e}\n{outputs_message(results)}"


def test_two_processes_match_one(distributed_run, reference):
  workdir, results = distributed_run
  _assert_same_training(workdir, reference, results)

  # Losses and evaluations agree too: each eval batch is gathered whole on every process, so
  # metrics cover every val record once (a process seeing only its half would differ).
  history, ref_history = _history(workdir), _history(reference)
  assert [sorted(r) for r in history] == [sorted(r) for r in ref_history], history
  for mine, ref in zip(history, ref_history):
    for k in ref:
      np.testing.assert_allclose(mine[k], ref[k], rtol=1e-4, atol=1e-6, err_msg=f"{k}: {mine}")

  # The same checkpoints are kept, and the report evaluates the same best one.
  assert _checkpoint_steps(workdir) == _checkpoint_steps(reference)
  assert _best_step(workdir) == _best_step(reference)

  # Only process 0 writes logs and the report: a second writer would duplicate every record
  # (checked above against the reference's), add a second event file, or print a summary.
  assert [r["step"] for r in _jsonl(workdir, "batches.jsonl")] == list(range(1, STEPS + 1))
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert len(events) == 1, events
  assert "done:" in results[0][1] and "done:" not in results[1][1], outputs_message(results)


def test_two_processes_resume_from_a_checkpoint(distributed_run, reference, data_dir, tmp_path):
  """Drops the last checkpoint of a finished run, as if both processes died just before saving
  it; the rerun restores step 5 (state and each process's Grain position) and redoes step 6."""
  finished, _ = distributed_run
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
  results = _run_distributed(workdir, data_dir, DEVICES_PER_PROCESS)
  # Process 1's position shows in the parameters (its half of step 6's batch), process 0's
  # also in the batch digests: step 6 read the same records as in the uninterrupted run.
  _assert_same_training(workdir, reference, results)
  assert _jsonl(workdir, "batches.jsonl") == _jsonl(finished, "batches.jsonl")
  assert [r["step"] for r in _history(workdir)] == [r["step"] for r in _history(reference)]
  # Metrics saved before the restart still rank the checkpoints: same ones kept, same best.
  assert _checkpoint_steps(workdir) == _checkpoint_steps(finished)
  assert _best_step(workdir) == _best_step(finished)


def test_bad_input_stops_both_processes(tmp_path):
  """An expected error (here a missing data file) ends every process with status 2 and its
  one-line message; none is left waiting on a peer at the shutdown barrier."""
  empty = tmp_path / "empty"
  empty.mkdir()
  results = _run_distributed(str(tmp_path / "run"), str(empty), 1, expect_rc=2)
  for _, out in results:
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    expected = f"error: {empty / 'pneumoniamnist.npz'}: no such file"
    assert len(errors) == 1 and errors[0].startswith(expected), outputs_message(results)


def test_a_failed_process_does_not_leave_its_peer_running():
  """The harness itself: when one process fails, a peer that would wait forever (as one blocked
  in a collective does) is killed after the grace period, and both outputs come back."""
  cmds = [[sys.executable, "-c", "import sys; print('dying'); sys.exit(3)"],
          [sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(600)"]]
  start = time.monotonic()
  results = run_together(cmds, [dict(os.environ)] * 2, timeout=120, grace=1)
  assert time.monotonic() - start < 60
  assert results == [(3, "dying\n"), (None, "waiting\n")], results
