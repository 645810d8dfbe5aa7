"""`python -m medjax.infer.predict`: new studies in (PNG, NIfTI, DICOM), tables and masks out."""

import contextlib
import csv
import glob
import io
import json
import os

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from absl import flags
from conftest import computed_once, write_msd, write_synthetic_medmnist
from helpers import apply_overrides, seg_config
from helpers import config as cls_config
from PIL import Image

from configs import adrenalmnist3d_resnet18
from medjax.infer import predict
from medjax.infer.trained import TrainedModel
from medjax.io import dicom, synthetic
from medjax.io.volume import Volume
from medjax.train import loop

PATIENT = {"PatientName": "DOE^JANE", "PatientID": "PID-314159", "PatientBirthDate": "19700101"}
# What must not leak: the values as stored and as a PersonName prints.
SECRETS = ("DOE^JANE", "DOE JANE", "PID-314159", "19700101")
# Oblique (20° about z) with the slice normal pointing inferior, so neither the file order, the
# InstanceNumber nor the world z order is the stacking order.
_C, _S = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
OBLIQUE = (_C, _S, 0.0, _S, -_C, 0.0)


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _text_outputs(folder):
  """Every file predict writes except the DICOM-SEG objects, as bytes."""
  return {p: open(p, "rb").read() for p in glob.glob(os.path.join(folder, "**", "*"),
                                                      recursive=True)
          if os.path.isfile(p) and not p.endswith(".dcm")}


def _assert_no_patient_identity(folder, *texts):
  for path, data in _text_outputs(folder).items():
    for secret in SECRETS:
      assert secret.encode() not in data, (secret, path)
  for text in texts:
    for secret in SECRETS:
      assert secret not in text


def _labels_at(ds, affine, labels):
  """The label map's values at one DICOM image's pixels, from the PS3.3 pixel geometry alone."""
  ipp, iop = np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float)
  spacing = np.array(ds.PixelSpacing, float)
  r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
  lps = ipp + c[..., None] * spacing[1] * iop[:3] + r[..., None] * spacing[0] * iop[3:]
  inv = np.linalg.inv(affine)
  ijk = (lps * [-1, -1, 1]) @ inv[:3, :3].T + inv[:3, 3]
  assert np.max(np.abs(ijk - np.rint(ijk))) < 1e-2  # on the label grid: no interpolation
  ijk = np.rint(ijk).astype(int)
  return labels[ijk[..., 0], ijk[..., 1], ijk[..., 2]]


def _assert_seg_matches(seg_path, source_files, nifti_path):
  """The SEG references exactly the series and each of its frames holds the label map's values at
  that source image's pixels."""
  seg = hd.seg.segread(seg_path)
  sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
  uids = [str(ds.SOPInstanceUID) for ds in sources]
  referenced = [str(item.ReferencedSOPInstanceUID)
                for series in seg.ReferencedSeriesSequence
                for item in series.ReferencedInstanceSequence]
  assert sorted(referenced) == sorted(uids)
  label_file = nib.load(nifti_path)
  labels = np.asarray(label_file.dataobj)
  frames = seg.get_pixels_by_source_instance(uids, combine_segments=True,
                                             assert_missing_frames_are_empty=True,
                                             skip_overlap_checks=True)
  for ds, frame in zip(sources, frames):
    np.testing.assert_array_equal(frame, _labels_at(ds, label_file.affine, labels))
  return seg, labels


# --------------------------------------------------------------------------------------------
# Classification


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
  """A classifier trained one step, made once (`computed_once`) and only read by the tests."""

  def train(root):
    data = write_synthetic_medmnist(root, n_train=32, n_val=16)
    workdir = os.path.join(root, "run")
    loop.train_and_evaluate(cls_config(data, steps=1, **{"mesh.data": 1, "eval.every_steps": 1,
                                                         "eval.batch_size": 16}), workdir)
    return workdir

  return computed_once(tmp_path_factory, "predict_cls_run", train)


