"""Tests for medjax.io.medmnist: synthetic .npz files, a loopback download server, shared copies."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medjax.io import (
    MEDMNIST_INFO,
    MedjaxIOError,
    MedMNISTSplit,
    download_medmnist,
    load_medmnist,
    medmnist,
)

N_TRAIN, N_VAL = 6, 3


def _images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _labels(n: int, n_classes: int, k: int | None = None, seed: int = 1) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if k is not None:
    return rng.integers(0, 2, (n, k), dtype=np.uint8)
  return rng.integers(0, n_classes, (n, 1), dtype=np.uint8)


def _arrays(flag: str, size: int = 28, with_test: bool = True) -> dict[str, np.ndarray]:
  """Valid arrays for `flag` in the official layout."""
  info = MEDMNIST_INFO[flag]
  shape = (size,) * info.ndim + ((3,) if info.n_channels == 3 else ())
  k = info.n_classes if info.multi_label else None
  arrays = {}
  for split, n in (("train", N_TRAIN), ("val", N_VAL)) + ((("test", 2),) if with_test else ()):
    arrays[f"{split}_images"] = _images(n, shape)
    arrays[f"{split}_labels"] = _labels(n, info.n_classes, k)
  return arrays


def _write(folder: Path, flag: str, size: int = 28, **arrays: np.ndarray) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / MEDMNIST_INFO[flag].filename(size)
  np.savez(path, **arrays)
  return path


def _raises(match: str, flag: str, split: str, folder: Path, size: int = 28) -> MedjaxIOError:
  """Loads and checks the MedjaxIOError names the file and matches `match`."""
  with pytest.raises(MedjaxIOError, match=match) as excinfo:
    load_medmnist(flag, split, size=size, data_dir=folder)
  assert MEDMNIST_INFO[flag].filename(size) in str(excinfo.value)
  return excinfo.value


@pytest.mark.parametrize(
    "flag, size, image_shape, label_shape",
    [
        ("pneumoniamnist", 28, (28, 28, 1), ()),  # 2-D grey
        ("pathmnist", 28, (28, 28, 3), ()),  # 2-D RGB
        ("pathmnist", 64, (64, 64, 3), ()),
        ("adrenalmnist3d", 28, (28, 28, 28, 1), ()),  # 3-D
        ("organmnist3d", 64, (64, 64, 64, 1), ()),
        ("chestmnist", 28, (28, 28, 1), (14,)),  # multi-label
        ("retinamnist", 28, (28, 28, 3), ()),  # ordinal regression
    ],
)
def test_load_shapes_dtypes_channels_last(tmp_path, flag, size, image_shape, label_shape):
  arrays = _arrays(flag, size)
  path = _write(tmp_path, flag, size, **arrays)
  for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", 2)):
    ds = load_medmnist(flag, split, size=size, data_dir=tmp_path)
    assert isinstance(ds, MedMNISTSplit)
    assert ds.images.shape == (n, *image_shape) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (n, *label_shape) and ds.labels.dtype == np.int64
    assert ds.path == path and ds.info is MEDMNIST_INFO[flag] and ds.split == split
    assert len(ds) == n
    raw = arrays[f"{split}_images"]
    np.testing.assert_array_equal(ds.images, raw if raw.ndim == ds.images.ndim else raw[..., None])
    np.testing.assert_array_equal(ds.labels, arrays[f"{split}_labels"].reshape(ds.labels.shape))


def test_split_is_frozen(tmp_path):
  _write(tmp_path, "pneumoniamnist", **_arrays("pneumoniamnist"))
  ds = load_medmnist("pneumoniamnist", "train", data_dir=tmp_path)
  with pytest.raises(dataclasses.FrozenInstanceError):
    ds.labels = None  # type: ignore[misc]


def test_file_names_follow_the_release():
  info = MEDMNIST_INFO["adrenalmnist3d"]
  assert info.filename(28) == "adrenalmnist3d.npz"
  assert info.filename(64) == "adrenalmnist3d_64.npz"
  assert info.url(64) == (
      "https://zenodo.org/records/10519652/files/adrenalmnist3d_64.npz?download=1")
  assert info.sizes == (28, 64) and info.ndim == 3
  assert MEDMNIST_INFO["pathmnist"].sizes == (28, 64, 128, 224)


def test_info_table_is_complete():
  flags_2d = {"pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist",
              "retinamnist", "breastmnist", "bloodmnist", "tissuemnist", "organamnist",
              "organcmnist", "organsmnist"}
  flags_3d = {"organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d",
              "vesselmnist3d", "synapsemnist3d"}
  assert set(MEDMNIST_INFO) == flags_2d | flags_3d
  tasks = {"binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression"}
  for flag, info in MEDMNIST_INFO.items():
    assert info.ndim == (3 if flag in flags_3d else 2)
    assert info.task in tasks and info.n_channels in (1, 3)
    assert info.n_classes == len(info.label_names) >= 2
    assert all(m is None or (len(m) == 32 and int(m, 16) >= 0) for m in info.md5s.values())
  assert MEDMNIST_INFO["pneumoniamnist"].md5s[28] == "28209eda62fecd6e6a2d98b1501bb15f"
  assert MEDMNIST_INFO["chestmnist"].multi_label


def test_data_dir_from_env(tmp_path, monkeypatch):
  _write(tmp_path / "medmnist", "breastmnist", **_arrays("breastmnist"))
  monkeypatch.setenv("MEDJAX_DATA_DIR", str(tmp_path))
  assert load_medmnist("breastmnist", "val").images.shape == (N_VAL, 28, 28, 1)


def test_no_data_dir_configured(monkeypatch):
  monkeypatch.delenv("MEDJAX_DATA_DIR", raising=False)
  with pytest.raises(MedjaxIOError, match="MEDJAX_DATA_DIR") as excinfo:
    load_medmnist("pneumoniamnist", "train")
  assert "pneumoniamnist.npz" in str(excinfo.value)


def test_bad_arguments_are_value_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown MedMNIST flag"):
    load_medmnist("mnist", "train", data_dir=tmp_path)
  with pytest.raises(ValueError, match="split"):
    load_medmnist("pneumoniamnist", "validation", data_dir=tmp_path)
  with pytest.raises(ValueError, match="sizes"):
    load_medmnist("adrenalmnist3d", "train", size=128, data_dir=tmp_path)


# ----------------------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
  err = _raises("download=True", "pneumoniamnist", "train", tmp_path)
  assert "no such file" in str(err) and "zenodo.org" in str(err)
  _raises("no such file", "adrenalmnist3d", "train", tmp_path, size=64)


def test_not_a_zip(tmp_path):
  (tmp_path / "pneumoniamnist.npz").write_bytes(b"this is not an npz archive\n" * 10)
  _raises("not an .npz", "pneumoniamnist", "train", tmp_path)


def test_empty_file(tmp_path):
  (tmp_path / "pneumoniamnist.npz").write_bytes(b"")
  _raises("truncated or corrupt", "pneumoniamnist", "train", tmp_path)


def test_truncated_archive(tmp_path):
  path = _write(tmp_path, "pneumoniamnist", **_arrays("pneumoniamnist"))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  _raises("truncated or corrupt", "pneumoniamnist", "train", tmp_path)


def test_corrupt_member_is_caught_on_lazy_read(tmp_path):
  path = tmp_path / "pneumoniamnist.npz"
  np.savez_compressed(path, **_arrays("pneumoniamnist"))
  data = bytearray(path.read_bytes())
  for i in range(200, 400):  # inside the first member's deflate stream; the directory survives.
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))
  np.load(path, allow_pickle=False).close()  # opening alone succeeds: the damage is in the data.
  _raises("corrupt", "pneumoniamnist", "train", tmp_path)


def test_single_npy_array(tmp_path):
  with (tmp_path / "pneumoniamnist.npz").open("wb") as f:
    np.save(f, _images(2, (28, 28)))
  _raises("single .npy", "pneumoniamnist", "train", tmp_path)


def test_missing_split_lists_keys(tmp_path):
  _write(tmp_path, "adrenalmnist3d", **_arrays("adrenalmnist3d", with_test=False))
  err = _raises("has no 'test_images'", "adrenalmnist3d", "test", tmp_path)
  assert "keys: train_images, train_labels, val_images, val_labels" in str(err)
  assert "test split back" in str(err)


def test_missing_labels_key(tmp_path):
  arrays = _arrays("pneumoniamnist")
  del arrays["val_labels"]
  _write(tmp_path, "pneumoniamnist", **arrays)
  _raises("has no 'val_labels'", "pneumoniamnist", "val", tmp_path)


def test_object_arrays_refused(tmp_path):
  arrays = _arrays("pneumoniamnist")
  arrays["train_images"] = np.array([np.zeros((28, 28)), None], dtype=object)
  _write(tmp_path, "pneumoniamnist", **arrays)
  _raises("object array", "pneumoniamnist", "train", tmp_path)


def test_count_mismatch(tmp_path):
  arrays = _arrays("pneumoniamnist")
  arrays["train_labels"] = arrays["train_labels"][:-1]
  _write(tmp_path, "pneumoniamnist", **arrays)
  _raises(f"holds {N_TRAIN - 1} labels but 'train_images' holds {N_TRAIN}", "pneumoniamnist",
          "train", tmp_path)


@pytest.mark.parametrize(
    "flag, bad_shape, match",
    [
        ("pneumoniamnist", (28,), r"stores \(N, H, W\)"),  # rank too low
        ("pneumoniamnist", (28, 28, 3), r"grey set .* stores \(N, H, W\)"),  # RGB in a grey set
        ("pathmnist", (28, 28), r"RGB set .* stores \(N, H, W, 3\)"),  # grey in an RGB set
        ("pathmnist", (28, 28, 4), r"stores \(N, H, W, 3\)"),
        ("adrenalmnist3d", (28, 28), r"stores \(N, D, H, W\)"),  # 2-D images in a 3-D set
        ("adrenalmnist3d", (28, 28, 28, 1), r"stores \(N, D, H, W\)"),
        ("pneumoniamnist", (32, 32), r"spatial shape \(32, 32\); expected \(28, 28\)"),
        ("pneumoniamnist", (28, 27), r"spatial shape"),
        ("adrenalmnist3d", (28, 28, 64), r"spatial shape"),
    ],
)
def test_wrong_image_shape(tmp_path, flag, bad_shape, match):
  arrays = _arrays(flag)
  arrays["train_images"] = _images(N_TRAIN, bad_shape)
  _write(tmp_path, flag, **arrays)
  _raises(match, flag, "train", tmp_path)


def test_wrong_size_file(tmp_path):
  # A 28-pixel file saved under the 64 name.
  _write(tmp_path, "pneumoniamnist", 64, **_arrays("pneumoniamnist", 28))
  _raises(r"expected \(64, 64\) for size 64", "pneumoniamnist", "train", tmp_path, size=64)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint16])
def test_wrong_image_dtype(tmp_path, dtype):
  arrays = _arrays("pneumoniamnist")
  arrays["train_images"] = arrays["train_images"].astype(dtype)
  _write(tmp_path, "pneumoniamnist", **arrays)
  _raises(f"dtype {np.dtype(dtype)}; MedMNIST images are uint8", "pneumoniamnist", "train",
          tmp_path)


@pytest.mark.parametrize(
    "flag, labels, match",
    [
        ("pneumoniamnist", [[0], [1], [2], [0], [1], [0]], r"spans \[0, 2\], outside \[0, 1\]"),
        ("pneumoniamnist", [[0], [1], [-1], [0], [1], [0]], r"outside \[0, 1\]"),
        ("pathmnist", [[0], [9], [1], [0], [1], [0]], r"outside \[0, 8\]"),
        ("chestmnist", np.full((N_TRAIN, 14), 2), "multi-label entries are 0 or 1"),
        ("chestmnist", np.zeros((N_TRAIN, 13), np.uint8), r"stores \(N, 14\)"),
        ("pneumoniamnist", np.zeros((N_TRAIN, 2), np.uint8), r"single-label sets store \(N, 1\)"),
        ("pneumoniamnist", np.full((N_TRAIN, 1), 0.5, np.float32), "labels must be integers"),
    ],
)
def test_bad_labels(tmp_path, flag, labels, match):
  arrays = _arrays(flag)
  labels = np.asarray(labels)
  arrays["train_labels"] = labels if labels.dtype.kind == "f" else labels.astype(np.int16)
  _write(tmp_path, flag, **arrays)
  _raises(match, flag, "train", tmp_path)


def test_flat_labels_accepted(tmp_path):
  arrays = _arrays("pneumoniamnist")
  arrays["train_labels"] = arrays["train_labels"][:, 0]
  _write(tmp_path, "pneumoniamnist", **arrays)
  assert load_medmnist("pneumoniamnist", "train", data_dir=tmp_path).labels.shape == (N_TRAIN,)


def test_directory_in_place_of_file(tmp_path):
  (tmp_path / "pneumoniamnist.npz").mkdir()
  _raises("not a regular file", "pneumoniamnist", "train", tmp_path)


# ----------------------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, format, *args):
    pass


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[str, Path]]:
  """Serves tmp_path/srv on 127.0.0.1 (ephemeral port); yields (base URL, folder)."""
  root = tmp_path / "srv"
  root.mkdir()
  httpd = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _serve(root: Path, flag: str = "pneumoniamnist", size: int = 28) -> tuple[bytes, str]:
  path = _write(root, flag, size, **_arrays(flag, size))
  data = path.read_bytes()
  return data, hashlib.md5(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_success(tmp_path, server):
  base, root = server
  data, md5 = _serve(root)
  dest = tmp_path / "dest"
  path = download_medmnist("pneumoniamnist", 28, dest, base_url=base, md5=md5, progress=False)
  assert path == dest / "pneumoniamnist.npz" and path.read_bytes() == data
  assert _leftovers(dest) == ["pneumoniamnist.npz"]  # no temporary file left behind
  ds = load_medmnist("pneumoniamnist", "val", data_dir=dest)
  assert ds.images.shape == (N_VAL, 28, 28, 1)


def test_download_with_progress_bar_and_size(tmp_path, server):
  base, root = server
  data, md5 = _serve(root, "adrenalmnist3d", 64)
  path = download_medmnist("adrenalmnist3d", 64, tmp_path / "d",
                           url=f"{base}/adrenalmnist3d_64.npz", md5=md5, progress=True)
  assert path.name == "adrenalmnist3d_64.npz" and path.read_bytes() == data


def test_download_base_url_from_env(tmp_path, server, monkeypatch):
  base, root = server
  _, md5 = _serve(root)
  monkeypatch.setenv("MEDJAX_MEDMNIST_URL", base + "/")
  path = download_medmnist("pneumoniamnist", data_dir=tmp_path / "d", md5=md5, progress=False)
  assert path.is_file()


def test_download_md5_mismatch_leaves_nothing(tmp_path, server):
  base, root = server
  _, md5 = _serve(root)
  dest = tmp_path / "dest"
  wrong = "0" * 32
  with pytest.raises(MedjaxIOError, match="md5 mismatch") as excinfo:
    download_medmnist("pneumoniamnist", 28, dest, base_url=base, md5=wrong, progress=False)
  message = str(excinfo.value)
  assert "pneumoniamnist.npz" in message and wrong in message and md5 in message
  assert _leftovers(dest) == []


def test_download_404(tmp_path, server):
  base, _ = server  # nothing served
  dest = tmp_path / "dest"
  with pytest.raises(MedjaxIOError, match="404") as excinfo:
    download_medmnist("pneumoniamnist", 28, dest, base_url=base, md5="0" * 32, progress=False)
  assert f"{base}/pneumoniamnist.npz" in str(excinfo.value)
  assert _leftovers(dest) == []


def test_download_connection_refused(tmp_path):
  with socket.socket() as s:  # A port nothing listens on: bind, read its number, close.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}/pneumoniamnist.npz"
  with pytest.raises(MedjaxIOError, match="failed") as excinfo:
    download_medmnist("pneumoniamnist", 28, tmp_path, url=url, md5="0" * 32, progress=False)
  assert url in str(excinfo.value)


def test_download_keeps_verified_file(tmp_path):
  data_dir = tmp_path / "d"
  path = _write(data_dir, "pneumoniamnist", **_arrays("pneumoniamnist"))
  md5 = hashlib.md5(path.read_bytes()).hexdigest()
  # The URL is unreachable: a matching file must be returned without any network access.
  got = download_medmnist("pneumoniamnist", 28, data_dir, url="http://127.0.0.1:9/x", md5=md5,
                          progress=False)
  assert got == path


def test_download_refuses_without_md5(tmp_path, monkeypatch):
  info = MEDMNIST_INFO["pneumoniamnist"]
  monkeypatch.setitem(medmnist.INFO, "pneumoniamnist",
                      dataclasses.replace(info, md5s={**info.md5s, 28: None}))
  with pytest.raises(MedjaxIOError, match="no official md5") as excinfo:
    download_medmnist("pneumoniamnist", 28, tmp_path, progress=False)
  assert "pneumoniamnist.npz" in str(excinfo.value)
  assert _leftovers(tmp_path) == []


def test_load_with_download_checks_official_md5(tmp_path, server, monkeypatch):
  base, root = server
  _serve(root)  # synthetic bytes: cannot match the official md5
  monkeypatch.setenv("MEDJAX_MEDMNIST_URL", base)
  dest = tmp_path / "dest"
  with pytest.raises(MedjaxIOError, match="md5 mismatch") as excinfo:
    load_medmnist("pneumoniamnist", "train", data_dir=dest, download=True)
  assert MEDMNIST_INFO["pneumoniamnist"].md5s[28] in str(excinfo.value)
  assert _leftovers(dest) == []


def test_load_with_download_fetches_missing_file(tmp_path, server, monkeypatch):
  base, root = server
  _, md5 = _serve(root)
  info = MEDMNIST_INFO["pneumoniamnist"]
  monkeypatch.setitem(medmnist.INFO, "pneumoniamnist",
                      dataclasses.replace(info, md5s={**info.md5s, 28: md5}))
  monkeypatch.setenv("MEDJAX_MEDMNIST_URL", base)
  ds = load_medmnist("pneumoniamnist", "train", data_dir=tmp_path / "dest", download=True)
  assert ds.images.shape == (N_TRAIN, 28, 28, 1)
  assert _leftovers(tmp_path / "dest") == ["pneumoniamnist.npz"]


# ----------------------------------------------------------------------------- shared copies


def _shared_dir(*names: str) -> Path:
  root = os.environ.get("MEDJAX_DATA_DIR")
  if not root:
    pytest.skip("MEDJAX_DATA_DIR is unset; the real MedMNIST copies are not available")
  folder = Path(root) / "medmnist"
  for name in names:
    if not (folder / name).is_file():
      pytest.skip(f"{folder / name} is absent")
  return folder


def test_shared_copies():
  folder = _shared_dir("pneumoniamnist.npz", "adrenalmnist3d.npz")
  train = load_medmnist("pneumoniamnist", "train")
  assert train.images.shape == (4708, 28, 28, 1) and train.images.dtype == np.uint8
  assert train.labels.shape == (4708,) and set(np.unique(train.labels)) <= {0, 1}
  assert load_medmnist("pneumoniamnist", "val").images.shape == (524, 28, 28, 1)
  adrenal = load_medmnist("adrenalmnist3d", "train")
  assert adrenal.images.shape == (1188, 28, 28, 28, 1) and adrenal.labels.shape == (1188,)
  assert adrenal.path == folder / "adrenalmnist3d.npz"
  for flag in ("pneumoniamnist", "adrenalmnist3d"):
    with pytest.raises(MedjaxIOError, match="has no 'test_images'") as excinfo:
      load_medmnist(flag, "test")
    assert f"{flag}.npz" in str(excinfo.value)


def test_shared_copy_64():
  _shared_dir("adrenalmnist3d_64.npz")
  val = load_medmnist("adrenalmnist3d", "val", size=64)
  assert val.images.shape == (98, 64, 64, 64, 1) and val.labels.shape == (98,)
