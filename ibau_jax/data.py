"""CIFAR-10 and GTSRB as in-memory uint8 arrays, from local files, TFDS or the web.

Every loader returns an :class:`Arrays`: ``images`` uint8 ``(N, 32, 32, 3)`` NHWC
with values 0..255, ``labels`` int32 ``(N,)``, and per-example ``extras``.

Sources, in the order :func:`load` tries them:

1. an explicit ``data_dir`` (the ``--data-dir`` of the scripts), laid out like the
   project's offline copy ``../shared/data``::

     <data_dir>/cifar10/train_0.npz   first 25,000 training images (official order)
     <data_dir>/cifar10/train_1.npz   last 25,000 training images
     <data_dir>/cifar10/test.npz      10,000 test images, extra bool array ``exact``
     <data_dir>/gtsrb/test.npz        12,630 test images (GT-final_test.csv order)
     <data_dir>/gtsrb/train.npz       full training set (class-major), or
     <data_dir>/gtsrb/train_subset.npz  a subset with extra ``idx`` into the full set

   Each file holds ``x`` (uint8 images), ``y`` (integer labels) and optional
   extra per-example arrays, which become :attr:`Arrays.extras`;
2. the directory named by the environment variable ``IBAU_DATA_DIR`` (same layout);
3. for CIFAR-10, a TFDS dataset already prepared in a random-access format
   (``array_record`` or ``parquet``) in the default TFDS data directory or in
   ``<cache_dir>/tensorflow_datasets``, read with ``tfds.data_source`` (no TensorFlow);
4. :func:`download`: the official archives, converted into the layout above under
   ``<cache_dir>/<name>/`` (default cache ``~/.cache/ibau_jax``).

GTSRB images are cropped to the sign's region of interest from the official CSVs
(``img[Y1:Y2, X1:X2]``, right/bottom edge excluded) and resized to 32x32 with
nearest-neighbour interpolation, the preprocessing the I-BAU GTSRB models expect.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import os
import pathlib
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from typing import Callable, Iterable, Mapping

import numpy as np

from ibau_jax import files

__all__ = [
    "Arrays", "DATA_DIR_ENV", "DATASETS", "NUM_CLASSES", "SPLITS", "download",
    "load", "load_npz_dir", "load_tfds", "to_float",
]

DATA_DIR_ENV = "IBAU_DATA_DIR"
DATASETS = ("cifar10", "gtsrb")
SPLITS = ("train", "test")
NUM_CLASSES = {"cifar10": 10, "gtsrb": 43}
IMAGE_SHAPE = (32, 32, 3)
DEFAULT_CACHE_DIR = "~/.cache/ibau_jax"

Progress = Callable[[str], None]

# Files of the npz layout.  Each entry lists alternatives, tried in order; an
# alternative is a tuple of files whose arrays are concatenated in that order.
_NPZ_LAYOUT: dict[tuple[str, str], tuple[tuple[str, ...], ...]] = {
    ("cifar10", "train"): (("train_0.npz", "train_1.npz"),),
    ("cifar10", "test"): (("test.npz",),),
    ("gtsrb", "train"): (("train.npz",), ("train_subset.npz",)),
    ("gtsrb", "test"): (("test.npz",),),
}
# Files that :func:`download` writes; the dataset is complete when all exist.
_DOWNLOAD_FILES = {
    "cifar10": ("train_0.npz", "train_1.npz", "test.npz"),
    "gtsrb": ("train.npz", "test.npz"),
}

_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_GTSRB_BASE_URL = (
    "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/")
_GTSRB_TRAIN_ZIP = "GTSRB_Final_Training_Images.zip"
_GTSRB_TEST_ZIP = "GTSRB_Final_Test_Images.zip"
_GTSRB_GT_ZIP = "GTSRB_Final_Test_GT.zip"
# Archives each dataset needs: archive file name -> URL.
_ARCHIVES: dict[str, dict[str, str]] = {
    "cifar10": {"cifar-10-python.tar.gz": _CIFAR10_URL},
    "gtsrb": {
        _GTSRB_TRAIN_ZIP: _GTSRB_BASE_URL + _GTSRB_TRAIN_ZIP,
        _GTSRB_TEST_ZIP: _GTSRB_BASE_URL + _GTSRB_TEST_ZIP,
        _GTSRB_GT_ZIP: _GTSRB_BASE_URL + _GTSRB_GT_ZIP,
    },
}
# MD5 of the official archives (the values torchvision and others check).
# ``None`` skips the check for that archive.
_ARCHIVE_MD5: dict[str, str | None] = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    _GTSRB_TRAIN_ZIP: "f33fd80ac59bff73c82d25ab499e03a3",
    _GTSRB_TEST_ZIP: "c7e4e6327067d32654124b0fe9e82185",
    _GTSRB_GT_ZIP: "fe31e9c9270bbcd7b84b7f21a9d9d9e5",
}
_FETCH_TIMEOUT_S = 60.0
_GTSRB_CSV_COLUMNS = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2",
                      "ClassId")


@dataclasses.dataclass(frozen=True, eq=False)
class Arrays:
  """One split of a dataset, in memory.

  Attributes:
    images: uint8 ``(N, 32, 32, 3)``, NHWC, values 0..255.
    labels: int32 ``(N,)``, class ids in ``[0, num_classes)``.
    extras: per-example arrays of length ``N``, e.g. ``{"exact": bool (N,)}`` for
      the CIFAR-10 test split (True where the pixels are the official ones) or
      ``{"idx": int (N,)}`` for the GTSRB training split (index into the full,
      class-major training set).
    num_classes: number of classes of the dataset (10 or 43).
    source: where the arrays came from: ``"npz:<dir>"``, ``"tfds:<dir>"`` or
      ``"download:<dir>"``.
  """

  images: np.ndarray
  labels: np.ndarray
  extras: dict[str, np.ndarray]
  num_classes: int
  source: str

  def __post_init__(self) -> None:
    images, labels = self.images, self.labels
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
      raise ValueError(
          f"images must be a uint8 numpy array, got {type(images).__name__} "
          f"of dtype {getattr(images, 'dtype', None)}")
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
      raise ValueError(
          f"images must have shape (N, 32, 32, 3), got {images.shape}")
    n = images.shape[0]
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int32:
      raise ValueError(
          f"labels must be an int32 numpy array, got {type(labels).__name__} "
          f"of dtype {getattr(labels, 'dtype', None)}")
    if labels.shape != (n,):
      raise ValueError(
          f"labels must have shape ({n},) to match the images, got "
          f"{labels.shape}")
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be positive, got {self.num_classes}")
    if n and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(
          f"labels must lie in [0, {self.num_classes}), found range "
          f"[{labels.min()}, {labels.max()}]")
    for key, value in self.extras.items():
      if not isinstance(value, np.ndarray) or value.ndim < 1 or len(value) != n:
        raise ValueError(
            f"extra {key!r} must be a numpy array with {n} rows, got "
            f"{getattr(value, 'shape', type(value).__name__)}")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def __repr__(self) -> str:
    extras = ", ".join(f"{k}: {v.dtype} {v.shape}" for k, v in self.extras.items())
    return (f"Arrays(images={self.images.dtype} {self.images.shape}, labels="
            f"{self.labels.dtype} {self.labels.shape}, extras={{{extras}}}, "
            f"num_classes={self.num_classes}, source={self.source!r})")


# ----------------------------------------------------------------------------
# Small helpers.


def _check_name(name: str) -> None:
  if name not in DATASETS:
    raise ValueError(
        f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")


def _check_name_split(name: str, split: str) -> None:
  _check_name(name)
  if split not in SPLITS:
    raise ValueError(
        f"unknown split {split!r} for dataset {name!r}; valid splits: "
        f"{', '.join(SPLITS)}")


def _as_path(path: str | os.PathLike, what: str) -> pathlib.Path:
  if isinstance(path, str) and not path:
    raise ValueError(f"{what} must be a non-empty path")
  return pathlib.Path(os.fspath(path)).expanduser()


def _resolve_cache_dir(cache_dir: str | os.PathLike | None) -> pathlib.Path:
  if cache_dir is None:
    return pathlib.Path(DEFAULT_CACHE_DIR).expanduser()
  return _as_path(cache_dir, "cache_dir")


def _report(progress: Progress | None, message: str) -> None:
  if progress is not None:
    progress(message)


def to_float(images: np.ndarray) -> np.ndarray:
  """Converts images to float32 pixels in [0, 1].

  Args:
    images: uint8 array with values 0..255 (any shape), or a floating array (bfloat16
      included) that is already scaled to [0, 1].

  Returns:
    ``images / 255`` as float32 for uint8 input; for floating input the same
    values as float32 (the input itself when it already is a float32 numpy
    array).

  Raises:
    ValueError: for floating input with values outside [0, 1] (or NaN), or for
      any other dtype (integers other than uint8 are ambiguous: 0..1 or 0..255).
  """
  arr = np.asarray(images)
  if arr.dtype == np.uint8:
    return arr.astype(np.float32) / np.float32(255.0)
  if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
    if arr.size:
      lo, hi = float(np.min(arr)), float(np.max(arr))
      if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise ValueError(
            f"floating images must already lie in [0, 1], found range "
            f"[{lo}, {hi}]; pass uint8 images to scale 0..255")
    return arr.astype(np.float32, copy=False)
  raise ValueError(
      f"images must be uint8 (0..255) or floating (0..1), got dtype {arr.dtype}")


# ----------------------------------------------------------------------------
# The npz layout.


def _expected_files_text(folder: pathlib.Path, name: str, split: str) -> str:
  alternatives = _NPZ_LAYOUT[(name, split)]
  return " or ".join(
      " + ".join(str(folder / f) for f in alternative)
      for alternative in alternatives)


def _read_npz(path: pathlib.Path, num_classes: int
              ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """Reads and validates one npz file of the layout: (x, y as int32, extras)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {key: f[key] for key in f.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"cannot read {path} as a numpy .npz archive: {e}") from e
  missing = [key for key in ("x", "y") if key not in arrays]
  if missing:
    raise ValueError(
        f"{path} lacks the array(s) {missing}; expected 'x' (uint8 images "
        f"(N, 32, 32, 3)) and 'y' (labels (N,)), found {sorted(arrays)}")
  x, y = arrays.pop("x"), arrays.pop("y")
  if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
    raise ValueError(
        f"{path}: 'x' must be uint8 with shape (N, 32, 32, 3), got {x.dtype} "
        f"{x.shape}")
  if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
    raise ValueError(
        f"{path}: 'y' must be integer with shape ({x.shape[0]},), got "
        f"{y.dtype} {y.shape}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(
        f"{path}: labels must lie in [0, {num_classes}), found range "
        f"[{y.min()}, {y.max()}]")
  for key, value in arrays.items():
    if value.ndim < 1 or len(value) != len(x):
      raise ValueError(
          f"{path}: extra array {key!r} must have {len(x)} rows, got shape "
          f"{value.shape}")
  return x, y.astype(np.int32), arrays


