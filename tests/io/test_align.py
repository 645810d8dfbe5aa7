"""Series onto one grid (`medjax.io.align`): landmarks keep their world position through spacing,
oblique and LPS/RAS storage changes; the real TCIA study; refusals of other frames and no overlap."""

import glob
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medjax.io import align, read_dicom_series, synthetic
from medjax.io.errors import GeometryError, MedjaxIOError
from medjax.io.volume import LPS_TO_RAS, Volume

# Two landmarks (RAS mm), far apart and off-centre so a flip or a swap of axes would move them.
LANDMARKS = np.array([[14.0, -9.0, 11.0], [-19.0, 17.0, -7.0]])
_SIGMA_MM = 5.0
_FRAME = "1.2.826.0.1.3680043.8.498.11"
_OTHER_FRAME = "1.2.826.0.1.3680043.8.498.12"


def _phantom(ras: np.ndarray) -> np.ndarray:
  """HU at world points ``[..., 3]``: a Gaussian blob of 1000 HU at each landmark, 0 elsewhere."""
  d2 = np.sum((ras[..., None, :] - LANDMARKS) ** 2, axis=-1)
  return 1000.0 * np.exp(-d2 / (2 * _SIGMA_MM**2)).sum(axis=-1)


def _write_series(folder, shape, spacing, orientation, origin, frame_uid=_FRAME):
  """The phantom sampled on a DICOM grid (``shape`` = (slices, rows, cols), LPS geometry as
  `synthetic.write_ct_series` takes it), written and read back."""
  row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
  z, r, c = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
  lps = (np.asarray(origin) + c[..., None] * spacing[0] * row + r[..., None] * spacing[1] * col
         + z[..., None] * spacing[2] * np.cross(row, col))
  synthetic.write_ct_series(folder, np.round(_phantom(lps @ LPS_TO_RAS.T)).astype(np.int16),
                            spacing, orientation, origin, frame_uid=frame_uid)
  return read_dicom_series(folder, workers=1)


def _oblique(degrees_a: float, degrees_b: float) -> list[float]:
  """A row and a column cosine turned about two axes (a doubly oblique plane)."""
  a, b = np.deg2rad(degrees_a), np.deg2rad(degrees_b)
  turn_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
  turn_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
  rotation = turn_x @ turn_z
  return [*rotation[:, 0], *rotation[:, 1]]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
  """Reference: axial DICOM (LPS storage); moving: a doubly oblique DICOM series of other spacing
  and field of view, and a RAS-stored NIfTI of other spacing and field of view."""
  root = tmp_path_factory.mktemp("align")
  reference = _write_series(root / "ref", (20, 56, 60), (1.2, 1.1, 3.0), (1, 0, 0, 0, 1, 0),
                            (-36.0, -30.0, -28.0))
  oblique = _write_series(root / "oblique", (26, 64, 52), (1.3, 1.3, 2.2), _oblique(25, 20),
                          (-7.8, -41.9, -42.2))
  affine = np.diag([1.6, 1.6, 1.6, 1.0])
  affine[:3, 3] = (-38.0, -34.0, -26.0)
  ijk = np.stack(np.meshgrid(*(np.arange(n) for n in (50, 44, 30)), indexing="ij"), axis=-1)
  ras_values = _phantom(ijk @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32)
  nib.save(nib.Nifti1Image(ras_values, affine), root / "ras.nii.gz")
  nib.save(nib.Nifti1Image((ras_values > 300).astype(np.uint8), affine), root / "ras_mask.nii.gz")
  return root, reference, oblique


def _landmarks(volume: Volume, channel: int = 0) -> np.ndarray:
  """World positions ``[2, 3]`` of the blobs: intensity-weighted centroids of the voxels above
  300 HU, each connected region matched to its nearest landmark."""
  values = volume.array[..., channel].astype(np.float64)
  regions, count = ndimage.label(values > 300)
  assert count == 2
  centroids = np.array(ndimage.center_of_mass(values, regions, [1, 2]))
  world = volume.voxel_to_world(centroids)
  order = np.argmin(np.linalg.norm(world[:, None] - LANDMARKS[None], axis=-1), axis=0)
  return world[order]


def _errors(found: np.ndarray, reference: Volume) -> tuple[float, float]:
  """Largest landmark error in mm and in reference voxels (along each voxel axis)."""
  mm = float(np.max(np.linalg.norm(found - LANDMARKS, axis=-1)))
  voxels = float(np.max(np.abs(reference.world_to_voxel(found) -
                               reference.world_to_voxel(LANDMARKS))))
  return mm, voxels


