"""What does plain unlearning of a perturbation cost?  Fine-tuning an official model on clean
images, part of each batch stamped with (a) nothing, (b) the REAL trigger, (c) a universal
perturbation found by L2 PGD.

    python benchmarks/trigger_unlearning.py --data-dir ../shared/data \\
        --reference-dir ../shared/reference/ibau_official --model badnets_8_02 \\
        --out runs/trigger_unlearning.json

No implicit term: each variant is ``--rounds`` passes over the 5,000 clean images of
``experiments.reproduce_official`` in batches of 100, Adam (``--lr``), true labels, the first
``--fraction`` of every batch replaced by its stamped version (clipped to [0, 1]).  For (c)
the perturbation is recomputed at the start of every round on the current model (untargeted,
against the model's own predictions, normalised steps of length C/5 projected on the L2 ball
of radius C, one pass).  It prints ACC / ASR / RA after every round.  (b) is the best a
trigger-recovering defense can do with this recipe; the gap between (b) and (c) is what a
wrong δ costs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ibau_jax import metrics  # noqa: E402
from experiments import reproduce_official as ro  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ro.add_model_args(parser)
  parser.add_argument("--lr", type=float, default=1e-4)
  parser.add_argument("--fraction", type=float, default=0.2)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--bounds", default="3,5", help="L2 radii C of the PGD variants")
  parser.add_argument("--out", default="runs/trigger_unlearning.json")
  args = parser.parse_args(argv)
  m = ro.load_model(args)
  info, model, variables, attack = m.info, m.model, m.variables, m.attack
  clean_x, clean_y, eval_x, eval_y = m.clean_x, m.clean_y, m.eval_x, m.eval_y
  rest = {k: x for k, x in variables.items() if k != "params"}
  n, bsz = len(clean_y) // 100 * 100, 100
  stamped = int(round(args.fraction * bsz))

  def ce(params, x, y):
    logits = model.apply({"params": params, **rest}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  pseudo = np.concatenate([np.asarray(jnp.argmax(model.apply(variables, clean_x[i:i + 500]), -1))
                           for i in range(0, n, 500)])
  delta_grad = jax.jit(jax.grad(lambda d, p, x, y: -ce(p, x + d, y)))

  def pgd(params, bound):
    delta = jnp.zeros(clean_x.shape[1:], jnp.float32)
    for i in range(0, n, bsz):
      g = delta_grad(delta, params, clean_x[i:i + bsz], pseudo[i:i + bsz])
      delta = delta - (bound / 5) * g / (jnp.linalg.norm(g) + 1e-12)
      delta = delta * jnp.minimum(1.0, bound / jnp.linalg.norm(delta))
    return np.asarray(delta)

  triggered = np.asarray(attack.apply(jnp.asarray(clean_x)))
  variants = {"clean only": None, "real trigger": "trigger"}
  variants.update({f"PGD C={b}": float(b) for b in args.bounds.split(",")})
  rows = []
  for name, how in variants.items():
    tx = optax.adam(args.lr)
    params = variables["params"]
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
      g = jax.grad(ce)(params, x, y)
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state

    for r in range(args.rounds if isinstance(how, float) else 1):
      delta = pgd(params, how) if isinstance(how, float) else None
      for i in range(0, n, bsz):
        x = np.array(clean_x[i:i + bsz])
        if how == "trigger":
          x[:stamped] = triggered[i:i + stamped]
        elif delta is not None:
          x[:stamped] = np.clip(x[:stamped] + delta, 0.0, 1.0)
        params, state = step(params, state, x, clean_y[i:i + bsz])
      m = metrics.evaluate(model.apply, {"params": params, **rest}, eval_x, eval_y,
                           attack.apply, info["target"])
      row = dict(variant=name, round=r, **{k: float(v) for k, v in m.items()})
      rows.append(row)
      print(f"{args.model} {name} round {r}: ACC {row['acc']:.2%} ASR {row['asr']:.2%} "
            f"RA {row['ra']:.2%}", flush=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(model=args.model, lr=args.lr, fraction=args.fraction,
                                 rows=rows), indent=1))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