def load_npz_dir(data_dir: str | os.PathLike, name: str, split: str) -> Arrays:
  """Loads one split from a directory in the layout of ``../shared/data``.

  Reads ``<data_dir>/<name>/``: for CIFAR-10 ``train`` the concatenation of
  ``train_0.npz`` then ``train_1.npz``, for ``test`` ``test.npz``; for GTSRB
  ``test`` ``test.npz`` and for ``train`` ``train.npz`` (the full training set,
  as written by :func:`download`) or, if that is absent, ``train_subset.npz``.
  Arrays in a file other than ``x`` and ``y`` are returned in ``extras``.

  Args:
    data_dir: the root directory (holding ``cifar10/`` and/or ``gtsrb/``).
    name: ``"cifar10"`` or ``"gtsrb"``.
    split: ``"train"`` or ``"test"``.

  Returns:
    The split, with ``source`` ``"npz:<absolute data_dir>/<name>"``.

  Raises:
    ValueError: for an unknown dataset or split, or a malformed file.
    FileNotFoundError: if ``data_dir`` does not exist or lacks the files.
  """
  _check_name_split(name, split)
  root = _as_path(data_dir, "data_dir")
  folder = root / name
  if not root.is_dir():
    raise FileNotFoundError(
        f"data directory {root} does not exist or is not a directory; "
        f"expected {_expected_files_text(folder, name, split)}")
  for alternative in _NPZ_LAYOUT[(name, split)]:
    paths = [folder / f for f in alternative]
    if all(p.is_file() for p in paths):
      break
  else:
    raise FileNotFoundError(
        f"data directory {root} lacks the {name} {split} split: expected "
        f"{_expected_files_text(folder, name, split)}")

  num_classes = NUM_CLASSES[name]
  parts = [_read_npz(p, num_classes) for p in paths]
  extra_keys = set(parts[0][2])
  for p, part in zip(paths[1:], parts[1:]):
    if set(part[2]) != extra_keys:
      raise ValueError(
          f"{p} has extra arrays {sorted(part[2])} but {paths[0]} has "
          f"{sorted(extra_keys)}; the files of one split must agree")
  if len(parts) == 1:
    images, labels, extras = parts[0]
  else:
    images = np.concatenate([part[0] for part in parts])
    labels = np.concatenate([part[1] for part in parts])
    extras = {k: np.concatenate([part[2][k] for part in parts])
              for k in sorted(extra_keys)}
  return Arrays(images=images, labels=labels, extras=extras,
                num_classes=num_classes,
                source=f"npz:{os.path.abspath(folder)}")


