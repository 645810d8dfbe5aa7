"""DICOM reader: geometry against SimpleITK and the shipped NIfTI, pydicom's corpus, bad input."""

import glob
import gzip
import json
import logging
import os
import shutil

import numpy as np
import pydicom
import pytest

from medjax.io import dicom, nifti, synthetic
from medjax.io.errors import MedjaxIOError
from medjax.io.volume import LPS_TO_RAS

sitk = pytest.importorskip("SimpleITK")


def _dicom_root(data_root):
  root = os.path.join(data_root, "dicom")
  if not os.path.isdir(root):
    pytest.skip(f"{root} is missing")
  return root


def _real_series(data_root):
  root = _dicom_root(data_root)
  return [os.path.join(root, "totalsegmentator_ct_series/slices")] + sorted(
      glob.glob(os.path.join(root, "tcia_brain_tumor_progression/*/*")))


def _sitk_series(folder):
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
  return reader.Execute()


def test_real_series_equal_simpleitk(data_root):
  for folder in _real_series(data_root):
    reference = _sitk_series(folder)
    volume = dicom.read_dicom_series(folder)
    assert volume.shape == reference.GetSize(), folder
    np.testing.assert_allclose(volume.spacing, reference.GetSpacing(), atol=1e-6, err_msg=folder)
    np.testing.assert_allclose(volume.origin, LPS_TO_RAS @ reference.GetOrigin(), atol=1e-6)
    direction = np.reshape(reference.GetDirection(), (3, 3))
    np.testing.assert_allclose(volume.direction, LPS_TO_RAS @ direction, atol=1e-6)
    voxels = sitk.GetArrayFromImage(reference).transpose(2, 1, 0)  # [k, j, i] → [i, j, k]
    np.testing.assert_array_equal(volume.array[..., 0], voxels, err_msg=folder)


def test_totalsegmentator_series_matches_its_nifti(data_root):
  root = _dicom_root(data_root)
  ct = dicom.read_dicom_series(os.path.join(root, "totalsegmentator_ct_series/slices"))
  seg = nifti.read_nifti_labels(
      os.path.join(root, "totalsegmentator_ct_series/example_seg_dicom.nii.gz"))
  assert ct.modality == "CT" and ct.array.dtype == np.float32
  assert ct.array.min() >= -1100 and ct.array.max() > 500  # HU: air and bone
  canonical = ct.to_canonical()
  assert canonical.shape == seg.shape
  np.testing.assert_allclose(canonical.affine, seg.affine, atol=1e-3)
  # The segmentation must land on the body: labelled voxels are not air.
  assert np.median(canonical.array[seg.array[..., 0] > 0]) > -200


def test_tcia_oblique_series_come_out_in_spatial_order(data_root):
  root = _dicom_root(data_root)
  folder = sorted(glob.glob(os.path.join(root, "tcia_brain_tumor_progression/*/*T1post*")))[0]
  files = sorted(os.listdir(folder))
  by_name = [float(np.dot(pydicom.dcmread(os.path.join(folder, f)).ImagePositionPatient,
                          [0, 0, 1])) for f in files]
  assert by_name != sorted(by_name) and by_name != sorted(by_name, reverse=True)  # a real test
  volume = dicom.read_dicom_series(folder)
  assert abs(volume.direction[1, 2]) > 0.1  # oblique: the slice normal is tilted towards y
  centres = volume.voxel_to_world(np.array([[0, 0, k] for k in range(volume.shape[2])]))
  steps = np.diff(centres @ volume.direction[:, 2])
  np.testing.assert_allclose(steps, volume.spacing[2], rtol=1e-4)
  # Every slice's pixels equal the file that sits at that position.
  for k in (0, 7, 21):
    world_lps = LPS_TO_RAS @ centres[k]
    match = [f for f in files if np.allclose(
        pydicom.dcmread(os.path.join(folder, f)).ImagePositionPatient, world_lps, atol=1e-3)]
    assert len(match) == 1
    expected = pydicom.dcmread(os.path.join(folder, match[0])).pixel_array.T
    np.testing.assert_array_equal(volume.array[:, :, k, 0], expected)


