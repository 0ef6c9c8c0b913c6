"""Does averaging the parameters of several I-BAU rounds keep the backdoor out?

    python benchmarks/round_average.py --data-dir ../shared/data --model badnets_8_02 \\
        --rounds-dir runs/rounds_cifar_s1_cur --sets 1-4,2-4,0-4

Reads the per-round variables that ``benchmarks/round_signals.py --save-dir`` wrote and
evaluates (ACC / ASR / RA on the evaluation images of ``experiments.reproduce_official``)
each saved round and the uniform average of the parameters of each set of rounds (other
collections, e.g. BatchNorm statistics, are those of the first round of the set; I-BAU does
not change them).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import flax.serialization
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ibau_jax import metrics  # noqa: E402
from experiments import reproduce_official as ro  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ro.add_model_args(parser)
  parser.add_argument("--rounds-dir", required=True)
  parser.add_argument("--sets", default="1-4", help="comma-separated first-last round ranges")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  m = ro.load_model(args)
  info, eval_x, eval_y, model, attack = m.info, m.eval_x, m.eval_y, m.model, m.attack
  template = m.variables
  folder = pathlib.Path(args.rounds_dir)
  saved = {int(f.stem.split("_")[1]): flax.serialization.from_bytes(template, f.read_bytes())
           for f in folder.glob("round_*.msgpack")}
  rows = []

  def evaluate(name, v):
    m = metrics.evaluate(model.apply, v, eval_x, eval_y, attack.apply, info["target"])
    rows.append(dict(name=name, **{k: float(x) for k, x in m.items()}))
    print(f"{name}: ACC {m['acc']:.2%} ASR {m['asr']:.2%} RA {m['ra']:.2%}", flush=True)

  for r in sorted(saved):
    evaluate(f"round {r}", saved[r])
  for spec in args.sets.split(","):
    first, last = (int(x) for x in spec.split("-"))
    chosen = [saved[r] for r in range(first, last + 1)]
    params = jax.tree_util.tree_map(lambda *p: np.mean(np.stack(p), 0),
                                    *[v["params"] for v in chosen])
    evaluate(f"average of rounds {first}-{last}", {**chosen[0], "params": params})
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
