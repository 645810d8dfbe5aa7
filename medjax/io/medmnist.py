"""MedMNIST `.npz` reader (allow_pickle=False) with a verified, atomic download.

The INFO table mirrors `medmnist/info.py` of the MedMNIST project (v3.0.2, zenodo record 10519652).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tqdm

from medjax.io.atomic import atomic_path
from medjax.io.errors import MedjaxIOError

DATA_DIR_ENV = "MEDJAX_DATA_DIR"  # data root; MedMNIST files live in $MEDJAX_DATA_DIR/medmnist.
URL_ENV = "MEDJAX_MEDMNIST_URL"  # base URL overriding zenodo, e.g. a mirror or a test server.
SUBDIR = "medmnist"
SPLITS = ("train", "val", "test")
ZENODO_BASE_URL = "https://zenodo.org/records/10519652/files"

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class MedMNISTInfo:
  """Static description of one MedMNIST dataset (one row of `INFO`).

  Attributes:
    flag: dataset name as in the official release, e.g. "pneumoniamnist".
    task: "binary-class", "multi-class", "multi-label, binary-class" or "ordinal-regression".
    n_channels: 1 for grey sets, 3 for RGB sets.
    label_names: class names by index (multi-label tasks: one name per label column).
    ndim: spatial rank, 2 for images and 3 for volumes.
    n_samples: official split sizes, {"train": ..., "val": ..., "test": ...}.
    md5s: official md5 of `{flag}.npz` (size 28) and `{flag}_{size}.npz` (other sizes), by size;
      None where unknown (download then refuses to run without an explicit md5).
  """

  flag: str
  task: str
  n_channels: int
  label_names: tuple[str, ...]
  ndim: int
  n_samples: Mapping[str, int]
  md5s: Mapping[int, str | None]

  @property
  def n_classes(self) -> int:
    """Number of classes (single-label tasks) or label columns (multi-label tasks)."""
    return len(self.label_names)

  @property
  def multi_label(self) -> bool:
    """Whether labels are an [N, K] 0/1 matrix rather than one class index per example."""
    return self.task.startswith("multi-label")

  @property
  def sizes(self) -> tuple[int, ...]:
    """Released edge lengths: (28, 64, 128, 224) for 2-D sets, (28, 64) for 3-D sets."""
    return tuple(sorted(self.md5s))

  def filename(self, size: int = 28) -> str:
    """Returns the official file name: `{flag}.npz` for size 28, `{flag}_{size}.npz` otherwise."""
    return f"{self.flag}.npz" if size == 28 else f"{self.flag}_{size}.npz"

  def url(self, size: int = 28) -> str:
    """Returns the official zenodo URL of the file for `size`."""
    return f"{ZENODO_BASE_URL}/{self.filename(size)}?download=1"


def _info(flag: str, task: str, n_channels: int, labels: tuple[str, ...], ndim: int,
          n_samples: tuple[int, int, int], md5s: dict[int, str | None]) -> MedMNISTInfo:
  return MedMNISTInfo(flag=flag, task=task, n_channels=n_channels, label_names=labels, ndim=ndim,
                      n_samples=dict(zip(SPLITS, n_samples)), md5s=md5s)


def _md5_2d(m28: str, m64: str, m128: str, m224: str) -> dict[int, str | None]:
  return {28: m28, 64: m64, 128: m128, 224: m224}


def _md5_3d(m28: str, m64: str) -> dict[int, str | None]:
  return {28: m28, 64: m64}


_BIN, _MULTI, _ML, _ORD = ("binary-class", "multi-class", "multi-label, binary-class",
                           "ordinal-regression")
_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
           "lung-left", "lung-right", "pancreas", "spleen")

# MedMNIST v2 2-D and 3-D datasets by flag; sizes 64/128/224 are the MedMNIST+ (v3) releases.
INFO: dict[str, MedMNISTInfo] = {i.flag: i for i in (
    _info("pathmnist", _MULTI, 3,
          ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
           "normal colon mucosa", "cancer-associated stroma",
           "colorectal adenocarcinoma epithelium"),
          2, (89996, 10004, 7180),
          _md5_2d("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
                  "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec")),
    _info("chestmnist", _ML, 1,
          ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
           "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
           "pleural", "hernia"),
          2, (78468, 11219, 22433),
          _md5_2d("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
                  "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa")),
    _info("dermamnist", _MULTI, 3,
          ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
           "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
           "vascular lesions"),
          2, (7007, 1003, 2005),
          _md5_2d("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
                  "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d")),
    _info("octmnist", _MULTI, 1,
          ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
          2, (97477, 10832, 1000),
          _md5_2d("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
                  "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3")),
    _info("pneumoniamnist", _BIN, 1, ("normal", "pneumonia"),
          2, (4708, 524, 624),
          _md5_2d("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
                  "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1")),
    _info("retinamnist", _ORD, 3, ("0", "1", "2", "3", "4"),
          2, (1080, 120, 400),
          _md5_2d("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
                  "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348")),
    _info("breastmnist", _BIN, 1, ("malignant", "normal, benign"),
          2, (546, 78, 156),
          _md5_2d("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
                  "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b")),
    _info("bloodmnist", _MULTI, 3,
          ("basophil", "eosinophil", "erythroblast",
           "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
           "monocyte", "neutrophil", "platelet"),
          2, (11959, 1712, 3421),
          _md5_2d("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
                  "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601")),
    _info("tissuemnist", _MULTI, 1,
          ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
           "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
           "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"),
          2, (165466, 23640, 47280),
          _md5_2d("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
                  "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c")),
    _info("organamnist", _MULTI, 1, _ORGANS,
          2, (34561, 6491, 17778),
          _md5_2d("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
                  "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170")),
    _info("organcmnist", _MULTI, 1, _ORGANS,
          2, (12975, 2392, 8216),
          _md5_2d("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
                  "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1")),
    _info("organsmnist", _MULTI, 1, _ORGANS,
          2, (13932, 2452, 8827),
          _md5_2d("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
                  "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1")),
    _info("organmnist3d", _MULTI, 1,
          ("liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder",
           "heart", "lung-right", "lung-left", "spleen", "pancreas"),
          3, (971, 161, 610),
          _md5_3d("a0c5a1ff56af4f155c46d46fbb45a2fe", "58a2205adf14a9d0a189cb06dc78bf10")),
    _info("nodulemnist3d", _BIN, 1, ("benign", "malignant"),
          3, (1158, 165, 310),
          _md5_3d("8755a7e9e05a4d9ce80a24c3e7a256f3", "c47c5b7d457bf6332200d2ea6d64ecd8")),
    _info("adrenalmnist3d", _BIN, 1, ("normal", "hyperplasia"),
          3, (1188, 98, 298),
          _md5_3d("bbd3c5a5576322bc4cdfea780653b1ce", "17721accfe9fb005146a47d33bc54b2f")),
    _info("fracturemnist3d", _MULTI, 1,
          ("buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"),
          3, (1027, 103, 240),
          _md5_3d("6aa7b0143a6b42da40027a9dda61302f", "f01d7e6316aedf4210da0da5b7437b42")),
    _info("vesselmnist3d", _BIN, 1, ("vessel", "aneurysm"),
          3, (1335, 191, 382),
          _md5_3d("b41fd4f7e7e2feedddb201585ecafa1b", "6bb274a8846e1097066dcd64e2c4520f")),
    _info("synapsemnist3d", _BIN, 1, ("inhibitory synapse", "excitatory synapse"),
          3, (1230, 177, 352),
          _md5_3d("1235b78a3cd6280881dd7850a78eadb6", "43bd14ebf3af9d3dd072446fedc14d5e")),
)}


@dataclasses.dataclass(frozen=True)
class MedMNISTSplit:
  """One split of one MedMNIST file, validated and laid out channels-last.

  Attributes:
    images: uint8, [N, H, W, C] for 2-D sets or [N, D, H, W, C] for 3-D sets; C is 1 for grey
      sets and 3 for RGB sets.
    labels: int64, [N] class indices for single-label tasks, [N, K] 0/1 for multi-label tasks.
    info: the `INFO` entry of the dataset.
    path: the `.npz` file the split was read from.
    split: "train", "val" or "test".
    size: the spatial edge length (28, 64, 128 or 224).
  """

  images: np.ndarray
  labels: np.ndarray
  info: MedMNISTInfo
  path: Path
  split: str
  size: int

  def __len__(self) -> int:
    return int(self.images.shape[0])


def get_info(flag: str, size: int = 28) -> MedMNISTInfo:
  """Looks up a dataset and checks that it is released at `size`.

  Args:
    flag: dataset name, e.g. "pneumoniamnist" or "adrenalmnist3d".
    size: spatial edge length.

  Returns:
    The `INFO` entry.

  Raises:
    ValueError: unknown flag, or a size the dataset is not released at.
  """
  info = INFO.get(flag)
  if info is None:
    raise ValueError(f"unknown MedMNIST flag {flag!r}; known: {', '.join(sorted(INFO))}")
  if size not in info.md5s:
    raise ValueError(f"{flag} is released at sizes {info.sizes}, not {size}")
  return info


def default_cache_dir() -> Path:
  """Returns where `load_medmnist(download=True)` stores files when no data folder is configured.

  Returns:
    `$XDG_CACHE_HOME/medjax/medmnist`, else `~/.cache/medjax/medmnist`.
  """
  cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(cache) / "medjax" / SUBDIR


def _data_dir(data_dir: str | os.PathLike | None) -> Path | None:
  if data_dir is not None:
    return Path(data_dir)
  root = os.environ.get(DATA_DIR_ENV)
  return Path(root) / SUBDIR if root else None


def _source_url(info: MedMNISTInfo, size: int, url: str | None, base_url: str | None) -> str:
  if url is not None:
    return url
  base = base_url if base_url is not None else os.environ.get(URL_ENV)
  if base:
    return f"{base.rstrip('/')}/{info.filename(size)}"
  return info.url(size)


def _file_md5(path: Path) -> str:
  digest = hashlib.md5()
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def download_medmnist(
    flag: str,
    size: int = 28,
    data_dir: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    base_url: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = _TIMEOUT_S,
) -> Path:
  """Fetches `{flag}[_{size}].npz`, checks its md5 and moves it into place atomically.

  The file is streamed into a hidden temporary file in `data_dir` and renamed (`atomic_path`) to its
  final name only once the md5 matches, so the final name never holds a partial file. A file
  already there with the expected md5 is kept and nothing is fetched; any other file under that
  name is replaced by the verified download.

  Args:
    flag: dataset name, e.g. "pneumoniamnist".
    size: spatial edge length (28, 64, 128 or 224; 3-D sets: 28 or 64).
    data_dir: destination folder; defaults to `$MEDJAX_DATA_DIR/medmnist`.
    url: full source URL; overrides `base_url`.
    base_url: folder URL the file name is appended to; defaults to `$MEDJAX_MEDMNIST_URL`, then
      to the official zenodo record.
    md5: expected md5 hex digest; defaults to the official one from `INFO`.
    progress: show a tqdm progress bar.
    timeout: socket timeout in seconds.

  Returns:
    Path of the verified file.

  Raises:
    ValueError: unknown flag or unavailable size.
    MedjaxIOError: no destination folder, no md5 to check against, network or HTTP failure (the
      message names the URL), short read, or md5 mismatch (the temporary file is deleted).
  """
  info = get_info(flag, size)
  folder = _data_dir(data_dir)
  if folder is None:
    raise MedjaxIOError(f"${DATA_DIR_ENV}/{SUBDIR}/{info.filename(size)}",
                        f"no destination: pass data_dir or set ${DATA_DIR_ENV}")
  target = folder / info.filename(size)
  source = _source_url(info, size, url, base_url)
  expected = (md5 or info.md5s.get(size) or "").lower()
  if not expected:
    raise MedjaxIOError(target, f"no official md5 known for {flag} at size {size}; refusing to "
                        f"download {source} unverified (pass md5=...)")
  if target.is_file() and _file_md5(target) == expected:
    return target
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise MedjaxIOError(folder, f"cannot create the download folder: {e}") from e

  digest = hashlib.md5()
  received = 0
  try:
    # A partial or mismatched download is deleted; only a verified one takes the final name.
    with atomic_path(target, suffix=".part") as tmp:
      request = urllib.request.Request(source, headers={"User-Agent": "medjax"})
      with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "xb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm.tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=target.name, disable=not progress, leave=False) as bar:
          while chunk := response.read(_CHUNK_BYTES):
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())
      if total is not None and received != total:
        raise MedjaxIOError(target, f"download from {source} stopped after {received} of "
                            f"{total} bytes")
      actual = digest.hexdigest()
      if actual != expected:
        raise MedjaxIOError(target, f"md5 mismatch for {source}: expected {expected}, got "
                            f"{actual}; the download was deleted")
  except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
    raise MedjaxIOError(target, f"download from {source} failed: {e}") from e
  return target


def _read_arrays(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads `{split}_images` and `{split}_labels`; every decode error becomes a MedjaxIOError."""
  image_key, label_key = f"{split}_images", f"{split}_labels"
  try:
    npz = np.load(path, allow_pickle=False)
  except ValueError as e:  # Neither zip nor .npy: numpy falls back to pickle, which is refused.
    raise MedjaxIOError(path, f"not an .npz archive ({e})") from e
  except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
    raise MedjaxIOError(path, "not a readable .npz archive (truncated or corrupt?): "
                        f"{type(e).__name__}: {e}") from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise MedjaxIOError(path, "holds a single .npy array, not an .npz archive of splits")
  with npz:
    keys = sorted(npz.files)
    for key in (image_key, label_key):
      if key not in keys:
        note = "; the shared copies keep the test split back" if split == "test" else ""
        raise MedjaxIOError(path, f"has no {key!r} (keys: {', '.join(keys) or 'none'}){note}")
    arrays = []
    for key in (image_key, label_key):
      try:  # NpzFile decodes lazily: truncation and corruption show up here.
        arrays.append(npz[key])
      except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
          raise MedjaxIOError(path, f"{key!r} is an object array; refused "
                              "(loaded with allow_pickle=False)") from e
        raise MedjaxIOError(path, f"cannot decode {key!r} (corrupt?): {e}") from e
      except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError) as e:
        raise MedjaxIOError(path, f"cannot read {key!r} (truncated or corrupt?): "
                            f"{type(e).__name__}: {e}") from e
  return arrays[0], arrays[1]


