"""Does the inner problem find the real trigger?  Norm bound C versus the official models.

    python benchmarks/trigger_probe.py --data-dir ../shared/data \\
        --reference-dir ../shared/reference/ibau_official --bounds 1,2,3,5,10 \\
        --out runs/trigger_probe.json

For each official model and each L2 radius C, it solves I-BAU's inner problem once on the
5,000 clean images of ``experiments.reproduce_official`` (δ from zero, ``max_δ mean CE(f(x+δ),
ŷ)`` with the model's own predictions ŷ) with two of the library's inner solvers:

* ``pgd``: L2 projected gradient ascent, normalised steps of length C/5, projected every
  step (``inner_optimizer="normalized"``, ``inner_projection="step"``), ``--epochs`` passes;
* ``paper``: the paper's pass (SGD lr 10 on the unconstrained objective, one projection on
  the ball at the end);
* ``paper+pgd``: ``pgd`` started from the ``paper`` solution instead of zero.

and reports, on the evaluation images whose label is not the target: the fraction that
``x + δ`` sends to the target class (``to_target``), the most frequent predicted class and
its share, and the fraction of δ's energy ``Σ δ²`` on the pixels the real trigger changes
(``on_trigger``; a δ spread evenly would put ``uniform`` there).  A δ with most of its
energy on the trigger's few pixels has found the trigger; one spread over the image that
sends everything to another class is a generic universal adversarial perturbation, and
unlearning it need not remove the backdoor.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ibau_jax  # noqa: E402
from ibau_jax import data as data_lib  # noqa: E402
from ibau_jax import ibau as ibau_lib  # noqa: E402
from ibau_jax.models import get_model  # noqa: E402
from ibau_jax.models import torch_import  # noqa: E402
from experiments import reproduce_official as ro  # noqa: E402


def _predict(apply_fn, variables, images, batch=500):
  return np.concatenate([np.asarray(jnp.argmax(apply_fn(variables, images[i:i + batch]), -1))
                         for i in range(0, len(images), batch)])


def solve(config: ibau_jax.IBAUConfig, apply_fn, variables, images, labels, epochs: int,
          start=None):
  """δ after ``epochs`` passes of ``config``'s inner solver (batches of
  ``config.batch_size``, in order) from ``start`` (default 0), projected on the ball at the
  end."""
  rest = {k: v for k, v in variables.items() if k != "params"}
  return ibau_lib._inner_pass(config, apply_fn, variables["params"], rest, images, labels,
                              epochs, start)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", default=os.environ.get(data_lib.DATA_DIR_ENV))
  parser.add_argument("--reference-dir", default="../shared/reference/ibau_official")
  parser.add_argument("--models", default=",".join(ro.MODELS))
  parser.add_argument("--bounds", default="1,2,3,5,10")
  parser.add_argument("--epochs", type=int, default=2, help="passes of the PGD solver")
  parser.add_argument("--solvers", default="pgd,paper,paper+pgd")
  parser.add_argument("--out", default="runs/trigger_probe.json")
  args = parser.parse_args(argv)
  if not args.data_dir:
    parser.error("--data-dir (or $IBAU_DATA_DIR) is required")
  reference = pathlib.Path(args.reference_dir)
  bounds = [float(c) for c in args.bounds.split(",")]
  infos = json.loads((reference / "models.json").read_text())
  rows = []
  for name in args.models.split(","):
    info = infos[name]
    clean_x, _, eval_x, eval_y = ro._split(info["dataset"], args.data_dir, 5000)
    classes = 10 if info["dataset"] == "cifar10" else 43
    model = get_model("small_vgg16", classes)
    variables = torch_import.load_torch_state(reference / f"{name}.npz", "small_vgg16")
    attack = ro._attack(info, reference)
    target = info["target"]
    changed = np.asarray(attack.apply(jnp.asarray(eval_x[:500]))) - eval_x[:500]
    support = np.abs(changed).sum(axis=(0, 3)) > 1e-6
    pseudo = _predict(model.apply, variables, clean_x)
    keep = eval_y != target
    for bound in bounds:
      pgd = ibau_jax.IBAUConfig(norm_bound=bound, inner_optimizer="normalized",
                                inner_lr=bound / 5, inner_projection="step",
                                inner_candidates=())
      paper = ibau_jax.IBAUConfig.official(norm_bound=bound)
      for solver in args.solvers.split(","):
        start = time.perf_counter()
        if solver == "pgd":
          delta = solve(pgd, model.apply, variables, clean_x, pseudo, args.epochs)
        elif solver == "paper":
          delta = solve(paper, model.apply, variables, clean_x, pseudo, 1)
        elif solver == "paper+pgd":
          delta = solve(pgd, model.apply, variables, clean_x, pseudo, args.epochs,
                        start=solve(paper, model.apply, variables, clean_x, pseudo, 1))
        else:
          parser.error(f"unknown solver {solver!r}")
        delta = np.asarray(delta)
        pred = _predict(model.apply, variables, eval_x[keep] + delta)
        counts = np.bincount(pred, minlength=classes)
        energy = (delta ** 2).sum(-1)
        row = dict(model=name, bound=bound, solver=solver, norm=float(np.sqrt(energy.sum())),
                   to_target=float(np.mean(pred == target)), top_class=int(counts.argmax()),
                   top_share=float(counts.max() / keep.sum()),
                   on_trigger=float(energy[support].sum() / energy.sum()),
                   uniform=float(support.mean()), seconds=time.perf_counter() - start)
        rows.append(row)
        print(f"{name} C={bound:g} {solver:5s}: to target {row['to_target']:.3f}, top class "
              f"{row['top_class']} ({row['top_share']:.3f}), energy on trigger pixels "
              f"{row['on_trigger']:.3f} (uniform {row['uniform']:.3f})", flush=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(rows=rows, epochs=args.epochs, jax=jax.__version__), indent=1))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
