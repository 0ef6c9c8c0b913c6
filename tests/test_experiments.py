"""The experiment pipeline: end-to-end smoke run, kill-and-resume, error cases."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import attack_table
from experiments import compare_defenses
from experiments import cifar10
from experiments import gtsrb
from experiments import pipeline
from ibau_jax import files

from _interrupt import Interrupted

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A very small smoke configuration: seconds per cell on 2 CPU cores.
TINY = ["--preset", "smoke", "--no-progress", "--set", "train_size=200",
        "--set", "clean_size=100", "--set", "eval_size=100", "--set", "model_widths=[4]",
        "--set", "train.epochs=1", "--set", "train.batch_size=50",
        "--set", "ibau.batch_size=50"]


def _strip_times(cell: dict) -> dict:
  """``cell`` without its wall times (a round resumed from a checkpoint also carries the
  ``seconds_before`` of the interrupted run)."""
  out = {k: v for k, v in cell.items() if not k.endswith("seconds")}
  out["rounds"] = [{k: v for k, v in r.items() if k not in ("seconds", "seconds_before")}
                   for r in cell["rounds"]]
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
  # What I-BAU reports beyond its rounds (the stamp check, the repairs), without wall times.
  details = cell["details"]
  assert details["selected_round"] == 0
  assert set(details["stamp"]) == {"target", "share", "active"}
  assert {"target", "corner", "size", "input_share", "active", "shares",
          "losses"} == set(details["repair"])
  assert details["repair"]["active"] == (details["repair"]["input_share"] >= 0.5)
  assert {"target", "input_share", "active", "shares", "losses", "phi"} == set(details["warp"])
  assert details["warp"]["active"] == (details["warp"]["input_share"] >= 0.5)
  # The configs the cell ran with, recorded by the cell itself.
  config = pipeline.ExperimentConfig.from_dict(results["config"])
  assert cell["defense_config"] == json.loads(json.dumps(
      pipeline.config_fields(config.defense_config("ibau"))))
  assert cell["defense_config"]["batch_size"] == 50 and cell["defense_config"]["rounds"] == 1
  assert cell["attack_config"] == json.loads(json.dumps(
      pipeline.config_fields(pipeline.make_attack("badnets", config))))
  for k in ("acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after"):
    assert 0.0 <= cell[k] <= 1.0
  _, labels = pipeline.synthetic_data(10, 200, stream=0)  # the training split's
  assert cell["poisoned"] == round(0.1 * int((labels != 1).sum()))  # target 1 excluded
  rows = list(csv.DictReader((workdir / "results.csv").open()))
  assert len(rows) == 1 and rows[0]["attack"] == "badnets"
  assert "\n| attack | defense | seed |" in (workdir / "results.md").read_text()
  assert not (workdir / "partial").exists()  # the cell's checkpoint folder and its parent
  for suffix in ("rounds", "gallery"):
    png = workdir / "plots" / f"badnets__ibau__seed0_{suffix}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((workdir / "config.json").read_text()) == results["config"]
  # Rerunning does no work: the cell is read back.
  start = time.perf_counter()
  assert cifar10.main(TINY + ["--attack", "badnets", "--workdir", str(workdir)]) == 0
  assert "done earlier" in capsys.readouterr().out
  assert time.perf_counter() - start < 20


_SWEEP = TINY + ["--attack", "badnets", "--seeds", "0,1"]


def _sweep(workdir: pathlib.Path) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "experiments.gtsrb", *_SWEEP, "--workdir",
                           str(workdir)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, start_new_session=True)


def test_killed_sweep_resumes_to_the_uninterrupted_result(tmp_path):
  full, killed = tmp_path / "full", tmp_path / "killed"
  victim = _sweep(killed)
  # Kill -9 the sweep once it has finished its first cell (it is then training the next
  # model or writing reports). The uninterrupted reference runs afterwards, next to the
  # resumed sweep: both then find every program in the test session's compilation cache.
  deadline = time.time() + 240
  while not list(killed.glob("cells/*.json")):
    assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
    assert time.time() < deadline
    time.sleep(0.2)
  time.sleep(1.0)
  os.killpg(victim.pid, signal.SIGKILL)
  victim.wait()
  finished = len(list((killed / "cells").glob("*.json")))
  assert finished == 1
  reference = _sweep(full)
  resumed = _sweep(killed)
  assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]
  assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
  a = json.loads((full / "results.json").read_text())
  b = json.loads((killed / "results.json").read_text())
  assert len(a["cells"]) == len(b["cells"]) == 2
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


@pytest.mark.parametrize("args,message", [
    (["--set", "clean_size=10"], "clean_size=10 is smaller than one batch of ibau (50)"),
    (["--defense", "ft,dp", "--set", "clean_size=100"], "one batch of ft (128)"),
])
def test_a_clean_set_smaller_than_a_batch_is_refused_before_training(args, message, capsys,
                                                                      tmp_path):
  assert cifar10.main(TINY + args + ["--workdir", str(tmp_path / "w"), "--model-dir",
                                     str(tmp_path / "m")]) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "m").exists()  # no model was trained


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
  pipeline.check_workdir(config, workdir.mkdir() or workdir)
  code = cifar10.main(TINY + ["--attack", "badnets", "--set", "poison_ratio=0.2",
                              "--workdir", str(workdir)])
  err = capsys.readouterr().err
  assert code == 2 and "different configuration" in err and "poison_ratio" in err



def test_a_second_sweep_in_a_busy_work_directory_is_refused_and_deletes_nothing(
    tmp_path, capsys):
  # Two sweeps in one work directory: the second would delete the first's in-flight
  # temporaries (a config, a cell, a checkpoint being written) and redo its cells.
  workdir = tmp_path / "w"
  in_flight = [workdir / ".config.json.abc.tmp", workdir / "cells" / ".x.json.abc.tmp",
               workdir / "partial" / "cell" / ".state.abc.tmp"]
  for path in in_flight:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("being written")
  with files.locked(workdir):  # "the first sweep"
    assert cifar10.main(TINY + ["--attack", "badnets", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert f"{workdir} is in use by another process (pid {os.getpid()}" in err
    assert "--merge" in err
  assert all(p.read_text() == "being written" for p in in_flight)
  assert not (workdir / "config.json").exists()
  # A comparison's work directory too (its clean-set folders are sweeps of their own).
  top = tmp_path / "c"
  with files.locked(top / "clean100"):
    assert compare_defenses.main(
        ["--preset", "smoke", "--attacks", "badnets", "--defenses", "ft", "--clean-sizes",
         "100", "--workdir", str(top), "--model-dir", str(tmp_path / "m"),
         "--no-progress"]) == 2
  assert "is in use by another process" in capsys.readouterr().err
  with files.locked(top):
    assert compare_defenses.main(["--preset", "smoke", "--attacks", "badnets",
                                  "--workdir", str(top)]) == 2
  assert "is in use by another process" in capsys.readouterr().err


def test_a_work_directory_takes_more_attacks_defenses_and_seeds(tmp_path):
  # Cells are per (attack, defense, seed): widening the sweep resumes it, and the
  # recorded config follows; any other field still refuses.
  narrow = pipeline.config_from_args("cifar10", _args(TINY + ["--attack", "badnets"]))
  wide = pipeline.config_from_args("cifar10", _args(
      TINY + ["--attack", "badnets,blend", "--defense", "ibau,ft", "--seeds", "0,1"]))
  pipeline.check_workdir(narrow, tmp_path)
  pipeline.check_workdir(wide, tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["attacks"] == ["badnets", "blend"] and saved["seeds"] == [0, 1]
  pipeline.check_workdir(narrow, tmp_path)
  changed = pipeline.ExperimentConfig.from_dict({**wide.to_dict(), "target": 3})
  with pytest.raises(ValueError, match=r"\['target'\]"):
    pipeline.check_workdir(changed, tmp_path)

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
  assert config.defenses == tuple(pipeline.defense_names()) and config.seeds == (3, 4)
  assert config.train["epochs"] == 1 and config.ibau["batch_size"] == 50
  assert pipeline.ExperimentConfig.from_dict(config.to_dict()) == config
  with pytest.raises(ValueError, match="target must be in"):
    config.__class__(**{**config.to_dict(), "target": 43, "attacks": ("badnets",),
                        "defenses": ("ibau",), "seeds": (0,)})


def test_cifar10_entry_refuses_other_datasets(tmp_path):
  with pytest.raises(ValueError, match="runs dataset 'cifar10'"):
    cifar10.run(pipeline.preset("smoke", "gtsrb"), tmp_path)


def test_attack_table_checks_and_shared_model_cache(tmp_path, capsys):
  models = tmp_path / "models"
  args = ["--preset", "smoke", "--attacks", "clean,badnets", "--no-progress", "--model-dir",
          str(models)] + TINY[3:]
  assert attack_table.main(args + ["--workdir", str(tmp_path / "t")]) == 0
  out = capsys.readouterr().out
  assert "| clean | - | 0 |" in out and "| badnets | - | 0 |" in out
  saved = json.loads((tmp_path / "t" / "attack_table.json").read_text())
  assert [r["attack"] for r in saved["rows"]] == ["clean", "badnets"]
  assert len(list(models.iterdir())) == 2
  # A defense sweep pointed at the same model cache trains nothing.
  assert cifar10.main(TINY + ["--attack", "badnets", "--defense", "none", "--workdir",
                              str(tmp_path / "d"), "--model-dir", str(models)]) == 0
  assert "model: reused" in capsys.readouterr().out
  # The checks: ASR floor (80 % for all-to-all) and ACC within 3 points of the clean model.
  cell = lambda attack, acc, asr: dict(attack=attack, seed=0, acc_before=acc, asr_before=asr,
                                       ra_before=0.0, poisoned=1, train_seconds=60.0)
  rows, markdown = attack_table.table([cell("clean", 0.80, 0.01), cell("badnets", 0.775, 0.95),
                                       cell("blend", 0.765, 0.99), cell("sig", 0.80, 0.89),
                                       cell("badnets_all_to_all", 0.79, 0.85)])
  checks = {r["attack"]: (r.get("asr_ok"), r.get("acc_ok")) for r in rows}
  assert checks == {"clean": (None, None), "badnets": (True, True), "blend": (True, False),
                    "sig": (False, True), "badnets_all_to_all": (True, True)}
  assert "| blend | - | 0 | 1 | 76.50 | 99.00 |" in markdown


def test_attack_table_runs_rows_with_their_settings_in_their_own_work_directories(
    tmp_path, capsys, monkeypatch):
  models, workdir = tmp_path / "models", tmp_path / "t"
  args = ["--preset", "smoke", "--attacks", "clean,wanet,badnets_all_to_all", "--no-progress",
          "--model-dir", str(models), "--workdir", str(workdir)] + TINY[3:]
  loads = []
  load_splits = pipeline.load_splits
  monkeypatch.setattr(pipeline, "load_splits", lambda *a: loads.append(1) or load_splits(*a))
  assert attack_table.main(args) == 0
  assert len(loads) == 1  # three sweeps (plain, wanet, all-to-all), the data loaded once
  out = capsys.readouterr().out
  assert "| wanet | `augment_triggered=false` | 0 |" in out
  assert "| badnets_all_to_all | `augment_triggered=false`, `poison_ratio=0.2` | 0 |" in out
  saved = json.loads((workdir / "attack_table.json").read_text())
  assert [r["attack"] for r in saved["rows"]] == ["clean", "wanet", "badnets_all_to_all"]
  assert saved["config"]["attacks"] == ["clean"] and saved["config"]["poison_ratio"] == 0.1
  a2a = saved["row_configs"]["badnets_all_to_all"]
  assert (a2a["poison_ratio"], a2a["augment_triggered"]) == (0.2, False)
  assert saved["row_configs"]["wanet"]["augment_triggered"] is False
  for name, config in saved["row_configs"].items():
    assert json.loads((workdir / "rows" / name / "config.json").read_text()) == config
  # All-to-all poisons 20 % of the 200 images; the clean model is trained once for all rows.
  assert saved["rows"][2]["poisoned"] == 40 and len(list(models.iterdir())) == 3
  # --set applies to every row, after the row's own settings; --plain drops those.
  args2 = args[:3] + ["clean,badnets_all_to_all"] + args[4:]
  assert attack_table.main(args2[:-2] + ["--workdir", str(tmp_path / "p"), "--plain",
                                         "--set", "poison_ratio=0.15"] + args2[-2:]) == 0
  saved = json.loads((tmp_path / "p" / "attack_table.json").read_text())
  assert saved["row_configs"] == {} and saved["config"]["poison_ratio"] == 0.15
  assert not (tmp_path / "p" / "rows").exists() and saved["rows"][1]["poisoned"] == 30
  assert attack_table.main(args2[:-2] + ["--workdir", str(tmp_path / "q"),
                                         "--set", "poison_ratio=0.15"] + args2[-2:]) == 0
  saved = json.loads((tmp_path / "q" / "attack_table.json").read_text())
  assert saved["row_configs"]["badnets_all_to_all"]["poison_ratio"] == 0.15
  # ... and the table says so: the row keeps only the settings --set did not override.
  assert saved["rows"][1]["settings"] == ["augment_triggered=false"]
  markdown = (tmp_path / "q" / "attack_table.md").read_text()
  first = markdown.splitlines()[0]
  assert first.startswith("Every row: `train_size=200`") and "`poison_ratio=0.15`" in first
  assert "| badnets_all_to_all | `augment_triggered=false` | 0 | 30 |" in markdown
  # A bad --set stops before anything runs, and so does an empty --attacks.
  with pytest.raises(SystemExit):
    attack_table.main(args + ["--set", "wanet.nonsense=1"])
  with pytest.raises(SystemExit):
    attack_table.main(args + ["--attacks", ","])
  # A row named twice is one row (every model is cached by now).
  assert attack_table.main(args + ["--attacks", "wanet,clean,wanet"]) == 0
  saved = json.loads((workdir / "attack_table.json").read_text())
  assert [r["attack"] for r in saved["rows"]] == ["wanet", "clean"]


def test_augment_triggered_false_keeps_triggered_images_unaugmented(tmp_path, monkeypatch):
  from ibau_jax import train as train_lib
  seen = []

  def fake_fit(model, images, labels, config, **kw):
    seen.append((images, kw.get("augment_mask")))
    return model.init(kw["key"], images[:1], train=False), []

  monkeypatch.setattr(train_lib, "fit", fake_fit)
  base = pipeline.config_from_args("cifar10", _args(TINY))
  off = pipeline.ExperimentConfig.from_dict({**base.to_dict(), "augment_triggered": False})
  splits = pipeline.load_splits(base, None)
  for config in (base, off):
    for attack in ("wanet", "clean"):
      pipeline.train_poisoned(config, attack, 0, splits, tmp_path, lambda s: None, False)
  # The second clean model is the first one, reused from the cache: three trainings.
  (x_on, mask_on), (_, clean_on), (x_off, mask_off) = seen
  assert mask_on is None and clean_on is None
  np.testing.assert_array_equal(x_on, x_off)
  untouched = np.all(x_off == splits.train_x, axis=(1, 2, 3))
  relabelled = pipeline.poisoned_training_set(off, "wanet", 0, splits)[1] != splits.train_y
  # Exactly the triggered images (10 %, all relabelled to the target) are left as they are;
  # the noise-mode images (twice as many, changed but not relabelled) are augmented.
  n = len(splits.train_y)
  np.testing.assert_array_equal(~mask_off, relabelled)
  assert (~mask_off).sum() == pytest.approx(0.1 * n, abs=0.02 * n)
  noise_mode = ~untouched & mask_off
  assert noise_mode.sum() == pytest.approx(0.2 * n, abs=0.02 * n)
  # The poisoned model's cache key changes; the clean model's does not.
  assert len([f for f in tmp_path.iterdir() if f.name.startswith("wanet")]) == 2
  assert len([f for f in tmp_path.iterdir() if f.name.startswith("clean")]) == 1
  with pytest.raises(ValueError, match="augment_triggered"):
    pipeline.ExperimentConfig.from_dict({**base.to_dict(), "augment_triggered": "no"})


def _record_training(monkeypatch) -> list:
  """Replaces ``train.fit`` by an initialisation; returns the list of the images it got."""
  from ibau_jax import train as train_lib
  seen = []

  def fake_fit(model, images, labels, config, **kw):
    seen.append(images)
    return model.init(kw["key"], images[:1], train=False), []

  monkeypatch.setattr(train_lib, "fit", fake_fit)
  return seen


def test_attack_settings_reach_the_attack_and_the_model_cache_key(tmp_path, monkeypatch):
  seen = _record_training(monkeypatch)
  base = pipeline.config_from_args("cifar10", _args(TINY))
  strong = pipeline.config_from_args("cifar10", _args(TINY + ["--set", "sig.delta=0.2",
                                                             "--set", "badnets.size=3"]))
  assert strong.attack_settings == {"sig": {"delta": 0.2}, "badnets": {"size": 3}}
  assert pipeline.make_attack("sig", strong).delta == 0.2
  assert pipeline.make_attack("sig", base).delta == pytest.approx(20 / 255)
  splits = pipeline.load_splits(base, None)
  for config in (base, strong):
    for attack in ("sig", "clean"):
      pipeline.train_poisoned(config, attack, 0, splits, tmp_path, lambda s: None, False)
  # The signal's amplitude is what the poisoned images got.
  (x_base, _, x_strong) = seen
  changed = np.any(x_base != splits.train_x, axis=(1, 2, 3))
  assert changed.sum() > 0
  col = (x_strong - splits.train_x)[changed][..., 0]
  assert np.abs(col).max() == pytest.approx(0.2, abs=1e-6)
  # A new model for sig; the clean model (evaluated with BadNets' trigger) is reused.
  assert len([f for f in tmp_path.iterdir() if f.name.startswith("sig")]) == 2
  assert len([f for f in tmp_path.iterdir() if f.name.startswith("clean")]) == 1
  # A test-time amplitude changes the evaluation, not the model.
  test_time = pipeline.config_from_args("cifar10", _args(
      TINY + ["--set", "sig.delta=0.2", "--set", "badnets.size=3", "--set", "sig.test_delta=0.3"]))
  pipeline.train_poisoned(test_time, "sig", 0, splits, tmp_path, lambda s: None, False)
  assert len(seen) == 3
  assert pipeline.make_attack("sig", test_time).for_evaluation().delta == 0.3
  # Nor do the target and the poisoning ratio change the clean model.
  other = pipeline.ExperimentConfig.from_dict({**base.to_dict(), "poison_ratio": 0.05,
                                               "target": 3})
  pipeline.train_poisoned(other, "clean", 0, splits, tmp_path, lambda s: None, False)
  assert len(seen) == 3
  for bad, match in ((["--set", "sig.colour=1"], "sig"),
                     (["--set", "sig.delta=2"], "delta"),
                     (["--set", "sig.target=3"], "target field")):
    with pytest.raises(ValueError, match=match):
      pipeline.config_from_args("cifar10", _args(TINY + bad))


def test_wanet_cross_ratio_sets_the_number_of_noise_mode_images():
  counts = []
  for extra in ([], ["--set", "wanet.cross_ratio=1"], ["--set", "wanet.cross_ratio=0"]):
    config = pipeline.config_from_args("cifar10", _args(TINY + extra))
    splits = pipeline.load_splits(config, None)
    x, _, mask = pipeline.poisoned_training_set(config, "wanet", 0, splits)
    changed = np.any(x != splits.train_x, axis=(1, 2, 3))
    counts.append((int(mask.sum()), int((changed & ~mask).sum())))
  (p2, n2), (p1, n1), (p0, n0) = counts
  assert p2 == p1 == p0 > 0  # the backdoor images do not change
  # poison's noise_ratio counts all images: cross_ratio x poison_ratio x N of them.
  n = len(splits.train_y)
  assert n2 == round(2 * config.poison_ratio * n) and n1 == round(config.poison_ratio * n)
  assert n0 == 0


def test_clean_label_poisoning_counts_a_fraction_of_the_training_set():
  config = pipeline.config_from_args("cifar10", _args(TINY + ["--set", "train_size=400"]))
  splits = pipeline.load_splits(config, None)
  y0 = splits.train_y
  n, in_target = len(y0), int(np.sum(y0 == config.target))
  x, y, mask = pipeline.poisoned_training_set(config, "sig", 0, splits)
  assert mask.sum() == min(in_target, round(config.poison_ratio * n)) and mask.sum() > 0
  assert np.all(y0[mask] == config.target) and np.array_equal(y, y0)
  _, y, mask = pipeline.poisoned_training_set(config, "badnets", 0, splits)
  assert mask.sum() == round(config.poison_ratio * (n - in_target))
  assert np.all(y[mask] == config.target)
  # More than the class holds: all of it.
  big = pipeline.ExperimentConfig.from_dict({**config.to_dict(), "poison_ratio": 0.9})
  _, _, mask = pipeline.poisoned_training_set(big, "sig", 0, splits)
  assert mask.sum() == in_target


def test_work_directory_from_before_a_new_config_field_still_resumes(tmp_path):
  config = pipeline.config_from_args("cifar10", _args(TINY))
  old = config.to_dict()
  del old["augment_triggered"]  # a work directory written before the field existed
  (tmp_path / "config.json").write_text(json.dumps(old))
  pipeline.check_workdir(config, tmp_path)  # the default value: the same configuration
  changed = pipeline.ExperimentConfig.from_dict({**config.to_dict(), "augment_triggered": False})
  with pytest.raises(ValueError, match=r"augment_triggered"):
    pipeline.check_workdir(changed, tmp_path)


def test_every_registered_defense_has_settings_from_the_command_line():
  config = pipeline.config_from_args("cifar10", _args(TINY + [
      "--defense", "nc,fp", "--set", "nc.steps=7", "--set", "fp.prune_ratio=0.5"]))
  assert config.defense_settings == {"nc": {"steps": 7}, "fp": {"prune_ratio": 0.5}}
  assert config.defense_config("nc").steps == 7
  assert config.defense_config("fp").prune_ratio == 0.5
  assert pipeline.ExperimentConfig.from_dict(config.to_dict()) == config
  with pytest.raises(ValueError, match="unknown nc fields"):
    pipeline.config_from_args("cifar10", _args(TINY + ["--set", "nc.nope=1"]))
  with pytest.raises(ValueError, match="defense_settings"):
    pipeline.ExperimentConfig.from_dict({**config.to_dict(),
                                         "defense_settings": {"ibau": {"rounds": 2}}})


def test_comparison_table_cells_and_time_ratio():
  def cell(attack, defense, acc, asr, seconds):
    return dict(attack=attack, seed=0, defense=defense, acc_before=0.8, asr_before=0.99,
                acc_after=acc, asr_after=asr, defense_seconds=seconds)
  cells = [cell("badnets", "ibau", 0.79, 0.02, 10.0), cell("badnets", "ft", 0.78, 0.5, 30.0),
           cell("badnets", "nc", 0.77, 0.1, 400.0), cell("badnets", "none", 0.8, 0.99, 0.0),
           cell("wanet", "ibau", 0.75, 0.04, 20.0), cell("wanet", "nc", 0.7, 0.2, 300.0)]
  rows, markdown = compare_defenses.comparison(cells, ["ibau", "ft", "nc", "none"])
  assert [r["attack"] for r in rows] == ["badnets", "wanet"]
  assert rows[0]["ratio"] == 3.0 and rows[0]["fastest_baseline"] == "ft"
  assert rows[1]["ratio"] == 15.0 and rows[1]["fastest_baseline"] == "nc"
  assert "| badnets | 0 | 80.0 / 99.0 | 79.0 / 2.0 / 10 | 78.0 / 50.0 / 30 | 77.0 / 10.0 / 400 |" \
      in markdown
  assert "| wanet | 0 | 80.0 / 99.0 | 75.0 / 4.0 / 20 | - |" in markdown
  assert "Median ratio of the fastest baseline's time to I-BAU's: 9.0 (over 2 rows)" in markdown
  # Against the paper's six baselines only (fine-tuning is not one): NC in both rows.
  assert [(r["paper_ratio"], r["paper_fastest_baseline"]) for r in rows] == [(40.0, "nc"),
                                                                             (15.0, "nc")]
  assert "| 3.0 (ft) | 40.0 (nc) |" in markdown
  assert ("Median ratio of the fastest of the paper's six baselines' time to I-BAU's: 27.5 "
          "(over 2 rows)") in markdown
  # Who wins, by DER = [max(0, ASR drop) - max(0, ACC drop) + 1] / 2 (before: 80 / 99):
  # badnets: ibau (0.97 - 0.01 + 1) / 2 = 0.98, ft 0.73, nc 0.925; wanet: ibau 0.95 - 0.05
  # -> 0.95, nc 0.845.
  assert rows[0]["versus_ibau"] == {"ft": "higher", "nc": "higher"}
  assert rows[1]["versus_ibau"] == {"nc": "higher"}
  assert "against each baseline's, rows counted: `ft` 1 higher; `nc` 2 higher." in markdown
  before = dict(acc=0.8, asr=0.99)
  ibau = dict(acc=0.78, asr=0.05)  # DER (0.94 - 0.02 + 1) / 2 = 0.96
  assert compare_defenses.versus_ibau(before, ibau, dict(acc=0.8, asr=0.06)) == "lower"
  assert compare_defenses.versus_ibau(before, ibau, dict(acc=0.79, asr=0.06)) == "equal"
  assert compare_defenses.versus_ibau(before, ibau, dict(acc=0.85, asr=0.10)) == "higher"
  # wanet ft: (0.98 - 0 + 1) / 2 = 0.99 > ibau's 0.95.
  cells.append(cell("wanet", "ft", 0.81, 0.01, 5.0))
  rows, markdown = compare_defenses.comparison(cells, ["ibau", "ft", "nc", "none"])
  assert rows[1]["versus_ibau"] == {"ft": "lower", "nc": "higher"}
  assert "`ft` 1 higher, 1 lower; `nc` 2 higher." in markdown



def test_comparison_plot_draws_every_defense_of_every_row(tmp_path):
  def cell(attack, defense, acc, asr):
    return dict(attack=attack, seed=0, defense=defense, acc_before=0.8, asr_before=0.99,
                acc_after=acc, asr_after=asr, defense_seconds=5.0)
  cells = [cell("badnets", "ibau", 0.79, 0.02), cell("badnets", "ft", 0.78, 0.5),
           cell("badnets", "none", 0.8, 0.99), cell("wanet", "nc", 0.7, 0.2)]
  rows, _ = compare_defenses.comparison(cells, ["ibau", "ft", "nc", "none"])
  points = compare_defenses.scatter_points(rows)
  assert points == [("badnets (seed 0)", {"before": (80.0, 99.0), "ibau": (79.0, 2.0),
                                          "ft": (78.0, 50.0)}),
                    ("wanet (seed 0)", {"before": (80.0, 99.0), "nc": (70.0, 20.0)})]
  paths = compare_defenses.plot_comparison({"100": rows, "5000": rows[:1], "500": []},
                                           tmp_path / "cmp")
  assert paths == [tmp_path / "cmp_clean100.png", tmp_path / "cmp_clean5000.png"]
  for path in paths:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not (tmp_path / "cmp_clean500.png").exists()


def test_merge_joins_work_directories_and_refuses_a_cell_held_twice(tmp_path, capsys):
  # Attacks with their own settings run in work directories of their own; --merge makes
  # one table of them, with each directory's settings and the medians over all rows.
  def cell(attack, defense, asr, seconds):
    return dict(attack=attack, seed=0, defense=defense, acc_before=0.8, asr_before=0.99,
                acc_after=0.75, asr_after=asr, defense_seconds=seconds)

  def sweep(workdir, size, settings, cells, official=(), defenses="ibau"):
    config = pipeline.config_from_args("cifar10", _args(TINY + [
        "--defense", defenses, "--set", f"clean_size={size}"] +
        sum((["--set", s] for s in settings), [])))
    pipeline.check_workdir(config, workdir / f"clean{size}")
    for folder, batch in ((workdir / f"clean{size}", cells),
                          (workdir / "official" / f"clean{size}", official)):
      for c in batch:
        path = folder / "cells" / f"{c['attack']}__{c['defense']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(c))

  a, b = tmp_path / "a", tmp_path / "b"
  sweep(a, 100, [], [cell("badnets", "ibau", 0.0, 10.0), cell("badnets", "ft", 0.9, 20.0)],
        official=[cell("official badnets_8_02", "ibau", 0.5, 10.0),
                  cell("official badnets_8_02", "ft", 0.9, 50.0)])
  sweep(a, 500, [], [cell("badnets", "ibau", 0.0, 40.0), cell("badnets", "ft", 0.9, 20.0)])
  # b's NC cell came from an earlier command than its config.json (--defense ibau).
  sweep(b, 100, ["poison_ratio=0.05", "nc.steps=7"], [cell("sig", "ibau", 0.1, 10.0),
                                                      cell("sig", "nc", 0.2, 300.0)])
  sweep(b, 300, ["poison_ratio=0.05", "nc.steps=7"], [])  # no cell finished yet: no table
  report, markdown = compare_defenses.merge([a, b])
  assert list(report) == ["500", "100"]
  assert "300 clean images" not in markdown
  assert [r["attack"] for r in report["100"]] == ["badnets", "official badnets_8_02", "sig"]
  assert [r["ratio"] for r in report["100"]] == [2.0, 5.0, 30.0]
  assert [r["attack"] for r in report["500"]] == ["badnets"]
  assert report["500"][0]["ratio"] == 0.5
  assert "| attack | seed | before | ibau | ft | nc |" in markdown
  assert "| sig | 0 | 80.0 / 99.0 | 75.0 / 10.0 / 10 | - | 75.0 / 20.0 / 300 |" in markdown
  assert "Median ratio of the fastest baseline's time to I-BAU's: 5.0 (over 3 rows)" in markdown
  assert f"- `{b}`: Settings: preset `smoke`; poison ratio 0.05; 100 clean images;" in markdown
  assert markdown.count(f"- `{a}`: Settings:") == 2
  # The settings of every defense with a cell in the directory.
  assert "100 clean images; `ibau` batch_size=50, rounds=1; `nc` steps=7." in markdown
  # The command line writes the markdown and the JSON and runs nothing.
  out = tmp_path / "merged.md"
  assert compare_defenses.main(["--merge", f"{a},{b}", "--out", str(out)]) == 0
  assert out.read_text() == markdown
  assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(report))
  assert sorted(p.name for p in tmp_path.glob("merged_clean*.png")) == [
      "merged_clean100.png", "merged_clean500.png"]
  # The same cell in two directories, or a directory with no comparison, is an error.
  c = tmp_path / "c"
  sweep(c, 100, [], [cell("sig", "nc", 0.3, 200.0)])
  with pytest.raises(ValueError, match="both hold sig / nc / seed 0 with 100 clean images"):
    compare_defenses.merge([a, b, c])
  (tmp_path / "empty").mkdir()
  assert compare_defenses.main(["--merge", f"{a},{tmp_path / 'empty'}"]) == 2
  assert "holds no comparison" in capsys.readouterr().err
  # Columns follow the sweeps' --defenses order, the first directory's first, then the
  # registry's order for defenses no sweep listed.
  d = tmp_path / "d"
  sweep(d, 100, [], [cell("blend", "nc", 0.3, 200.0), cell("blend", "ibau", 0.0, 10.0)],
        defenses="nc,tabor,ibau")
  _, markdown = compare_defenses.merge([d, a])
  assert "| attack | seed | before | nc | ibau | ft |" in markdown


def test_comparison_runs_dp_once_for_all_clean_set_sizes(tmp_path, capsys):
  # DP-SGD retrains on the poisoned training set: its cell cannot depend on the clean set,
  # so the second size's sweep copies it, and its batch size is not capped at the clean set.
  argv = ["--preset", "smoke", "--attacks", "badnets", "--defenses", "dp",
          "--clean-sizes", "100,50", "--workdir", str(tmp_path / "w"), "--no-progress",
          "--model-dir", str(tmp_path / "models")] + sum(
              (["--set", s] for s in ["train_size=200", "eval_size=100", "model_widths=[4]",
                                      "train.epochs=1", "train.batch_size=50", "dp.epochs=1"]),
              [])
  assert compare_defenses.main(argv) == 0
  out = capsys.readouterr().out
  assert out.count("badnets / dp / seed 0: done earlier") == 1
  first, second = (json.loads((tmp_path / "w" / f"clean{n}" / "cells" /
                               "badnets__dp__seed0.json").read_text()) for n in (100, 50))
  assert second.pop("shared_from") == "clean100" and "shared_from" not in first
  assert second == first
  for n in (100, 50):
    config = json.loads((tmp_path / "w" / f"clean{n}" / "config.json").read_text())
    assert "batch_size" not in config["defense_settings"]["dp"]
    assert config["ft"]["batch_size"] == n
  assert "dp" in json.loads((tmp_path / "w" / "comparison.json").read_text())["50"][0]
  note = (tmp_path / "w" / "comparison.md").read_text()
  assert "Settings: preset `smoke`" in note and "`dp` epochs=1" in note
  assert "; 50 clean images;" in note and "`ft`" not in note  # only the defenses run
  assert sorted(p.name for p in (tmp_path / "w").glob("*.png")) == [
      "comparison_clean100.png", "comparison_clean50.png"]

# Every defense's smallest useful setting, for one end-to-end pass through the pipeline.
_ALL_DEFENSES_TINY = [
    "--set", "ft.epochs=1", "--set", "ft.batch_size=50",
    "--set", "nc.steps=3", "--set", "nc.batch_size=50", "--set", "nc.unlearn_epochs=1",
    "--set", "tabor.steps=3", "--set", "tabor.batch_size=50",
    "--set", "fp.epochs=1", "--set", "fp.batch_size=50",
    "--set", "nad.teacher_epochs=1", "--set", "nad.epochs=1", "--set", "nad.batch_size=50",
    "--set", "anp.iterations=2", "--set", "anp.batch_size=50", "--set", "anp.log_every=1",
    "--set", "dp.epochs=1", "--set", "dp.batch_size=50",
    "--set", "deepinspect.inversion_steps=2", "--set", "deepinspect.generator_steps=2",
    "--set", "deepinspect.batch_size=50", "--set", "deepinspect.patch_epochs=1",
    "--set", "deepinspect.inversion_per_class=2", "--set", "deepinspect.statistic_samples=4"]



def test_eval_every_changes_the_record_between_rounds_not_the_result(tmp_path, capsys):
  # The numbers after a defense come from the variables it returns; eval_every only thins
  # the per-round record, and a work directory resumes with another value.
  base = TINY + ["--attack", "badnets", "--set", "ibau.rounds=3",
                 "--model-dir", str(tmp_path / "models")]
  cells = {}
  for every in (1, 2, 0):
    workdir = tmp_path / f"w{every}"
    assert cifar10.main(base + ["--set", f"eval_every={every}", "--workdir", str(workdir)]) == 0
    cells[every] = json.loads((workdir / "results.json").read_text())["cells"][0]
    assert (workdir / "plots" / "badnets__ibau__seed0_rounds.png").is_file()
  assert [("acc" in r) for r in cells[1]["rounds"]] == [True, True, True]
  assert [("acc" in r) for r in cells[2]["rounds"]] == [False, True, False]
  assert not any("acc" in r for r in cells[0]["rounds"])
  assert cells[1]["rounds"][-1]["asr"] == cells[1]["asr_after"]
  for every in (2, 0):
    assert [cells[every][k] for k in ("acc_after", "asr_after", "ra_after")] == \
        [cells[1][k] for k in ("acc_after", "asr_after", "ra_after")]
  assert cifar10.main(base + ["--set", "eval_every=5", "--workdir", str(tmp_path / "w0")]) == 0
  assert "done earlier" in capsys.readouterr().out
  with pytest.raises(ValueError, match="eval_every"):
    pipeline.config_from_args("cifar10", _args(TINY + ["--set", "eval_every=-1"]))

def test_every_defense_runs_through_the_pipeline(tmp_path, capsys):
  workdir = tmp_path / "w"
  assert cifar10.main(TINY + _ALL_DEFENSES_TINY + ["--attack", "badnets", "--defense", "all",
                                                   "--workdir", str(workdir)]) == 0
  cells = json.loads((workdir / "results.json").read_text())["cells"]
  assert [c["defense"] for c in cells] == pipeline.defense_names()
  for c in cells:
    assert 0.0 <= c["acc_after"] <= 1.0 and c["defense_seconds"] >= 0.0
    if c["defense"] != "none":
      assert c["rounds"], c["defense"]
  # Before-numbers are the poisoned model's in every cell, DP-SGD's included.
  assert len({(c["acc_before"], c["asr_before"]) for c in cells}) == 1
  # Neural Cleanse and TABOR saved their state while running; nothing is left of it.
  assert not [p for p in (workdir / "partial").rglob("*") if p.is_file()]


def _dense_problem(n: int):
  """``(apply_fn, variables, images, labels)``: a linear 4-class model on ``n`` 4×4 images."""
  import flax.linen as nn
  import jax

  model = nn.Dense(4)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 48), np.float32))
  apply_fn = lambda v, x: model.apply(v, x.reshape((x.shape[0], -1)))
  rng = np.random.RandomState(0)
  return apply_fn, variables, rng.rand(n, 4, 4, 3).astype(np.float32), np.arange(n) % 4


def test_an_interrupted_neural_cleanse_cell_resumes_and_counts_its_earlier_seconds(tmp_path):
  import jax
  from ibau_jax.defenses import nc

  apply_fn, variables, x, y = _dense_problem(64)
  no_metrics = lambda v: {"acc": 0.0, "asr": 0.0, "ra": 0.0}
  config = nc.NCConfig(steps=20, log_every=5, batch_size=16, unlearn_epochs=1)
  run = lambda c: pipeline.run_defense("nc", c, apply_fn, variables, x, y,
                                       jax.random.PRNGKey(1), no_metrics, eval_every=0,
                                       checkpoint_dir=tmp_path / "partial")
  # A 2-s pause after step 5 (longer than the resumed run takes), then interrupted after
  # step 10, whose checkpoint counts the pause (a pause in the hook at step 10 would come
  # after that checkpoint was saved).
  def progress(step, total):
    if step == 5:
      time.sleep(2.0)
    if step == 10:
      raise Interrupted

  with pytest.raises(Interrupted):
    run(config.replace(progress=progress))
  assert (tmp_path / "partial" / nc.CHECKPOINT_FILE).is_file()
  _, rounds, seconds, _ = run(config)
  assert rounds[0]["resumed_from"] == 10 and rounds[0]["seconds_before"] >= 2.0
  # The cell's seconds count the interrupted run's (stage 0's seconds include them).
  assert seconds >= rounds[0]["seconds"] > rounds[0]["seconds_before"]
  # The hooks and the checkpoint folder are not settings a sweep can be given.
  smoke = pipeline.preset("smoke", "cifar10").to_dict()
  for field in ("progress", "checkpoint_dir"):
    with pytest.raises(ValueError, match="unknown nc fields"):
      pipeline.ExperimentConfig.from_dict(
          {**smoke, "defense_settings": {"nc": {field: None}}}).defense_config("nc")


def test_an_interrupted_ibau_cell_keeps_the_metrics_of_the_rounds_it_replays(tmp_path):
  import jax
  import ibau_jax
  from _interrupt import Interrupted

  apply_fn, variables, x, y = _dense_problem(32)
  config = ibau_jax.IBAUConfig(rounds=3, batch_size=16)
  calls = []

  def evaluate(v, stop=None):
    calls.append(1)
    if len(calls) == stop:
      raise Interrupted
    w = np.asarray(v["params"]["kernel"])
    return {"acc": float(w.sum()), "asr": float(np.abs(w).max()), "ra": float(w[0, 0])}

  def run(stop=None, folder=None):
    calls.clear()
    return pipeline.run_defense("ibau", config, apply_fn, variables, x, y,
                                jax.random.PRNGKey(1), lambda v: evaluate(v, stop),
                                checkpoint_dir=folder)

  after, reference, _, _ = run()
  partial = tmp_path / "partial"
  # Killed while evaluating round 1: rounds 0 and 1 are checkpointed, round 0 was evaluated.
  with pytest.raises(Interrupted):
    run(stop=2, folder=partial)
  assert (partial / files.ROUNDS_FILE).is_file()
  resumed_after, rounds, _, _ = run(folder=partial)
  assert resumed_after == after
  metrics = ("acc", "asr", "ra")
  assert {k: rounds[0][k] for k in metrics} == {k: reference[0][k] for k in metrics}
  assert not any(k in rounds[1] for k in metrics)  # its evaluation was interrupted
  assert {k: rounds[2][k] for k in metrics} == {k: reference[2][k] for k in metrics}
  assert [r["seconds_before"] > 0 for r in rounds[:2]] == [True, True]
  assert not (partial / files.ROUNDS_FILE).exists()


def test_cpu_preset_shortens_the_slow_defenses_and_the_command_line_restores_them():
  config = pipeline.preset("cpu", "cifar10")
  assert set(config.defense_settings) == set(pipeline.CPU_DEFENSE_SETTINGS)
  from ibau_jax import defenses
  for name, settings in pipeline.CPU_DEFENSE_SETTINGS.items():
    default = defenses.get_defense(name)[1]()
    for field, value in settings.items():
      assert getattr(config.defense_config(name), field) == value
      assert value < getattr(default, field), (name, field)
  import argparse
  args = argparse.Namespace(attack=None, defense=None, seeds=None, preset="cpu",
                            set=["nc.steps=1000"])
  restored = pipeline.config_from_args("cifar10", args)
  assert restored.defense_config("nc").steps == 1000
  assert restored.defense_config("nc").batch_size == 32  # the preset's other setting stays
  # The preset's dict is a copy: changing one config's settings changes no other.
  config.defense_settings["nc"]["steps"] = 1
  assert pipeline.preset("cpu", "cifar10").defense_config("nc").steps == 200


def test_synthetic_training_images_do_not_depend_on_the_clean_and_eval_sizes(tmp_path,
                                                                             monkeypatch):
  # The model cache key holds train_size, not the other sizes: the training images must not
  # change with them, so that a cached model is legitimately reused.
  seen = _record_training(monkeypatch)
  base = pipeline.config_from_args("cifar10", _args(TINY))
  other = pipeline.config_from_args("cifar10", _args(TINY + ["--set", "clean_size=150",
                                                             "--set", "eval_size=300"]))
  more_eval = pipeline.config_from_args("cifar10", _args(TINY + ["--set", "eval_size=300"]))
  a, b, c = (pipeline.load_splits(config, None) for config in (base, other, more_eval))
  np.testing.assert_array_equal(a.train_x, b.train_x)
  np.testing.assert_array_equal(a.train_y, b.train_y)
  np.testing.assert_array_equal(a.clean_x, c.clean_x)  # nor the clean set with eval_size
  assert (len(b.clean_y), len(b.eval_y), len(c.eval_y)) == (150, 300, 300)
  # The splits share the classes (the same colour fields), not the images.
  for split in (a.clean_x, a.eval_x):
    assert not np.any(np.all(split[:, None] == a.train_x[None], axis=(2, 3, 4)))
  # (Each class's mean over its images and over the 8x8 blocks of its colour field.)
  means = [np.stack([x[y == k].mean(0).reshape(4, 8, 4, 8, 3).mean((1, 3))
                     for k in range(10)]) for x, y in
           ((a.train_x, a.train_y), (a.eval_x, a.eval_y))]
  assert np.abs(means[0] - means[1]).max() < 0.05
  for config, splits in ((base, a), (other, b)):
    pipeline.train_poisoned(config, "badnets", 0, splits, tmp_path, lambda s: None, False)
  assert len(seen) == 1 and len(list(tmp_path.iterdir())) == 1  # reused, rightly
  # Models cached before the splits were drawn apart (other images) are not reused; the key
  # of real-data models is unchanged (cpu preset, CIFAR-10 BadNets, seed 0: the key of the
  # 8-epoch model of docs/results.md, trained with --set train.epochs=8 before the preset
  # changed to 8 epochs).
  info = json.loads((next(tmp_path.iterdir()) / "info.json").read_text())
  assert info["spec"]["synthetic_splits"] == "independent"
  cpu = pipeline.preset("cpu", "cifar10")
  pipeline.train_poisoned(cpu, "badnets", 0, a, tmp_path, lambda s: None, False)
  assert (tmp_path / "badnets_seed0_6e21889aad5a").is_dir()
  # The default stream (the notebooks') is the one of before.
  x, y = pipeline.synthetic_data(10, 50)
  rng = np.random.RandomState(0)
  rng.rand(10, 4, 4, 3)
  labels = np.arange(50) % 10
  rng.shuffle(labels)
  np.testing.assert_array_equal(y, labels)


def _fake_cell(config, attack, defense, seed, splits, model_dir, log, progress,
               checkpoint_dir=None):
  """Stands in for :func:`pipeline.run_cell`: a cell in no time, leaving a checkpoint
  folder as the real defenses do; blend's ASR before is 20 % (an attack that did not take
  hold), the others' 90 %."""
  checkpoint_dir.mkdir(parents=True)
  (checkpoint_dir / "state.msgpack").write_text("state")
  asr = 0.2 if attack == "blend" else 0.9
  return dict(attack=attack, defense=defense, seed=seed, dataset=config.dataset,
              **pipeline.resolved_configs(config, dict(attack=attack, defense=defense)),
              target=config.target, poisoned=1, train_seconds=60.0, defense_seconds=2.0,
              acc_before=0.8, asr_before=asr, ra_before=0.1, acc_after=0.78, asr_after=0.05,
              ra_after=0.7, der=float((max(0, asr - 0.05) - 0.02 + 1) / 2),
              rounds=[{"step": 0, "acc": 0.78, "asr": 0.05, "ra": 0.7}], delta=None)


