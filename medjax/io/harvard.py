"""The Harvard Whole Brain Atlas fusion pairs (AANLIB): co-registered 8-bit PNGs, and their split.

Layout (``$MEDJAX_DATA_DIR/fusion/harvard_aanlib``)::

  <pair>/<modality>/<case><slice>.png     e.g. CT-MRI/CT/20005.png = case 20, slice 5

where ``<pair>`` is ``CT-MRI``, ``PET-MRI`` or ``SPECT-MRI`` and the same file name in both modality
folders is one co-registered pair. MRI and CT are greyscale; PET and SPECT are RGB (a colour map
over the tracer uptake). Arrays come back as stored: uint8 ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB).

The test split holds whole cases (`held_out_cases`): a case is on one side in every pair folder,
because the folders share patients (case 28's MRI slices are the same files in CT-MRI and
SPECT-MRI), so a model trained on one pair folder never sees a test case of another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from medjax.io.errors import MedjaxIOError

PAIRS = ("CT-MRI", "PET-MRI", "SPECT-MRI")
# Fraction of each pair folder's cases held out as the test split (at least one case).
TEST_FRACTION = 0.25
# Fraction of each pair folder's training cases held out to select models on (at least one case).
VAL_FRACTION = 0.2
_NAME = re.compile(r"^(\d+)(\d{3})\.png$")


@dataclasses.dataclass(frozen=True)
class Pair:
  """One co-registered pair: ``a`` the MRI, ``b`` the other modality (CT, PET or SPECT).

  Attributes:
    pair: the pair folder, e.g. ``"PET-MRI"``.
    case: the atlas case number (patient), e.g. ``25``.
    slice: the slice number within the case.
    name: the file name shared by both images, e.g. ``"25015.png"``.
    modalities: ``(modality of a, modality of b)``, e.g. ``("MRI", "PET")``.
    a, b: uint8 ``[H, W]`` or ``[H, W, 3]`` arrays.
  """
  pair: str
  case: int
  slice: int
  name: str
  modalities: tuple[str, str]
  a: np.ndarray
  b: np.ndarray

  @property
  def id(self) -> str:
    """``<pair>/<case>_<slice>``, unique over the dataset, e.g. ``"PET-MRI/25_015"``."""
    return f"{self.pair}/{self.case}_{self.slice:03d}"


def read_image(path: str | os.PathLike) -> np.ndarray:
  """An 8-bit PNG/JPEG as uint8 ``[H, W]`` (grey) or ``[H, W, 3]`` (colour).

  Palette and alpha images become RGB or grey; an RGB image whose three channels are equal is
  grey (some tools store greyscale that way). Anything else (16-bit, float) is a MedjaxIOError:
  the fusion methods and metrics work on 8-bit grey levels, as the field's evaluation code does.
  """
  path = os.fspath(path)
  try:
    with Image.open(path) as image:
      image.load()  # decodes now: a truncated file fails here, not later
      if image.mode in ("1", "LA", "La"):
        image = image.convert("L")
      elif image.mode in ("P", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
      if image.mode not in ("L", "RGB"):
        raise MedjaxIOError(path, f"{image.mode} image; fusion reads 8-bit grey or RGB images")
      array = np.asarray(image)
  except MedjaxIOError:
    raise
  except Exception as e:  # noqa: BLE001 - Pillow raises many types on junk
    raise MedjaxIOError(path, f"unreadable image ({type(e).__name__}: {e})") from e
  if array.ndim == 3 and (array == array[..., :1]).all():
    array = array[..., 0]
  return np.ascontiguousarray(array)


def modalities(pair: str) -> tuple[str, str]:
  """``(MRI, the other modality)`` of a pair folder name: ``"PET-MRI"`` -> ``("MRI", "PET")``."""
  first, second = pair.split("-")
  return ("MRI", first) if second == "MRI" else (first, second)


def _parse(path: str) -> tuple[int, int]:
  match = _NAME.match(os.path.basename(path))
  if not match:
    raise MedjaxIOError(path, "not an atlas file name <case><3-digit slice>.png")
  return int(match.group(1)), int(match.group(2))


def list_pairs(root: str | os.PathLike, pair: str) -> list[tuple[int, int, str]]:
  """``(case, slice, name)`` of every pair in ``root/<pair>``, sorted, without reading pixels.

  Raises:
    MedjaxIOError: the folder is missing, or a name is in one modality folder only.
  """
  if pair not in PAIRS:
    raise ValueError(f"unknown pair {pair!r}; one of {', '.join(PAIRS)}")
  folders = [os.path.join(os.fspath(root), pair, m) for m in modalities(pair)]
  names = []
  for folder in folders:
    if not os.path.isdir(folder):
      raise MedjaxIOError(folder, "missing folder")
    names.append({n for n in os.listdir(folder) if n.lower().endswith(".png")})
  only = names[0] ^ names[1]
  if only:
    raise MedjaxIOError(os.path.join(os.fspath(root), pair),
                        f"{len(only)} file(s) in one modality folder only, e.g. {min(only)}")
  return sorted(_parse(n) + (n,) for n in names[0])


def held_out_cases(cases_by_pair: Mapping[str, Iterable[int]],
               fraction: float = TEST_FRACTION) -> dict[str, list[int]]:
  """The test cases of each pair folder: whole cases, the same side in every folder.

  Each case's rank is the SHA-256 of ``"harvard_aanlib/<case>"`` (stable across machines and
  library versions). Folders are visited from fewest cases to most (ties by name); each needs
  ``max(1, round(fraction * n))`` test cases: cases already placed by an earlier folder keep their
  side, and the unplaced ones join the test split in rank order until the count is met, the rest
  the training split. On the atlas folders of SOURCES.md this gives CT-MRI {28, 32},
  PET-MRI {30}, SPECT-MRI {21, 28, 35} (tests/io/test_harvard.py pins it).

  Args:
    cases_by_pair: ``{pair: case numbers}``.
    fraction: the share of each folder's cases to hold out.

  Returns:
    ``{pair: sorted test case numbers}``.
  """
  rank = lambda c: hashlib.sha256(f"harvard_aanlib/{c}".encode()).hexdigest()
  cases = {p: sorted(set(cs)) for p, cs in cases_by_pair.items()}
  side: dict[int, str] = {}
  for p in sorted(cases, key=lambda p: (len(cases[p]), p)):
    need = max(1, round(fraction * len(cases[p])))
    have = sum(side.get(c) == "test" for c in cases[p])
    for c in sorted((c for c in cases[p] if c not in side), key=rank):
      side[c] = "test" if have < need else "train"
      have += side[c] == "test"
  return {p: [c for c in cs if side[c] == "test"] for p, cs in cases.items()}


def split_of(root: str | os.PathLike, pairs: Sequence[str] = PAIRS) -> dict[str, list[int]]:
  """`held_out_cases` of the pair folders present under ``root`` (all of ``pairs`` that exist).

  The split depends on every folder of `PAIRS` that exists, whichever ``pairs`` are asked for,
  so reading one folder gives the same split as reading all three.
  """
  present = [p for p in PAIRS if os.path.isdir(os.path.join(os.fspath(root), p))]
  split = held_out_cases({p: [c for c, _, _ in list_pairs(root, p)] for p in present})
  return {p: split[p] for p in pairs if p in split}


def validation_cases(root: str | os.PathLike, pairs: Sequence[str] = PAIRS,
                     fraction: float = VAL_FRACTION) -> dict[str, list[int]]:
  """The validation cases of each pair folder: `held_out_cases` applied to the training cases.

  Whole cases again, on one side in every folder (a model selected on a case never trained on
  it in another folder), depending on every folder of `PAIRS` that exists, as `split_of`.
  On the atlas folders: CT-MRI {20}, PET-MRI {25}, SPECT-MRI {4, 25}.

  Raises:
    MedjaxIOError: a pair folder of ``pairs`` would keep no training case.
  """
  test = split_of(root)
  train = {p: [c for c, _, _ in list_pairs(root, p) if c not in test[p]] for p in test}
  val = held_out_cases(train, fraction)
  for p in pairs:
    if p in val and not set(train[p]) - set(val[p]):
      raise MedjaxIOError(os.path.join(os.fspath(root), p),
                          f"{len(train[p])} training case(s) only: none left to train on after "
                          "holding out a validation case")
  return {p: val[p] for p in pairs if p in val}


def read_pairs(root: str | os.PathLike, pair: str, split: str = "all") -> list[Pair]:
  """The pairs of ``root/<pair>`` on ``split`` (``"train"``, ``"test"`` or ``"all"``), sorted.

  Raises:
    MedjaxIOError: a missing folder, an unreadable image, or two images of a pair whose sizes
      differ.
  """
  if split not in ("train", "test", "all"):
    raise ValueError(f"split must be train, test or all, not {split!r}")
  entries = list_pairs(root, pair)
  if split != "all":
    test = set(split_of(root, [pair])[pair])
    entries = [e for e in entries if (e[0] in test) == (split == "test")]
  names = modalities(pair)
  out = []
  for case, slice_, name in entries:
    paths = [os.path.join(os.fspath(root), pair, m, name) for m in names]
    a, b = (read_image(p) for p in paths)
    if a.shape[:2] != b.shape[:2]:
      raise MedjaxIOError(paths[1], f"{b.shape[:2]} pixels, its pair {paths[0]} {a.shape[:2]}")
    out.append(Pair(pair, case, slice_, name, names, a, b))
  return out
