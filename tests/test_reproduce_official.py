"""The reproduction script end to end on a fake reference folder (tiny data, one round)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from experiments import reproduce_official
from ibau_jax.models import get_model
from ibau_jax.models import init_variables
from ibau_jax.models import torch_import


@pytest.fixture
def fake_dirs(tmp_path):
  rng = np.random.RandomState(0)
  data = tmp_path / "data" / "cifar10"
  data.mkdir(parents=True)
  for name, n in (("train_0", 100), ("train_1", 100)):
    np.savez(data / f"{name}.npz", x=rng.randint(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             y=(np.arange(n) % 10).astype(np.uint8))
  np.savez(data / "test.npz", x=rng.randint(0, 256, (60, 32, 32, 3), dtype=np.uint8),
           y=(np.arange(60) % 10).astype(np.uint8), exact=np.arange(60) < 40)
  ref = tmp_path / "ref"
  ref.mkdir()
  variables = init_variables(get_model("small_vgg16", 10), jax.random.PRNGKey(0),
                             np.zeros((1, 32, 32, 3), np.float32))
  np.savez(ref / "badnets_8_02.npz", **torch_import.export_torch_state(variables, "small_vgg16"))
  (ref / "models.json").write_text(json.dumps({"badnets_8_02": dict(
      dataset="cifar10", attack="badnets", target=8, poison_ratio=0.2)}))
  return tmp_path / "data", ref


def test_reproduce_runs_writes_results_and_resumes(fake_dirs, tmp_path, capsys):
  data, ref = fake_dirs
  out = tmp_path / "out"
  argv = ["--data-dir", str(data), "--reference-dir", str(ref), "--models", "badnets_8_02",
          "--configs", "official", "--clean-size", "100", "--out", str(out)]
  assert reproduce_official.main(argv) == 0
  rows = json.loads((out / "results.json").read_text())["rows"]
  assert len(rows) == 1
  row = rows[0]
  assert (row["model"], row["config"], row["seed"], row["clean_size"], row["eval_size"]) == (
      "badnets_8_02", "official", 0, 100, 40)
  assert len(row["rounds"]) == 1 and row["unlearn_seconds"] > 0
  for k in ("acc_before", "asr_before", "acc_after", "asr_after", "der"):
    assert 0.0 <= row[k] <= 1.0
  assert "| badnets_8_02 | official | 0 |" in (out / "results.md").read_text()
  assert not (out / "partial").exists()  # the cell's checkpoint folder is gone
  # A second run finds the cell done and does no work.
  assert reproduce_official.main(argv) == 0
  assert "done already, skipped" in capsys.readouterr().out
  assert len(json.loads((out / "results.json").read_text())["rows"]) == 1
  # A row from before a config field existed (it ran at its default) is still done.
  payload = json.loads((out / "results.json").read_text())
  del payload["rows"][0]["config_fields"]["inner_use"]
  (out / "results.json").write_text(json.dumps(payload))
  assert reproduce_official.main(argv) == 0
  assert "done already, skipped" in capsys.readouterr().out
  # A row made with other settings is not taken for this configuration's: refused.
  payload["rows"][0]["config_fields"]["rounds"] = 7
  (out / "results.json").write_text(json.dumps(payload))
  with pytest.raises(SystemExit):
    reproduce_official.main(argv)
  assert "different configuration" in capsys.readouterr().err


def test_reproduce_rejects_bad_arguments(fake_dirs, tmp_path, capsys):
  data, ref = fake_dirs
  base = ["--reference-dir", str(ref), "--out", str(tmp_path / "o")]
  with pytest.raises(SystemExit):
    reproduce_official.main(base + ["--data-dir", str(tmp_path / "missing")])
  with pytest.raises(SystemExit):
    reproduce_official.main(base + ["--data-dir", str(data), "--models", "resnet_x"])
  with pytest.raises(SystemExit):
    reproduce_official.main(base + ["--data-dir", str(data), "--configs", "fast"])
  with pytest.raises(SystemExit):
    reproduce_official.main(base + ["--data-dir", str(data), "--set", "nonsense=1"])
  # One-line usage errors before any work, not tracebacks from inside a cell.
  for bad, message in ((["--seeds", "x"], "--seeds must be"),
                       (["--official-seeds", "1,y"], "--official-seeds must be"),
                       (["--seeds", "-1"], "--seeds must be"),
                       (["--set", "rounds=0"], "IBAUConfig.rounds"),
                       (["--set", "checkpoint_dir=\"/tmp/x\""], "--set expects"),
                       (["--clean-size", "0"], "--clean-size must be"),
                       (["--clean-size", "1000000"], "exceeds")):
    with pytest.raises(SystemExit) as e:
      reproduce_official.main(base + ["--data-dir", str(data), "--models", "badnets_8_02"]
                              + bad)
    assert e.value.code != 0
    assert message in capsys.readouterr().err + str(e.value.code), bad


def test_comparison_adds_rows_for_the_released_models(fake_dirs, tmp_path, capsys):
  from experiments import compare_defenses
  data, ref = fake_dirs
  argv = ["--preset", "smoke", "--attacks", "badnets", "--defenses", "ft",
          "--clean-sizes", "100", "--workdir", str(tmp_path / "w"), "--no-progress",
          "--model-dir", str(tmp_path / "models"), "--data-dir", str(data),
          "--official", "badnets_8_02", "--reference-dir", str(ref),
          "--set", "train_size=200", "--set", "eval_size=100", "--set", "model_widths=[4]",
          "--set", "train.epochs=1", "--set", "train.batch_size=50", "--set", "ft.epochs=1"]
  assert compare_defenses.main(argv) == 0
  rows = json.loads((tmp_path / "w" / "comparison.json").read_text())["100"]
  assert [r["attack"] for r in rows] == ["badnets", "official badnets_8_02"]
  cell = json.loads((tmp_path / "w" / "official" / "clean100" / "cells" /
                     "badnets_8_02__ft.json").read_text())
  assert rows[1]["ft"]["acc"] == cell["acc_after"] and cell["clean_size"] == 100
  assert cell["settings"]["epochs"] == 1 and cell["settings"]["batch_size"] == 100
  # The untouched model's row: its numbers before the defense are the reproduction's.
  before = reproduce_official.run_cell("badnets_8_02", "official", 0, data_dir=str(data),
                                       reference_dir=ref, clean_size=100, overrides={})
  assert rows[1]["before"] == dict(acc=before["acc_before"], asr=before["asr_before"])
  capsys.readouterr()
  assert compare_defenses.main(argv) == 0
  assert "[official badnets_8_02] ft: done earlier" in capsys.readouterr().out
  # A saved cell made with other settings is not taken for this one's: refused.
  path = tmp_path / "w" / "official" / "clean100" / "cells" / "badnets_8_02__ft.json"
  path.write_text(json.dumps({**cell, "settings": {**cell["settings"], "epochs": 7}}))
  assert compare_defenses.main(argv) == 2
  assert "other settings" in capsys.readouterr().err
  # Only the released model's rows: no attack is trained, and --merge reads the folder.
  only = ["--attacks", "", "--workdir", str(tmp_path / "o")]
  assert compare_defenses.main(argv + only) == 0
  rows = json.loads((tmp_path / "o" / "comparison.json").read_text())["100"]
  assert [r["attack"] for r in rows] == ["official badnets_8_02"]
  assert rows[0]["ft"]["acc"] == cell["acc_after"]  # the same cell, computed again
  assert not (tmp_path / "o" / "clean100" / "cells").exists()
  report, _ = compare_defenses.merge([tmp_path / "o"])
  assert report == json.loads((tmp_path / "o" / "comparison.json").read_text())
  with pytest.raises(SystemExit):
    compare_defenses.main([a for a in argv if a not in ("--official", "badnets_8_02")] +
                          ["--attacks", ""])  # neither attacks nor --official


def test_reproduce_reports_the_returned_variables_with_select_average_and_resumes(
    fake_dirs, tmp_path):
  # With select="average" unlearn returns the mean of the rounds' variables, not the last
  # round's: the row's numbers after must be those of the returned variables.
  import ibau_jax
  from ibau_jax import metrics
  data, ref = fake_dirs
  # K = 2: a smaller program to compile; a short repair that runs (the row's numbers are
  # those of the repaired variables).
  overrides = dict(select="average", rounds=2, batch_size=50, inner_candidates=(),
                   solver_iterations=2, repair_epochs=1, repair_fit_steps=5, repair_share=0.01)
  row = reproduce_official.run_cell("badnets_8_02", "default", 0, data_dir=str(data),
                                    reference_dir=ref, clean_size=100, overrides=overrides)
  clean_x, clean_y, eval_x, eval_y = reproduce_official._split("cifar10", str(data), 100)
  model = get_model("small_vgg16", 10)
  variables = torch_import.load_torch_state(ref / "badnets_8_02.npz", "small_vgg16")
  result = ibau_jax.unlearn(model.apply, variables, clean_x, clean_y,
                            ibau_jax.IBAUConfig().replace(**overrides), key=jax.random.PRNGKey(0))
  attack = reproduce_official._attack(dict(attack="badnets", target=8), ref)
  expected = metrics.evaluate(model.apply, result.variables, eval_x, eval_y, attack.apply, 8)
  assert [float(row[k + "_after"]) for k in ("acc", "asr", "ra")] == \
      [float(expected[k]) for k in ("acc", "asr", "ra")]
  assert len(row["rounds"]) == 2 and row["repair"]["active"]

  # Killed after round 0 (saved and evaluated), the cell resumes with round 1 and ends with
  # the same numbers (the average too: its running sum is part of the checkpoint).
  from _interrupt import Interrupted

  def stop_after_round_0(message):
    if "round 0:" in message:
      raise Interrupted
  partial = tmp_path / "partial"
  cell = lambda **kw: reproduce_official.run_cell(
      "badnets_8_02", "default", 0, data_dir=str(data), reference_dir=ref, clean_size=100,
      overrides=overrides, **kw)
  with pytest.raises(Interrupted):
    cell(checkpoint_dir=partial, log=stop_after_round_0)
  assert (partial / "rounds.json").is_file() and (partial / "ibau.npz").is_file()
  seen = []
  resumed = cell(checkpoint_dir=partial, log=seen.append)
  assert any("round 0: restored" in m for m in seen)
  assert not any("round 1: restored" in m for m in seen)
  assert not list(partial.iterdir())
  strip = lambda r: [{k: v for k, v in x.items() if "seconds" not in k} for x in r["rounds"]]
  assert strip(resumed) == strip(row)
  for k in ("acc_after", "asr_after", "ra_after", "der", "config_fields"):
    assert resumed[k] == row[k], k
  assert "checkpoint_dir" not in row["config_fields"]


def test_reproduce_reports_the_variables_after_the_warp_repair(fake_dirs, capsys, monkeypatch):
  # select="last" with an active warp repair: the row's numbers after are those of the
  # returned (warp-repaired) variables, not the last round's.
  import ibau_jax
  data, ref = fake_dirs
  seen = []
  real = reproduce_official.metrics.evaluate

  def evaluate(apply_fn, variables, *args):
    seen.append(variables)
    return real(apply_fn, variables, *args)

  monkeypatch.setattr(reproduce_official.metrics, "evaluate", evaluate)
  overrides = dict(rounds=1, batch_size=50, inner_candidates=(), solver_iterations=2,
                   repair_epochs=0, retries=0, warp_epochs=1, warp_fit_steps=3,
                   warp_share=0.01, repair_lr=0.5)
  row = reproduce_official.run_cell("badnets_8_02", "default", 0, data_dir=str(data),
                                    reference_dir=ref, clean_size=100, overrides=overrides)
  assert row["warp"]["active"] and "warp repair: class" in capsys.readouterr().out
  assert len(seen) == 3  # before, round 0, the returned variables
  clean_x, clean_y, _, _ = reproduce_official._split("cifar10", str(data), 100)
  model = get_model("small_vgg16", 10)
  variables = torch_import.load_torch_state(ref / "badnets_8_02.npz", "small_vgg16")
  result = ibau_jax.unlearn(model.apply, variables, clean_x, clean_y,
                            ibau_jax.IBAUConfig().replace(**overrides), key=jax.random.PRNGKey(0))
  jax.tree_util.tree_map(np.testing.assert_array_equal, seen[-1], result.variables)
  moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), seen[-1]["params"],
                                 seen[1]["params"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0  # the warp repair changed them


def test_a_second_reproduction_in_a_busy_output_folder_stops_at_once(fake_dirs, tmp_path):
  from ibau_jax import files
  data, ref = fake_dirs
  out = tmp_path / "out"
  argv = ["--data-dir", str(data), "--reference-dir", str(ref), "--models", "badnets_8_02",
          "--configs", "official", "--clean-size", "100", "--out", str(out)]
  with files.locked(out):
    with pytest.raises(SystemExit) as e:
      reproduce_official.main(argv)
  assert e.value.code == 2
  assert not (out / "results.json").exists()