def _check_images(path: Path, key: str, images: np.ndarray, info: MedMNISTInfo,
                  size: int) -> np.ndarray:
  """Validates the stored image array and returns it channels-last."""
  if images.dtype != np.uint8:
    raise MedjaxIOError(path, f"{key!r} has dtype {images.dtype}; MedMNIST images are uint8")
  rgb = info.n_channels == 3
  if info.ndim == 3:
    rank, layout = 4, "(N, D, H, W)"
  elif rgb:
    rank, layout = 4, "(N, H, W, 3)"
  else:
    rank, layout = 3, "(N, H, W)"
  if images.ndim != rank or (info.ndim == 2 and rgb and images.shape[-1] != 3):
    kind = f"{info.ndim}-D {'RGB' if rgb else 'grey'} set {info.flag}"
    raise MedjaxIOError(path, f"{key!r} has shape {images.shape}; the {kind} stores {layout}")
  spatial = images.shape[1:1 + info.ndim]
  if any(s != size for s in spatial):
    raise MedjaxIOError(path, f"{key!r} has spatial shape {spatial}; expected "
                        f"{(size,) * info.ndim} for size {size}")
  return images if rgb else images[..., None]


def _check_labels(path: Path, key: str, labels: np.ndarray, info: MedMNISTInfo) -> np.ndarray:
  """Validates the stored label array and returns int64 [N] or [N, K]."""
  if labels.dtype.kind not in "uib":
    raise MedjaxIOError(path, f"{key!r} has dtype {labels.dtype}; labels must be integers")
  labels = labels.astype(np.int64)
  if info.multi_label:
    if labels.ndim != 2 or labels.shape[1] != info.n_classes:
      raise MedjaxIOError(path, f"{key!r} has shape {labels.shape}; the multi-label set "
                          f"{info.flag} stores (N, {info.n_classes})")
    bad = labels[(labels != 0) & (labels != 1)]
    if bad.size:
      raise MedjaxIOError(path, f"{key!r} holds {int(bad[0])}; multi-label entries are 0 or 1")
    return labels
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1:
    raise MedjaxIOError(path, f"{key!r} has shape {labels.shape}; single-label sets store (N, 1)")
  if labels.size and (labels.min() < 0 or labels.max() >= info.n_classes):
    raise MedjaxIOError(path, f"{key!r} spans [{labels.min()}, {labels.max()}], outside "
                        f"[0, {info.n_classes - 1}] for the {info.n_classes} classes of "
                        f"{info.flag}")
  return labels


