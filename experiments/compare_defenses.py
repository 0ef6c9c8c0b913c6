"""The paper-style comparison: rows attacks, columns defenses, cells ACC / ASR / seconds.

    python -m experiments.compare_defenses --data-dir ../shared/data \\
        --attacks badnets,blend,trojan_wm,wanet,sig --clean-sizes 5000,100 \\
        --official badnets_8_02 --reference-dir ../shared/reference/ibau_official

For every clean-set size it runs one sweep of :mod:`experiments.pipeline` (attacks x
defenses, defense ``none`` included for the before-numbers) in
``<workdir>/clean<size>/``, sharing the trained models through ``--model-dir`` (default
``runs/models_<dataset>_<preset>``, the same cache as :mod:`experiments.attack_table`), and
writes ``comparison.md`` / ``comparison.json`` and a plot per size
(``comparison_clean<size>.png``, :func:`plot_comparison`) in ``<workdir>``:

* one table per clean-set size: a row per (attack, seed), a column per defense, each cell
  ``ACC / ASR / seconds`` after the defense (ACC and ASR in %, seconds of the defense alone,
  without the evaluations run between its rounds);
* the ratio of the fastest baseline's time to I-BAU's time per row and its median (the
  I-BAU paper reports the fastest baseline at least 13 times slower than I-BAU).

Resumable like every sweep: rerun the same command after an interruption.  With fewer
than 128 clean images the batch sizes of the defenses are capped (I-BAU and fine-tuning at
the clean-set size, the others at 64; ``--set`` can override).  DP-SGD uses no clean set (it
retrains on the poisoned training set), so its cells run in the first size's sweep and are
copied to the others (marked ``shared_from``).  ``--official`` adds rows for the I-BAU
paper's released models (:func:`official_cells`; saved in ``<workdir>/official/``).
``--merge DIR,DIR --out table.md`` joins finished work directories (attacks run with
settings of their own) into one table per size (:func:`merge`) and runs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shutil
import statistics
import sys
import textwrap
from typing import Any, Callable, Optional, Sequence

from experiments import pipeline
from ibau_jax import data as data_lib
from ibau_jax import files

DEFAULT_ATTACKS = ("badnets", "blend", "trojan_wm", "wanet", "sig")

# Defenses that do not use the defender's clean set: their cells are the same for every
# clean-set size, so they run once.
NO_CLEAN_SET = pipeline.NO_CLEAN_SET


def share_cells(source: pathlib.Path, dest: pathlib.Path, defenses: Sequence[str]) -> list[str]:
  """Copies the finished cells of ``defenses`` from sweep folder ``source`` to ``dest``
  where ``dest`` lacks them (marked ``shared_from``); returns the copied file names."""
  copied = []
  if not (source / "cells").is_dir():
    return copied
  for path in sorted((source / "cells").glob("*.json")):
    cell = json.loads(path.read_text())
    target = dest / "cells" / path.name
    if cell.get("defense") in defenses and not target.exists():
      target.parent.mkdir(parents=True, exist_ok=True)
      cell.setdefault("shared_from", source.name)
      files.atomic_write(target, json.dumps(cell))
      copied.append(path.name)
  return copied


# The six baselines the I-BAU paper compares with (its timing claim is about these);
# fine-tuning and ANP are this project's additions.
PAPER_BASELINES = ("nc", "tabor", "deepinspect", "fp", "nad", "dp")


def versus_ibau(before: dict, ibau: dict, other: dict) -> str:
  """I-BAU's cell against another defense's in the same row, by the defense effectiveness
  rating (BackdoorBench's DER, :func:`ibau_jax.metrics.defense_effectiveness_rating`:
  ``[max(0, ASR_before − ASR_after) − max(0, ACC_before − ACC_after) + 1] / 2``):
  ``"higher"``, ``"lower"`` or ``"equal"`` (I-BAU's DER against the other's, to 4 decimals,
  i.e. 0.02 points of ASR or ACC)."""
  from ibau_jax import metrics
  der = lambda c: round(metrics.defense_effectiveness_rating(before["acc"], before["asr"],
                                                             c["acc"], c["asr"]), 4)
  mine, theirs = der(ibau), der(other)
  return "higher" if mine > theirs else "lower" if mine < theirs else "equal"


# Below this ASR before the defense the attack did not take hold, and the defense
# effectiveness rating (which rewards the ASR drop) says nothing about the defense: the
# markdown marks such rows with NO_BACKDOOR_MARK and a footnote.
DER_MIN_ASR = 0.5
NO_BACKDOOR_MARK = "†"


def comparison(cells: Sequence[dict], defenses: Sequence[str]) -> tuple[list[dict], str]:
  """Rows ``{attack, seed, before, <defense>: {acc, asr, seconds}, ratio, paper_ratio,
  versus_ibau}`` and markdown.  ``ratio``: the fastest baseline's seconds over I-BAU's
  (``fastest_baseline`` names it); ``paper_ratio``: the same over the paper's six
  (:data:`PAPER_BASELINES`); ``versus_ibau``: ``{baseline: I-BAU's DER higher, lower or
  equal}`` (:func:`versus_ibau`) for the baselines that ran in the row.  The markdown ends
  with the verdicts counted per baseline over the rows; rows whose ASR before the defense
  is under :data:`DER_MIN_ASR` (the attack did not take hold, so DER is not meaningful) get
  :data:`NO_BACKDOOR_MARK` after their before-numbers and a footnote saying so."""
  by_row: dict[tuple, dict] = {}
  for c in cells:
    row = by_row.setdefault((c["attack"], c["seed"]), dict(attack=c["attack"], seed=c["seed"]))
    row["before"] = dict(acc=c["acc_before"], asr=c["asr_before"])
    row[c["defense"]] = dict(acc=c["acc_after"], asr=c["asr_after"],
                             seconds=c["defense_seconds"])
  shown = [d for d in defenses if d != "none"]
  baselines = [d for d in shown if d != "ibau"]
  rows = []
  for row in by_row.values():
    if "ibau" in row and row["ibau"]["seconds"] > 0:
      for key, names in (("", baselines), ("paper_", [d for d in baselines
                                                       if d in PAPER_BASELINES])):
        times = [(row[d]["seconds"], d) for d in names if d in row]
        if times:
          row[f"{key}fastest_baseline"] = min(times)[1]
          row[f"{key}ratio"] = min(times)[0] / row["ibau"]["seconds"]
    if "ibau" in row:
      row["versus_ibau"] = {d: versus_ibau(row["before"], row["ibau"], row[d])
                            for d in baselines if d in row}
    rows.append(row)

  def ratio_md(row, key):
    return (f"{row[key + 'ratio']:.1f} ({row[key + 'fastest_baseline']})"
            if key + "ratio" in row else "-")

  head = ("| attack | seed | before | " + " | ".join(shown) +
          " | fastest baseline / I-BAU time | the same, paper's six baselines |")
  lines = [head, "|" + "---|" * (len(shown) + 5)]
  marked = 0  # rows whose attack did not take hold
  for row in rows:
    cells_md = []
    for d in shown:
      v = row.get(d)
      cells_md.append("-" if v is None else
                      f"{100 * v['acc']:.1f} / {100 * v['asr']:.1f} / {v['seconds']:.0f}")
    mark = ""
    if row["before"]["asr"] < DER_MIN_ASR:
      mark = f" {NO_BACKDOOR_MARK}"
      marked += 1
    lines.append(f"| {row['attack']} | {row['seed']} | {100 * row['before']['acc']:.1f} / "
                 f"{100 * row['before']['asr']:.1f}{mark} | " + " | ".join(cells_md) +
                 f" | {ratio_md(row, '')} | {ratio_md(row, 'paper_')} |")
  for key, what in (("", "the fastest baseline's"), ("paper_", "the fastest of the paper's "
                                                                "six baselines'")):
    ratios = [r[key + "ratio"] for r in rows if key + "ratio" in r]
    if ratios:
      lines.append("")
      lines.append(f"Median ratio of {what} time to I-BAU's: "
                   f"{statistics.median(ratios):.1f} (over {len(ratios)} "
                   f"row{'s' * (len(ratios) != 1)}).")
  counts = []
  for d in baselines:
    verdicts = [r["versus_ibau"][d] for r in rows if d in r.get("versus_ibau", {})]
    if verdicts:
      parts = [f"{n} {v}" for v in ("higher", "lower", "equal") if (n := verdicts.count(v))]
      counts.append(f"`{d}` {', '.join(parts)}")
  if counts:
    lines.append("")
    lines.append("I-BAU's defense effectiveness rating (DER = [max(0, ASR drop) − max(0, ACC "
                 "drop) + 1] / 2) against each baseline's, rows counted: "
                 + "; ".join(counts) + ".")
  if marked:
    counted = " (the counts above include such rows)" if counts else ""
    lines.append("")
    lines.append(f"{NO_BACKDOOR_MARK} ASR before the defense under {100 * DER_MIN_ASR:.0f} %: "
                 f"the attack did not take hold, so the defense effectiveness rating (DER) "
                 f"of the defenses in a marked row is not meaningful{counted}.")
  return rows, "\n".join(lines) + "\n"


def scatter_points(rows: Sequence[dict]) -> list[tuple[str, dict[str, tuple[float, float]]]]:
  """What :func:`plot_comparison` draws: per row, its label (``attack`` and ``seed``) and
  ``{"before" or defense: (ACC %, ASR %)}``, defenses in the row's order (``none``, the
  before-numbers again, left out)."""
  out = []
  for row in rows:
    points = {"before": (100 * row["before"]["acc"], 100 * row["before"]["asr"])}
    for name, value in row.items():
      if isinstance(value, dict) and "seconds" in value and name != "none":
        points[name] = (100 * value["acc"], 100 * value["asr"])
    out.append((f"{row['attack']} (seed {row['seed']})", points))
  return out


def comparison_figures(report: dict[str, list[dict]]) -> dict[str, Any]:
  """The figures :func:`plot_comparison` saves: ``{size: matplotlib Figure}`` for every
  clean-set size with a row (the caller closes them).  Each figure is at least as wide as
  its title and its legend, whatever the number of panels."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels_by_size = {size: scatter_points(rows) for size, rows in report.items()}
  names = []
  for panels in panels_by_size.values():
    for _, points in panels:
      names += [n for n in points if n != "before" and n not in names]
  palette = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # grey is "before"
  colours = {n: palette[i % len(palette)] for i, n in enumerate(names)}
  figures = {}
  for size, panels in panels_by_size.items():
    if not panels:
      continue
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.4 * nrows + 0.6), squeeze=False)
    for ax, (label, points) in zip(axes.ravel(), panels):
      ax.plot(*points["before"], marker="X", color="grey", markersize=10, linestyle="")
      for name, (acc, asr) in points.items():
        if name == "before":
          continue
        ax.plot(acc, asr, marker="*" if name == "ibau" else "o", color=colours[name],
                markersize=13 if name == "ibau" else 8, linestyle="")
        ax.annotate(name, (acc, asr), fontsize=7, xytext=(3, 3), textcoords="offset points")
      ax.set_title(label, fontsize=10)
      ax.set_xlabel("ACC %")
      ax.set_ylabel("ASR %")
      ax.set_ylim(-4, 104)
      ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
      ax.axis("off")
    handles = [plt.Line2D([], [], marker="X", color="grey", linestyle="", label="before")] + [
        plt.Line2D([], [], marker="*" if n == "ibau" else "o", color=colours[n], linestyle="",
                   label=n) for n in names]
    legend = fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10),
                        fontsize=8)
    title = fig.suptitle(f"{size} clean images: ASR and ACC after each defense")
    # Text keeps its size in inches when the figure widens: one panel (4 inches) is
    # narrower than the title, and a legend of many defenses is wider than a few panels.
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    needed = max(t.get_window_extent(renderer).width for t in (title, legend)) / fig.dpi
    if needed + 0.4 > fig.get_figwidth():
      fig.set_figwidth(needed + 0.4)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    figures[size] = fig
  return figures


