"""The experiment pipeline: end-to-end smoke run, kill-and-resume, error cases."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from experiments import cifar10
from experiments import gtsrb
from experiments import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A very small smoke configuration: seconds per cell on 2 CPU cores.
TINY = ["--preset", "smoke", "--no-progress", "--set", "train_size=200",
        "--set", "clean_size=100", "--set", "eval_size=100", "--set", "model_widths=[4,8,8]",
        "--set", "train.epochs=1", "--set", "train.batch_size=50",
        "--set", "ibau.batch_size=50"]


def _strip_times(cell: dict) -> dict:
  out = {k: v for k, v in cell.items() if not k.endswith("seconds")}
  out["rounds"] = [{k: v for k, v in r.items() if k != "seconds"} for r in cell["rounds"]]
  return out


def test_smoke_run_end_to_end(tmp_path, capsys):
  workdir = tmp_path / "w"
  assert cifar10.main(TINY + ["--attack", "badnets", "--workdir", str(workdir)]) == 0
  out = capsys.readouterr().out
  assert "| badnets | ibau | 0 |" in out
  results = json.loads((workdir / "results.json").read_text())
  assert results["config"]["dataset"] == "cifar10" and results["versions"]["jax"]
  (cell,) = results["cells"]
  assert cell["attack"] == "badnets" and cell["defense"] == "ibau" and len(cell["rounds"]) == 1
  for k in ("acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after"):
    assert 0.0 <= cell[k] <= 1.0
  _, labels = pipeline.synthetic_data(10, 200 + 100 + 100)
  assert cell["poisoned"] == round(0.1 * int((labels[:200] != 1).sum()))  # target 1 excluded
  rows = list(csv.DictReader((workdir / "results.csv").open()))
  assert len(rows) == 1 and rows[0]["attack"] == "badnets"
  assert (workdir / "results.md").read_text().startswith("| attack |")
  for suffix in ("rounds", "gallery"):
    png = workdir / "plots" / f"badnets__ibau__seed0_{suffix}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((workdir / "config.json").read_text()) == results["config"]
  # Rerunning does no work: the cell is read back.
  start = time.perf_counter()
  assert cifar10.main(TINY + ["--attack", "badnets", "--workdir", str(workdir)]) == 0
  assert "done earlier" in capsys.readouterr().out
  assert time.perf_counter() - start < 20


_SWEEP = TINY + ["--attack", "badnets,blend", "--seeds", "0,1"]


def _sweep(workdir: pathlib.Path) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "experiments.gtsrb", *_SWEEP, "--workdir",
                           str(workdir)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, start_new_session=True)


def test_killed_sweep_resumes_to_the_uninterrupted_result(tmp_path):
  full, killed = tmp_path / "full", tmp_path / "killed"
  reference = _sweep(full)
  victim = _sweep(killed)
  # Kill -9 the second sweep once it has finished its first cell (it is then training the
  # next model or writing reports).
  deadline = time.time() + 240
  while not list(killed.glob("cells/*.json")):
    assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
    assert time.time() < deadline
    time.sleep(0.2)
  time.sleep(1.0)
  os.killpg(victim.pid, signal.SIGKILL)
  victim.wait()
  finished = len(list((killed / "cells").glob("*.json")))
  assert 1 <= finished < 4
  assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]
  resumed = _sweep(killed)
  assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
  a = json.loads((full / "results.json").read_text())
  b = json.loads((killed / "results.json").read_text())
  assert len(a["cells"]) == len(b["cells"]) == 4
  assert [_strip_times(c) for c in a["cells"]] == [_strip_times(c) for c in b["cells"]]
  assert not list(killed.rglob(".*.tmp*")) and not list(killed.rglob(".*json.*"))


@pytest.mark.parametrize("args,message", [
    (["--attack", "nope"], "unknown attack"),
    (["--defense", "magic"], "unknown defense"),
    (["--set", "train.nonsense=1"], "unknown TrainConfig fields"),
    (["--set", "ibau.nonsense=1"], "unknown ibau fields"),
    (["--set", "colour=red"], "unknown field 'colour'"),
    (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
])
def test_bad_names_are_clear_command_line_errors(args, message, capsys, tmp_path):
  with pytest.raises(SystemExit) as e:
    cifar10.main(TINY + args + ["--workdir", str(tmp_path)])
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_unknown_preset_is_refused(capsys):
  with pytest.raises(SystemExit):
    cifar10.main(["--preset", "huge"])
  assert "invalid choice: 'huge'" in capsys.readouterr().err
  with pytest.raises(ValueError, match="unknown preset"):
    pipeline.preset("huge", "cifar10")


def test_missing_data_dir_and_changed_config_are_refused(tmp_path, capsys):
  code = gtsrb.main(["--preset", "cpu", "--no-progress", "--data-dir", str(tmp_path / "none"),
                     "--workdir", str(tmp_path / "w")])
  assert code == 2 and "does not exist" in capsys.readouterr().err
  workdir = tmp_path / "w2"
  config = pipeline.config_from_args("cifar10", _args(TINY + ["--attack", "badnets"]))
  pipeline._check_workdir(config, workdir.mkdir() or workdir)
  code = cifar10.main(TINY + ["--attack", "badnets", "--set", "poison_ratio=0.2",
                              "--workdir", str(workdir)])
  err = capsys.readouterr().err
  assert code == 2 and "different configuration" in err and "poison_ratio" in err


def _args(argv):
  import argparse
  ns = argparse.Namespace(attack=None, defense=None, seeds=None, preset="smoke", set=[])
  it = iter(argv)
  for a in it:
    if a == "--set":
      ns.set.append(next(it))
    elif a in ("--attack", "--defense", "--seeds", "--preset"):
      setattr(ns, a[2:], next(it))
  return ns


def test_config_round_trips_and_every_field_is_overridable():
  config = pipeline.config_from_args("gtsrb", _args(TINY + ["--attack", "all", "--defense",
                                                             "all", "--seeds", "3,4"]))
  assert config.attacks == tuple(pipeline.attack_names())
  assert config.defenses == pipeline.DEFENSES and config.seeds == (3, 4)
  assert config.train["epochs"] == 1 and config.ibau["batch_size"] == 50
  assert pipeline.ExperimentConfig.from_dict(config.to_dict()) == config
  with pytest.raises(ValueError, match="target must be in"):
    config.__class__(**{**config.to_dict(), "target": 43, "attacks": ("badnets",),
                        "defenses": ("ibau",), "seeds": (0,)})


def test_cifar10_entry_refuses_other_datasets(tmp_path):
  with pytest.raises(ValueError, match="runs dataset 'cifar10'"):
    cifar10.run(pipeline.preset("smoke", "gtsrb"), tmp_path)