def test_reports_cover_every_finished_cell_of_the_work_directory(tmp_path, monkeypatch,
                                                                   capsys):
  monkeypatch.setattr(pipeline, "run_cell", _fake_cell)
  workdir = tmp_path / "w"
  extra = ["--set", "blend.alpha=0.3", "--set", "ft.epochs=1", "--set", "ft.batch_size=50",
           "--workdir", str(workdir)]
  assert cifar10.main(TINY + extra + ["--attack", "badnets,blend", "--defense", "ibau,ft"]) == 0
  assert not (workdir / "partial").exists()  # every cell's folder and then partial/ went
  capsys.readouterr()
  # Not cells of this sweep: another file, a copy under another name.
  (workdir / "cells" / "notes.json").write_text(json.dumps({"note": 1}))
  (workdir / "cells" / "copy.json").write_text(
      (workdir / "cells" / "badnets__ibau__seed0.json").read_text())
  # Another run's cell folder (as if it were running): partial/ stays for it.
  held = workdir / "partial" / "held"
  held.mkdir(parents=True)
  # A subset with a new cell, then a subset that runs nothing: the reports keep every cell.
  for attack, seeds in (("blend", "1"), ("blend", "0")):
    assert cifar10.main(TINY + extra + ["--attack", attack, "--defense", "ft",
                                        "--seeds", seeds]) == 0
    results = json.loads((workdir / "results.json").read_text())
    keys = [(c["attack"], c["defense"], c["seed"]) for c in results["cells"]]
    # The command's cells first, then the others in the registry's order, as run() runs
    # them (seeds, then attacks, then defenses).
    assert keys == ([("blend", "ft", 1), ("blend", "ft", 0), ("blend", "ibau", 0),
                     ("badnets", "ft", 0), ("badnets", "ibau", 0)] if seeds == "1" else
                    [("blend", "ft", 0), ("blend", "ibau", 0), ("badnets", "ft", 0),
                     ("badnets", "ibau", 0), ("blend", "ft", 1)])
    rows = list(csv.DictReader((workdir / "results.csv").open()))
    assert [(r["attack"], r["defense"], int(r["seed"])) for r in rows] == keys
    table = [line for line in (workdir / "results.md").read_text().splitlines()
             if line.startswith("| ") and not line.startswith("| attack")]
    assert [tuple(x.strip() for x in line.split("|")[1:4]) for line in table] == \
        [(a, d, str(s)) for a, d, s in keys]
    for a, d, s in keys:
      for kind in ("rounds", "gallery"):
        assert (workdir / "plots" / f"{pipeline.cell_name(a, d, s)}_{kind}.png").is_file()
    # config.json still records the last command; results.json's config is it.
    assert json.loads((workdir / "config.json").read_text()) == results["config"]
    assert results["config"]["attacks"] == [attack]
    # The command prints its own cells.
    out = capsys.readouterr().out
    assert f"| blend | ft | {seeds} |" in out and "| badnets |" not in out
  assert held.is_dir() and not (workdir / "partial" / "blend__ft__seed1").exists()
  held.rmdir()
  assert cifar10.main(TINY + extra + ["--attack", "blend", "--defense", "ft"]) == 0
  assert not (workdir / "partial").exists()
  # The resolved configs: the training config at the top, each cell's attack and defense.
  config = pipeline.load_config(workdir)
  assert results["train_config"] == json.loads(json.dumps(config.train_config().to_dict()))
  assert results["train_config"]["epochs"] == 1 and results["train_config"]["batch_size"] == 50
  for c in results["cells"]:
    attack = pipeline.make_attack(c["attack"], config)
    assert c["attack_config"] == json.loads(json.dumps(
        {f.name: getattr(attack, f.name) for f in dataclasses.fields(attack)}))
    dconfig = config.defense_config(c["defense"])
    assert c["defense_config"] == json.loads(json.dumps(
        {f.name: getattr(dconfig, f.name) for f in dataclasses.fields(dconfig)
         if f.name not in ("callback", "progress", "checkpoint_dir")}))
    assert c["defense_config"]["batch_size"] == 50 and "callback" not in c["defense_config"]
    assert c["attack_config"]["target"] == 1
  blend = [c for c in results["cells"] if c["attack"] == "blend"]
  assert blend and all(c["attack_config"]["alpha"] == 0.3 for c in blend)
  ibau = [c for c in results["cells"] if c["defense"] == "ibau"]
  assert ibau and all(c["defense_config"]["rounds"] == 1 and
                      c["defense_config"]["inner_candidates"] ==
                      [list(x) for x in config.ibau_config().inner_candidates] for c in ibau)
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    head = None
  assert results["git_commit"] == head


