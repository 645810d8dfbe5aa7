"""The command lines after training answer a user's mistake with one ``error:`` line and exit
status 2 (`medjax.io.errors.exit_on_users_error`), not a traceback."""

import subprocess
import sys

import pytest
from conftest import REPO

from medjax.io.errors import is_users_error


@pytest.mark.parametrize("command", [
    ["medjax.evaluate", "--split", "val"],
    ["medjax.infer.features", "--split", "train", "--out", "{tmp}/out"],
    ["medjax.infer.predict", "--input", "{tmp}", "--output", "{tmp}/out"],
])
def test_a_folder_that_is_no_run_is_one_error_line(command, tmp_path):
  workdir = tmp_path / "not_a_run"
  workdir.mkdir()
  args = [a.format(tmp=tmp_path) for a in command]
  done = subprocess.run([sys.executable, "-m", *args, "--workdir", str(workdir)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.splitlines() == [
      f"error: {workdir / 'config.json'}: missing: is this the workdir of a finished medjax run?"]
  assert not (tmp_path / "out").exists()  # nothing written, no input read


def test_only_users_errors_lose_their_traceback():
  class Diverged(FloatingPointError):
    users_error = True

  def raised(fn):
    try:
      fn()
    except Exception as e:  # noqa: BLE001 - the exception with its traceback, as a CLI sees it
      return e

  assert is_users_error(Diverged("step 3"))
  assert not is_users_error(FloatingPointError("step 3"))
  assert not is_users_error(raised(lambda: int("x")))  # a ValueError from outside medjax: a bug
