"""``python -m medjax.infer.align``: a multi-channel NIfTI and an overlay figure, one-line errors."""

import logging
import os

import nibabel as nib
import numpy as np
from helpers import run_cli

from medjax.infer import align as align_cli
from medjax.io import synthetic

_MARKERS = {"PatientName": "Zzaligner^Qqfirst", "PatientID": "ID-ALIGN-4471",
            "PatientBirthDate": "19310905"}


def _run(*args):
  return run_cli(align_cli, *args)


def _series(tmp_path, name, origin=(-20.0, -18.0, -12.0), frame_uid="1.2.826.0.1.3680043.8.498.21",
            spacing=(1.6, 1.6, 2.5)):
  hu = synthetic.ct_phantom((10, 24, 26))
  synthetic.write_ct_series(tmp_path / name, hu, spacing=spacing, origin=origin,
                            frame_uid=frame_uid, patient=_MARKERS)
  return str(tmp_path / name)


def test_series_are_stacked_on_the_reference_grid_with_a_figure(tmp_path, caplog):
  ref = _series(tmp_path, "ct")
  moving = _series(tmp_path, "coarse", origin=(-22.0, -20.0, -14.0), spacing=(2.0, 2.0, 3.0))
  mask = tmp_path / "mask.nii.gz"
  affine = np.diag([-2.0, -2.0, 2.0, 1.0])  # RAS+ of an LPS grid, as the reader makes it
  affine[:3, 3] = (20.0, 18.0, -12.0)
  labels = np.zeros((20, 20, 10), np.uint8)
  labels[8:12, 8:12, 3:7] = 1
  nib.save(nib.Nifti1Image(labels, affine), mask)
  out, figure = str(tmp_path / "out/aligned.nii.gz"), str(tmp_path / "out/overlay.png")
  with caplog.at_level(logging.DEBUG):
    code, stdout, stderr = _run(f"--reference={ref}", f"--moving={moving}", f"--labels={mask}",
                                f"--out={out}", f"--out_labels={tmp_path}/out/labels.nii.gz",
                                f"--figure={figure}")
  assert code == 0 and not stderr and "2 channel(s) on a 26×24×10 grid" in stdout
  image = nib.load(out)
  assert image.shape == (26, 24, 10, 2)
  np.testing.assert_allclose(image.affine, nib.load(f"{tmp_path}/out/labels.nii.gz").affine)
  assert set(np.unique(np.asarray(nib.load(f"{tmp_path}/out/labels.nii.gz").dataobj))) == {0, 1}
  assert 0 < os.path.getsize(figure) < 300_000
  for marker in _MARKERS.values():
    assert marker not in stdout + caplog.text and marker.split("^")[0] not in stdout + caplog.text


def test_other_frame_or_no_overlap_stops_with_one_error_line(tmp_path):
  ref = _series(tmp_path, "ct")
  other = _series(tmp_path, "other", frame_uid="1.2.826.0.1.3680043.8.498.22")
  far = _series(tmp_path, "far", origin=(-20.0, -18.0, 300.0))
  out = str(tmp_path / "aligned.nii.gz")
  for moving, problem in ((other, "another DICOM frame of reference"),
                          (far, "does not overlap")):
    code, stdout, stderr = _run(f"--reference={ref}", f"--moving={moving}", f"--out={out}")
    assert code == 2 and not stdout and not os.path.exists(out)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {moving}: ") and problem in lines[0]
  code, _, stderr = _run(f"--reference={ref}", f"--moving={other}", f"--out={out}",
                         "--assume_registered")
  assert code == 0 and not stderr and nib.load(out).shape == (26, 24, 10, 2)