def test_results_markdown_says_what_the_numbers_are(tmp_path, monkeypatch):
  cell = lambda attack, asr: dict(attack=attack, defense="ibau", seed=0, acc_before=0.8,
                                  asr_before=asr, ra_before=0.1, acc_after=0.78,
                                  asr_after=0.05, ra_after=0.7, der=0.5, train_seconds=60.0,
                                  defense_seconds=2.0)
  smoke = pipeline.config_from_args("cifar10", _args(TINY))
  text = pipeline.markdown_report(smoke, [cell("badnets", 0.9), cell("blend", 0.4999)], 100)
  header, table = text.split("\n| attack |")
  assert "Dataset `cifar10`, preset `smoke`, synthetic data" in header
  assert "100 evaluation images" in header
  assert "ACC, ASR, RA and DER are percentages" in header
  assert ("DER = [max(0, ASR before - ASR after) - max(0, ACC before - ACC after) + 1] / 2"
          in header)
  assert "includes the XLA compilation of its first call" in header
  # The columns are those of before; only the weak attack's DER has the mark.
  assert table.startswith(" defense | seed | ACC before | ASR before | RA before | "
                          "ACC after | ASR after | RA after | DER | train min | defense s |\n")
  assert "| badnets | ibau | 0 | 80.00 | 90.00 | 10.00 | 78.00 | 5.00 | 70.00 | 50.0 | 1.0 | 2 |" \
      in table
  assert "| blend | ibau | 0 | 80.00 | 49.99 | 10.00 | 78.00 | 5.00 | 70.00 | 50.0† | 1.0 | 2 |" \
      in table
  assert table.rstrip().endswith("† ASR before the defense below 50 %: the attack did not take "
                                 "hold, so DER is not meaningful.")
  # No weak attack, no footnote; real data with every evaluation image.
  assert "†" not in pipeline.markdown_table([cell("badnets", 0.5)])
  real = pipeline.markdown_report(pipeline.preset("cpu", "gtsrb"), [cell("badnets", 0.9)])
  assert real.startswith("Dataset `gtsrb`, preset `cpu`, real data; all evaluation images.")