# ----------------------------------------------------------------------------
# TFDS.


def load_tfds(name: str, split: str, *,
              data_dir: str | os.PathLike | None = None) -> Arrays:
  """Loads one split of a TFDS dataset that is already prepared.

  Uses ``tfds.data_source`` with ``download=False``, so it needs neither the
  network nor TensorFlow, but the dataset must have been prepared in a
  random-access format (``array_record`` or ``parquet``).  Only CIFAR-10 is
  available: GTSRB has no TFDS catalog entry.  CIFAR-10 ``test`` gets the extra
  ``exact`` (all True: TFDS holds the official pixels).

  Args:
    name: ``"cifar10"`` (``"gtsrb"`` raises ``ValueError``).
    split: ``"train"`` or ``"test"``.
    data_dir: TFDS data directory; ``None`` for TFDS's default
      (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

  Returns:
    The split, with ``source`` ``"tfds:<versioned dataset dir>"``.

  Raises:
    ValueError: for an unknown dataset or split, for GTSRB, or bad examples.
    FileNotFoundError: if no prepared random-access dataset is found.
    ImportError: if tensorflow-datasets is not installed.
  """
  _check_name_split(name, split)
  if name != "cifar10":
    raise ValueError(
        f"dataset {name!r} has no TFDS catalog entry, only 'cifar10' can be "
        f"loaded from TFDS; use load_npz_dir() or download() instead")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds_dir = None if data_dir is None else os.fspath(
      _as_path(data_dir, "data_dir"))
  try:
    source = tfds.data_source(name, split=split, data_dir=tfds_dir,
                              download=False)
  except (NotImplementedError, ValueError, AssertionError) as e:
    where = tfds_dir or "the default TFDS data directory"
    raise FileNotFoundError(
        f"no prepared TFDS {name!r} dataset in a random-access format "
        f"(array_record or parquet) found in {where}: {e}") from e

  n = len(source)
  images = np.empty((n,) + IMAGE_SHAPE, np.uint8)
  labels = np.empty((n,), np.int32)
  for i in range(n):
    example = source[i]
    image = np.asarray(example["image"])
    if image.shape != IMAGE_SHAPE or image.dtype != np.uint8:
      raise ValueError(
          f"TFDS {name} {split} example {i}: expected a uint8 (32, 32, 3) "
          f"image, got {image.dtype} {image.shape}")
    images[i] = image
    labels[i] = int(example["label"])
  extras = {"exact": np.ones((n,), bool)} if split == "test" else {}
  return Arrays(images=images, labels=labels, extras=extras,
                num_classes=NUM_CLASSES[name],
                source=f"tfds:{source.dataset_info.data_dir}")


