"""A sha256 record of a folder's files, written once the folder is complete and checked before the
folder is read: it catches what the folder's own reader may not, such as flipped bytes inside an
Orbax array chunk, which TensorStore decodes into wrong numbers without an error."""

from __future__ import annotations

import hashlib
import json
import os

from medjax.io.atomic import atomic_write_json

RECORD = "sha256.json"  # inside the folder it describes, so it moves and is deleted with it


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def _files(folder: str) -> list[str]:
  out = []
  for root, _, names in os.walk(folder):
    out += [os.path.relpath(os.path.join(root, n), folder) for n in names]
  return sorted(f for f in out if f != RECORD)


def write_record(folder: str | os.PathLike) -> None:
  """Records the size and sha256 of every file under ``folder`` in ``folder/sha256.json``
  (atomically: a reader sees the whole record or none)."""
  folder = os.fspath(folder)
  files = {f: {"bytes": os.path.getsize(os.path.join(folder, f)),
               "sha256": sha256_file(os.path.join(folder, f))} for f in _files(folder)}
  atomic_write_json(os.path.join(folder, RECORD), {"files": files}, indent=1, sort_keys=True)


def has_record(folder: str | os.PathLike) -> bool:
  return os.path.exists(os.path.join(folder, RECORD))


def check_record(folder: str | os.PathLike) -> str | None:
  """The first way ``folder`` differs from its record (a file missing, of another size, or with
  other bytes; the record unreadable), or None when it matches or has no record."""
  folder = os.fspath(folder)
  path = os.path.join(folder, RECORD)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{RECORD}: unreadable ({type(e).__name__})"
  for name, want in sorted(files.items()):
    full = os.path.join(folder, name)
    if not os.path.isfile(full):
      return f"{name}: missing"
    size = os.path.getsize(full)
    if size != want["bytes"]:
      return f"{name}: {size} bytes, {want['bytes']} when saved"
    if sha256_file(full) != want["sha256"]:
      return f"{name}: its bytes changed since the save (sha256 differs)"
  return None
