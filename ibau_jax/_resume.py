"""Checkpoints that let a long defense resume after an interruption (private).

A checkpoint is one ``.npz`` file, written atomically (:func:`ibau_jax.files.atomic_write`),
holding a pytree of arrays (the loop state), the step it was saved after, the seconds spent
so far, an optional JSON text (e.g. the history up to that step) and a fingerprint: a digest
of everything the result depends on (the settings that change it, the model's variables,
the data and the key).  :func:`load` returns the state only when the fingerprint and the
state's shapes and dtypes match, so a folder reused for another problem starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ibau_jax import files

PyTree = Any


def settings(config) -> dict:
  """The fields of a config dataclass that change what it computes (those not declared
  ``compare=False``: callbacks, progress hooks, checkpoint folders, chunk sizes)."""
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.compare}


def fingerprint(config, *extra: Any, arrays: PyTree = ()) -> str:
  """A SHA-256 digest of ``config``'s :func:`settings`, the ``repr`` of ``extra`` and the
  bytes, shapes and dtypes of every leaf of ``arrays`` (PRNG keys by their key data)."""
  h = hashlib.sha256()
  h.update(repr((type(config).__name__, sorted(settings(config).items()), extra)).encode())
  for leaf in jax.tree_util.tree_leaves(arrays):
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.asarray(leaf)
    h.update(repr((a.dtype.str, a.shape)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def path(folder: Optional[str | os.PathLike], name: str) -> Optional[pathlib.Path]:
  return None if folder is None else pathlib.Path(folder) / name


def load(file: Optional[pathlib.Path], digest: str, template: PyTree):
  """``(step, seconds, state, text)`` from ``file`` if it was saved with fingerprint
  ``digest`` and a state shaped like ``template`` (a pytree of arrays or
  ``jax.ShapeDtypeStruct``); else None (also for a missing or damaged file)."""
  if file is None or not file.is_file():
    return None
  try:
    with np.load(file, allow_pickle=False) as f:
      if str(f["fingerprint"]) != digest:
        return None
      leaves, treedef = jax.tree_util.tree_flatten(template)
      loaded = [jnp.asarray(f[f"leaf_{i}"]) for i in range(len(leaves))]
      if any(a.shape != tuple(b.shape) or a.dtype != b.dtype for a, b in zip(loaded, leaves)):
        return None
      return (int(f["step"]), float(f["seconds"]), jax.tree_util.tree_unflatten(treedef, loaded),
              str(f["text"]))
  except (OSError, KeyError, ValueError, EOFError):
    return None


def save(file: Optional[pathlib.Path], digest: str, step: int, seconds: float,
         state: PyTree, text: str = "") -> None:
  """Writes the checkpoint atomically (nothing when ``file`` is None)."""
  if file is None:
    return
  buffer = io.BytesIO()
  leaves = jax.tree_util.tree_leaves(state)
  np.savez(buffer, fingerprint=np.asarray(digest), step=np.asarray(step),
           seconds=np.asarray(seconds), text=np.asarray(text),
           **{f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
  files.atomic_write(file, buffer.getvalue())


def remove(file: Optional[pathlib.Path]) -> None:
  if file is not None:
    file.unlink(missing_ok=True)


def to_json(obj: Any) -> str:
  """JSON of nested dicts/lists with NumPy arrays and scalars (arrays become lists)."""
  def plain(v):
    if isinstance(v, dict):
      return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    if isinstance(v, (np.ndarray, np.generic, jax.Array)):
      return np.asarray(v).tolist()
    return v
  return json.dumps(plain(obj))


def check_folder(cls_name: str, value) -> None:
  """Checks a config's ``checkpoint_dir``: None, or a non-empty path that is a folder or can
  be made one (neither it nor any folder above it is an existing file).

  Args:
    cls_name: the config's class name, for the message.
    value: the ``checkpoint_dir`` field.

  Raises:
    ValueError: if ``value`` is neither None nor a path, is empty, or names (or lies under)
      an existing file.
  """
  if value is None:
    return
  if not isinstance(value, (str, os.PathLike)):
    raise ValueError(f"{cls_name}.checkpoint_dir must be a path or None, got {value!r}")
  if not os.fspath(value):
    raise ValueError(f"{cls_name}.checkpoint_dir must be None or a non-empty path to a "
                     f"folder, got {value!r} (an empty path would put the checkpoint in the "
                     "working directory)")
  folder = pathlib.Path(value)
  for candidate in (folder, *folder.parents):
    try:
      if not candidate.exists():
        continue
      is_dir = candidate.is_dir()
    except OSError:  # unreadable: leave it to the first write to report
      return
    if not is_dir:
      raise ValueError(f"{cls_name}.checkpoint_dir must be a folder (or a path where one can "
                       f"be made), got {value!r}: {str(candidate)!r} is an existing file")
    return
