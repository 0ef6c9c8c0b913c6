"""Tests of ibau_jax.data: npz layout, source resolution, TFDS and download paths.

Nothing here touches the network: downloads are served from tiny archives built
in tmp_path through a monkeypatched ``data._fetch``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import pickle
import shutil
import tarfile
import zipfile

import numpy as np
import pytest

from ibau_jax import data

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA_CANDIDATES = (REPO_ROOT.parent / "shared" / "data",
                          pathlib.Path("/work/shared/data"))


# ----------------------------------------------------------------------------
# Helpers.


def _images(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), np.uint8)


def _write_npz(path: pathlib.Path, **arrays: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **arrays)


def _write_cifar_layout(root: pathlib.Path, seed: int = 0
                        ) -> dict[str, np.ndarray]:
  """Writes a tiny cifar10 npz layout under root; returns what was written."""
  x0, x1, xt = _images(3, seed), _images(2, seed + 1), _images(4, seed + 2)
  y0 = np.array([0, 1, 2], np.uint8)
  y1 = np.array([9, 8], np.uint8)
  yt = np.array([3, 4, 5, 6], np.uint8)
  exact = np.array([True, True, False, False])
  _write_npz(root / "cifar10" / "train_0.npz", x=x0, y=y0)
  _write_npz(root / "cifar10" / "train_1.npz", x=x1, y=y1)
  _write_npz(root / "cifar10" / "test.npz", x=xt, y=yt, exact=exact)
  return {"x0": x0, "x1": x1, "xt": xt, "y0": y0, "y1": y1, "yt": yt,
          "exact": exact}


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path):
  """No env var, no TFDS detection, no network, no default cache."""
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.setattr(data, "_find_prepared_tfds", lambda name, cache: None)

  def no_network(url, dest):
    raise AssertionError(f"test tried to fetch {url}")

  monkeypatch.setattr(data, "_fetch", no_network)
  monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", str(tmp_path / "default_cache"))


def _serve(monkeypatch, archives: dict[str, pathlib.Path]) -> list[str]:
  """Makes _fetch copy local archives (by URL basename); returns fetched URLs."""
  fetched = []

  def fake_fetch(url, dest):
    fetched.append(url)
    shutil.copyfile(archives[url.rsplit("/", 1)[-1]], dest)

  monkeypatch.setattr(data, "_fetch", fake_fetch)
  for filename, path in archives.items():
    monkeypatch.setitem(data._ARCHIVE_MD5, filename,
                        hashlib.md5(path.read_bytes()).hexdigest())
  return fetched


def _npz_and_tmp_files(folder: pathlib.Path) -> list[str]:
  if not folder.exists():
    return []
  return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------
# to_float and Arrays.


def test_to_float_uint8():
  x = np.array([[0, 51, 255]], np.uint8)
  out = data.to_float(x)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [[0.0, 0.2, 1.0]], rtol=0, atol=1e-7)


def test_to_float_float_input_passes_and_is_float32():
  x = np.array([0.0, 0.5, 1.0], np.float64)
  out = data.to_float(x)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, x.astype(np.float32))


@pytest.mark.parametrize("bad", [[-0.1, 0.5], [0.5, 1.5], [np.nan, 0.5]])
def test_to_float_rejects_out_of_range_float(bad):
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    data.to_float(np.array(bad, np.float32))


def test_to_float_rejects_other_dtypes():
  with pytest.raises(ValueError, match="int32"):
    data.to_float(np.zeros((2, 2), np.int32))


def test_arrays_validates_shapes():
  images = _images(2, 0)
  labels = np.array([0, 1], np.int32)
  arrays = data.Arrays(images, labels, {}, 10, "test")
  assert len(arrays) == 2
  with pytest.raises(ValueError, match="labels"):
    data.Arrays(images, labels[:1], {}, 10, "test")
  with pytest.raises(ValueError, match="int32"):
    data.Arrays(images, labels.astype(np.int64), {}, 10, "test")
  with pytest.raises(ValueError, match="extra 'exact'"):
    data.Arrays(images, labels, {"exact": np.ones(3, bool)}, 10, "test")
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    data.Arrays(images, np.array([0, 10], np.int32), {}, 10, "test")


# ----------------------------------------------------------------------------
# npz layout.


def test_load_npz_dir_cifar_train_concatenates_in_order(tmp_path):
  written = _write_cifar_layout(tmp_path)
  arrays = data.load_npz_dir(tmp_path, "cifar10", "train")
  assert arrays.images.shape == (5, 32, 32, 3)
  assert arrays.images.dtype == np.uint8
  assert arrays.labels.dtype == np.int32
  np.testing.assert_array_equal(
      arrays.images, np.concatenate([written["x0"], written["x1"]]))
  np.testing.assert_array_equal(arrays.labels, [0, 1, 2, 9, 8])
  assert arrays.extras == {}
  assert arrays.num_classes == 10
  assert arrays.source == f"npz:{tmp_path / 'cifar10'}"


def test_load_npz_dir_cifar_test_has_exact(tmp_path):
  written = _write_cifar_layout(tmp_path)
  arrays = data.load_npz_dir(str(tmp_path), "cifar10", "test")
  np.testing.assert_array_equal(arrays.images, written["xt"])
  np.testing.assert_array_equal(arrays.labels, written["yt"])
  assert set(arrays.extras) == {"exact"}
  assert arrays.extras["exact"].dtype == bool
  np.testing.assert_array_equal(arrays.extras["exact"], written["exact"])


def test_load_npz_dir_gtsrb_train_full_or_subset(tmp_path):
  folder = tmp_path / "gtsrb"
  _write_npz(folder / "train_subset.npz", x=_images(2, 0),
             y=np.array([42, 0], np.uint8), idx=np.array([5, 9], np.int32))
  subset = data.load_npz_dir(tmp_path, "gtsrb", "train")
  assert len(subset) == 2 and subset.num_classes == 43
  np.testing.assert_array_equal(subset.labels, [42, 0])
  np.testing.assert_array_equal(subset.extras["idx"], [5, 9])
  # The full training set, when present, wins over the subset.
  _write_npz(folder / "train.npz", x=_images(3, 1),
             y=np.array([1, 2, 3], np.uint8), idx=np.arange(3, dtype=np.int32))
  full = data.load_npz_dir(tmp_path, "gtsrb", "train")
  np.testing.assert_array_equal(full.labels, [1, 2, 3])


def test_load_npz_dir_missing_dir_names_path(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="nope") as info:
    data.load_npz_dir(missing, "cifar10", "test")
  assert "test.npz" in str(info.value)


def test_load_npz_dir_missing_files_lists_expected(tmp_path):
  _write_npz(tmp_path / "cifar10" / "train_0.npz", x=_images(1, 0),
             y=np.zeros(1, np.uint8))
  with pytest.raises(FileNotFoundError) as info:
    data.load_npz_dir(tmp_path, "cifar10", "train")
  assert "train_1.npz" in str(info.value) and str(tmp_path) in str(info.value)
  with pytest.raises(FileNotFoundError, match="train_subset.npz"):
    data.load_npz_dir(tmp_path, "gtsrb", "train")


@pytest.mark.parametrize("arrays, match", [
    ({"x": _images(2, 0)}, "'y'"),
    ({"x": np.zeros((2, 28, 28, 3), np.uint8), "y": np.zeros(2, np.uint8)},
     r"\(N, 32, 32, 3\)"),
    ({"x": _images(2, 0), "y": np.array([0, 10], np.uint8)}, r"\[0, 10\)"),
    ({"x": _images(2, 0), "y": np.zeros(2, np.uint8),
      "exact": np.ones(3, bool)}, "'exact'"),
])
def test_load_npz_dir_rejects_malformed_files(tmp_path, arrays, match):
  _write_npz(tmp_path / "cifar10" / "test.npz", **arrays)
  with pytest.raises(ValueError, match=match):
    data.load_npz_dir(tmp_path, "cifar10", "test")


def test_unknown_dataset_or_split_lists_valid_ones(tmp_path):
  for fn in (data.load, data.load_tfds):
    with pytest.raises(ValueError, match="cifar10, gtsrb"):
      fn("mnist", "train")
    with pytest.raises(ValueError, match="train, test"):
      fn("cifar10", "validation")
  with pytest.raises(ValueError, match="cifar10, gtsrb"):
    data.load_npz_dir(tmp_path, "svhn", "test")
  with pytest.raises(ValueError, match="cifar10, gtsrb"):
    data.download("svhn", cache_dir=tmp_path)


def _shared_data_dir() -> pathlib.Path | None:
  for candidate in SHARED_DATA_CANDIDATES:
    if (candidate / "cifar10" / "test.npz").is_file():
      return candidate
  return None


@pytest.mark.skipif(_shared_data_dir() is None,
                    reason="offline data ../shared/data not available")
def test_real_cifar10_test_split():
  arrays = data.load_npz_dir(_shared_data_dir(), "cifar10", "test")
  assert arrays.images.shape == (10_000, 32, 32, 3)
  assert arrays.num_classes == 10
  np.testing.assert_array_equal(np.bincount(arrays.labels), [1000] * 10)
  assert int(arrays.extras["exact"].sum()) == 1000
  assert arrays.extras["exact"][:1000].all()
  assert arrays.labels[0] == 3  # test image 0 is a cat


# ----------------------------------------------------------------------------
# Resolution order in load().


def test_explicit_dir_beats_env(tmp_path, monkeypatch):
  explicit, env = tmp_path / "explicit", tmp_path / "env"
  written = _write_cifar_layout(explicit, seed=0)
  _write_cifar_layout(env, seed=10)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(env))
  arrays = data.load("cifar10", "test", data_dir=explicit)
  np.testing.assert_array_equal(arrays.images, written["xt"])
  assert arrays.source == f"npz:{explicit / 'cifar10'}"


def test_env_used_without_explicit_dir(tmp_path, monkeypatch):
  written = _write_cifar_layout(tmp_path / "env", seed=10)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
  arrays = data.load("cifar10", "test", cache_dir=tmp_path / "cache")
  np.testing.assert_array_equal(arrays.images, written["xt"])
  assert arrays.source.startswith("npz:")


def test_env_dir_missing_is_an_error_naming_env(tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match=data.DATA_DIR_ENV) as info:
    data.load("cifar10", "test", cache_dir=tmp_path / "cache")
  assert "missing" in str(info.value)


def test_explicit_missing_dir_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing"):
    data.load("gtsrb", "test", data_dir=tmp_path / "missing")


def test_nothing_available_without_download_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="--data-dir") as info:
    data.load("cifar10", "train", cache_dir=tmp_path / "cache",
              download=False)
  assert data.DATA_DIR_ENV in str(info.value)
  assert not (tmp_path / "cache").exists()


def test_already_downloaded_cache_used_without_download(tmp_path):
  cache = tmp_path / "cache"
  written = _write_cifar_layout(cache)
  arrays = data.load("cifar10", "test", cache_dir=cache, download=False)
  np.testing.assert_array_equal(arrays.images, written["xt"])
  assert arrays.source == f"download:{cache / 'cifar10'}"


def test_default_cache_dir_is_used(tmp_path):
  written = _write_cifar_layout(tmp_path / "default_cache")
  arrays = data.load("cifar10", "test", download=False)
  np.testing.assert_array_equal(arrays.labels, written["yt"])


# ----------------------------------------------------------------------------
# TFDS.

tfds = pytest.importorskip("tensorflow_datasets")


def _mock_tfds(num_examples: int):
  return tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_CODE)


def test_load_tfds_cifar10_mock():
  with _mock_tfds(5):
    expected = tfds.data_source("cifar10", split="train")
    expected_labels = [int(expected[i]["label"]) for i in range(5)]
    expected_first = np.asarray(expected[0]["image"])
    train = data.load_tfds("cifar10", "train")
    test = data.load_tfds("cifar10", "test")
  assert train.images.shape == (5, 32, 32, 3)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  np.testing.assert_array_equal(train.labels, expected_labels)
  np.testing.assert_array_equal(train.images[0], expected_first)
  assert train.num_classes == 10 and train.extras == {}
  assert train.source.startswith("tfds:")
  assert test.extras["exact"].dtype == bool and test.extras["exact"].all()


def test_load_tfds_gtsrb_has_no_catalog_entry():
  with pytest.raises(ValueError, match="no TFDS catalog entry"):
    data.load_tfds("gtsrb", "test")


def test_load_tfds_not_prepared_is_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match="prepared"):
    data.load_tfds("cifar10", "test", data_dir=tmp_path)


def test_load_uses_prepared_tfds_after_env(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_find_prepared_tfds",
                      lambda name, cache: str(tmp_path / "tfds"))
  with _mock_tfds(3):
    arrays = data.load("cifar10", "test", cache_dir=tmp_path / "cache",
                       download=False)
  assert len(arrays) == 3 and arrays.source.startswith("tfds:")
  # An env var still wins over TFDS.
  _write_cifar_layout(tmp_path / "env")
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
  assert data.load("cifar10", "test").source.startswith("npz:")


def test_find_prepared_tfds_probe(tmp_path, monkeypatch):
  monkeypatch.undo()  # the real probe, not the autouse stub
  assert data._find_prepared_tfds("gtsrb", tmp_path) is None
  assert data._prepared_tfds_dir("cifar10", [str(tmp_path)]) is None
  assert not list(tmp_path.iterdir())  # the probe created nothing


def test_prepared_tfds_dir_needs_random_access_format(tmp_path, monkeypatch):
  formats = tfds.core.file_adapters.FileFormat

  class FakeBuilder:

    def __init__(self, data_dir, file_format, prepared=True):
      self.data_dir_root = data_dir
      self._prepared = prepared
      self.info = type("Info", (), {
          "available_file_formats": lambda _: {file_format}})()

    def is_prepared(self):
      return self._prepared

  builders = {
      "a": FakeBuilder("a", formats.TFRECORD),       # needs TensorFlow
      "b": FakeBuilder("b", formats.ARRAY_RECORD, prepared=False),
      "c": FakeBuilder("c", formats.ARRAY_RECORD),
  }

  def fake_builder(name, data_dir=None):
    if data_dir == "broken":
      raise RuntimeError("tfds failure")
    return builders[data_dir]

  monkeypatch.setattr(tfds, "builder", fake_builder)
  assert data._prepared_tfds_dir("cifar10", ["broken", "a", "b", "c"]) == "c"
  assert data._prepared_tfds_dir("cifar10", ["a", "b"]) is None


# ----------------------------------------------------------------------------
# Download: CIFAR-10.


def _cifar_rows(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, 3072), np.uint8)


def _make_cifar_tar(path: pathlib.Path, batches: dict[str, dict]) -> None:
  with tarfile.open(path, "w:gz") as tar:
    for name, batch in batches.items():
      payload = pickle.dumps(batch, protocol=2)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
    meta = b"not a pickle, and never read"
    info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
    info.size = len(meta)
    tar.addfile(info, io.BytesIO(meta))


def _cifar_batches(rows_per_batch: int = 2) -> dict[str, dict]:
  batches = {}
  for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] +
                           ["test_batch"]):
    n = 3 if name == "test_batch" else rows_per_batch
    batches[name] = {b"batch_label": name.encode(),
                     b"data": _cifar_rows(n, seed=i),
                     b"labels": [(i + j) % 10 for j in range(n)],
                     b"filenames": [b"f.png"] * n}
  return batches


def _chw_rows_to_hwc(rows: np.ndarray) -> np.ndarray:
  out = np.empty((len(rows), 32, 32, 3), np.uint8)
  for n in range(len(rows)):
    for c in range(3):
      for h in range(32):
        out[n, h, :, c] = rows[n, c * 1024 + h * 32: c * 1024 + h * 32 + 32]
  return out


def test_download_cifar10(tmp_path, monkeypatch):
  batches = _cifar_batches()
  archive = tmp_path / "src" / "cifar-10-python.tar.gz"
  archive.parent.mkdir()
  _make_cifar_tar(archive, batches)
  fetched = _serve(monkeypatch, {archive.name: archive})
  messages = []
  cache = tmp_path / "cache"

  folder = data.download("cifar10", cache_dir=cache, progress=messages.append)

  assert folder == cache / "cifar10"
  assert fetched == [data._CIFAR10_URL]
  assert messages and all(isinstance(m, str) for m in messages)
  assert sorted(p.name for p in folder.iterdir()) == [
      "test.npz", "train_0.npz", "train_1.npz"]
  assert not (cache / "downloads" / archive.name).exists()  # archive removed
  train_rows = np.concatenate(
      [batches[f"data_batch_{k}"][b"data"] for k in range(1, 6)])
  train_labels = np.concatenate(
      [batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)])
  with np.load(folder / "train_0.npz") as f0, np.load(folder / "train_1.npz") as f1:
    assert f0["x"].shape == (5, 32, 32, 3) and f1["x"].shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(f0["x"], _chw_rows_to_hwc(train_rows[:5]))
    np.testing.assert_array_equal(f1["x"], _chw_rows_to_hwc(train_rows[5:]))
    np.testing.assert_array_equal(f0["y"], train_labels[:5])
    np.testing.assert_array_equal(f1["y"], train_labels[5:])
  test = data.load_npz_dir(cache, "cifar10", "test")
  np.testing.assert_array_equal(
      test.images, _chw_rows_to_hwc(batches["test_batch"][b"data"]))
  np.testing.assert_array_equal(test.labels, batches["test_batch"][b"labels"])
  assert test.extras["exact"].all() and len(test.extras["exact"]) == 3

  # load() now finds the converted files without fetching again.
  monkeypatch.setattr(data, "_fetch", lambda url, dest: pytest.fail("fetch"))
  train = data.load("cifar10", "train", cache_dir=cache)
  assert len(train) == 10 and train.source == f"download:{folder}"


def test_load_downloads_when_missing(tmp_path, monkeypatch):
  archive = tmp_path / "cifar-10-python.tar.gz"
  _make_cifar_tar(archive, _cifar_batches())
  fetched = _serve(monkeypatch, {archive.name: archive})
  arrays = data.load("cifar10", "test", cache_dir=tmp_path / "cache")
  assert len(arrays) == 3 and len(fetched) == 1
  assert arrays.source == f"download:{tmp_path / 'cache' / 'cifar10'}"


def test_download_rejects_bad_checksum(tmp_path, monkeypatch):
  archive = tmp_path / "cifar-10-python.tar.gz"
  _make_cifar_tar(archive, _cifar_batches())
  _serve(monkeypatch, {archive.name: archive})
  monkeypatch.setitem(data._ARCHIVE_MD5, archive.name, "0" * 32)
  cache = tmp_path / "cache"
  with pytest.raises(ValueError, match="MD5"):
    data.download("cifar10", cache_dir=cache)
  assert _npz_and_tmp_files(cache / "downloads") == []
  assert not (cache / "cifar10").exists()


def test_download_cifar10_parse_failure_leaves_no_files(tmp_path, monkeypatch):
  batches = _cifar_batches()
  batches["test_batch"][b"data"] = np.zeros((3, 100), np.uint8)  # wrong width
  archive = tmp_path / "cifar-10-python.tar.gz"
  _make_cifar_tar(archive, batches)
  _serve(monkeypatch, {archive.name: archive})
  cache = tmp_path / "cache"
  with pytest.raises(ValueError, match="3072"):
    data.download("cifar10", cache_dir=cache)
  assert _npz_and_tmp_files(cache / "cifar10") == []
  # The verified archive is kept so that a retry need not fetch it again.
  assert (cache / "downloads" / archive.name).is_file()


def test_download_refuses_unexpected_pickled_objects(tmp_path, monkeypatch):
  batches = _cifar_batches()
  batches["data_batch_3"] = {b"data": os.getcwd, b"labels": []}
  archive = tmp_path / "cifar-10-python.tar.gz"
  _make_cifar_tar(archive, batches)
  _serve(monkeypatch, {archive.name: archive})
  with pytest.raises(ValueError, match="refusing to unpickle"):
    data.download("cifar10", cache_dir=tmp_path / "cache")


def test_download_write_failure_leaves_no_files(tmp_path, monkeypatch):
  archive = tmp_path / "cifar-10-python.tar.gz"
  _make_cifar_tar(archive, _cifar_batches())
  _serve(monkeypatch, {archive.name: archive})
  real_savez = np.savez_compressed
  calls = []

  def failing_savez(file, **arrays):
    calls.append(1)
    if len(calls) == 3:
      real_savez(file, **arrays)  # partly written last file...
      raise OSError("disk full")  # ...then the write fails
    real_savez(file, **arrays)

  monkeypatch.setattr(np, "savez_compressed", failing_savez)
  cache = tmp_path / "cache"
  with pytest.raises(OSError, match="disk full"):
    data.download("cifar10", cache_dir=cache)
  assert _npz_and_tmp_files(cache / "cifar10") == []


def test_fetch_reads_a_url(tmp_path, monkeypatch):
  monkeypatch.undo()  # the real _fetch, on a file:// URL (no network)
  src = tmp_path / "src.bin"
  src.write_bytes(b"payload" * 1000)
  dest = tmp_path / "dest.bin"
  data._fetch(src.as_uri(), dest)
  assert dest.read_bytes() == src.read_bytes()


# ----------------------------------------------------------------------------
# Download: GTSRB.

RED, BLUE = (250, 10, 20), (5, 6, 200)


def _ppm(pixels: np.ndarray) -> bytes:
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PPM")
  return buffer.getvalue()


def _framed(width: int, height: int, roi: tuple[int, int, int, int],
            inner: np.ndarray | None = None) -> np.ndarray:
  """A BLUE image whose ROI [Y1:Y2, X1:X2] is RED (or ``inner``)."""
  x1, y1, x2, y2 = roi
  pixels = np.empty((height, width, 3), np.uint8)
  pixels[:] = BLUE
  pixels[y1:y2, x1:x2] = RED if inner is None else inner
  return pixels


def _gradient(h: int, w: int) -> np.ndarray:
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([ys * 7 % 256, xs * 11 % 256, (ys * w + xs) % 256],
                  -1).astype(np.uint8)


def _csv(rows: list[tuple], with_class: bool = True) -> bytes:
  header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2"
  header += ";ClassId" if with_class else ""
  lines = [header] + [
      ";".join(str(v) for v in (row if with_class else row[:-1]))
      for row in rows]
  return ("\r\n".join(lines) + "\r\n").encode()


def _make_gtsrb_zips(src: pathlib.Path, test_missing_image: bool = False
                     ) -> dict[str, pathlib.Path]:
  """Writes tiny official-looking GTSRB zips; returns name -> path."""
  src.mkdir(parents=True, exist_ok=True)
  # Training: class 0 (two images), class 2 (one image); class 1 absent.
  train = {
      0: [("00000_00000.ppm", _framed(40, 45, (3, 5, 35, 37))),    # 32x32 ROI
          ("00000_00001.ppm", _framed(29, 31, (5, 6, 24, 25)))],   # 19x19 ROI
      2: [("00001_00000.ppm",
           _framed(20, 24, (2, 4, 18, 20), inner=_gradient(16, 16)))],
  }
  rois = {"00000_00000.ppm": (3, 5, 35, 37), "00000_00001.ppm": (5, 6, 24, 25),
          "00001_00000.ppm": (2, 4, 18, 20)}
  paths = {}
  path = src / data._GTSRB_TRAIN_ZIP
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("GTSRB/Readme-Images.txt", "readme")
    for cls in (2, 0):  # written out of order on purpose
      folder = f"GTSRB/Final_Training/Images/{cls:05d}/"
      rows = []
      for filename, pixels in train[cls]:
        zf.writestr(folder + filename, _ppm(pixels))
        h, w = pixels.shape[:2]
        rows.append((filename, w, h, *rois[filename], cls))
      zf.writestr(folder + f"GT-{cls:05d}.csv", _csv(rows))
  paths[path.name] = path

  # Test: three images; the GT CSV lists them in the order 2, 0, 1.
  test_images = {
      "00000.ppm": (_framed(50, 34, (10, 1, 42, 33)), (10, 1, 42, 33), 7),
      "00001.ppm": (_framed(70, 70, (3, 3, 67, 67), inner=_gradient(64, 64)),
                    (3, 3, 67, 67), 42),
      "00002.ppm": (_framed(33, 32, (0, 0, 32, 32)), (0, 0, 32, 32), 1),
  }
  order = ["00002.ppm", "00000.ppm", "00001.ppm"]
  rows = [(f, test_images[f][0].shape[1], test_images[f][0].shape[0],
           *test_images[f][1], test_images[f][2]) for f in order]
  path = src / data._GTSRB_TEST_ZIP
  with zipfile.ZipFile(path, "w") as zf:
    for filename, (pixels, _, _) in test_images.items():
      if test_missing_image and filename == "00001.ppm":
        continue
      zf.writestr("GTSRB/Final_Test/Images/" + filename, _ppm(pixels))
    zf.writestr("GTSRB/Final_Test/Images/GT-final_test.test.csv",
                _csv(rows, with_class=False))
  paths[path.name] = path
  path = src / data._GTSRB_GT_ZIP
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("GT-final_test.csv", _csv(rows))
  paths[path.name] = path
  return paths


def test_download_gtsrb_crops_and_resizes(tmp_path, monkeypatch):
  archives = _make_gtsrb_zips(tmp_path / "src")
  fetched = _serve(monkeypatch, archives)
  cache = tmp_path / "cache"
  folder = data.download("gtsrb", cache_dir=cache, keep_archives=True)

  assert sorted(url.rsplit("/", 1)[-1] for url in fetched) == sorted(archives)
  assert all(url.startswith(data._GTSRB_BASE_URL) for url in fetched)
  assert sorted(p.name for p in folder.iterdir()) == ["test.npz", "train.npz"]
  assert (cache / "downloads" / data._GTSRB_GT_ZIP).is_file()  # kept

  red = np.broadcast_to(np.array(RED, np.uint8), (32, 32, 3))
  train = data.load_npz_dir(cache, "gtsrb", "train")
  assert train.images.shape == (3, 32, 32, 3) and train.num_classes == 43
  np.testing.assert_array_equal(train.labels, [0, 0, 2])  # class-major
  np.testing.assert_array_equal(train.extras["idx"], [0, 1, 2])
  # ROI exactly 32x32: the crop itself; 19x19 upscaled: still only ROI pixels,
  # so no BLUE from row Y2 / column X2 (edges excluded).
  np.testing.assert_array_equal(train.images[0], red)
  np.testing.assert_array_equal(train.images[1], red)
  # 16x16 gradient upscaled 2x with nearest neighbour: each pixel doubled.
  doubled = np.repeat(np.repeat(_gradient(16, 16), 2, axis=0), 2, axis=1)
  np.testing.assert_array_equal(train.images[2], doubled)

  test = data.load_npz_dir(cache, "gtsrb", "test")
  assert test.images.shape == (3, 32, 32, 3) and test.extras == {}
  np.testing.assert_array_equal(test.labels, [1, 7, 42])  # GT CSV order
  np.testing.assert_array_equal(test.images[0], red)
  np.testing.assert_array_equal(test.images[1], red)
  # 64x64 gradient downscaled 2x with nearest neighbour: odd rows and columns.
  np.testing.assert_array_equal(test.images[2], _gradient(64, 64)[1::2, 1::2])


def test_download_gtsrb_parse_failure_leaves_no_files(tmp_path, monkeypatch):
  archives = _make_gtsrb_zips(tmp_path / "src", test_missing_image=True)
  _serve(monkeypatch, archives)
  cache = tmp_path / "cache"
  with pytest.raises(ValueError, match="00001.ppm"):
    data.download("gtsrb", cache_dir=cache)
  assert _npz_and_tmp_files(cache / "gtsrb") == []


def test_download_is_idempotent(tmp_path, monkeypatch):
  archives = _make_gtsrb_zips(tmp_path / "src")
  fetched = _serve(monkeypatch, archives)
  cache = tmp_path / "cache"
  data.download("gtsrb", cache_dir=cache)
  assert len(fetched) == 3
  data.download("gtsrb", cache_dir=cache)
  assert len(fetched) == 3  # nothing fetched the second time
  data.download("gtsrb", cache_dir=cache, force=True)
  assert len(fetched) == 6


def test_to_float_takes_bfloat16_and_arrays_print_shapes_not_pixels():
  import ml_dtypes
  x = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=ml_dtypes.bfloat16)
  np.testing.assert_array_equal(data.to_float(x), np.array([[0.0, 0.5], [1.0, 0.25]], np.float32))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    data.to_float(np.array([2.0], dtype=ml_dtypes.bfloat16))
  arrays = data.Arrays(images=np.zeros((5, 32, 32, 3), np.uint8), labels=np.zeros(5, np.int32),
                       extras={"exact": np.ones(5, bool)}, num_classes=10, source="npz:/d")
  text = repr(arrays)
  assert text == ("Arrays(images=uint8 (5, 32, 32, 3), labels=int32 (5,), extras={exact: bool "
                  "(5,)}, num_classes=10, source='npz:/d')")