@pytest.fixture(scope="module")
def cls_out(cls_run, tmp_path_factory):
  """The command line on a folder: a PNG, a NIfTI, a one-slice DICOM CT, a corrupt PNG, a note."""
  root = tmp_path_factory.mktemp("cls_in")
  val = TrainedModel.load(cls_run).source("val")
  folder = root / "inbox"
  (folder / "sub").mkdir(parents=True)
  Image.fromarray(val[0]["image"][..., 0]).save(folder / "xray.png")
  # NIfTI axes are (i along a row, j down the rows), as medjax's Volume.
  nib.save(nib.Nifti1Image(val[1]["image"][..., 0].T[:, :, None], np.eye(4)),
           folder / "sub" / "scan.nii.gz")
  synthetic.write_ct_series(folder / "ct", synthetic.ct_phantom((1, 40, 56)), patient=PATIENT)
  (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image needs")
  (folder / "notes.txt").write_text("not an image")
  out = root / "out"
  fv = flags.FlagValues()
  predict.define_flags(fv)
  fv(["predict", f"--workdir={cls_run}", f"--input={folder}", f"--output={out}"])
  stderr, stdout = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
    code = predict.main([], fv)
  return {"code": code, "out": str(out), "stderr": stderr.getvalue(),
          "stdout": stdout.getvalue(), "val": val, "workdir": cls_run}


def test_a_bad_input_is_reported_and_skipped_and_the_exit_status_says_so(cls_out):
  assert cls_out["code"] == predict.EXIT_SOME_FAILED
  errors = _rows(os.path.join(cls_out["out"], "errors.csv"))
  assert [e["input"] for e in errors] == ["broken.png"]
  assert "unreadable image" in errors[0]["problem"]
  lines = [line for line in cls_out["stderr"].splitlines() if "broken.png" in line]
  assert len(lines) == 1 and "unreadable image" in lines[0]
  rows = _rows(os.path.join(cls_out["out"], "predictions.csv"))
  assert [r["input"] for r in rows] == ["ct", "sub/scan.nii.gz", "xray.png"]  # note.txt skipped
  summary = json.load(open(os.path.join(cls_out["out"], "predict.json")))
  assert (summary["inputs"], summary["predicted"], summary["failed"]) == (4, 3, 1)
  assert summary["settings"]["saliency"] is None  # every setting the outputs depend on


def test_png_and_nifti_get_exactly_the_runs_evaluation_preprocessing(cls_out):
  rows = {r["input"]: r for r in _rows(os.path.join(cls_out["out"], "predictions.csv"))}
  trained = TrainedModel.load(cls_out["workdir"])
  expected = trained.predict(cls_out["val"], progress=False)["probs"]
  for name, index in (("xray.png", 0), ("sub/scan.nii.gz", 1)):
    row = rows[name]
    got = [float(row["prob_normal"]), float(row["prob_pneumonia"])]
    np.testing.assert_allclose(got, expected[index], atol=1e-5, err_msg=name)
    assert row["predicted"] == ("pneumonia" if got[1] >= 0.5 else "normal")
    assert row["predicted_index"] == str(int(got[1] >= 0.5)) and row["threshold"] == "0.5"
  assert rows["ct"]["modality"] == "CT" and rows["xray.png"]["modality"] == ""


def test_no_patient_identity_in_tables_json_or_messages(cls_out):
  _assert_no_patient_identity(cls_out["out"], cls_out["stderr"], cls_out["stdout"])
  header = open(os.path.join(cls_out["out"], "predictions.csv")).readline()
  assert "UID" not in header


def test_threshold_decides_the_binary_label(cls_run, cls_out, tmp_path):
  png = os.path.join(os.path.dirname(cls_out["out"]), "inbox", "xray.png")
  p1 = float(_rows(os.path.join(cls_out["out"], "predictions.csv"))[2]["prob_pneumonia"])
  # A threshold just past the probability flips the default (0.5) decision.
  threshold, label = ((min(p1 + 0.01, 0.999), "normal") if p1 >= 0.5 else
                      (max(p1 - 0.01, 0.001), "pneumonia"))
  summary = predict.predict(cls_run, png, str(tmp_path), threshold=threshold, progress=False)
  row = _rows(str(tmp_path / "predictions.csv"))[0]
  assert summary["failed"] == 0 and row["input"] == "xray.png" and row["predicted"] == label
  assert float(row["threshold"]) == threshold


# --------------------------------------------------------------------------------------------
# Classification preprocessing (no model)


def test_2d_input_is_centre_cropped_resized_and_kept_in_viewer_orientation():
  picture = np.zeros((60, 100), np.uint8)  # rows × columns, as a viewer shows it
  picture[:30, 20:80] = 200  # top half of the centre square bright
  volume = Volume(picture.T[:, :, None, None], np.ones(3), np.zeros(3), np.eye(3))
  image = predict.classification_input(volume, 28, 2, 1)
  assert image.shape == (28, 28, 1) and image.dtype == np.uint8
  assert image[:12].mean() > 190 and image[16:].mean() < 10
  rgb = predict.classification_input(volume, 28, 2, 3)
  assert rgb.shape == (28, 28, 3) and np.array_equal(rgb[..., 0], image[..., 0])


def test_3d_input_is_an_axial_stack_whatever_the_files_axis_order():
  ras = np.zeros((40, 30, 20, 1), np.float32)
  ras[20:, :, 15:] = 100.0  # the patient's right (RAS: i grows rightwards), superior
  ras[:, :10, :] += 50.0  # posterior
  canonical = Volume(ras, (1.0, 1.0, 2.0), (0, 0, 0), np.eye(3), modality="MR")
  flipped = canonical.reoriented(np.diag([-1.0, -1.0, 1.0, 1.0])[[1, 0, 2, 3]])
  assert flipped.orientation != canonical.orientation
  a = predict.classification_input(canonical, 16, 3, 1)
  b = predict.classification_input(flipped, 16, 3, 1)
  assert a.shape == (16, 16, 16, 1)
  np.testing.assert_array_equal(a, b)
  d, h, w = (a[..., 0] > 200).nonzero()  # right + superior + posterior: the brightest corner
  assert d.min() >= 8 and h.min() >= 8 and w.max() < 8


def test_intensity_maps_onto_the_uint8_range():
  hu = Volume(np.array([-1000.0, 50.0, 2000.0]).reshape(3, 1, 1, 1), np.ones(3), np.zeros(3),
              np.eye(3), modality="CT")
  np.testing.assert_allclose(predict.intensity_op("auto", hu)(hu.array).ravel(),
                             [0.0, 127.5, 255.0])  # soft-tissue window, level 50 width 400
  np.testing.assert_allclose(predict.intensity_op("-600,1500", hu)(hu.array).ravel(),
                             [59.5, 238.0, 255.0])
  grey = Volume(np.array([3, 200], np.uint8).reshape(2, 1, 1, 1), np.ones(3), np.zeros(3),
                np.eye(3))
  np.testing.assert_array_equal(predict.intensity_op("auto", grey)(grey.array).ravel(), [3, 200])
  with pytest.raises(ValueError, match="level,width"):
    predict.check_intensity("brightish")


# --------------------------------------------------------------------------------------------
# Inputs


def test_folders_yield_each_series_and_file_once_and_skip_the_output_folder(tmp_path):
  inbox = tmp_path / "inbox"
  hu = synthetic.ct_phantom((3, 8, 8))
  synthetic.write_ct_series(inbox / "study", hu)
  for path in synthetic.write_ct_series(tmp_path / "second", hu):  # same file names: renamed
    os.rename(path, inbox / "study" / f"B{os.path.basename(path)}")
  synthetic.write_ct_series(inbox / "other" / "a", hu[:2], series_uid="1.2.3.4")
  synthetic.write_ct_series(inbox / "other" / "b", hu[2:], series_uid="1.2.3.4",
                            origin=(-200, -180, -295))
  (inbox / "out").mkdir()
  (inbox / "out" / "x_seg.nii.gz").write_bytes(b"earlier output")
  (inbox / "bad.dcm").write_bytes(b"no dicom here")
  inputs, failures, skipped = predict.find_inputs(str(inbox), exclude=str(inbox / "out"))
  names = [(i.kind, i.name, len(i.files)) for i in inputs]
  assert names == [("dicom", "other", 3), ("dicom", "study#1", 3), ("dicom", "study#2", 3)]
  assert [f.input for f in failures] == ["bad.dcm"] and skipped == 0
  one, _, _ = predict.find_inputs(str(inbox / "other" / "a"))
  assert [(i.kind, i.name) for i in one] == [("dicom", "a")]


# --------------------------------------------------------------------------------------------
# DICOM-SEG (no model)


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
def test_dicom_seg_frames_land_on_their_source_slices(tmp_path, seg_type):
  files = synthetic.write_ct_series(tmp_path / "ct", synthetic.ct_phantom((7, 12, 10)),
                                    spacing=(1.2, 0.9, 2.5), orientation=OBLIQUE, patient=PATIENT)
  volume = dicom.read_dicom_series(str(tmp_path / "ct"))
  i, j, k = np.meshgrid(*map(np.arange, volume.shape), indexing="ij")
  labels = np.where((k % 3 == 0) & (i < 6), 1, np.where(j > 2 * k, 2, 0)).astype(np.uint8)
  labels[..., 4] = 0  # an empty slice: its frames are omitted
  label_volume = volume.replace(array=labels[..., None])
  nifti = str(tmp_path / "labels.nii.gz")
  nib.save(nib.Nifti1Image(labels, volume.affine), nifti)
  path = str(tmp_path / "seg.dcm")
  predict.write_dicom_seg(label_volume, files[::-1], ["background", "outer", "core"], path,
                          segmentation_type=seg_type)
  seg, _ = _assert_seg_matches(path, files, nifti)
  assert seg.SegmentationType == seg_type
  # LABELMAP objects also describe segment 0 (background).
  assert [s.SegmentLabel for s in seg.SegmentSequence if s.SegmentNumber > 0] == ["outer", "core"]
  assert str(seg.PatientName) == PATIENT["PatientName"]  # the standard's Patient module


def test_dicom_seg_refuses_a_grid_it_would_have_to_interpolate(tmp_path):
  files = synthetic.write_ct_series(tmp_path / "ct", synthetic.ct_phantom((4, 8, 8)))
  volume = dicom.read_dicom_series(str(tmp_path / "ct"))
  affine = volume.affine.copy()
  affine[:3, 3] += 0.5 * affine[:3, 0]  # half a voxel along i
  shifted = Volume.from_affine(np.zeros((*volume.shape, 1), np.uint8), affine)
  with pytest.raises(ValueError, match="off the label map's voxel grid"):
    predict.write_dicom_seg(shifted, files, ["background", "x"], str(tmp_path / "seg.dcm"))


def test_dicom_seg_of_an_enhanced_multiframe_ct(data_root, tmp_path):
  """One multi-frame source: frame n of the SEG's source is frame n of the file, placed through
  its per-frame functional groups."""
  path = os.path.join(data_root, "dicom", "pydicom_testdata", "multiframe", "eCT_Supplemental.dcm")
  if not os.path.isfile(path):
    pytest.skip(f"{path} is missing")
  volume = dicom.read_dicom_file(path)
  i, j, k = np.meshgrid(*map(np.arange, volume.shape), indexing="ij")
  labels = ((i // 64 + 2 * (j // 64) + k) % 3).astype(np.uint8)
  predict.write_dicom_seg(volume.replace(array=labels[..., None]), [path], ["bg", "a", "b"],
                          str(tmp_path / "seg.dcm"))
  seg = hd.seg.segread(str(tmp_path / "seg.dcm"))
  source = pydicom.dcmread(path)
  frames = seg.get_pixels_by_source_frame(
      source.SOPInstanceUID, list(range(1, int(source.NumberOfFrames) + 1)),
      combine_segments=True, assert_missing_frames_are_empty=True, skip_overlap_checks=True)
  shared = source.SharedFunctionalGroupsSequence[0]
  for n, frame in enumerate(frames):
    groups = source.PerFrameFunctionalGroupsSequence[n]
    plane = pydicom.Dataset()
    for keyword, sequence in (("ImagePositionPatient", "PlanePositionSequence"),
                              ("ImageOrientationPatient", "PlaneOrientationSequence"),
                              ("PixelSpacing", "PixelMeasuresSequence")):
      item = (groups.get(sequence) or shared.get(sequence))[0]
      setattr(plane, keyword, item[keyword].value)
    plane.Rows, plane.Columns = source.Rows, source.Columns
    np.testing.assert_array_equal(frame, _labels_at(plane, volume.affine, labels))


# --------------------------------------------------------------------------------------------
# Segmentation


def test_segmentation_writes_masks_on_the_input_grid_and_a_dicom_seg(seg_run, tmp_path):
  workdir, msd = seg_run
  inbox = tmp_path / "inbox"
  inbox.mkdir()
  nifti_in = inbox / "case.nii.gz"
  nifti_in.write_bytes(open(os.path.join(msd, "imagesTr", "case_000.nii.gz"), "rb").read())
  files = synthetic.write_ct_series(inbox / "ct", synthetic.ct_phantom((10, 24, 20)),
                                    spacing=(1.2, 1.0, 2.0), orientation=OBLIQUE,
                                    patient=PATIENT)
  out = tmp_path / "out"
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    summary = predict.predict(workdir, str(inbox), str(out), probabilities=True, mirror=False,
                              progress=False)
  assert summary["failed"] == 0, summary["failures"]
  rows = {r["input"]: r for r in _rows(str(out / "predictions.csv"))}
  assert set(rows) == {"case.nii.gz", "ct"}
  source = nib.load(str(nifti_in))
  for name, affine, shape in (("case.nii.gz", source.affine, source.shape),
                              ("ct", dicom.read_dicom_series(str(inbox / "ct")).affine,
                               (20, 24, 10))):
    seg = nib.load(str(out / rows[name]["segmentation"]))
    assert seg.shape == shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, affine, atol=1e-3)
    assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(affine)
    probs = nib.load(str(out / rows[name]["probabilities"]))
    assert probs.shape == (*shape, 3)
    np.testing.assert_allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-4)
    assert float(rows[name]["ml_outer"]) >= 0.0
  assert rows["case.nii.gz"]["dicom_seg"] == ""
  seg, _ = _assert_seg_matches(str(out / rows["ct"]["dicom_seg"]), files,
                               str(out / rows["ct"]["segmentation"]))
  assert str(seg.PatientID) == PATIENT["PatientID"]
  _assert_no_patient_identity(str(out), stderr.getvalue())


def _check_series_outputs(inbox, out, summary):
  """Every series under ``inbox`` has a label map on its grid and a DICOM-SEG that matches it."""
  series = dicom.list_dicom_series(inbox)
  rows = _rows(str(out / "predictions.csv"))
  assert len(rows) == len(series) == summary["predicted"]
  for row in rows:
    folder = inbox if row["input"] == os.path.basename(inbox) else os.path.join(inbox,
                                                                                 row["input"])
    files = next(s.files for s in series if os.path.dirname(s.files[0]) == folder)
    volume = dicom.read_dicom_series(list(files))
    written = nib.load(str(out / row["segmentation"]))
    assert written.shape == volume.shape
    np.testing.assert_allclose(written.affine, volume.affine, atol=1e-3)
    if row["dicom_seg"]:
      _assert_seg_matches(str(out / row["dicom_seg"]), files, str(out / row["segmentation"]))
  identity = {str(pydicom.dcmread(s.files[0], stop_before_pixels=True).get(k, "")).strip()
              for s in series for k in ("PatientName", "PatientID", "PatientBirthDate")}
  for path, data in _text_outputs(str(out)).items():
    for value in identity - {""}:
      assert value.encode() not in data, (value, path)
  return rows


@pytest.mark.slow
def test_real_dicom_series(data_root, tmp_path):
  """TotalSegmentator's CT (JPEG 2000) and the TCIA MR study (oblique, four series, files out of
  order) end to end, with a tiny segmentation run."""
  dicom_root = os.path.join(data_root, "dicom")
  if not os.path.isdir(dicom_root):
    pytest.skip(f"{dicom_root} is missing")
  msd = write_msd(tmp_path / "msd", n=5)
  workdir = str(tmp_path / "run")
  # A 2 mm plan and large windows: the 512² CT then takes a few hundred windows, not thousands.
  loop.train_and_evaluate(seg_config(msd, steps=2, **{
      "data.plan.target_spacing": [2.0, 2.0, 2.0], "data.plan.patch_size": [48, 48, 16]}),
      workdir)

  def run(inbox, name):
    out = tmp_path / "out" / name
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
      summary = predict.predict(workdir, inbox, str(out), mirror=False, progress=False)
    (out / "stderr.log").write_text(stderr.getvalue())  # checked with the other outputs
    return out, summary

  tcia = os.path.join(dicom_root, "tcia_brain_tumor_progression", "PGBM-003_1995-03-29")
  out, summary = run(tcia, "tcia")
  assert summary["failed"] == 0, summary["failures"]
  rows = _check_series_outputs(tcia, out, summary)
  assert len(rows) == 4 and all(r["dicom_seg"] for r in rows)

  # The shipped CT had its study and series UIDs blanked: the label map is written, the SEG
  # (which must reference them) is refused with the reason.
  ct = os.path.join(dicom_root, "totalsegmentator_ct_series", "slices")
  out, summary = run(ct, "ct")
  [failure] = summary["failures"]
  assert "DICOM-SEG not written" in failure.problem and "StudyInstanceUID" in failure.problem
  assert _check_series_outputs(ct, out, summary)[0]["dicom_seg"] == ""
  # With UIDs restored (in a copy), the SEG is written and lands on the right slices.
  fixed = tmp_path / "ct_fixed"
  fixed.mkdir()
  study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
  for path in sorted(glob.glob(os.path.join(ct, "*"))):
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.save_as(fixed / os.path.basename(path))
  out, summary = run(str(fixed), "ct_fixed")
  assert summary["failed"] == 0, summary["failures"]
  assert _check_series_outputs(str(fixed), out, summary)[0]["dicom_seg"]


@pytest.mark.slow
def test_3d_classification_of_a_dicom_series_and_a_nifti(tmp_path):
  data = write_synthetic_medmnist(str(tmp_path), flag="adrenalmnist3d", ndim=3, n_train=16,
                                  n_val=8)
  c = adrenalmnist3d_resnet18.get_config("runlocal")
  c.data.dir = data
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(apply_overrides(c, {"train.steps": 1, "eval.every_steps": 1,
                                              "eval.batch_size": 8, "mesh.data": 1}), workdir)
  inbox = tmp_path / "inbox"
  synthetic.write_ct_series(inbox / "ct", synthetic.ct_phantom((12, 40, 30)), patient=PATIENT)
  nib.save(nib.Nifti1Image(np.random.default_rng(0).random((30, 20, 10), np.float32),
                           np.diag([-1.0, 1.0, 2.0, 1.0])), inbox / "mr.nii.gz")
  Image.fromarray(np.zeros((30, 30), np.uint8)).save(inbox / "flat.png")
  out = tmp_path / "out"
  summary = predict.predict(workdir, str(inbox), str(out), progress=False)
  rows = _rows(str(out / "predictions.csv"))
  assert [r["input"] for r in rows] == ["ct", "mr.nii.gz"]
  assert [(f.input, f.problem) for f in summary["failures"]] == [
      ("flat.png", "the run classifies volumes; this input has shape (30, 30, 1)")]
  for row in rows:
    np.testing.assert_allclose(float(row["prob_normal"]) + float(row["prob_hyperplasia"]), 1.0,
                               atol=1e-5)
  _assert_no_patient_identity(str(out))