def plot_comparison(report: dict[str, list[dict]], stem: pathlib.Path) -> list[pathlib.Path]:
  """One figure per clean-set size, ``<stem>_clean<size>.png``: a panel per row (attack,
  seed) with ASR against ACC after each defense (up and left is bad, down and right is
  good; the grey cross is the model before any defense), each defense in the same colour in
  every panel (:func:`comparison_figures`).  Returns the written paths."""
  figures = comparison_figures(report)
  import matplotlib.pyplot as plt  # (after comparison_figures has chosen the backend)
  written = []
  try:
    for size, fig in figures.items():
      path = stem.parent / f"{stem.name}_clean{size}.png"
      pipeline.save_figure(fig, path)
      written.append(path)
  finally:
    for fig in figures.values():
      plt.close(fig)
  return written


def official_cells(config: pipeline.ExperimentConfig, models: Sequence[str],
                   reference_dir: str, data_dir: Optional[str], folder: pathlib.Path,
                   progress: bool = False, log=print) -> list[dict]:
  """Cells for the paper's released models (``../shared/reference/ibau_official``): every
  defense of ``config`` but DP-SGD (it retrains on the attacker's poisoned training set,
  which is not released), with ``config``'s defense settings and clean-set size, the clean
  set and evaluation images of :mod:`experiments.reproduce_official` (CIFAR-10: the last
  training images and the 1,000 pixel-exact test images).  Each cell is saved in
  ``folder`` as it finishes and skipped when the same command runs again; a saved cell
  made with other defense settings is refused.  The row's ``attack`` is ``official <model>``.
  """
  import jax
  from experiments import reproduce_official
  from ibau_jax import metrics

  cells = []
  for name in models:
    loaded = None
    for defense in config.defenses:
      if defense in NO_CLEAN_SET:
        continue
      path = folder / "cells" / f"{name}__{defense}.json"
      dconfig = None if defense == "none" else config.defense_config(defense)
      # What the defense computes: fields marked compare=False (callbacks, progress,
      # checkpoints, chunk sizes) say how it runs, not what it returns.
      settings = {} if dconfig is None else json.loads(json.dumps(
          {f.name: getattr(dconfig, f.name) for f in dataclasses.fields(dconfig)
           if f.compare}))
      if path.is_file():
        cell = json.loads(path.read_text())
        if cell["settings"] != settings or cell["clean_size"] != config.clean_size:
          raise ValueError(f"{path} was made with other settings; use another --workdir")
        log(f"[official {name}] {defense}: done earlier")
        cells.append(cell)
        continue
      if loaded is None:
        loaded = reproduce_official.load_model(argparse.Namespace(
            data_dir=data_dir, reference_dir=reference_dir, model=name), config.clean_size)
        apply_fn = pipeline._apply_fn(loaded.model)

        def evaluate(v, loaded=loaded, apply_fn=apply_fn):
          return {k: float(x) for k, x in metrics.evaluate(
              apply_fn, v, loaded.eval_x, loaded.eval_y, loaded.attack.apply,
              loaded.info["target"]).items()}

        before = evaluate(loaded.variables)
      log(f"[official {name}] {defense}")
      after, rounds, seconds = before, [], 0.0
      if defense != "none":
        after, rounds, seconds, _ = pipeline.run_defense(
            defense, dconfig, apply_fn, loaded.variables,
            loaded.clean_x, loaded.clean_y, jax.random.PRNGKey(0), evaluate,
            eval_every=config.eval_every, desc=f"{defense} official {name}",
            progress=progress, checkpoint_dir=folder / "partial" / f"{name}__{defense}")
      log(f"  ACC {after['acc']:.2%} ASR {after['asr']:.2%} ({seconds:.0f} s)")
      cell = dict(attack=f"official {name}", defense=defense, seed=0,
                  clean_size=config.clean_size, settings=settings,
                  acc_before=before["acc"], asr_before=before["asr"], ra_before=before["ra"],
                  acc_after=after["acc"], asr_after=after["asr"], ra_after=after["ra"],
                  defense_seconds=seconds, rounds=rounds)
      files.atomic_write(path, json.dumps(cell))
      shutil.rmtree(folder / "partial" / f"{name}__{defense}", ignore_errors=True)
      cells.append(cell)
  return cells


