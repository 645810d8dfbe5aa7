"""The one error type of medjax's readers: it names the file and the cause."""

from __future__ import annotations

import os


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
