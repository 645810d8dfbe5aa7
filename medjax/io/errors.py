"""The one error type of medjax's readers and writers, naming the file and the cause, and its
kinds: a corrupt checkpoint, a workdir in use, a full disk; and how every command line tells a
user's mistake (one ``error:`` line, exit status 2) from a bug (a traceback)."""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable


class MedjaxIOError(Exception):
  """A file could not be read as what it claims to be.

  Attributes:
    path: the offending file or folder.
    cause: a short human reason.
  """

  def __init__(self, path: str | os.PathLike, cause: str):
    self.path = os.fspath(path)
    self.cause = cause
    super().__init__(f"{self.path}: {cause}")

  def __reduce__(self):  # survives pickling (errors raised in worker processes)
    return type(self), (self.path, self.cause)


class GeometryError(MedjaxIOError):
  """Images cannot be put on one voxel grid: their DICOM frames of reference differ, or they do
  not overlap in space. ``path`` names the moving image."""


class CheckpointCorruptError(MedjaxIOError):
  """No checkpoint of a run could be restored intact (each one named with its problem)."""


class WorkdirLockedError(MedjaxIOError):
  """Another run holds the workdir (named with its process id and host)."""


class DiskFullError(MedjaxIOError):
  """A write ran out of space (the cause names the filesystem: `describe_filesystem`)."""


# Errno values that mean the device has no room for the write (full, or the user's quota spent).
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def mentions_disk_full(text: str) -> bool:
  """Whether an error message reports a full device or quota (by its strerror or errno)."""
  return any(os.strerror(n) in text or f"os_error_code='{n}'" in text for n in _NO_SPACE)


def is_disk_full(e: BaseException) -> bool:
  """Whether ``e`` or an exception it chains from reports a full device or quota.

  TensorStore (under Orbax) raises ``ValueError("RESOURCE_EXHAUSTED: ... No space left on device
  [os_error_code='28']")`` rather than an ``OSError``, so the text is checked too.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno in _NO_SPACE) or mentions_disk_full(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def describe_filesystem(path: str | os.PathLike) -> str:
  """``"tmpfs (device tmpfs) mounted at /mnt/x, 12 KiB of 2.0 MiB free"`` for the filesystem
  holding ``path`` (its nearest existing parent), from ``/proc/mounts`` where there is one."""
  path = os.path.realpath(os.fspath(path))
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  mount, device, fstype = "/", "?", "?"
  try:
    with open("/proc/mounts") as f:
      for line in f:
        dev, point, kind = line.split()[:3]
        point = point.replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip(os.sep) + os.sep)
        if inside and len(point) >= len(mount):
          mount, device, fstype = point, dev, kind
  except OSError:
    pass
  st = os.statvfs(path)
  return (f"{fstype} (device {device}) mounted at {mount}, {_size(st.f_bavail * st.f_frsize)} of "
          f"{_size(st.f_blocks * st.f_frsize)} free")


def _size(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


def is_users_error(e: BaseException) -> bool:
  """Whether ``e`` is the user's to fix (input, settings, workdir), not a bug in the code.

  Those get a one-line message: the exception text already names the file, key or step, and a
  traceback would bury it. They are a `MedjaxIOError`, an exception whose type says so
  (``users_error = True``: another experiment's workdir, a diverged run), or a ValueError raised
  from medjax's own code, which checks settings that way; a ValueError from inside JAX, Flax or
  numpy is a bug and keeps its traceback.
  """
  if isinstance(e, MedjaxIOError) or getattr(type(e), "users_error", False):
    return True
  if not isinstance(e, ValueError) or e.__traceback__ is None:
    return False
  tb = e.__traceback__
  while tb.tb_next is not None:
    tb = tb.tb_next
  package = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
  return os.path.realpath(tb.tb_frame.f_code.co_filename).startswith(package + os.sep)


EXIT_USERS_ERROR = 2


def exit_on_users_error(main: Callable) -> Callable:
  """Wraps a command line's ``main(argv)``: a user's error (`is_users_error`) ends as one
  ``error: ...`` line on stderr and returns exit status 2 (absl's ``app.run`` exits with what
  ``main`` returns; in-process callers get the status); anything else keeps its traceback."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except Exception as e:
      if not is_users_error(e):
        raise
      print(f"error: {e}", file=sys.stderr, flush=True)
      return EXIT_USERS_ERROR

  return wrapped