# Config fields that settings_note shows in words of its own, or that say which cells a
# sweep has rather than what they hold; preset_overrides lists the others.
_NOTED_FIELDS = ("dataset", "preset", "poison_ratio", "clean_size", "augment_triggered",
                 "attack_settings", "ibau", "ft", "defense_settings") + pipeline.SWEEP_EXTENT


def preset_overrides(config: pipeline.ExperimentConfig) -> dict[str, Any]:
  """The fields of ``config`` that differ from its preset's and that :func:`settings_note`
  does not show otherwise (the attacker's training as ``train.<field>``, the model, the
  data sizes, the target...), as ``{--set FIELD: value}`` in the config's field order."""
  base = pipeline.preset(config.preset, config.dataset)
  mine, theirs = config.to_dict(), base.to_dict()
  out = {}
  for key, value in mine.items():
    if key in _NOTED_FIELDS:
      continue
    if key == "train":
      # Through TrainConfig: a field left out of one dict is its default in both.
      train, preset_train = (json.loads(json.dumps(c.train_config().to_dict()))
                             for c in (config, base))
      out.update({f"train.{k}": v for k, v in train.items() if preset_train.get(k) != v})
    elif value != theirs.get(key):
      out[key] = value
  return out


def settings_note(config: pipeline.ExperimentConfig,
                  defenses: Optional[Sequence[str]] = None) -> str:
  """One markdown line with what a reader needs to rerun a table: the preset, the
  attacker's settings and every setting that differs from its config's default of the
  ``defenses`` in the table (default: ``config.defenses``, the last command's), then every
  other field that differs from the preset (:func:`preset_overrides`: training, model,
  data sizes), written as ``--set`` takes them."""
  defenses = config.defenses if defenses is None else defenses
  def fmt(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items()))
  parts = [f"preset `{config.preset}`", f"poison ratio {config.poison_ratio}",
           f"{config.clean_size} clean images"]
  if not config.augment_triggered:
    parts.append("triggered images not augmented")
  parts += [f"{name}: {fmt(v)}" for name, v in sorted(config.attack_settings.items()) if v]
  defense = {"ibau": config.ibau, "ft": config.ft, **config.defense_settings}
  parts += [f"`{name}` {fmt(v)}" for name, v in sorted(defense.items())
            if v and name in defenses]
  note = "Settings: " + "; ".join(parts) + "."
  overrides = preset_overrides(config)
  if overrides:
    note += " Changed from the preset: " + ", ".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()) + "."
  return note


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def merge(workdirs: Sequence[str | os.PathLike],
          warn: Callable[[str], None] = _warn) -> tuple[dict, str]:
  """The tables of several comparison work directories as one table per clean-set size.

  Attacks that need their own settings (WaNet without augmented triggers, SIG at another
  poison ratio) run in work directories of their own; this reads the finished cells of
  each (``<workdir>/clean<size>/cells`` and ``<workdir>/official/clean<size>/cells``) and
  its ``config.json``, and returns ``({size: rows}, markdown)`` as :func:`comparison` does,
  the medians taken over all rows, with each work directory's :func:`settings_note`.
  Columns follow the directories' ``--defenses`` order (the first directory's first); a
  size with no finished cell in any directory gets no table, and a directory with no
  finished cell at all (a comparison stopped before its first cell) is named to ``warn``.
  Raises ValueError if a directory holds no comparison, if none holds a finished cell, or
  if two hold the same cell (attack, seed, defense, clean-set size).
  """
  by_size: dict[int, list] = {}
  order: list[str] = []  # the sweeps' --defenses order, first directory first
  empty = []  # directories without a finished cell
  workdirs = [pathlib.Path(w) for w in workdirs]
  if not workdirs:
    raise ValueError("no work directory to merge")
  for workdir in workdirs:
    if not workdir.is_dir():
      raise ValueError(f"{workdir} is not a directory")
    found = contributes = False
    for config_path in sorted(workdir.glob("clean*/config.json")):
      folder = config_path.parent
      try:
        size = int(folder.name[len("clean"):])
      except ValueError:
        continue
      found = True
      config = pipeline.load_config(folder)
      cells = [json.loads(p.read_text()) for cells_dir in
               (folder / "cells", workdir / "official" / folder.name / "cells")
               for p in sorted(cells_dir.glob("*.json"))]
      if cells:  # a sweep that has not finished a cell yet adds no table and no note
        # The settings of every defense with a cell here: config.json holds the last
        # command's --defenses, and a directory may have been filled by several commands.
        note = settings_note(config, sorted({c["defense"] for c in cells}))
        by_size.setdefault(size, []).append((workdir, cells, note))
        contributes = True
      order += [d for d in config.defenses if d not in order]
    if not found:
      raise ValueError(f"{workdir} holds no comparison (no clean<size>/config.json)")
    if not contributes:
      empty.append(workdir)
  if len(empty) == len(workdirs):
    raise ValueError(f"no finished cell in {', '.join(map(str, workdirs))}: nothing to merge")
  order += [d for d in pipeline.defense_names() if d not in order]
  report, markdown = {}, []
  for size in sorted(by_size, reverse=True):
    seen: dict[tuple, pathlib.Path] = {}
    cells = []
    for workdir, sweep_cells, _ in by_size[size]:
      for c in sweep_cells:
        key = (c["attack"], c["seed"], c["defense"])
        if key in seen:
          raise ValueError(f"{workdir} and {seen[key]} both hold {key[0]} / {key[2]} / seed "
                           f"{key[1]} with {size} clean images; merge one of them")
        seen[key] = workdir
        cells.append(c)
    names = {c["defense"] for c in cells}
    defenses = [d for d in order if d in names] + sorted(names - set(order))
    rows, md = comparison(cells, defenses)
    report[str(size)] = rows
    notes = "\n".join(f"- `{w}`: {note}" for w, _, note in by_size[size])
    markdown.append(f"### {size} clean images\n\nCells: ACC % / ASR % / seconds after the "
                    f"defense.\n\n{md}\n{notes}\n")
  for workdir in empty:
    warn(f"{workdir} holds no finished cell (stopped before its first one?): it adds no row")
  return report, "\n".join(markdown)