# Files of pydicom's corpus that must fail, with the reason (everything else must read).
EXPECTED_FAILURES = {
    "dicomdirtests/DICOMDIR": "13 series found",
    "dicomdirtests/DICOMDIR-bigEnd": "13 series found",
    "dicomdirtests/DICOMDIR-implicit": "13 series found",
    "dicomdirtests/DICOMDIR-nooffset": "13 series found",
    "dicomdirtests/DICOMDIR-reordered": "13 series found",
    "dicomdirtests/DICOMDIR-nopatient": "unreadable DICOMDIR",
    "dicomdirtests/DICOMDIR-empty.dcm": "references no files",
    "dicomdirtests/README.txt": "not a DICOM file",
}


def _corpus(data_root):
  root = os.path.join(_dicom_root(data_root), "pydicom_testdata")
  files = [f for f in glob.glob(os.path.join(root, "**/*"), recursive=True)
           if os.path.isfile(f) and "LICENSE" not in f]
  return root, sorted(files)


def test_pydicom_corpus_reads_equal_to_pydicom_or_fails_with_reason(data_root):
  root, files = _corpus(data_root)
  assert len(files) > 40
  table = {}
  for path in files:
    name = os.path.relpath(path, root)
    try:
      volume = dicom.read_dicom(path, rescale=False, invert_monochrome1=False)
    except MedjaxIOError as e:
      table[name] = e.cause
      assert name in EXPECTED_FAILURES, f"{name} failed: {e}"
      assert EXPECTED_FAILURES[name] in e.cause, e
      continue
    assert name not in EXPECTED_FAILURES, f"{name} read but should fail"
    table[name] = "reads"
    ds = pydicom.dcmread(path)
    reference = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
      reference = reference[None]
    if reference.ndim == 3:
      reference = reference[..., None]
    reference = reference.transpose(2, 1, 0, 3)  # [frame, row, col, C] → [i, j, k, C]
    if volume.shape[2] > 1 and "PerFrameFunctionalGroupsSequence" in ds:
      # Frames were sorted in space; compare as sets of slices along k.
      got = sorted(volume.array[:, :, k].tobytes() for k in range(volume.shape[2]))
      want = sorted(reference[:, :, k].tobytes() for k in range(reference.shape[2]))
      assert got == want, name
    else:
      np.testing.assert_array_equal(volume.array, reference, err_msg=name)
  reads = [n for n, v in table.items() if v == "reads"]
  assert len(reads) >= 30, table


def test_dicomdir_series_by_uid(data_root):
  root, _ = _corpus(data_root)
  path = os.path.join(root, "dicomdirtests/DICOMDIR")
  series = dicom.list_dicom_series(path)
  assert len(series) == 13
  ct = max((s for s in series if s.modality == "CT"), key=lambda s: len(s.files))
  volume = dicom.read_dicom(path, series_uid=ct.uid)
  assert volume.modality == "CT" and volume.shape[2] == len(ct.files)


def test_rescale_gives_hounsfield_units(data_root):
  root, _ = _corpus(data_root)
  path = os.path.join(root, "small/CT_small.dcm")
  ds = pydicom.dcmread(path)
  volume = dicom.read_dicom_file(path)
  expected = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).T
  assert volume.array.dtype == np.float32
  np.testing.assert_allclose(volume.array[:, :, 0, 0], expected)


def test_monochrome1_is_inverted(data_root):
  root, _ = _corpus(data_root)
  path = os.path.join(root, "compressed/RG3_J2KR.dcm")
  ds = pydicom.dcmread(path)
  assert ds.PhotometricInterpretation == "MONOCHROME1"
  raw = dicom.read_dicom_file(path, invert_monochrome1=False).array
  inverted = dicom.read_dicom_file(path).array
  np.testing.assert_array_equal(inverted.astype(np.int64), 2**ds.BitsStored - 1 - raw)