def load_medmnist(
    flag: str,
    split: str,
    *,
    size: int = 28,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> MedMNISTSplit:
  """Reads and validates one split of a MedMNIST `.npz` file.

  Args:
    flag: dataset name, e.g. "pneumoniamnist", "chestmnist", "adrenalmnist3d".
    split: "train", "val" or "test".
    size: spatial edge length; selects `{flag}.npz` (28) or `{flag}_{size}.npz`.
    data_dir: folder holding the files; defaults to `$MEDJAX_DATA_DIR/medmnist`, or (only with
      download=True) to `default_cache_dir()`.
    download: fetch the official file (md5-verified) when it is absent.

  Returns:
    A `MedMNISTSplit`: images uint8 [N, H, W, C] or [N, D, H, W, C], labels int64 [N] or [N, K].

  Raises:
    ValueError: unknown flag, split or size.
    MedjaxIOError: missing, corrupt or malformed file (the message names the file and the cause).
  """
  info = get_info(flag, size)
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  folder = _data_dir(data_dir)
  if folder is None:
    if not download:
      raise MedjaxIOError(f"${DATA_DIR_ENV}/{SUBDIR}/{info.filename(size)}",
                          f"${DATA_DIR_ENV} is not set and no data_dir was given; set it, pass "
                          "data_dir (--config.data.dir), or download=True "
                          "(--config.data.download=True)")
    folder = default_cache_dir()
  path = folder / info.filename(size)
  if not path.exists():
    if not download:
      raise MedjaxIOError(path, "no such file; download=True (launch.py: "
                          "--config.data.download=True) fetches it from "
                          f"{_source_url(info, size, None, None)}")
    download_medmnist(flag, size, folder)
  if not path.is_file():
    raise MedjaxIOError(path, "is not a regular file")

  images, labels = _read_arrays(path, split)
  image_key, label_key = f"{split}_images", f"{split}_labels"
  images = _check_images(path, image_key, images, info, size)
  if labels.ndim == 0 or labels.shape[0] != images.shape[0]:
    raise MedjaxIOError(path, f"{label_key!r} holds {labels.shape[0] if labels.ndim else 0} "
                        f"labels but {image_key!r} holds {images.shape[0]} images")
  labels = _check_labels(path, label_key, labels, info)
  return MedMNISTSplit(images=images, labels=labels, info=info, path=path, split=split, size=size)
