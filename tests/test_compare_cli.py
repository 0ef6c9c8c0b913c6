"""The command line of experiments.compare_defenses: --merge errors, warnings and output
paths, the settings line, the plots' width, --help and the DER footnote.

Fast: the work directories are made by hand (a config.json and cell files), so nothing is
trained.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import struct

import pytest

from experiments import compare_defenses
from experiments import pipeline

# The smoke preset with tiny sizes, as in tests/test_experiments.py.
TINY = ["--set", "train_size=200", "--set", "eval_size=100", "--set", "model_widths=[4]",
        "--set", "train.epochs=1", "--set", "train.batch_size=50", "--set", "ibau.batch_size=50"]


def _config(settings=(), defenses="ibau", size=100) -> pipeline.ExperimentConfig:
  sets = TINY + [f"clean_size={size}"] + list(settings)
  args = argparse.Namespace(attack=None, defense=defenses, seeds=None, preset="smoke",
                            set=[s for s in sets if s != "--set"])
  return pipeline.config_from_args("cifar10", args)


def cell(attack, defense, asr=0.1, seconds=10.0, asr_before=0.99, acc_before=0.8):
  return dict(attack=attack, seed=0, defense=defense, acc_before=acc_before,
              asr_before=asr_before, acc_after=0.75, asr_after=asr, defense_seconds=seconds)


def sweep(workdir: pathlib.Path, cells=(), settings=(), size=100, defenses="ibau"):
  """A comparison work directory as a (killed or finished) run leaves it."""
  pipeline.check_workdir(_config(settings, defenses, size), workdir / f"clean{size}")
  for c in cells:
    path = workdir / f"clean{size}" / "cells" / f"{c['attack']}__{c['defense']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(c))
  return workdir


def _notes(markdown: str) -> dict[str, str]:
  """``{work directory: its settings line}`` of a merged table."""
  out = {}
  for line in markdown.splitlines():
    if line.startswith("- `") and "`: Settings: " in line:
      where, note = line[3:].split("`: ", 1)
      out[where] = note
  return out


# 1. --merge ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [",", "", " , ", ",,"])
def test_merge_without_a_work_directory_is_a_usage_error_and_writes_nothing(
    value, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as e:
    compare_defenses.main(["--merge", value])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "--merge: no work directory given" in err
  assert len(err.strip().splitlines()[-1]) < 120  # one line after the usage
  assert list(tmp_path.iterdir()) == []  # no {} and no empty table


def test_merge_names_a_directory_killed_before_its_first_cell(tmp_path, capsys):
  done = sweep(tmp_path / "done", [cell("badnets", "ibau"), cell("badnets", "ft", 0.9, 20.0)])
  killed = sweep(tmp_path / "killed")  # only clean100/config.json
  assert sorted(p.name for p in killed.rglob("*") if p.is_file()) == ["config.json"]
  warnings = []
  report, markdown = compare_defenses.merge([done, killed], warn=warnings.append)
  assert [r["attack"] for r in report["100"]] == ["badnets"]
  assert len(warnings) == 1 and str(killed) in warnings[0] and str(done) not in warnings[0]
  assert "no finished cell" in warnings[0]
  # On the command line: a warning line on stderr, the table still written.
  out = tmp_path / "out" / "merged.md"
  assert compare_defenses.main(["--merge", f"{done},{killed}", "--out", str(out)]) == 0
  err = capsys.readouterr().err
  assert [line for line in err.splitlines() if line.startswith("warning:")] == [
      f"warning: {warnings[0]}"]
  assert out.read_text() == markdown
  # No directory contributes a row: an error, and nothing is written.
  killed2 = sweep(tmp_path / "killed2", size=500)
  out2 = tmp_path / "out2" / "merged.md"
  assert compare_defenses.main(["--merge", f"{killed},{killed2}", "--out", str(out2)]) == 2
  err = capsys.readouterr().err
  assert f"error: no finished cell in {killed}, {killed2}: nothing to merge" in err
  assert "warning:" not in err
  assert not out2.parent.exists()
  with pytest.raises(ValueError, match="nothing to merge"):
    compare_defenses.merge([killed])
  # A directory that is not there is named as such.
  assert compare_defenses.main(["--merge", f"{done},{tmp_path / 'typo'}", "--out",
                                str(out2)]) == 2
  assert f"{tmp_path / 'typo'} is not a directory" in capsys.readouterr().err


def test_settings_line_shows_training_model_and_data_overrides(tmp_path):
  a = sweep(tmp_path / "a", [cell("badnets", "ibau")], ["train.epochs=1"])
  b = sweep(tmp_path / "b", [cell("blend", "ibau")], ["train.epochs=3"])
  _, markdown = compare_defenses.merge([a, b])
  notes = _notes(markdown)
  assert notes[str(a)] != notes[str(b)]
  assert notes[str(a)] == (
      "Settings: preset `smoke`; poison ratio 0.1; 100 clean images; `ibau` batch_size=50, "
      "rounds=1. Changed from the preset: model_widths=[4], train_size=200, eval_size=100, "
      "train.epochs=1, train.batch_size=50.")
  assert notes[str(b)] == notes[str(a)].replace("train.epochs=1", "train.epochs=3")
  # Every kind of override shows, each in the --set form that made it.
  c = sweep(tmp_path / "c", [cell("sig", "nc")], [
      "target=3", "model_options={\"dropout_rates\": [0.5, 0.5, 0.5]}", "train.optimizer=sgd",
      "sig.delta=0.2", "nc.steps=7", "poison_ratio=0.05", "augment_triggered=false"])
  note = _notes(compare_defenses.merge([c])[1])[str(c)]
  for text in ("poison ratio 0.05", "triggered images not augmented", "sig: delta=0.2",
               "`nc` steps=7", "target=3", "train.optimizer=sgd",
               'model_options={"dropout_rates": [0.5, 0.5, 0.5]}'):
    assert text in note, text
  # Values equal to the preset's are not overrides; the preset itself has none.
  smoke = pipeline.preset("smoke", "cifar10")
  assert compare_defenses.preset_overrides(smoke) == {}
  assert "Changed from the preset" not in compare_defenses.settings_note(smoke)
  same = pipeline.ExperimentConfig.from_dict(
      {**smoke.to_dict(), "train": {**smoke.train, "epochs": 2}, "attacks": ["sig"]})
  assert compare_defenses.preset_overrides(same) == {}
  assert compare_defenses.preset_overrides(_config(["eval_size=null"])) == {
      "train_size": 200, "model_widths": [4], "eval_size": None, "train.batch_size": 50,
      "train.epochs": 1}
  assert compare_defenses.preset_overrides(pipeline.preset("cpu", "gtsrb")) == {}


def test_merge_out_default_is_in_the_help_and_the_paths_are_printed(
    tmp_path, monkeypatch, capsys):
  done = sweep(tmp_path / "done", [cell("badnets", "ibau"), cell("badnets", "ft", 0.9, 20.0)])
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  assert compare_defenses.main(["--merge", str(done)]) == 0
  out, err = capsys.readouterr()
  written = [cwd / "comparison_merged.md", cwd / "comparison_merged.json",
             cwd / "comparison_merged_clean100.png"]
  assert sorted(cwd.iterdir()) == sorted(written)
  assert err.splitlines()[-1] == "wrote " + ", ".join(map(str, written))
  assert out.strip() == (cwd / "comparison_merged.md").read_text().strip()  # stdout: the table
  with pytest.raises(SystemExit):
    compare_defenses.main(["--help"])
  help_text = " ".join(capsys.readouterr().out.split())
  assert "(default: comparison_merged.md in the current directory)" in help_text
  # --out without --merge, or a JSON name for the markdown, is a usage error.
  for argv, message in ((["--out", "x.md"], "--out is only used with --merge"),
                        (["--merge", str(done), "--out", str(tmp_path / "t.json")],
                         "the JSON goes next to the markdown")):
    with pytest.raises(SystemExit) as e:
      compare_defenses.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
  assert not (tmp_path / "t.json").exists()


# 2. The plot's width ---------------------------------------------------------------------


def _png_width(path: pathlib.Path) -> int:
  return struct.unpack(">I", path.read_bytes()[16:20])[0]


@pytest.mark.parametrize("attacks,defenses", [
    (["badnets"], ["ibau", "ft"]),  # one panel: 4 inches, narrower than the title
    (["badnets"], [d for d in pipeline.defense_names() if d != "none"]),  # a wide legend
    (["badnets", "blend"], ["ibau"]),
    (["badnets", "blend", "sig", "wanet"], ["ibau", "ft", "nc"]),
])
def test_comparison_figure_is_as_wide_as_its_title_and_legend(attacks, defenses, tmp_path):
  import matplotlib.pyplot as plt
  cells = [cell(a, d) for a in attacks for d in defenses + ["none"]]
  rows, _ = compare_defenses.comparison(cells, defenses + ["none"])
  figures = compare_defenses.comparison_figures({"5000": rows, "100": rows, "7": []})
  widths = {size: fig.get_figwidth() for size, fig in figures.items()}
  try:
    assert list(figures) == ["5000", "100"]
    for size, fig in figures.items():
      fig.canvas.draw()
      box = fig.bbox
      title = fig._suptitle
      assert title.get_text().startswith(f"{size} clean images")
      for text in (title, fig.legends[0]):
        extent = text.get_window_extent()
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1, (size, extent, box)
      # Several panels keep their 4 inches each.
      assert fig.get_figwidth() >= 4 * min(3, len(attacks))
      if len(attacks) >= 2 and len(defenses) < 5:
        assert fig.get_figwidth() == 4 * min(3, len(attacks))
  finally:
    for fig in figures.values():
      plt.close(fig)
  # The saved files keep their names and that width (100 dpi).
  paths = compare_defenses.plot_comparison({"100": rows}, tmp_path / "comparison")
  assert paths == [tmp_path / "comparison_clean100.png"]
  assert abs(_png_width(paths[0]) - 100 * widths["100"]) <= 1
  if len(attacks) == 1:
    assert _png_width(paths[0]) > 400  # one panel's 4 inches did not hold the title


# 3. --help -------------------------------------------------------------------------------


def test_help_shows_every_default_the_long_run_and_no_sphinx_markup(capsys):
  with pytest.raises(SystemExit) as e:
    compare_defenses.main(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  assert ":mod:" not in text and ":func:" not in text and ":data:" not in text
  assert "``" not in text
  # The first lines say that no arguments means hours of work.
  head = " ".join(" ".join(text.splitlines()[:6]).split())
  assert "Run without arguments, it starts the full default sweep" in head
  assert "5 attacks x 9 defenses at 5,000 and 100 clean images on the cpu preset" in head
  assert "many hours on a CPU" in " ".join(" ".join(text.splitlines()[:9]).split())
  flat = " ".join(text.split())
  for default in ("(default: cpu)", "(default: badnets,blend,trojan_wm,wanet,sig)",
                  "(default: 5000,100)", "(default: 0)", "(default: cifar10)",
                  "(default: ../shared/reference/ibau_official)",
                  "(default: runs/compare_<dataset>_<preset>)",
                  "(default: runs/models_<dataset>_<preset>)",
                  "(default: all, i.e. ibau,ft,", "(default: $IBAU_DATA_DIR;"):
    assert default in flat, default
  # Every option says its default.
  for action in compare_defenses._parser()._actions:
    if action.dest != "help":
      assert "default" in action.help, action.dest
  assert "experiments.pipeline (attacks x defenses" in flat  # the epilog, unmarked


def test_plain_removes_sphinx_roles_and_literals():
  assert compare_defenses.plain(
      "see :mod:`experiments.pipeline`, :func:`merge` and :data:`~x.Y` in ``<workdir>``") \
      == "see experiments.pipeline, merge and x.Y in <workdir>"
  assert compare_defenses.plain("ACC / ASR `x`") == "ACC / ASR `x`"


# 4. DER where the attack did not take hold -----------------------------------------------


def test_rows_whose_attack_did_not_take_hold_are_marked_with_a_der_footnote(tmp_path):
  cells = [cell("badnets", "ibau", 0.02), cell("badnets", "ft", 0.5, 20.0),
           cell("clean", "ibau", 0.02, asr_before=0.3),
           cell("clean", "ft", 0.05, 20.0, asr_before=0.3),
           cell("wanet", "ibau", 0.1, asr_before=0.5)]  # exactly 50 %: took hold
  rows, markdown = compare_defenses.comparison(cells, ["ibau", "ft", "none"])
  mark = compare_defenses.NO_BACKDOOR_MARK
  assert f"| clean | 0 | 80.0 / 30.0 {mark} | 75.0 / 2.0 / 10 |" in markdown
  assert "| badnets | 0 | 80.0 / 99.0 | 75.0 / 2.0 / 10 |" in markdown
  assert "| wanet | 0 | 80.0 / 50.0 | 75.0 / 10.0 / 10 |" in markdown
  assert markdown.count(mark) == 2  # the row and its footnote
  footnote = markdown.strip().splitlines()[-1]
  assert footnote.startswith(f"{mark} ASR before the defense under 50 %: the attack did not "
                             "take hold")
  assert "(DER)" in footnote and "not meaningful" in footnote
  assert "the counts above include such rows" in footnote
  assert markdown.index("defense effectiveness rating (DER = ") < markdown.index(footnote)
  # The rows themselves are unchanged.
  assert rows[1]["versus_ibau"] == {"ft": "higher"}
  # No such row: no mark, no footnote.
  _, markdown = compare_defenses.comparison(cells[:2], ["ibau", "ft", "none"])
  assert mark not in markdown
  # Without I-BAU (no DER counts) the footnote still explains the mark.
  _, markdown = compare_defenses.comparison(cells[3:4], ["ft", "none"])
  assert markdown.count(mark) == 2 and "counts above" not in markdown
  # Through --merge too.
  d = sweep(tmp_path / "d", cells[:4], defenses="ibau,ft")
  _, markdown = compare_defenses.merge([d])
  assert f"80.0 / 30.0 {mark} |" in markdown and "did not take hold" in markdown


def test_merge_refuses_sweep_flags_it_would_ignore(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    compare_defenses.main(["--merge", str(tmp_path), "--clean-sizes", "100", "--seeds", "1"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "--clean-sizes, --seeds would be ignored" in err
