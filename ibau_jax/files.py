"""Crash-safe file writes, and a lock that keeps a folder to one process at a time."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import socket
import sys
import tempfile
from typing import Callable, Iterator, Optional

try:
  import fcntl
except ImportError:  # not POSIX: folders are not locked
  fcntl = None

#: The lock file :func:`locked` creates in the folder it locks.
LOCK_NAME = ".lock"


class FolderBusy(ValueError):
  """Another process holds the folder's lock (see :func:`locked`)."""


def file_mode() -> int:
  """The permissions of a new file under the current umask (``0o666 & ~umask``, so 0o644
  under the usual 022): what ``open(path, "w")`` would give, where ``tempfile.mkstemp``
  gives 0o600."""
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes ``data`` to ``path`` so that readers (and a later run after a crash or
  ``kill -9``) see either the old file or the complete new one, never a part: the data goes
  to a temporary file in the same folder (``.<name>.<random>.tmp``), is flushed to disk, and
  replaces ``path`` with one ``os.replace``.  Creates the parent folder if needed; the file
  gets the permissions a plain write would (:func:`file_mode`)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  raw = data.encode() if isinstance(data, str) else data
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, file_mode())  # readable by others as a plain write would be
    with os.fdopen(fd, "wb") as f:
      f.write(raw)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


#: The usual name of a :class:`RoundRecords` file inside a run's checkpoint folder.
ROUNDS_FILE = "rounds.json"


class RoundRecords:
  """Per-round records (JSON dicts) kept in a file next to a resumable run's checkpoint.

  A run appends a record after each round (:meth:`append` rewrites the file with
  :func:`atomic_write`); when it is killed and resumed, the rounds its checkpoint replays
  get back what was recorded for them (:meth:`restored`), e.g. metrics measured on
  variables the checkpoint did not keep.  ``path`` None: nothing is saved or restored.
  """

  def __init__(self, path: Optional[str | os.PathLike], key: str):
    self.path = None if path is None else pathlib.Path(path)
    self.records: list[dict] = []
    self._saved = ({r[key]: r for r in json.loads(self.path.read_text())}
                   if self.path is not None and self.path.is_file() else {})

  def restored(self, step, fields) -> dict:
    """The ``fields`` saved for ``step`` by the interrupted run (those it had)."""
    saved = self._saved.get(step, {})
    return {k: saved[k] for k in fields if k in saved}

  def append(self, record: dict) -> None:
    self.records.append(record)
    if self.path is not None:
      atomic_write(self.path, json.dumps(self.records))

  def remove(self) -> None:
    """Deletes the file (the run finished)."""
    if self.path is not None:
      self.path.unlink(missing_ok=True)


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


@contextlib.contextmanager
def locked(folder: str | os.PathLike, *, wait: bool = False,
           on_wait: Optional[Callable[[str], None]] = None,
           hint: str = "wait for it to finish, or use another folder") -> Iterator[None]:
  """Holds an exclusive lock on ``folder`` (created if needed) for the ``with`` block.

  The lock is ``fcntl.flock`` on ``folder/.lock``, so the operating system releases it when
  the holder exits, also on a crash or ``kill -9``: there is no stale lock to clear by hand.
  The holder writes its process id, host, start time and command line into the file.

  Args:
    folder: the folder to lock.
    wait: False: raise :class:`FolderBusy` at once if another process holds the lock.
      True: block until it is released.
    on_wait: called once with the holder's description before blocking (``wait=True``).
    hint: what to do instead, the end of :class:`FolderBusy`'s message.

  Raises:
    FolderBusy: (``wait=False``) the folder is locked by another process, or by another
      ``locked`` block of this process (locks are per open file, not per process).

  Where ``fcntl`` is missing (not POSIX) the block runs without a lock.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  if fcntl is None:
    yield
    return
  path = folder / LOCK_NAME
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(path)
      if not wait:
        raise FolderBusy(f"{folder} is in use by another process ({holder}); {hint}") from None
      if on_wait is not None:
        on_wait(holder)
      fcntl.flock(fd, fcntl.LOCK_EX)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    note = (f"pid {os.getpid()} on {socket.gethostname()} since {started}: "
            f"{' '.join(sys.argv)}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, note.encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def _holder(path: pathlib.Path) -> str:
  try:
    text = path.read_text().strip()
  except OSError:
    text = ""
  return text or "holder unknown"