def test_colour_to_greyscale(data_root):
  root, _ = _corpus(data_root)
  path = os.path.join(root, "compressed/SC_rgb_jpeg_dcmtk.dcm")
  rgb = dicom.read_dicom_file(path).array
  grey = dicom.read_dicom_file(path, greyscale=True).array
  assert rgb.shape[-1] == 3 and grey.shape[-1] == 1
  np.testing.assert_allclose(grey[..., 0], rgb.astype(np.float32) @ [0.299, 0.587, 0.114],
                             rtol=1e-5)


def test_missing_decoder_names_the_package(data_root, monkeypatch):
  root, _ = _corpus(data_root)
  path = os.path.join(root, "small/MR_small_jp2klossless.dcm")
  decoder = pydicom.pixels.get_decoder(pydicom.uid.JPEG2000Lossless)
  monkeypatch.setattr(decoder, "_available", {})
  monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg-openjpeg",)})
  with pytest.raises(MedjaxIOError, match="pip install pylibjpeg pylibjpeg-openjpeg") as e:
    dicom.read_dicom_file(path)
  assert e.value.path == path


# --- synthetic series -----------------------------------------------------------------------


@pytest.fixture
def phantom():
  return synthetic.ct_phantom((12, 24, 20))


def test_synthetic_series_shuffled_names_oblique(tmp_path, phantom):
  c, s = np.cos(0.3), np.sin(0.3)
  orientation = (1, 0, 0, 0, c, s)  # rows tilted about x: an oblique stack
  paths = synthetic.write_ct_series(tmp_path, phantom, spacing=(0.7, 0.9, 2.5),
                                    orientation=orientation)
  assert sorted(paths) != paths
  volume = dicom.read_dicom_series(tmp_path)
  np.testing.assert_array_equal(volume.array[..., 0], phantom.transpose(2, 1, 0))
  np.testing.assert_allclose(volume.spacing, (0.7, 0.9, 2.5), atol=1e-5)
  normal = np.cross(orientation[:3], orientation[3:])
  expected = LPS_TO_RAS @ np.stack([orientation[:3], orientation[3:], normal], axis=1)
  np.testing.assert_allclose(volume.direction, expected, atol=1e-6)
  np.testing.assert_allclose(volume.origin, LPS_TO_RAS @ np.array([-200.0, -180.0, -300.0]),
                             atol=1e-5)


def test_missing_slice_is_reported(tmp_path, phantom):
  synthetic.write_ct_series(tmp_path, phantom, skip=(5,))
  with pytest.raises(MedjaxIOError, match="about 1 slice\\(s\\) missing") as e:
    dicom.read_dicom_series(tmp_path)
  assert e.value.path == str(tmp_path)
  volume = dicom.read_dicom_series(tmp_path, allow_uneven=True)
  assert volume.shape[2] == 11 and len(volume.metadata["slice_gaps_mm"]) == 10
  assert max(volume.metadata["slice_gaps_mm"]) == pytest.approx(5.0, abs=1e-4)


def test_duplicate_positions_are_reported(tmp_path, phantom):
  uid = pydicom.uid.generate_uid()
  synthetic.write_ct_series(tmp_path / "a", phantom, series_uid=uid)
  synthetic.write_ct_series(tmp_path / "b", phantom, series_uid=uid, seed=1)
  with pytest.raises(MedjaxIOError, match="share a position"):
    dicom.read_dicom_series(tmp_path)


def test_two_series_in_one_folder(tmp_path, phantom):
  synthetic.write_ct_series(tmp_path / "one", phantom)
  synthetic.write_ct_series(tmp_path / "two", phantom[:6] + 100, spacing=(1, 1, 3))
  series = dicom.list_dicom_series(tmp_path)
  assert sorted(len(s.files) for s in series) == [6, 12]
  with pytest.raises(MedjaxIOError, match="2 series found"):
    dicom.read_dicom_series(tmp_path)
  small = next(s for s in series if len(s.files) == 6)
  volume = dicom.read_dicom_series(tmp_path, series_uid=small.uid)
  np.testing.assert_array_equal(volume.array[..., 0], (phantom[:6] + 100).transpose(2, 1, 0))