def test_landmarks_keep_their_world_position_on_the_reference_grid(series):
  root, reference, oblique = series
  assert reference.orientation == "LPS" and np.all(np.max(np.abs(oblique.direction), 0) < 0.95)
  images, labels = align.read_aligned(root / "ref", [root / "oblique", root / "ras.nii.gz"],
                                      labels=[root / "ras_mask.nii.gz"])
  assert images.shape == reference.shape and images.channels == 3
  np.testing.assert_allclose(images.affine, reference.affine, atol=1e-9)
  assert [os.path.basename(n) for n in images.metadata["channels"]] == [
      "ref", "oblique", "ras.nii.gz"]
  coverage = [a["coverage"] for a in images.metadata["alignment"]]
  assert coverage[0] == 1.0 and 0.5 < min(coverage[1:]) < 1.0  # other fields of view
  assert not np.any(images.array[0, 0, -1, 1:])  # a corner no moving series covers is filled 0
  for channel in range(3):
    mm, voxels = _errors(_landmarks(images, channel), reference)
    assert voxels < 0.5, (channel, mm, voxels)
  # The label map comes by nearest neighbour (only 0 and 1, never a blend) onto the blobs.
  assert labels.array.dtype == np.uint8 and set(np.unique(labels.array)) == {0, 1}
  blobs = images.array[..., 2] > 300
  assert np.sum(blobs & (labels.array[..., 0] == 1)) > 0.8 * np.sum(blobs)


def test_each_voxel_samples_the_moving_series_at_its_own_world_position(series):
  _, reference, oblique = series
  # Linear interpolation of the moving grid's own index coordinates is exact: what comes back is
  # the moving-grid position each reference voxel was sampled at.
  index = np.stack(np.meshgrid(*(np.arange(n) for n in oblique.shape), indexing="ij"), axis=-1)
  coordinates = oblique.replace(array=(index + 1).astype(np.float32))  # + 1: 0 is "not covered"
  sampled = align.resample_to(coordinates, reference).array.astype(np.float64) - 1
  covered = np.all(sampled > -1, axis=-1)
  grid = np.stack(np.meshgrid(*(np.arange(n) for n in reference.shape), indexing="ij"), axis=-1)
  expected = oblique.world_to_voxel(reference.voxel_to_world(grid))
  inner = covered & np.all((expected >= 0) & (expected <= np.array(oblique.shape) - 1), axis=-1)
  gap = oblique.voxel_to_world(sampled[inner]) - reference.voxel_to_world(grid[inner])
  assert inner.mean() > 0.5 and np.max(np.abs(gap)) < 1e-3  # mm (float32 coordinates)
  # Within half a voxel of the moving series' edge values are the edge's (never stretched).
  assert np.max(np.abs(sampled[covered] - expected[covered])) <= 0.5 + 1e-4


def test_series_that_do_not_overlap_are_refused(series, tmp_path):
  root, reference, _ = series
  far = _write_series(tmp_path / "far", (20, 56, 60), (1.2, 1.1, 3.0), (1, 0, 0, 0, 1, 0),
                      (-36.0, -30.0, 400.0))
  with pytest.raises(GeometryError, match="does not overlap") as error:
    align.read_aligned(root / "ref", [tmp_path / "far"])
  assert str(tmp_path / "far") in str(error.value) and isinstance(error.value, MedjaxIOError)
  sliver = far.replace(origin=reference.origin + [0, 0, 45.0])  # 15 of 60 mm in common
  with pytest.raises(GeometryError, match="by only 25%"):
    align.align(reference, [sliver], ["sliver"])
  assert align.align(reference, [sliver], ["sliver"], min_overlap=0.1)[0].shape == reference.shape


def test_another_frame_of_reference_is_refused_unless_declared_registered(series, tmp_path):
  root, reference, _ = series
  _write_series(tmp_path / "other", (20, 56, 60), (1.2, 1.1, 3.0), (1, 0, 0, 0, 1, 0),
                (-36.0, -30.0, -28.0), frame_uid=_OTHER_FRAME)
  with pytest.raises(GeometryError, match="another DICOM frame of reference") as error:
    align.read_aligned(root / "ref", [tmp_path / "other"])
  assert str(tmp_path / "other") in str(error.value)
  assert _FRAME not in str(error.value) and _OTHER_FRAME not in str(error.value)
  images, _ = align.read_aligned(root / "ref", [tmp_path / "other"], assume_registered=True)
  np.testing.assert_allclose(images.array[..., 1], images.array[..., 0], atol=1e-3)


