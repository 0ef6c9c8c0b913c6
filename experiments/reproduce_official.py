"""Reproduce I-BAU on the three poisoned models released with the paper.

    python -m experiments.reproduce_official --data-dir ../shared/data \\
        --reference-dir ../shared/reference/ibau_official

For each model (CIFAR-10 BadNets, GTSRB BadNets, GTSRB l0_inv) and each configuration
(``official``: :meth:`ibau_jax.IBAUConfig.official`, one round; ``default``:
``ibau_jax.IBAUConfig()``) and seed, it measures clean accuracy (ACC), attack success rate on
triggered non-target images (ASR) and robust accuracy (RA) before and after unlearning (and
after every round), the seconds spent, and writes ``results.json`` / ``results.md`` in
``--out``.  Finished cells are skipped when the command is run again, and a cell that was
killed resumes after its last finished round (its I-BAU state and per-round metrics are kept
in ``--out/partial/`` while it runs), so an interrupted run loses at most one round.  One
run at a time per ``--out`` (a second one stops with an error).

Data protocol (fixed, independent of the unlearning seed):

* CIFAR-10: the clean set is the last 5,000 training images (indices 45,000-49,999);
  evaluation on the 1,000 pixel-exact test images (see ``../shared/data/README.md``).
* GTSRB: a permutation of the 12,630 test images with seed 0; its first 5,000 images are the
  clean set, the other 7,630 the evaluation set.

Runtime on a 2-core CPU: about 105 s per official round and 145 s per default round (two
inner solutions), plus evaluation: about 45 minutes for one seed of both configurations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
import types
from typing import Optional

import jax
import numpy as np

import ibau_jax
from ibau_jax import data as data_lib
from ibau_jax import files
from ibau_jax import metrics
from ibau_jax.attacks import badnets as badnets_lib
from ibau_jax.attacks import l0_inv as l0_inv_lib
from ibau_jax.models import get_model
from ibau_jax.models import torch_import

MODELS = ("badnets_8_02", "gtsrbbadnets_8_02", "gtsrbl0_inv_0_02")
CONFIGS = ("official", "default")


def _clean_size_limit(dataset: str, data_dir: str) -> int:
  """The largest clean set of ``dataset``: CIFAR-10's training set (the clean set is its
  last images), GTSRB's test set less one evaluation image."""
  if dataset == "cifar10":
    return len(data_lib.load("cifar10", "train", data_dir=data_dir, download=False))
  return len(data_lib.load("gtsrb", "test", data_dir=data_dir, download=False)) - 1


def _split(dataset: str, data_dir: str, clean_size: int):
  """Returns ``(clean_x, clean_y, eval_x, eval_y)`` as float32 images and int32 labels."""
  if isinstance(clean_size, bool) or not isinstance(clean_size, (int, np.integer)) \
      or not 1 <= clean_size <= _clean_size_limit(dataset, data_dir):
    raise ValueError(f"clean_size must be an integer in [1, "
                     f"{_clean_size_limit(dataset, data_dir)}] for {dataset}, got {clean_size!r}")
  if dataset == "cifar10":
    train = data_lib.load("cifar10", "train", data_dir=data_dir, download=False)
    test = data_lib.load("cifar10", "test", data_dir=data_dir, download=False)
    exact = test.extras["exact"]
    clean = slice(len(train) - clean_size, len(train))
    return (data_lib.to_float(train.images[clean]), train.labels[clean],
            data_lib.to_float(test.images[exact]), test.labels[exact])
  test = data_lib.load("gtsrb", "test", data_dir=data_dir, download=False)
  order = np.random.RandomState(0).permutation(len(test))
  clean, rest = order[:clean_size], order[clean_size:]
  return (data_lib.to_float(test.images[clean]), test.labels[clean],
          data_lib.to_float(test.images[rest]), test.labels[rest])


