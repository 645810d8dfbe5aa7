r"""Reading a DICOM series into memory: medjax's `read_dicom_series` vs SimpleITK, same process.

  pip install -e ".[bench]"   # SimpleITK
  MEDJAX_DATA_DIR=../shared/data python benchmarks/read_dicom_vs_simpleitk.py [--repeats 5]

Cases: the real TotalSegmentator CT series (20 slices of 512², JPEG 2000), a synthetic uncompressed
CT (``--slices`` × ``--size``², written with `synthetic.write_ct_series` into a temporary folder
first) and, when present, the TCIA brain-tumour-progression T1post MR series.

Both sides do the whole job from a folder name to a numpy array: medjax discovers and decodes the
files (``workers=`` decoding processes for compressed series; the pool stays up across reads, so
the warm-up read, printed separately, also pays its start-up); SimpleITK lists them with
``GetGDCMSeriesFileNames``, reads them with ``ImageSeriesReader`` and converts with
``GetArrayFromImage``, all inside its time. After one warm-up read each, ``--repeats`` reads
alternate (medjax, SimpleITK, medjax, ...) so neither side gets a warmer page cache. The warm-up volumes are compared (voxels with SimpleITK's ``[k, j, i]``
transposed to ``[i, j, k]``, spacing, origin and direction with LPS→RAS): a difference prints
MISMATCH and the script exits 1. Prints one JSON line per case with the median seconds, slices/s
and ratio = SimpleITK time / medjax time (> 1: medjax is faster); nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from medjax.io import dicom, synthetic  # noqa: E402
from medjax.io.volume import LPS_TO_RAS  # noqa: E402


def read_medjax(folder: str, workers: int | None):
  return dicom.read_dicom_series(folder, workers=workers)


def read_sitk(folder: str) -> tuple[sitk.Image, np.ndarray]:
  files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder)
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(files)
  image = reader.Execute()
  return image, sitk.GetArrayFromImage(image)


def compare(vol, image: sitk.Image, array: np.ndarray) -> list[str]:
  """What differs between the medjax Volume and the SimpleITK image (empty: the same)."""
  problems = []
  if vol.array.shape[-1] != 1:
    return [f"medjax has {vol.array.shape[-1]} channels, this benchmark expects 1"]
  ours, theirs = vol.array[..., 0], array.transpose(2, 1, 0)  # sitk [k, j, i] -> [i, j, k]
  if ours.shape != theirs.shape:
    return [f"shape medjax {ours.shape} vs SimpleITK {theirs.shape}"]
  diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
  if not np.all(diff <= 1e-4 + 1e-6 * np.abs(theirs)):
    bad = int(np.count_nonzero(diff > 1e-4 + 1e-6 * np.abs(theirs)))
    problems.append(f"voxels: {bad} differ, max |diff| {diff.max():.6g} "
                    f"(dtypes {ours.dtype} vs {theirs.dtype})")
  spacing = np.array(image.GetSpacing())
  if not np.allclose(vol.spacing, spacing, atol=1e-4):
    problems.append(f"spacing medjax {vol.spacing.tolist()} vs SimpleITK {spacing.tolist()}")
  origin = LPS_TO_RAS @ np.array(image.GetOrigin())
  if not np.allclose(vol.origin, origin, atol=1e-3):
    problems.append(f"origin (RAS) medjax {vol.origin.tolist()} vs SimpleITK {origin.tolist()}")
  direction = LPS_TO_RAS @ np.array(image.GetDirection()).reshape(3, 3)
  if not np.allclose(vol.direction, direction, atol=1e-4):
    problems.append(f"direction (RAS) medjax {vol.direction.tolist()} vs SimpleITK "
                    f"{direction.tolist()}")
  return problems


def bench_case(name: str, folder: str, repeats: int, workers: int | None) -> dict:
  t = time.perf_counter()
  vol = read_medjax(folder, workers)
  warm_medjax = time.perf_counter() - t
  t = time.perf_counter()
  image, array = read_sitk(folder)
  warm_sitk = time.perf_counter() - t
  problems = compare(vol, image, array)
  shape, slices = list(vol.shape), int(vol.shape[2])
  syntax = vol.metadata.get("TransferSyntax", "")
  print(f"{name}: {slices} slices, [i,j,k] {shape}, {syntax}; medjax {vol.array.dtype}, "
        f"SimpleITK {array.dtype}; warm-up medjax {warm_medjax:.3f} s, "
        f"SimpleITK {warm_sitk:.3f} s", flush=True)
  for p in problems:
    print(f"  MISMATCH {name}: {p}", flush=True)
  del vol, image, array

  medjax_s, sitk_s = [], []
  for _ in range(repeats):
    t = time.perf_counter()
    read_medjax(folder, workers)
    medjax_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    read_sitk(folder)
    sitk_s.append(time.perf_counter() - t)
  m, s = statistics.median(medjax_s), statistics.median(sitk_s)
  print(f"  medjax    {m:.3f} s median ({slices / m:7.1f} slices/s)  runs "
        f"{' '.join(f'{x:.3f}' for x in medjax_s)}")
  print(f"  SimpleITK {s:.3f} s median ({slices / s:7.1f} slices/s)  runs "
        f"{' '.join(f'{x:.3f}' for x in sitk_s)}")
  print(f"  ratio SimpleITK/medjax {s / m:.3f} ({'medjax' if s > m else 'SimpleITK'} faster)",
        flush=True)
  return {"case": name, "slices": slices, "shape_ijk": shape, "transfer_syntax": syntax,
          "workers": workers, "repeats": repeats, "medjax_s": round(m, 4),
          "sitk_s": round(s, 4), "medjax_slices_per_s": round(slices / m, 1),
          "sitk_slices_per_s": round(slices / s, 1), "ratio_sitk_over_medjax": round(s / m, 3),
          "equal": not problems, "mismatches": problems}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--workers", type=int, default=None,
                 help="medjax read_dicom_series(workers=...); default: the CPU count")
  p.add_argument("--slices", type=int, default=300, help="synthetic series: number of slices")
  p.add_argument("--size", type=int, default=512, help="synthetic series: rows = columns")
  p.add_argument("--skip_synthetic", action="store_true")
  p.add_argument("--skip_tcia", action="store_true", help="leave out the TCIA T1post MR series")
  a = p.parse_args()
  data = os.environ.get("MEDJAX_DATA_DIR",
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                     "shared", "data"))
  print(f"cores {os.cpu_count()}, SimpleITK threads "
        f"{sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}, medjax workers "
        f"{a.workers if a.workers else 'default'}", flush=True)

  results = []
  with tempfile.TemporaryDirectory(prefix="medjax_dicom_bench_") as tmp:
    cases = []
    total = os.path.join(data, "dicom", "totalsegmentator_ct_series", "slices")
    if os.path.isdir(total):
      cases.append(("totalsegmentator_ct_j2k", total))
    else:
      print(f"skipping the TotalSegmentator series: {total} not found")
    if not a.skip_synthetic:
      t = time.perf_counter()
      synthetic.write_ct_series(tmp, synthetic.ct_phantom((a.slices, a.size, a.size)))
      print(f"wrote synthetic {a.slices}×{a.size}² uncompressed CT in "
            f"{time.perf_counter() - t:.1f} s", flush=True)
      cases.append((f"synthetic_ct_{a.slices}x{a.size}", tmp))
    if not a.skip_tcia:
      found = sorted(glob.glob(os.path.join(data, "dicom", "tcia_brain_tumor_progression", "*",
                                            "*T1post*")))
      if found:
        cases.append(("tcia_t1post_mr", found[0]))
      else:
        print("skipping TCIA T1post: not found")
    for name, folder in cases:
      results.append(bench_case(name, folder, a.repeats, a.workers))

  for r in results:
    print(json.dumps({**r, "cores": os.cpu_count()}))
  bad = [r["case"] for r in results if not r["equal"]]
  if bad:
    print(f"MISMATCH between medjax and SimpleITK in: {', '.join(bad)}")
    sys.exit(1)


if __name__ == "__main__":
  main()
