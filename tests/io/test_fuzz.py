"""Fuzzing the readers: mutated real DICOM and NIfTI files read or raise MedjaxIOError, in time.

Hypothesis draws the mutations (derandomized, so every run checks the same cases): bytes
overwritten, a run of bytes deleted or inserted, or the file cut short. Any exception other than
MedjaxIOError, or a read that outlasts its time bound, fails the test.
"""

import os
import signal
import tempfile

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medjax.io import dicom, nifti
from medjax.io.errors import MedjaxIOError

# Mutated files make pydicom warn (odd VRs, unknown encodings); the warnings are the point.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SECONDS_PER_CASE = 10
DICOM_FILES = ("small/CT_small.dcm", "small/MR_small_RLE.dcm", "small/MR_small_jp2klossless.dcm",
               "small/MR_small_jpeg_ls_lossless.dcm", "small/MR_small_bigendian.dcm",
               "multiframe/emri_small.dcm", "compressed/JPEGBaseline_1s_1f_u_08_08.dcm")


@st.composite
def mutations(draw, data: bytes) -> bytes:
  n = len(data)
  kind = draw(st.sampled_from(["overwrite", "delete", "insert", "truncate"]))
  # Half the edits land in the first 1 KiB, where the header lives and damage matters most.
  at = draw(st.one_of(st.integers(0, min(n, 1024) - 1), st.integers(0, n - 1)))
  if kind == "overwrite":
    chunk = draw(st.binary(min_size=1, max_size=8))
    return data[:at] + chunk + data[at + len(chunk):]
  if kind == "delete":
    return data[:at] + data[at + draw(st.integers(1, 64)):]
  if kind == "insert":
    return data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
  return data[:at]


class _Timeout(Exception):
  pass


def _read_bounded(read, path):
  """Runs ``read(path)``; returns the exception it raised (None if it read), failing on a hang."""

  def alarm(signum, frame):
    raise _Timeout(f"{path}: read took over {SECONDS_PER_CASE} s")

  previous = signal.signal(signal.SIGALRM, alarm)
  signal.alarm(SECONDS_PER_CASE)
  try:
    read(path)
    return None
  except MedjaxIOError as e:
    assert e.path == path, e
    return e
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def dicom_corpus():
  root = os.environ.get("MEDJAX_DATA_DIR", "")
  folder = os.path.join(root, "dicom/pydicom_testdata")
  if not os.path.isdir(folder):
    pytest.skip("pydicom_testdata under $MEDJAX_DATA_DIR/dicom is missing")
  return [open(os.path.join(folder, f), "rb").read() for f in DICOM_FILES]


@pytest.fixture(scope="module")
def nifti_corpus():
  rng = np.random.default_rng(0)
  files = []
  with tempfile.TemporaryDirectory() as tmp:
    for suffix, dtype in ((".nii", np.int16), (".nii.gz", np.float32), (".nii.gz", np.uint8)):
      path = os.path.join(tmp, "image" + suffix)
      array = rng.uniform(0, 100, size=(12, 10, 8)).astype(dtype)
      affine = np.diag([-0.8, 0.9, 2.5, 1.0])
      nib.save(nib.Nifti1Image(array, affine), path)
      files.append(open(path, "rb").read())
  return files


def _fuzz(corpus, suffix, read, data_strategy):
  outcomes = {"read": 0, "MedjaxIOError": 0}

  @settings(max_examples=500, derandomize=True, deadline=None, database=None,
            suppress_health_check=list(HealthCheck))
  @given(st.data())
  def case(data):
    original = corpus[data.draw(st.integers(0, len(corpus) - 1))]
    mutated = data.draw(mutations(original))
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "case" + suffix)
      with open(path, "wb") as f:
        f.write(mutated)
      error = _read_bounded(read, path)
    outcomes["read" if error is None else "MedjaxIOError"] += 1

  case()
  return outcomes


def test_fuzzed_dicom_reads_or_raises_medjax_io_error(dicom_corpus):
  outcomes = _fuzz(dicom_corpus, ".dcm", dicom.read_dicom_file, mutations)
  assert outcomes["read"] > 0 and outcomes["MedjaxIOError"] > 0, outcomes


def test_fuzzed_nifti_reads_or_raises_medjax_io_error(nifti_corpus):
  outcomes = _fuzz(nifti_corpus, ".nii.gz", nifti.read_nifti, mutations)
  assert outcomes["read"] > 0 and outcomes["MedjaxIOError"] > 0, outcomes
