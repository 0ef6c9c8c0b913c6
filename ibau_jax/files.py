"""Crash-safe file writes."""

from __future__ import annotations

import os
import pathlib
import tempfile


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes ``data`` to ``path`` so that readers (and a later run after a crash or
  ``kill -9``) see either the old file or the complete new one, never a part: the data goes
  to a temporary file in the same folder (``.<name>.<random>.tmp``), is flushed to disk, and
  replaces ``path`` with one ``os.replace``.  Creates the parent folder if needed."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  raw = data.encode() if isinstance(data, str) else data
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(raw)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def remove_temporaries(folder: str | os.PathLike, recursive: bool = False) -> int:
  """Deletes the temporary files that :func:`atomic_write` leaves behind when its process is
  killed between writing and renaming (``.<name>.<random>.tmp``; nothing else is touched).
  Safe only when no other process is writing in ``folder``.  Returns how many went."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return 0
  found = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
  count = 0
  for path in found:
    if path.is_file():
      path.unlink(missing_ok=True)
      count += 1
  return count
