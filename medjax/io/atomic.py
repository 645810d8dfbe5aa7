"""Atomic file writes: a temporary file beside the target, renamed over it once complete.

Readers (a resumed run, a sweep deciding what finished, another process of a multi-host run)
see either the old file or the whole new one, never half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
  """A fresh temporary path beside ``path`` for the block to write; renamed onto ``path`` when
  the block ends, deleted when it raises.

  Args:
    suffix: the temporary name's ending, for writers that pick a format by it (``.nii.gz``).
  """
  path = os.fspath(path)
  folder, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO[Any]]:
  """``open(path, mode)`` that replaces ``path`` only once the block ends without an error."""
  with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
    yield f


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes ``data`` (text or bytes) to ``path`` atomically."""
  with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
  """``json.dump(obj, **dump_kwargs)`` to ``path`` atomically."""
  with atomic_open(path) as f:
    json.dump(obj, f, **dump_kwargs)
