"""Helpers shared by the tests: configs, checkpoint reading and ``launch.py`` subprocesses.

Imported after ``conftest.py`` has set up the fake CPU devices (pytest loads conftest first).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from conftest import REPO

from configs import hippocampus_unet2d, hippocampus_unet3d, pneumoniamnist_resnet18
from medjax.sweep.workers import without_device_count

LAUNCH = os.path.join(REPO, "launch.py")
RUNLOCAL = os.path.join(REPO, "configs/pneumoniamnist_resnet18.py:runlocal")


def config(data_dir, steps=6, **overrides):
  """The ``runlocal`` PneumoniaMNIST config on ``data_dir``, on one device unless ``overrides``
  (dotted keys) say otherwise.

  One device: JAX lowers the CPU kernels' batch partitioning (``custom_partitioning``) only for
  meshes of several devices, and that lowering keys each compiled step by a per-process id, so
  the persistent compilation cache never serves it; the tests of data parallelism set
  ``mesh.data`` themselves.
  """
  c = pneumoniamnist_resnet18.get_config("runlocal")
  c.data.dir = data_dir
  c.train.steps = steps
  c.mesh.data = 1
  return apply_overrides(c, overrides)


def seg_config(data_dir, steps=1, dims=3, **overrides):
  """The ``runlocal`` 3-D U-Net (hippocampus) config on the MSD folder ``data_dir``, one device,
  evaluated at its last step; ``dims=2``: its 2-D (slice-by-slice) twin."""
  c = (hippocampus_unet3d if dims == 3 else hippocampus_unet2d).get_config("runlocal")
  c.data.dir = data_dir
  c.train.steps = steps
  c.eval.every_steps = steps
  c.mesh.data = 1
  return apply_overrides(c, overrides)


def apply_overrides(c, overrides: dict[str, Any]):
  """Sets dotted keys (``{"optim.lr": 0.1}``) on the ConfigDict ``c`` and returns it."""
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def override_flags(overrides: dict[str, Any]) -> list[str]:
  """``--config.k=v`` flags for launch.py, the CLI twin of ``config(**overrides)``."""
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def final_params(workdir, step=None):
  """The saved state (numpy-backed, on one local device) of checkpoint ``step`` (default: last).

  The target is built from the checkpoint's own metadata on this process's first device, so a
  checkpoint written by any topology (other device counts, several processes) reads back here.
  """
  directory = os.path.join(workdir, "checkpoints")
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  step = step or mngr.latest_step()
  mngr.close()
  path = os.path.join(directory, str(step), "state")
  ckptr = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        ckptr.metadata(path).item_metadata)
  return ckptr.restore(path, target)


def rel_diff(a, b):
  """||a - b|| / ||b|| over all leaves: per-leaf ratios blow up on near-zero leaves, where Adam
  turns summation-order noise in a ~0 gradient into an lr-sized step."""
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def launch_cmd(workdir, flags: Sequence[str] = (), config_file=RUNLOCAL) -> list[str]:
  return [sys.executable, LAUNCH, "--config", config_file, "--workdir", workdir, *flags]


def launch_env(devices=1) -> dict[str, str]:
  """The test process's environment with ``devices`` host devices (replacing conftest's 4; its
  other XLA flags stay)."""
  env = without_device_count(dict(os.environ))
  env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
  return env


def launch(workdir, flags: Sequence[str] = (), devices=1, **popen) -> subprocess.Popen:
  """Starts ``python launch.py`` on the runlocal config; stdout and stderr merged into one pipe."""
  return subprocess.Popen(launch_cmd(workdir, flags), env=launch_env(devices), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run_launch(workdir, flags: Sequence[str] = (), devices=1, timeout=300):
  """Runs launch.py to completion; returns ``(returncode, merged output)``."""
  p = launch(workdir, flags, devices)
  try:
    out, _ = p.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    p.kill()
    out, _ = p.communicate()
    raise AssertionError(f"launch.py ran past {timeout} s:\n{tail(out)}") from None
  return p.returncode, out


def launch_module():
  """launch.py as a module, loaded once per process (a second load would redefine its flags): its
  helpers, e.g. ``_is_expected_error``, tested in-process."""
  if "launch" not in sys.modules:
    spec = importlib.util.spec_from_file_location("launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["launch"] = module
  return sys.modules["launch"]


def run_cli(module, *args) -> tuple[int | None, str, str]:
  """A command line (a module with ``define_flags(fv)`` and ``main(argv, fv)``) run in-process
  on fresh flags; returns ``(exit status, stdout, stderr)``."""
  from absl import flags

  fv = flags.FlagValues()
  module.define_flags(fv)
  fv(["cli", *args])
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    code = module.main(["cli"], fv)
  return code, stdout.getvalue(), stderr.getvalue()


# What the multi-process launches (tests/slurm/test_srun.py, tests/test_mpirun.py) train, on
# `write_synthetic_medmnist`; their reference is the ``one_process_run`` fixture.
MULTIPROCESS_OVERRIDES = {"train.steps": 6, "eval.every_steps": 3}


def assert_trains_as_one_process(stdout: str, output: str, workdir: str, reference: str,
                                 cluster: str, processes: int = 2) -> None:
  """Checks a launch.py run of ``processes`` processes, one XLA device each, in ``workdir``: each
  process printed a start line naming ``cluster`` and its index, process 0 alone reported, and
  the final parameters and batch statistics equal the one-process run ``reference``'s within 1e-5
  relative (batch statistics and the loss are global-batch means: only summation order differs).
  ``output`` (stdout and stderr) goes into the failure messages."""
  # Found in the text, not per line: mpirun forwards the ranks' output in chunks that may join
  # two ranks' lines (seen once under load: rank 1's line ran straight into rank 0's).
  starts = sorted(re.findall(r"cluster: [^;\n]*; process \d+ of \d+; devices: \d+ local of \d+ "
                             r"\([^)\n]*\)", stdout))
  assert len(starts) == processes, tail(output, 40)
  for i, line in enumerate(starts):
    assert line.startswith(f"cluster: {cluster}"), line
    assert f"process {i} of {processes}; devices: 1 local of {processes} (cpu" in line, line
  assert stdout.count("done: ") == 1, tail(output, 40)  # process 0 reports
  mine, theirs = final_params(workdir), final_params(reference)
  steps = MULTIPROCESS_OVERRIDES["train.steps"]
  assert int(mine["step"]) == int(theirs["step"]) == steps
  for part in ("params", "batch_stats"):
    diff = rel_diff(mine[part], theirs[part])
    assert diff <= 1e-5, f"{part}: relative difference {diff:.2e}\n{tail(output)}"


def tail(text: str, lines=25) -> str:
  return "\n".join(text.splitlines()[-lines:])


def run_together(cmds: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], timeout=300,
                 grace=30) -> list[tuple[int | None, str]]:
  """Runs the commands as concurrent processes and returns each one's ``(returncode, output)``.

  Never hangs the caller: every process still running at ``timeout``, or ``grace`` seconds after
  another one failed (a peer blocked in a collective waits for the dead one forever), is killed
  and reports returncode None. Output goes to files, not pipes, so a chatty process cannot block
  on a full pipe while we wait on another.
  """
  logs = [tempfile.TemporaryFile("w+") for _ in cmds]
  procs = [subprocess.Popen(list(c), env=e, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            text=True) for c, e, f in zip(cmds, envs, logs)]
  deadline = time.monotonic() + timeout
  killed = set()
  try:
    while any(p.poll() is None for p in procs):
      now = time.monotonic()
      if any(p.returncode not in (None, 0) for p in procs):
        deadline = min(deadline, now + grace)
      if now > deadline:
        break
      time.sleep(0.2)
  finally:
    for i, p in enumerate(procs):
      if p.poll() is None:
        p.kill()
        killed.add(i)
      p.wait()
  results = []
  for i, f in enumerate(logs):
    f.seek(0)
    results.append((None if i in killed else procs[i].returncode, f.read()))
    f.close()
  return results


def outputs_message(results: Sequence[tuple[int | None, str]], lines=25) -> str:
  """Each process's exit status and output tail, for assertion messages."""
  return "\n".join(f"--- process {i}: returncode {rc} (None: killed) ---\n{tail(out, lines)}"
                   for i, (rc, out) in enumerate(results))


def clear_holdout(cv_folder: str, folds: int = 2) -> None:
  """Empties ``data.holdout`` in the ``config.json`` of ``cv_folder``'s ``fold<k>`` runs: folds
  that may have trained on the held-out cases."""
  for k in range(folds):
    path = os.path.join(cv_folder, f"fold{k}", "config.json")
    config = json.load(open(path))
    config["data"]["holdout"] = []
    json.dump(config, open(path, "w"))
