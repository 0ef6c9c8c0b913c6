"""`ibau_jax.files`: atomic writes' temporaries and the folder lock."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from ibau_jax import files


def test_a_locked_folder_refuses_a_second_holder_and_names_the_first(tmp_path):
  with files.locked(tmp_path / "w"):
    with pytest.raises(files.FolderBusy, match=f"in use by another process \\(pid "
                                               f"{os.getpid()} on .*; use another"):
      with files.locked(tmp_path / "w", hint="use another"):
        pass
    with files.locked(tmp_path / "other"):  # another folder is free
      pass
  with files.locked(tmp_path / "w"):  # released at the end of the block
    pass
  assert isinstance(files.FolderBusy("x"), ValueError)  # the CLIs report ValueErrors


def test_a_lock_is_released_when_its_block_raises(tmp_path):
  with pytest.raises(RuntimeError):
    with files.locked(tmp_path):
      raise RuntimeError("boom")
  with files.locked(tmp_path):
    pass


def test_waiting_blocks_until_the_holder_releases(tmp_path):
  events = []
  held = threading.Event()
  release = threading.Event()

  def holder():
    with files.locked(tmp_path):
      held.set()
      release.wait(30)
      events.append("released")

  t = threading.Thread(target=holder)
  t.start()
  assert held.wait(30)
  waiting = []
  def release_soon():
    time.sleep(0.3)
    release.set()
  threading.Thread(target=release_soon).start()
  with files.locked(tmp_path, wait=True, on_wait=waiting.append):
    events.append("acquired")
  t.join(30)
  assert events == ["released", "acquired"]
  assert len(waiting) == 1 and f"pid {os.getpid()}" in waiting[0]


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import sys, time
      from ibau_jax import files
      with files.locked({str(tmp_path)!r}):
        print("held", flush=True)
        time.sleep(120)
      """)], stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(files.FolderBusy, match=f"pid {child.pid} "):
      with files.locked(tmp_path):
        pass
  finally:
    child.kill()
    child.wait(30)
  with files.locked(tmp_path):  # the kill released it
    pass


def test_remove_temporaries_touches_only_atomic_write_leftovers(tmp_path):
  files.atomic_write(tmp_path / "a.json", "{}")
  (tmp_path / ".a.json.xyz.tmp").write_text("partial")
  (tmp_path / "keep.tmp").write_text("not ours")
  assert files.remove_temporaries(tmp_path) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "keep.tmp"]


def test_round_records_give_a_resumed_run_what_the_killed_one_recorded(tmp_path):
  path = tmp_path / "sub" / "rounds.json"
  first = files.RoundRecords(path, "round")
  assert first.restored(0, ("acc",)) == {}
  first.append({"round": 0, "acc": 0.5, "asr": 0.1})
  first.append({"round": 1, "loss": 2.0})          # killed before round 1 was evaluated
  resumed = files.RoundRecords(path, "round")
  assert resumed.restored(0, ("acc", "asr", "ra")) == {"acc": 0.5, "asr": 0.1}
  assert resumed.restored(1, ("acc",)) == {} and resumed.restored(7, ("acc",)) == {}
  assert resumed.records == []                      # the new run builds its own list
  resumed.append({"round": 0, "acc": 0.5})
  assert files.RoundRecords(path, "round").restored(0, ("asr",)) == {}  # rewritten, not merged
  resumed.remove()
  assert not path.exists()
  resumed.remove()                                  # twice is fine
  nowhere = files.RoundRecords(None, "round")       # no path: nothing saved
  nowhere.append({"round": 0})
  assert nowhere.records == [{"round": 0}] and nowhere.restored(0, ("round",)) == {}
  nowhere.remove()


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
  old = os.umask(0o022)
  try:
    files.atomic_write(tmp_path / "a.json", "{}")
    with open(tmp_path / "plain.json", "w") as f:
      f.write("{}")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == \
        stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
    os.umask(0o077)
    files.atomic_write(tmp_path / "b.json", "{}")
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
  finally:
    os.umask(old)