def test_git_commit_is_none_without_git(monkeypatch):
  def no_git(*args, **kwargs):
    raise FileNotFoundError("git")

  monkeypatch.setattr(subprocess, "run", no_git)
  assert pipeline.git_commit() is None
  monkeypatch.undo()
  monkeypatch.setenv("PATH", "")
  assert pipeline.git_commit() is None


def test_stats_keep_small_values_and_drop_large_ones_at_any_depth():
  nested = [[0.5] * 10 for _ in range(10)]  # 100 numbers, 10 per level
  small = [[0.5] * 4 for _ in range(4)]
  stats = {"nested": nested, "array": np.zeros((10, 10)), "small": small,
           "small_array": np.ones((2, 3)), "scalar": np.float32(0.25), "masks": {"a": nested}}
  assert pipeline._jsonable(stats) == {"small": small, "small_array": [[1.0] * 3] * 2,
                                       "scalar": 0.25, "masks": {}}


def test_the_gallery_shows_the_warp_of_an_active_warp_repair(tmp_path):
  import matplotlib.image
  config = pipeline.preset("smoke", "cifar10")
  splits = pipeline.load_splits(config, None)
  cell = dict(attack="wanet", defense="ibau", seed=0, rounds=[dict(acc=0.5, asr=0.1, ra=0.4)],
              acc_before=0.5, asr_before=0.9, ra_before=0.1, acc_after=0.5, asr_after=0.05,
              ra_after=0.4, delta=np.zeros((32, 32, 3)).tolist())
  heights = []
  for warp in (None, dict(active=False, phi=np.zeros((4, 4, 2)).tolist()),
               dict(active=True, phi=np.full((4, 4, 2), 0.5).tolist())):
    folder = tmp_path / str(len(heights))
    pipeline.plot_cell(config, {**cell, "details": {"warp": warp}}, folder, splits)
    heights.append(matplotlib.image.imread(folder / "wanet__ibau__seed0_gallery.png").shape[0])
  # Clean, triggered and δ rows; a fourth row only for a warp repair that ran.
  assert heights[0] == heights[1] < heights[2]