def test_non_dicom_files_in_the_folder_are_skipped(tmp_path, phantom):
  synthetic.write_ct_series(tmp_path, phantom)
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "empty.dcm").write_bytes(b"")
  volume = dicom.read_dicom_series(tmp_path)
  assert volume.shape == (20, 24, 12)


@pytest.mark.parametrize("damage", ["truncate_pixels", "truncate_header", "drop_pixels",
                                    "bad_spacing", "bad_orientation"])
def test_damaged_file_names_the_file(tmp_path, phantom, damage):
  paths = synthetic.write_ct_series(tmp_path, phantom, shuffle_names=False)
  victim = paths[3]
  if damage.startswith("truncate"):
    data = open(victim, "rb").read()
    keep = len(data) - 100 if damage == "truncate_pixels" else 200
    open(victim, "wb").write(data[:keep])
  else:
    ds = pydicom.dcmread(victim)
    if damage == "drop_pixels":
      del ds.PixelData
    elif damage == "bad_spacing":
      ds.PixelSpacing = [0, 1]
    else:
      ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]
    ds.save_as(victim)
  with pytest.raises(MedjaxIOError) as e:
    dicom.read_dicom_file(victim)
  assert e.value.path == victim


def test_missing_and_empty_paths(tmp_path):
  with pytest.raises(MedjaxIOError, match="no such"):
    dicom.read_dicom(tmp_path / "absent.dcm")
  with pytest.raises(MedjaxIOError, match="no DICOM image files"):
    dicom.read_dicom_series(tmp_path)


MARKERS = {"PatientName": "Zzmarkername^Qqfirst", "PatientID": "ID-MARKER-8812",
           "PatientBirthDate": "19230417"}


def test_identity_never_leaves_the_reader(tmp_path, phantom, caplog):
  folder = tmp_path / "series"
  synthetic.write_ct_series(folder, phantom, patient=MARKERS)
  with caplog.at_level(logging.DEBUG):
    volume = dicom.read_dicom_series(folder)
    one = dicom.read_dicom_file(sorted(folder.iterdir())[0])
    info = dicom.list_dicom_series(folder)
    out = tmp_path / "ct.nii.gz"
    nifti.write_nifti(volume, out)
    written = nifti.read_nifti(out)
  synthetic.write_ct_series(tmp_path / "bad", phantom, patient=MARKERS, skip=(3,))
  with pytest.raises(MedjaxIOError) as error:
    dicom.read_dicom_series(tmp_path / "bad")
  texts = [caplog.text, json.dumps(volume.metadata), json.dumps(one.metadata), repr(volume),
           json.dumps(written.metadata), str(error.value), repr([s.description for s in info]),
           gzip.open(out).read().decode("latin-1")]
  for marker in MARKERS.values():
    for text in texts:
      assert marker not in text and marker.split("^")[0] not in text


def test_worker_processes_decode_the_same_and_report_bad_files(data_root, tmp_path):
  source = os.path.join(_dicom_root(data_root), "totalsegmentator_ct_series/slices")
  pooled = dicom.read_dicom_series(source, workers=2)
  serial = dicom.read_dicom_series(source, workers=1)
  np.testing.assert_array_equal(pooled.array, serial.array)
  folder = shutil.copytree(source, tmp_path / "slices")
  victim = sorted(folder.iterdir())[4]
  data = victim.read_bytes()
  start = data.find(b"\xff\x4f\xff\x51")  # the JPEG 2000 codestream's SOC + SIZ markers
  assert start > 0
  victim.write_bytes(data[:start] + bytes(64) + data[start + 64:])
  with pytest.raises(MedjaxIOError) as e:
    dicom.read_dicom_series(folder, workers=2)
  assert e.value.path == str(victim)