def _find_prepared_tfds(name: str, cache_dir: pathlib.Path) -> str | None:
  """Returns a TFDS data dir holding ``name`` prepared for random access, or None.

  Looks in TFDS's default data directory(ies) and in
  ``<cache_dir>/tensorflow_datasets``.  Returns None when tensorflow-datasets is
  not installed or ``name`` has no TFDS entry.  Never downloads or prepares
  anything.
  """
  if name != "cifar10":
    return None
  candidates: list[str | None] = [None]
  cache_tfds = cache_dir / "tensorflow_datasets"
  if cache_tfds.is_dir():
    candidates.append(os.fspath(cache_tfds))
  return _prepared_tfds_dir(name, candidates)


def _prepared_tfds_dir(name: str, candidates: Iterable[str | None]
                       ) -> str | None:
  """The first TFDS data dir (None: TFDS's default) where ``name`` is prepared.

  Only datasets prepared in a random-access format count, since only those can
  be read without TensorFlow.  Returns the data dir root, or None.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  random_access = tfds.core.file_adapters.FileFormat.with_random_access()
  for candidate in candidates:
    # A probe: any failure of TFDS here only means "not usable".
    try:
      builder = tfds.builder(name, data_dir=candidate)
      if (builder.is_prepared() and
          set(builder.info.available_file_formats()) & random_access):
        return os.fspath(builder.data_dir_root)
    except Exception:  # pylint: disable=broad-except
      continue
  return None


# ----------------------------------------------------------------------------
# Download and conversion.


def _fetch(url: str, dest: pathlib.Path) -> None:
  """Downloads ``url`` to the file ``dest`` (overwriting it).

  Module-level so that tests can replace it; callers handle atomicity.
  """
  with urllib.request.urlopen(url, timeout=_FETCH_TIMEOUT_S) as response:
    with open(dest, "wb") as out:
      shutil.copyfileobj(response, out, length=1 << 20)


def _md5(path: pathlib.Path) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _fetch_archive(url: str, dest: pathlib.Path,
                   progress: Progress | None) -> pathlib.Path:
  """Makes ``dest`` a verified copy of ``url``, reusing a verified earlier copy."""
  expected = _ARCHIVE_MD5.get(dest.name)
  if dest.is_file() and (expected is None or _md5(dest) == expected):
    _report(progress, f"using cached {dest}")
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part",
                                  dir=dest.parent)
  os.fchmod(fd, files.file_mode())
  os.close(fd)
  tmp = pathlib.Path(tmp_name)
  try:
    _report(progress, f"downloading {url}")
    _fetch(url, tmp)
    if expected is not None:
      actual = _md5(tmp)
      if actual != expected:
        raise ValueError(
            f"download of {url} is corrupt: MD5 {actual}, expected {expected}")
    os.replace(tmp, dest)
  finally:
    tmp.unlink(missing_ok=True)
  _report(progress, f"downloaded {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
  return dest


class _BatchUnpickler(pickle.Unpickler):
  """Unpickles CIFAR-10 batches, allowing only numpy arrays and plain data."""

  def find_class(self, module: str, name: str):
    reconstruct = np.ndarray(0).__reduce__()[0]
    allowed = {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in Python-3 protocol 2
    }
    if (module, name) not in allowed:
      raise pickle.UnpicklingError(
          f"refusing to unpickle {module}.{name} from a CIFAR-10 batch")
    return allowed[(module, name)]


def _read_cifar10_batch(tar: tarfile.TarFile, member: tarfile.TarInfo,
                        archive: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Returns (uint8 NHWC images, int32 labels) of one pickled CIFAR-10 batch."""
  where = f"{archive}:{member.name}"
  f = tar.extractfile(member)
  if f is None:
    raise ValueError(f"{where} is not a regular file")
  try:
    batch = _BatchUnpickler(f, encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as e:
    raise ValueError(f"{where} is not a valid CIFAR-10 batch: {e}") from e
  if not isinstance(batch, dict):
    raise ValueError(f"{where}: expected a dict, got {type(batch).__name__}")
  data = batch.get(b"data", batch.get("data"))
  labels = batch.get(b"labels", batch.get("labels"))
  if data is None or labels is None:
    raise ValueError(f"{where}: expected keys 'data' and 'labels', found "
                     f"{sorted(map(str, batch))}")
  data = np.asarray(data)
  labels = np.asarray(labels)
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise ValueError(f"{where}: 'data' must be uint8 (N, 3072), got "
                     f"{data.dtype} {data.shape}")
  if labels.shape != (data.shape[0],) or not np.issubdtype(
      labels.dtype, np.integer):
    raise ValueError(f"{where}: 'labels' must be {data.shape[0]} integers, got "
                     f"{labels.dtype} {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= 10):
    raise ValueError(f"{where}: labels must lie in [0, 10)")
  # Rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def _convert_cifar10(archive: pathlib.Path
                     ) -> dict[str, dict[str, np.ndarray]]:
  """Parses cifar-10-python.tar.gz into the contents of the npz files."""
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  try:
    with tarfile.open(archive, "r:gz") as tar:
      members = {pathlib.PurePosixPath(m.name).name: m
                 for m in tar.getmembers() if m.isfile()}
      missing = [n for n in names if n not in members]
      if missing:
        raise ValueError(f"{archive} lacks the CIFAR-10 batches {missing}")
      batches = {n: _read_cifar10_batch(tar, members[n], archive)
                 for n in names}
  except (tarfile.TarError, EOFError, OSError) as e:
    raise ValueError(f"cannot read {archive} as a .tar.gz archive: {e}") from e
  train_x = np.concatenate([batches[n][0] for n in names[:5]])
  train_y = np.concatenate([batches[n][1] for n in names[:5]])
  test_x, test_y = batches["test_batch"]
  half = len(train_x) // 2
  return {
      "train_0.npz": {"x": train_x[:half], "y": train_y[:half].astype(np.uint8)},
      "train_1.npz": {"x": train_x[half:], "y": train_y[half:].astype(np.uint8)},
      "test.npz": {"x": test_x, "y": test_y.astype(np.uint8),
                   "exact": np.ones((len(test_x),), bool)},
  }


def _read_gtsrb_csv(raw: bytes, where: str) -> list[dict[str, str]]:
  """Parses a ``;``-separated GTSRB annotation CSV into rows."""
  reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")), delimiter=";")
  missing = [c for c in _GTSRB_CSV_COLUMNS
             if c not in (reader.fieldnames or [])]
  if missing:
    raise ValueError(f"{where}: missing column(s) {missing}; found "
                     f"{reader.fieldnames}")
  return list(reader)


def _crop_resize(raw: bytes, row: Mapping[str, str], where: str) -> np.ndarray:
  """Crops a GTSRB image to its ROI (edges X2/Y2 excluded), resizes to 32x32."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    x1, y1, x2, y2 = (int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2",
                                             "Roi.Y2"))
  except ValueError as e:
    raise ValueError(f"{where}: non-integer ROI in {dict(row)}") from e
  try:
    with Image.open(io.BytesIO(raw)) as im:
      pixels = np.asarray(im.convert("RGB"))
  except (OSError, SyntaxError) as e:  # PIL raises these for broken images
    raise ValueError(f"{where}: cannot decode image: {e}") from e
  crop = pixels[y1:y2, x1:x2]
  if min(x1, y1) < 0 or crop.shape[0] == 0 or crop.shape[1] == 0:
    raise ValueError(
        f"{where}: ROI X1={x1} Y1={y1} X2={x2} Y2={y2} is empty or invalid "
        f"for an image of size {pixels.shape[1]}x{pixels.shape[0]}")
  resized = Image.fromarray(crop).resize((32, 32), Image.Resampling.NEAREST)
  return np.asarray(resized, dtype=np.uint8)


def _class_id(row: Mapping[str, str], where: str) -> int:
  try:
    label = int(row["ClassId"])
  except ValueError as e:
    raise ValueError(f"{where}: non-integer ClassId {row['ClassId']!r}") from e
  if not 0 <= label < NUM_CLASSES["gtsrb"]:
    raise ValueError(f"{where}: ClassId {label} outside [0, 43)")
  return label


def _gtsrb_train(archive: pathlib.Path) -> dict[str, np.ndarray]:
  """The full GTSRB training set, class-major in GT-000CC.csv order."""
  pattern = re.compile(r"(?:^|/)Final_Training/Images/(\d{5})/GT-\1\.csv$")
  images, labels = [], []
  with zipfile.ZipFile(archive) as zf:
    csvs = sorted((int(m.group(1)), name) for name in zf.namelist()
                  if (m := pattern.search(name)))
    if not csvs:
      raise ValueError(
          f"{archive} holds no Final_Training/Images/000CC/GT-000CC.csv files")
    for _, csv_name in csvs:
      folder = csv_name.rsplit("/", 1)[0] + "/" if "/" in csv_name else ""
      for line, row in enumerate(
          _read_gtsrb_csv(zf.read(csv_name), f"{archive}:{csv_name}"), 2):
        where = f"{archive}:{csv_name} line {line}"
        image_name = folder + row["Filename"]
        try:
          raw = zf.read(image_name)
        except KeyError as e:
          raise ValueError(f"{where}: image {image_name} not in archive") from e
        images.append(_crop_resize(raw, row, where))
        labels.append(_class_id(row, where))
  n = len(images)
  return {"x": np.stack(images) if n else np.empty((0,) + IMAGE_SHAPE, np.uint8),
          "y": np.asarray(labels, np.uint8),
          "idx": np.arange(n, dtype=np.int32)}


def _gtsrb_test(images_archive: pathlib.Path, gt_archive: pathlib.Path
                ) -> dict[str, np.ndarray]:
  """The GTSRB test set in GT-final_test.csv order."""
  with zipfile.ZipFile(gt_archive) as zf:
    gt_names = [n for n in zf.namelist()
                if pathlib.PurePosixPath(n).name == "GT-final_test.csv"]
    if not gt_names:
      raise ValueError(f"{gt_archive} holds no GT-final_test.csv")
    where_csv = f"{gt_archive}:{gt_names[0]}"
    rows = _read_gtsrb_csv(zf.read(gt_names[0]), where_csv)
  images, labels = [], []
  with zipfile.ZipFile(images_archive) as zf:
    members = {pathlib.PurePosixPath(n).name: n for n in zf.namelist()
               if "Final_Test/Images/" in n and n.lower().endswith(".ppm")}
    for line, row in enumerate(rows, 2):
      where = f"{where_csv} line {line}"
      if row["Filename"] not in members:
        raise ValueError(f"{where}: image {row['Filename']} not in "
                         f"{images_archive} (under Final_Test/Images/)")
      images.append(_crop_resize(zf.read(members[row["Filename"]]), row, where))
      labels.append(_class_id(row, where))
  n = len(images)
  return {"x": np.stack(images) if n else np.empty((0,) + IMAGE_SHAPE, np.uint8),
          "y": np.asarray(labels, np.uint8)}


def _convert_gtsrb(archives: Mapping[str, pathlib.Path]
                   ) -> dict[str, dict[str, np.ndarray]]:
  """Parses the three official GTSRB zips into the contents of the npz files."""
  try:
    test = _gtsrb_test(archives[_GTSRB_TEST_ZIP], archives[_GTSRB_GT_ZIP])
    train = _gtsrb_train(archives[_GTSRB_TRAIN_ZIP])
  except zipfile.BadZipFile as e:
    raise ValueError(f"cannot read a GTSRB archive as a zip file: {e}") from e
  return {"train.npz": train, "test.npz": test}


def _write_npz_files(folder: pathlib.Path,
                     contents: Mapping[str, Mapping[str, np.ndarray]]) -> None:
  """Writes all files to temporary names, then renames each into place.

  On any failure no temporary file remains and no target file is created.
  """
  folder.mkdir(parents=True, exist_ok=True)
  temps: dict[str, pathlib.Path] = {}
  try:
    for filename, arrays in contents.items():
      fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".tmp",
                                      dir=folder)
      temps[filename] = pathlib.Path(tmp_name)
      os.fchmod(fd, files.file_mode())
      with os.fdopen(fd, "wb") as f:
        np.savez_compressed(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    for filename, tmp in temps.items():
      os.replace(tmp, folder / filename)
  finally:
    for tmp in temps.values():
      tmp.unlink(missing_ok=True)


def _download_complete(folder: pathlib.Path, name: str) -> bool:
  return all((folder / f).is_file() for f in _DOWNLOAD_FILES[name])


def download(name: str, *, cache_dir: str | os.PathLike,
             progress: Progress | None = None, force: bool = False,
             keep_archives: bool = False) -> pathlib.Path:
  """Fetches the official archives of ``name`` and converts them to npz files.

  Writes ``<cache_dir>/<name>/`` in the layout :func:`load_npz_dir` reads: for
  CIFAR-10 ``train_0.npz`` (first half of the training set, batches 1 to 2.5),
  ``train_1.npz`` (second half) and ``test.npz`` (extra ``exact``, all True);
  for GTSRB ``train.npz`` (all training images, class-major, extra ``idx`` =
  ``arange(N)``) and ``test.npz`` (GT-final_test.csv order), each image cropped
  to its ROI and resized to 32x32 (nearest neighbour).  Archives are downloaded
  to ``<cache_dir>/downloads/`` and checked against their known MD5.  Every file
  is written under a temporary name and renamed into place only after all
  archives were parsed, so a failure leaves no partial npz file.  Does nothing
  if all files already exist, unless ``force``.  Needs Pillow for GTSRB.

  Args:
    name: ``"cifar10"`` or ``"gtsrb"``.
    cache_dir: directory for the downloads and converted files.
    progress: called with a short message before and after each step.
    force: fetch and convert even if the converted files exist.
    keep_archives: keep the downloaded archives after a successful conversion
      (they are always kept when conversion fails, to avoid fetching again).

  Returns:
    The dataset folder ``<cache_dir>/<name>``.

  Raises:
    ValueError: for an unknown dataset, a corrupt download or an archive that
      does not have the expected contents.
    OSError: if a download or a write fails (e.g. ``urllib.error.URLError``).
  """
  _check_name(name)
  return _download(name, cache=_as_path(cache_dir, "cache_dir"),
                   progress=progress, force=force, keep_archives=keep_archives)


def _download(name: str, *, cache: pathlib.Path, progress: Progress | None,
              force: bool, keep_archives: bool) -> pathlib.Path:
  """Implements :func:`download` (also called by :func:`load`)."""
  folder = cache / name
  if not force and _download_complete(folder, name):
    _report(progress, f"{name} already converted in {folder}")
    return folder
  archives = {
      filename: _fetch_archive(url, cache / "downloads" / filename, progress)
      for filename, url in _ARCHIVES[name].items()
  }
  _report(progress, f"converting {name} archives")
  if name == "cifar10":
    contents = _convert_cifar10(archives["cifar-10-python.tar.gz"])
  else:
    contents = _convert_gtsrb(archives)
  _write_npz_files(folder, contents)
  _report(progress, f"wrote {', '.join(contents)} to {folder}")
  if not keep_archives:
    for path in archives.values():
      path.unlink(missing_ok=True)
  return folder


# ----------------------------------------------------------------------------
# Entry point.


def load(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
         cache_dir: str | os.PathLike | None = None, download: bool = True,
         progress: Progress | None = None) -> Arrays:
  """Loads a split of CIFAR-10 or GTSRB from the first source that has it.

  Sources, in order:

  1. ``data_dir`` if given (npz layout, see :func:`load_npz_dir`);
  2. else the directory in ``$IBAU_DATA_DIR`` if set and non-empty;
  3. else, for CIFAR-10, a prepared random-access TFDS dataset in TFDS's default
     data directory or ``<cache_dir>/tensorflow_datasets`` (:func:`load_tfds`);
  4. else the converted files in ``<cache_dir>/<name>/``, fetching and
     converting them first with :func:`download` if they are missing and
     ``download`` is True.

  A ``data_dir`` or ``$IBAU_DATA_DIR`` that lacks the files is an error, not a
  reason to fall through to the next source.

  Args:
    name: ``"cifar10"`` or ``"gtsrb"``.
    split: ``"train"`` or ``"test"``.
    data_dir: root of an npz-layout directory (e.g. ``../shared/data``).
    cache_dir: cache for downloads; default ``~/.cache/ibau_jax``.
    download: whether step 4 may use the network.
    progress: receives download progress messages.

  Returns:
    The split as :class:`Arrays`.

  Raises:
    ValueError: for an unknown dataset or split, or malformed files.
    FileNotFoundError: if the chosen directory lacks the files, or if nothing
      is available and ``download`` is False.
  """
  _check_name_split(name, split)
  if data_dir is not None:
    return load_npz_dir(data_dir, name, split)
  env_dir = os.environ.get(DATA_DIR_ENV, "")
  if env_dir:
    try:
      return load_npz_dir(env_dir, name, split)
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f"{e} (directory taken from ${DATA_DIR_ENV})") from e
  cache = _resolve_cache_dir(cache_dir)
  tfds_dir = _find_prepared_tfds(name, cache)
  if tfds_dir is not None:
    return load_tfds(name, split, data_dir=tfds_dir)
  folder = cache / name
  if not _download_complete(folder, name):
    if not download:
      raise FileNotFoundError(
          f"no {name} data found: pass --data-dir (data_dir=) or set "
          f"${DATA_DIR_ENV} to a directory holding "
          f"{_expected_files_text(pathlib.Path('<dir>') / name, name, split)}"
          f", or allow downloading into {folder}")
    _download(name, cache=cache, progress=progress, force=False,
              keep_archives=False)
  arrays = load_npz_dir(cache, name, split)
  return dataclasses.replace(arrays,
                             source=f"download:{os.path.abspath(folder)}")
