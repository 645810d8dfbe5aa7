"""Two runs on one workdir: real processes, since the lock is between processes."""

import logging
import os
import socket
import subprocess
import sys

from conftest import REPO
from helpers import launch_cmd, run_launch, tail

from medjax.train import workdir_lock

_HOLD = """
import sys, time
from medjax.train import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(120)
"""


def _holder(workdir):
  """A process holding ``workdir``'s lock until killed (started once it holds it)."""
  p = subprocess.Popen([sys.executable, "-c", _HOLD, workdir], cwd=REPO, text=True,
                       stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO))
  assert p.stdout.readline().strip() == "locked"
  return p


def _error_lines(out):
  return [ln for ln in out.splitlines() if ln.startswith("error: ")]


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(
    tmp_path, caplog):
  workdir = str(tmp_path / "run")
  holder = _holder(workdir)
  try:
    rc, out = run_launch(workdir, ["--config.data.dir=/nonexistent"])
  finally:
    holder.kill()  # SIGKILL: no chance to release the lock
    holder.wait()
  assert rc == 2 and "Traceback" not in out, tail(out)
  lines = _error_lines(out)
  assert len(lines) == 1, tail(out)
  assert f"{workdir}: in use by another run (pid {holder.pid} on host {socket.gethostname()}" \
      in lines[0], lines
  assert os.listdir(workdir) == [".lock"]  # refused before writing anything
  # The kernel released the dead holder's lock; the next run takes it over with one line.
  with caplog.at_level(logging.WARNING), workdir_lock.hold(workdir):
    pass
  taken = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
  assert len(taken) == 1 and f"pid {holder.pid}" in taken[0], taken
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # released on exit


def test_a_sweep_root_in_use_is_refused(tmp_path):
  workdir = str(tmp_path / "sweep")
  holder = _holder(workdir)
  try:
    p = subprocess.run(launch_cmd(workdir, ["--sweep"]), cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  finally:
    holder.kill()
    holder.wait()
  out = p.stdout + p.stderr
  assert p.returncode == 2 and len(_error_lines(out)) == 1, tail(out)
  assert f"pid {holder.pid}" in _error_lines(out)[0]


def test_the_lock_is_released_when_the_run_raises(tmp_path):
  workdir = str(tmp_path / "run")
  try:
    with workdir_lock.hold(workdir):
      raise RuntimeError("a crash inside the run")
  except RuntimeError:
    pass
  with workdir_lock.hold(workdir):  # free again, and not reported as taken over
    assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