def _attack(info: dict, reference_dir: pathlib.Path):
  if info["attack"] == "badnets":
    return badnets_lib.BadNets(target=info["target"])
  return l0_inv_lib.from_files(reference_dir / "mask.npy", reference_dir / "l0_inv.png",
                               target=info["target"])


def add_model_args(parser: argparse.ArgumentParser) -> None:
  """The options the benchmarks on one official model share."""
  parser.add_argument("--data-dir", default=os.environ.get(data_lib.DATA_DIR_ENV))
  parser.add_argument("--reference-dir", default="../shared/reference/ibau_official")
  parser.add_argument("--model", default="badnets_8_02", choices=MODELS)


def load_model(args: argparse.Namespace, clean_size: int = 5000) -> types.SimpleNamespace:
  """One official model with this module's clean / evaluation split: ``info``, ``clean_x``,
  ``clean_y``, ``eval_x``, ``eval_y``, ``classes``, ``model`` (Flax), ``variables``,
  ``attack``, ``reference`` (for the benchmarks; options from :func:`add_model_args`)."""
  if not args.data_dir:
    raise SystemExit("--data-dir (or $IBAU_DATA_DIR) is required")
  reference = pathlib.Path(args.reference_dir)
  info = json.loads((reference / "models.json").read_text())[args.model]
  clean_x, clean_y, eval_x, eval_y = _split(info["dataset"], args.data_dir, clean_size)
  classes = 10 if info["dataset"] == "cifar10" else 43
  return types.SimpleNamespace(
      info=info, clean_x=clean_x, clean_y=clean_y, eval_x=eval_x, eval_y=eval_y,
      classes=classes, model=get_model("small_vgg16", classes), reference=reference,
      variables=torch_import.load_torch_state(reference / f"{args.model}.npz", "small_vgg16"),
      attack=_attack(info, reference))


def _config(name: str, overrides: dict) -> ibau_jax.IBAUConfig:
  base = ibau_jax.IBAUConfig.official() if name == "official" else ibau_jax.IBAUConfig()
  return base.replace(**overrides)