def plain(text: str) -> str:
  """``text`` with its Sphinx markup removed, for the terminal: ``:mod:`x```, ``:func:`x```
  (any role) and double-backquoted literals become ``x``."""
  text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
  return re.sub(r"``([^`]+)``", r"\1", text)


#: Where ``--merge`` writes its table without ``--out`` (in the current directory).
MERGE_OUT = "comparison_merged.md"


def _parser() -> argparse.ArgumentParser:
  """The command line (help texts from this module's docstring, without its markup)."""
  defenses = [d for d in pipeline.defense_names() if d != "none"]
  warning = textwrap.fill(
      f"Run without arguments, it starts the full default sweep: {len(DEFAULT_ATTACKS)} "
      f"attacks x {len(defenses)} defenses at 5,000 and 100 clean images on the cpu preset, "
      f"training {len(DEFAULT_ATTACKS)} models first; that takes many hours on a CPU "
      "(docs/results.md: about 15 minutes per model, minutes to half an hour per defense "
      "cell).  Narrow it with --attacks, --defenses and --clean-sizes; --merge only joins "
      "finished work directories and runs nothing.", width=88)
  paragraphs = __doc__.split("\n\n")
  parser = argparse.ArgumentParser(prog="python -m experiments.compare_defenses",
                                   usage="%(prog)s [options]",
                                   description=plain(paragraphs[0]) + "\n\n" + warning,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=plain("\n\n".join(paragraphs[2:])))
  parser.add_argument("--dataset", default="cifar10", choices=sorted(pipeline.DATASETS),
                      help="the data set (default: %(default)s)")
  parser.add_argument("--preset", default="cpu", choices=pipeline.PRESETS,
                      help="settings preset: smoke (synthetic data, for checking that it "
                           "runs), cpu (the 2-core CPU budget) or paper (default: %(default)s)")
  parser.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS),
                      help="comma-separated attacks (default: %(default)s); '' with "
                           "--official: only the released models' rows")
  parser.add_argument("--defenses", default="all",
                      help="comma-separated defenses or 'all' (default: all, i.e. "
                           f"{','.join(defenses)}); 'none' (the before-numbers) is added")
  parser.add_argument("--clean-sizes", default="5000,100",
                      help="comma-separated sizes of the defender's clean set, one sweep "
                           "each (default: %(default)s)")
  parser.add_argument("--seeds", default="0",
                      help="comma-separated seeds, a row each (default: %(default)s)")
  parser.add_argument("--data-dir", default=None,
                      help=f"folder of the data sets (default: ${data_lib.DATA_DIR_ENV}; "
                           "the smoke preset needs none)")
  parser.add_argument("--workdir", default=None,
                      help="where the sweeps, tables and plots go (default: "
                           "runs/compare_<dataset>_<preset>)")
  parser.add_argument("--model-dir", default=None,
                      help="cache of trained models, shared with experiments.attack_table "
                           "(default: runs/models_<dataset>_<preset>)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, as in experiments.cifar10 --set; "
                           "repeatable (default: the preset's values)")
  parser.add_argument("--official", default="",
                      help="comma-separated released models of the I-BAU paper to add as rows "
                           "(e.g. badnets_8_02; from --reference-dir; every defense but dp; "
                           "default: none)")
  parser.add_argument("--reference-dir", default="../shared/reference/ibau_official",
                      help="the released models for --official (default: %(default)s)")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bars (default: shown)")
  parser.add_argument("--merge", default=None, metavar="DIR,DIR",
                      help="comma-separated finished work directories: write their tables as "
                           "one (to --out) and run nothing (default: run the sweep)")
  parser.add_argument("--out", default=None,
                      help=f"with --merge: the markdown file; the JSON and the plots, "
                           f"<name>_clean<size>.png, go next to it (default: {MERGE_OUT} in "
                           f"the current directory)")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.out is not None and args.merge is None:
    parser.error("--out is only used with --merge (a sweep writes comparison.md in --workdir)")
  if args.merge is not None:
    sweep_flags = [f"--{a.dest.replace('_', '-')}" for a in parser._actions  # pylint: disable=protected-access
                   if a.dest not in ("help", "merge", "out")
                   and getattr(args, a.dest) != a.default]
    if sweep_flags:
      parser.error(f"--merge reads finished work directories; {', '.join(sweep_flags)} "
                   "would be ignored (run the sweep first, then merge)")
    workdirs = [w for w in args.merge.split(",") if w.strip()]
    if not workdirs:
      parser.error("--merge: no work directory given (comma-separated work directories)")
    out = pathlib.Path(args.out or MERGE_OUT)
    if out.suffix == ".json":
      parser.error(f"--out {out}: the JSON goes next to the markdown ({out.stem}.json); "
                   "give the markdown file's name")
    try:
      report, markdown = merge(workdirs)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    files.atomic_write(out.with_suffix(".json"), json.dumps(report, indent=1))
    files.atomic_write(out, markdown)
    written = [out, out.with_suffix(".json")] + plot_comparison(report, out.with_suffix(""))
    print(markdown)
    # (On stderr: stdout is the table.)
    print("wrote " + ", ".join(str(p.resolve()) for p in written), file=sys.stderr)
    return 0
  from experiments import reproduce_official
  official = [m for m in args.official.split(",") if m]
  for m in official:
    if m not in reproduce_official.MODELS:
      parser.error(f"--official: unknown model {m!r}; choose from {reproduce_official.MODELS}")
    dataset = "cifar10" if m.startswith("badnets") else "gtsrb"
    if dataset != args.dataset:
      parser.error(f"--official {m} is a {dataset} model; this comparison is on {args.dataset}")
  attacks = [a for a in args.attacks.split(",") if a]
  if not attacks and not official:
    parser.error("--attacks: give at least one attack (or --official models)")
  if official and not (pathlib.Path(args.reference_dir) / "models.json").is_file():
    parser.error(f"--reference-dir {args.reference_dir} has no models.json")
  defenses = pipeline.defense_names() if args.defenses == "all" else args.defenses.split(",")
  if "none" not in defenses:
    defenses = defenses + ["none"]
  try:
    sizes = [int(s) for s in args.clean_sizes.split(",")]
  except ValueError:
    parser.error(f"--clean-sizes must be comma-separated integers, got {args.clean_sizes!r}")
  workdir = pathlib.Path(args.workdir or f"runs/compare_{args.dataset}_{args.preset}")
  model_dir = args.model_dir or f"runs/models_{args.dataset}_{args.preset}"
  try:
    # One comparison per work directory (its sweeps' own folders are locked as well).
    with files.locked(workdir, hint=pipeline.BUSY_HINT):
      return _sweep(args, attacks, official, defenses, sizes, workdir, model_dir)
  except files.FolderBusy as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _sweep(args: argparse.Namespace, attacks: list[str], official: list[str],
           defenses: list[str], sizes: list[int], workdir: pathlib.Path, model_dir: str) -> int:
  """Runs (or resumes) the sweep of every clean-set size; writes and prints the tables."""
  report, markdown = {}, []
  for i, size in enumerate(sizes):
    extra = [f"clean_size={size}"]
    if size < 128:
      # Every batch must fit in the clean set (DP-SGD's batches come from the poisoned
      # training set instead).  Every registered defense gets the cap, listed or not, so
      # that the settings do not depend on the list and a sweep resumed with more
      # defenses is the same configuration.
      extra += [f"ibau.batch_size={size}", f"ft.batch_size={size}"] + [
          f"{d}.batch_size={min(size, 64)}" for d in pipeline.defense_names()
          if d not in ("ibau", "ft", "none") + NO_CLEAN_SET]
    sweep = argparse.Namespace(attack=",".join(attacks) or None, defense=",".join(defenses),
                               seeds=args.seeds, preset=args.preset, set=extra + args.set)
    try:
      config = pipeline.config_from_args(args.dataset, sweep)
      pipeline.check_workdir(config, workdir / f"clean{size}")  # before copying cells in
      for earlier in sizes[:i]:
        share_cells(workdir / f"clean{earlier}", workdir / f"clean{size}", NO_CLEAN_SET)
      cells = pipeline.run(config, workdir / f"clean{size}", data_dir=args.data_dir,
                           model_dir=model_dir, progress=not args.no_progress) if attacks else []
      if official:
        cells = cells + official_cells(
            config, official, args.reference_dir,
            args.data_dir or os.environ.get(data_lib.DATA_DIR_ENV),
            workdir / "official" / f"clean{size}", progress=not args.no_progress)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    rows, md = comparison(cells, defenses)
    report[str(size)] = rows
    markdown.append(f"### {size} clean images\n\nCells: ACC % / ASR % / seconds after the "
                    f"defense.\n\n{md}\n{settings_note(config)}\n")
  files.atomic_write(workdir / "comparison.json", json.dumps(report, indent=1))
  files.atomic_write(workdir / "comparison.md", "\n".join(markdown))
  plot_comparison(report, workdir / "comparison")
  print()
  print("\n".join(markdown))
  return 0


if __name__ == "__main__":
  sys.exit(main())
