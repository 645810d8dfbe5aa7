"""One run per workdir: launch.py holds an exclusive lock on ``<workdir>/.lock`` while it works.

``fcntl.flock`` rather than the ``filelock`` package: the kernel drops the lock the moment its
process ends, however it ends (SIGKILL, a crashed host's NFS lease expiring), so a stale lock
never blocks anyone and no pid-liveness guessing is needed (which cannot work across hosts
anyway); ``filelock`` wraps the same call without recording who holds the lock. The file holds
the holder's pid, host and start time for the refusal message; a clean exit deletes it, so a
file left with a holder in it means that run died, and the next run says it takes over.

A multi-process run shares one workdir: process 0 takes the lock (it writes the logs and
finalises checkpoints) and tells the others whether it got it. A sweep locks its root, and each
member (its own launch.py) its own folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from typing import Iterator

from absl import logging

from medjax.io.errors import WorkdirLockedError

LOCK_FILE = ".lock"


def _read(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 4096, 0) or b"{}")
  except ValueError:
    return {}


def _holder(info: dict) -> str:
  if not info:
    return "another process (no holder recorded)"
  return f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"


def _acquire(path: str) -> int:
  """Locks ``path`` (created if absent); returns its open descriptor."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      raise WorkdirLockedError(
          os.path.dirname(path), f"in use by another run ({_holder(holder)}); wait for it to "
          "end, or give this run another --workdir") from None
    try:
      if os.stat(path).st_ino == os.fstat(fd).st_ino:
        break
    except FileNotFoundError:
      pass
    os.close(fd)  # the holder deleted the file between our open and lock: lock the new one
  previous = _read(fd)
  if previous:
    logging.warning("%s: taking over the lock of %s, which ended without releasing it",
                    os.path.dirname(path), _holder(previous))
  me = {"pid": os.getpid(), "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S")}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(me).encode(), 0)
  return fd


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds ``workdir``'s lock for the block (creating the folder, removed again if the block
  leaves it empty); one process only.

  Raises:
    WorkdirLockedError: another live process holds it (named by pid and host).
  """
  created = not os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = _acquire(path)
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)  # still locked: a waiting open sees the inode change and retries
    os.close(fd)
    if created:  # a run refused before writing anything leaves no empty folder behind
      with contextlib.suppress(OSError):
        os.rmdir(workdir)


@contextlib.contextmanager
def hold_for_run(workdir: str) -> Iterator[None]:
  """`hold` on process 0 of a (possibly multi-process) run; every process raises when it fails."""
  import jax  # here: a sweep's own process (`hold` only) never starts JAX
  import numpy as np
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    with hold(workdir):
      yield
    return
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(hold(workdir))
      except WorkdirLockedError as e:
        error = e
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if error is not None:
      raise error
    if int(failed):  # the holder as process 0 saw it, read from the shared workdir
      try:
        with open(os.path.join(workdir, LOCK_FILE)) as f:
          holder = json.load(f)
      except (OSError, ValueError):
        holder = {}
      raise WorkdirLockedError(workdir, f"in use by another run ({_holder(holder)}); process 0 "
                               "could not lock it")
    yield