def _tuples(value):
  """JSON lists as (nested) tuples, as the config's tuple fields want them."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# IBAUConfig's functions and the checkpoint folder (set per cell): not settings.
_NOT_SETTINGS = ("callback", "progress", "checkpoint_dir")


def _parse_overrides(items: list[str]) -> dict:
  fields = {f.name: f for f in dataclasses.fields(ibau_jax.IBAUConfig)}
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or key not in fields or key in _NOT_SETTINGS:
      raise SystemExit(f"--set expects FIELD=VALUE with FIELD one of "
                       f"{sorted(k for k in fields if k not in _NOT_SETTINGS)}; got {item!r}")
    try:  # numbers, true/false, null, lists; anything else is a string (e.g. solver=cg)
      out[key] = _tuples(json.loads(value))
    except json.JSONDecodeError:
      out[key] = value
  return out


def _fields(config: ibau_jax.IBAUConfig) -> dict:
  """The settings a row records and is compared by (not the callback or the checkpoint
  folder, which do not change the result)."""
  return {k: v for k, v in dataclasses.asdict(config).items()
          if k not in _NOT_SETTINGS and not callable(v)}


def run_cell(model_name: str, config_name: str, seed: int, *, data_dir: str,
             reference_dir: pathlib.Path, clean_size: int, overrides: dict,
             log=print, checkpoint_dir: Optional[pathlib.Path] = None) -> dict:
  """Unlearns one reference model with one configuration and seed; returns the result row.

  With ``checkpoint_dir``, I-BAU saves its state there after every round
  (``IBAUConfig.checkpoint_dir``) and the per-round metrics go to ``rounds.json`` beside it,
  so a killed cell resumes after its last finished round with the same result; the folder
  is emptied when the cell returns.
  """
  info = json.loads((reference_dir / "models.json").read_text())[model_name]
  clean_x, clean_y, eval_x, eval_y = _split(info["dataset"], data_dir, clean_size)
  num_classes = 10 if info["dataset"] == "cifar10" else 43
  model = get_model("small_vgg16", num_classes)
  variables = torch_import.load_torch_state(reference_dir / f"{model_name}.npz", "small_vgg16")
  attack = _attack(info, reference_dir)

  def evaluate(v):
    return metrics.evaluate(model.apply, v, eval_x, eval_y, attack.apply, info["target"])

  before = evaluate(variables)
  log(f"[{model_name} {config_name} seed {seed}] before: ACC {before['acc']:.2%} "
      f"ASR {before['asr']:.2%} RA {before['ra']:.2%}")
  records = files.RoundRecords(
      None if checkpoint_dir is None else pathlib.Path(checkpoint_dir) / files.ROUNDS_FILE, "round")

  def callback(r, stats, v):
    if v is None:
      # A round the checkpoint replays: its variables were not kept, its metrics were
      # (unless the run was killed while evaluating it).
      records.append({**stats, **records.restored(r, ("acc", "asr", "ra"))})
      log(f"[{model_name} {config_name} seed {seed}] round {r}: restored from "
          f"{checkpoint_dir}")
      return
    m = evaluate(v)
    records.append({**stats, **m})
    log(f"[{model_name} {config_name} seed {seed}] round {r}: ACC {m['acc']:.2%} "
        f"ASR {m['asr']:.2%} RA {m['ra']:.2%} |δ| {stats['delta_norm']:.2f} "
        f"residual {stats['residual_mean']:.3g} δ from solver {stats['inner_choice']} "
        f"(locality {', '.join(f'{v:.2f}' for v in stats['candidate_locality'])}) "
        + _stamp_text(stats) + f"({stats['seconds']:.1f} s)")

  def progress(done, total):
    if done < total:
      log(f"[{model_name} {config_name} seed {seed}] repairs: step {done}/{total} done")

  config = _config(config_name, overrides).replace(
      callback=callback, progress=progress, checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir))
  start = time.perf_counter()
  result = ibau_jax.unlearn(model.apply, variables, clean_x, clean_y, config,
                            key=jax.random.PRNGKey(seed))
  unlearn_seconds = sum(h["seconds"] for h in result.history)
  wall = time.perf_counter() - start
  # The returned variables: the last round's with select="last" unless a repair (the patch
  # repair or the warp repair) ran, not with "probe"/"average".
  rounds = records.records
  repaired = any(info is not None and info["active"] for info in (result.repair, result.warp))
  after = (rounds[-1] if config.select == "last" and "acc" in rounds[-1] and not repaired
           else evaluate(result.variables))
  if result.repair is not None:
    rep = result.repair
    log(f"[{model_name} {config_name} seed {seed}] repair: window {rep['size']}x{rep['size']} "
        f"at {tuple(rep['corner'])}, input-model share {rep['input_share']:.3f} -> "
        + (f"shares {', '.join(f'{v:.3f}' for v in rep['shares'])}; after: ACC "
           f"{after['acc']:.2%} ASR {after['asr']:.2%} RA {after['ra']:.2%}"
           if rep["active"] else "inactive") + f" ({rep['seconds']:.1f} s)")
  if result.warp is not None:
    warp = result.warp
    log(f"[{model_name} {config_name} seed {seed}] warp repair: class {warp['target']}, "
        f"input-model share {warp['input_share']:.3f} -> "
        + (f"shares {', '.join(f'{v:.3f}' for v in warp['shares'])}; after: ACC "
           f"{after['acc']:.2%} ASR {after['asr']:.2%} RA {after['ra']:.2%}"
           if warp["active"] else "inactive") + f" ({warp['seconds']:.1f} s)")
  records.remove()
  return dict(model=model_name, dataset=info["dataset"], attack=info["attack"],
              target=info["target"], config=config_name, seed=seed,
              config_fields=_fields(config),
              clean_size=clean_size, eval_size=int(len(eval_y)),
              acc_before=before["acc"], asr_before=before["asr"], ra_before=before["ra"],
              acc_after=after["acc"], asr_after=after["asr"], ra_after=after["ra"],
              der=metrics.defense_effectiveness_rating(before["acc"], before["asr"],
                                                       after["acc"], after["asr"]),
              unlearn_seconds=unlearn_seconds, wall_seconds_with_eval=wall, rounds=rounds,
              stamp=result.stamp, repair=result.repair, warp=result.warp)


def _stamp_text(stats: dict) -> str:
  """The stamp check of ``IBAUConfig.retries`` in a round's log line ('' without it)."""
  if "stamp_share" not in stats:
    return ""
  shares = [f"{d['stamp_share']:.3f}" for d in stats["retried"]]
  return (f"stamp share {stats['stamp_share']:.3f}"
          + (f" (retried after {', '.join(shares)})" if shares else "") + " ")