# ----------------------------------------------------------------------------------------------
# The real TCIA study: T1post, FLAIR, T2 and a tumour mask as separate series of one study.


@pytest.fixture(scope="module")
def tcia():
  root = os.environ.get("MEDJAX_DATA_DIR", "")
  found = glob.glob(os.path.join(root, "dicom/tcia_brain_tumor_progression/PGBM-003*"))
  if not root or not found:
    pytest.skip("MEDJAX_DATA_DIR lacks dicom/tcia_brain_tumor_progression/PGBM-003* (the TCIA "
                "Brain-Tumor-Progression study); see ../shared/data/SOURCES.md")
  series = {name.split("-")[1]: os.path.join(found[0], name) for name in os.listdir(found[0])}
  return {key: series[key] for key in ("T1post", "FLAIRreg", "T2reg", "MaskTumor")}


def test_tcia_flair_and_mask_land_on_the_t1post_grid(tcia):
  images, mask = align.read_aligned(tcia["T1post"], [tcia["FLAIRreg"], tcia["T2reg"]],
                                    labels=[tcia["MaskTumor"]])
  t1 = read_dicom_series(tcia["T1post"], workers=1)
  flair = read_dicom_series(tcia["FLAIRreg"], workers=1)
  raw_mask = read_dicom_series(tcia["MaskTumor"], workers=1)
  assert images.shape == t1.shape and images.channels == 3 and mask.channels == 1
  np.testing.assert_allclose(images.affine, t1.affine, atol=1e-9)
  # Every aligned FLAIR voxel: its world position through the aligned grid's affine against that
  # of the FLAIR voxel its value came from, through the FLAIR's own affine.
  sampled = align.resample_to(flair.replace(array=np.stack(np.meshgrid(
      *(np.arange(n, dtype=np.float32) for n in flair.shape), indexing="ij"), axis=-1)), t1)
  grid = np.stack(np.meshgrid(*(np.arange(n) for n in t1.shape), indexing="ij"), axis=-1)
  gap = flair.voxel_to_world(sampled.array) - images.voxel_to_world(grid)
  assert np.max(np.linalg.norm(gap, axis=-1)) < 0.5 * min(t1.spacing)
  assert np.max(np.abs(gap) / t1.spacing) < 0.5
  np.testing.assert_array_equal(images.array[..., 1], flair.array[..., 0].astype(np.float32))
  # The mask keeps its voxels and its world centre.
  assert np.count_nonzero(mask.array) == np.count_nonzero(raw_mask.array) > 1000
  centre = lambda v: v.voxel_to_world(np.argwhere(v.array[..., 0] != 0).mean(axis=0))
  assert np.linalg.norm(centre(mask) - centre(raw_mask)) < 0.5 * min(t1.spacing)


def test_tcia_mask_and_flair_onto_an_axis_aligned_grid_keep_the_tumour_in_place(tcia):
  # A grid of its own (RAS axes, 2 mm, a 64 mm box around the tumour) against the oblique,
  # 6.5 mm-slice series: a real resampling, not a copy.
  raw_mask = align.read_labels(tcia["MaskTumor"])
  centre = raw_mask.voxel_to_world(np.argwhere(raw_mask.array[..., 0] != 0).mean(axis=0))
  box = Volume(np.zeros((32, 32, 32, 1), np.float32), (2.0, 2.0, 2.0), centre - 31.0, np.eye(3))
  mask, flair = (align.align(box, [v], [n], label=label)[0] for v, n, label in (
      (raw_mask, "mask", True), (read_dicom_series(tcia["FLAIRreg"], workers=1), "flair", False)))
  moved = mask.voxel_to_world(np.argwhere(mask.array[..., 0] != 0).mean(axis=0))
  # Nearest neighbour on 6.5 mm slices: the centre moves by well under half a slice.
  assert np.linalg.norm(moved - centre) < 0.5 * raw_mask.spacing[2]
  inside = flair.array[..., 0][mask.array[..., 0] != 0].mean()
  outside = flair.array[..., 0][(mask.array[..., 0] == 0) & (flair.array[..., 0] > 0)].mean()
  assert inside > 1.2 * outside  # the tumour is bright on FLAIR, in its new grid too
