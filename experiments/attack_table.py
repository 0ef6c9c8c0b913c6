"""The attack table: a clean model and one poisoned model per attack, ACC / ASR / minutes.

    python -m experiments.attack_table --data-dir ../shared/data

trains (or reuses) small-VGG16 with the ``cpu`` preset on CIFAR-10 for a clean model and for
each attack (badnets, blend, trojan_sq, trojan_wm, l0_inv, l2_inv, smooth, wanet, sig and
BadNets all-to-all; poison ratio 0.1, target 8), evaluates every model on the 10,000 test
images and writes ``attack_table.md`` / ``attack_table.json`` in the work directory, with
the two acceptance checks of each row:

* ASR >= 90 % (all-to-all: >= 80 %; the clean row reports the BadNets trigger's ASR on the
  clean model, for reference, and is not checked);
* clean accuracy within 3 points of the clean model's.

It is one sweep of :mod:`experiments.pipeline` with the defense ``none``, so it is resumable
(rerun the same command after an interruption) and its models land in ``--model-dir``
(default ``runs/models_<dataset>_<preset>``), where the defense sweeps find them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Optional, Sequence

from experiments import pipeline
from ibau_jax import files

#: The table's rows, in training order (the models later experiments need come first).
ATTACKS = ("clean", "badnets", "wanet", "blend", "trojan_wm", "sig", "trojan_sq", "l0_inv",
           "l2_inv", "smooth", "badnets_all_to_all")
ASR_MIN = 0.90
ASR_MIN_ALL_TO_ALL = 0.80
ACC_TOLERANCE = 0.03


def table(cells: Sequence[dict]) -> tuple[list[dict], str]:
  """Rows (with the checks) and their markdown, from pipeline cells with defense ``none``."""
  clean = next((c for c in cells if c["attack"] == "clean"), None)
  rows = []
  for c in cells:
    row = dict(attack=c["attack"], seed=c["seed"], acc=c["acc_before"], asr=c["asr_before"],
               ra=c["ra_before"], poisoned=c["poisoned"], minutes=c["train_seconds"] / 60)
    if c["attack"] != "clean":
      floor = ASR_MIN_ALL_TO_ALL if c["attack"] == "badnets_all_to_all" else ASR_MIN
      row["asr_ok"] = row["asr"] >= floor
      row["acc_ok"] = None if clean is None else abs(row["acc"] - clean["acc_before"]) <= \
          ACC_TOLERANCE
    rows.append(row)
  lines = ["| attack | seed | poisoned images | ACC % | ASR % | RA % | minutes | "
           "ASR >= 90 (80) | ACC within 3 of clean |", "|---|---|---|---|---|---|---|---|---|"]
  mark = {True: "yes", False: "NO", None: "-"}
  for r in rows:
    lines.append(f"| {r['attack']} | {r['seed']} | {r['poisoned']} | {100 * r['acc']:.2f} | "
                 f"{100 * r['asr']:.2f} | {100 * r['ra']:.2f} | {r['minutes']:.1f} | "
                 f"{mark[r.get('asr_ok')]} | {mark[r.get('acc_ok')]} |")
  return rows, "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.attack_table",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", default="cifar10", choices=sorted(pipeline.DATASETS),
                      help="default: cifar10")
  parser.add_argument("--preset", default="cpu", choices=pipeline.PRESETS,
                      help="training preset, as in experiments.cifar10 (default: cpu)")
  parser.add_argument("--attacks", default=",".join(ATTACKS),
                      help="comma-separated attacks (default: all rows, clean first)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the poisoning and the training (default: 0)")
  parser.add_argument("--data-dir", default=None,
                      help="folder with the .npz arrays (default: $IBAU_DATA_DIR)")
  parser.add_argument("--workdir", default=None,
                      help="default: runs/attack_table_<dataset>_<preset>")
  parser.add_argument("--model-dir", default=None,
                      help="default: runs/models_<dataset>_<preset>")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, as in experiments.cifar10 --set")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  sweep = argparse.Namespace(attack=args.attacks, defense="none", seeds=str(args.seed),
                             preset=args.preset, set=args.set)
  try:
    config = pipeline.config_from_args(args.dataset, sweep)
  except ValueError as e:
    parser.error(str(e))
  workdir = pathlib.Path(args.workdir or f"runs/attack_table_{args.dataset}_{args.preset}")
  model_dir = args.model_dir or f"runs/models_{args.dataset}_{args.preset}"
  try:
    cells = pipeline.run(config, workdir, data_dir=args.data_dir, model_dir=model_dir,
                         progress=not args.no_progress)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rows, markdown = table(cells)
  files.atomic_write(workdir / "attack_table.json", json.dumps(
      dict(config=config.to_dict(), rows=rows), indent=1))
  files.atomic_write(workdir / "attack_table.md", markdown)
  print()
  print(markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main())