def markdown_table(rows: list[dict]) -> str:
  head = ("| model | config | seed | ACC before | ASR before | RA before | ACC after | "
          "ASR after | RA after | DER | unlearn s |\n|" + "---|" * 11)
  lines = [head]
  for r in rows:
    lines.append(f"| {r['model']} | {r['config']} | {r['seed']} | {r['acc_before']:.2%} | "
                 f"{r['asr_before']:.2%} | {r['ra_before']:.2%} | {r['acc_after']:.2%} | "
                 f"{r['asr_after']:.2%} | {r['ra_after']:.2%} | {r['der']:.3f} | "
                 f"{r['unlearn_seconds']:.0f} |")
  return "\n".join(lines).replace("%", " %")


def _run_cells(parser, cells, configs, args, reference_dir, overrides, out) -> list[dict]:
  """Runs the cells not in ``out/results.json`` yet, rewriting it after each; a cell's
  rounds are checkpointed in ``out/partial/<cell>`` while it runs.  Returns all rows."""
  results_path = out / "results.json"
  rows = json.loads(results_path.read_text())["rows"] if results_path.exists() else []

  def fields(config_name):
    return json.loads(json.dumps(_fields(
        _config(config_name, overrides if config_name == "default" else {}))))

  # A row counts as done only if it was made with the same configuration fields (rows of
  # earlier versions also recorded checkpoint_dir, always None, and lack the fields added
  # since, which ran at their defaults then).
  wanted = {name: fields(name) for name in configs}
  defaults = json.loads(json.dumps({f.name: f.default
                                    for f in dataclasses.fields(ibau_jax.IBAUConfig)
                                    if f.default is not dataclasses.MISSING}))
  stale = [r for r in rows if r["config"] in wanted
           and {k: v for k, v in {**defaults, **json.loads(json.dumps(r["config_fields"]))}.items()
                if k in wanted[r["config"]]} != wanted[r["config"]]]
  if stale:
    parser.error(f"{results_path} holds {len(stale)} row(s) made with a different "
                 f"configuration (e.g. {stale[0]['model']} {stale[0]['config']} seed "
                 f"{stale[0]['seed']}); use another --out")
  done = {(r["model"], r["config"], r["seed"]) for r in rows}
  for model_name, config_name, seed in cells:
    if (model_name, config_name, seed) in done:
      print(f"[{model_name} {config_name} seed {seed}] done already, skipped")
      continue
    partial = out / "partial" / f"{model_name}__{config_name}__seed{seed}"
    row = run_cell(model_name, config_name, seed, data_dir=args.data_dir,
                   reference_dir=reference_dir, clean_size=args.clean_size,
                   overrides=overrides if config_name == "default" else {},
                   log=lambda s: print(s, flush=True), checkpoint_dir=partial)
    rows.append(row)
    payload = dict(rows=rows, versions=dict(ibau_jax=ibau_jax.__version__,
                                            jax=jax.__version__,
                                            python=sys.version.split()[0]),
                   device=str(jax.devices()[0]))
    files.atomic_write(results_path, json.dumps(payload, indent=1))
    files.atomic_write(out / "results.md", markdown_table(rows) + "\n")
    shutil.rmtree(partial, ignore_errors=True)
  try:
    (out / "partial").rmdir()
  except OSError:  # absent, or holds another run's cells
    pass
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.reproduce_official",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--data-dir", default=os.environ.get(data_lib.DATA_DIR_ENV),
                      help=f"folder of the .npz arrays (default: ${data_lib.DATA_DIR_ENV})")
  parser.add_argument("--reference-dir", required=True,
                      help="folder with the official models, models.json, mask.npy, l0_inv.png")
  parser.add_argument("--models", default=",".join(MODELS),
                      help=f"comma-separated model names (default: all: {','.join(MODELS)})")
  parser.add_argument("--configs", default=",".join(CONFIGS),
                      help="comma-separated, from: official (the paper's code), default "
                           "(IBAUConfig()) (default: both)")
  parser.add_argument("--seeds", default="0",
                      help="comma-separated non-negative integer seeds (default: 0)")
  parser.add_argument("--official-seeds", default=None,
                      help="seeds for the official config (default: the first of --seeds)")
  parser.add_argument("--clean-size", type=int, default=5000,
                      help="the defender's clean images (default: 5000)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override an IBAUConfig field of the default config, e.g. rounds=2 "
                           "(values are JSON; repeat for several fields)")
  parser.add_argument("--out", default="runs/reproduce_official",
                      help="output folder (default: runs/reproduce_official)")
  args = parser.parse_args(argv)

  def seed_list(text, flag):
    try:
      values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
      values = None
    if not values or any(v < 0 for v in values):
      parser.error(f"{flag} must be comma-separated non-negative integers, got {text!r}")
    return values

  if not args.data_dir or not pathlib.Path(args.data_dir).is_dir():
    parser.error(f"--data-dir {args.data_dir!r} is not a folder (or set "
                 f"${data_lib.DATA_DIR_ENV})")
  reference_dir = pathlib.Path(args.reference_dir)
  if not (reference_dir / "models.json").is_file():
    parser.error(f"--reference-dir {reference_dir} has no models.json")
  models = [m for m in args.models.split(",") if m]
  configs = [c for c in args.configs.split(",") if c]
  for m in models:
    if m not in MODELS:
      parser.error(f"unknown model {m!r}; choose from {MODELS}")
  for c in configs:
    if c not in CONFIGS:
      parser.error(f"unknown config {c!r}; choose from {CONFIGS}")
  seeds = seed_list(args.seeds, "--seeds")
  official_seeds = (seed_list(args.official_seeds, "--official-seeds")
                    if args.official_seeds is not None else seeds[:1])
  overrides = _parse_overrides(args.set)
  try:
    _config("default", overrides)
  except (TypeError, ValueError) as e:
    parser.error(f"--set: {e}")
  if args.clean_size < 1:
    parser.error(f"--clean-size must be a positive integer, got {args.clean_size}")
  models_json = json.loads((reference_dir / "models.json").read_text())
  missing = [m for m in models if m not in models_json]
  if missing:
    parser.error(f"{reference_dir / 'models.json'} does not describe {missing}")
  for dataset in sorted({models_json[m]["dataset"] for m in models}):
    limit = _clean_size_limit(dataset, args.data_dir)
    if args.clean_size > limit:
      parser.error(f"--clean-size {args.clean_size} exceeds the {limit} images {dataset} "
                   "has for it")

  out = pathlib.Path(args.out)
  cells = [(m, c, s) for s in seeds for m in models for c in configs
           if c == "default" or s in official_seeds]
  cells += [(m, "official", s) for s in official_seeds if s not in seeds for m in models
            if "official" in configs]
  try:
    # One run per output folder: a second would redo the same cells from the same
    # checkpoints and overwrite the first's results.
    with files.locked(out, hint="another reproduction is running in it: wait for it, or "
                      "use another --out"):
      rows = _run_cells(parser, cells, configs, args, reference_dir, overrides, out)
  except files.FolderBusy as e:
    parser.exit(2, f"error: {e}\n")
  print(markdown_table(rows))
  print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
