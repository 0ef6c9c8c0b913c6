"""Does a patch optimised inside the window the inner problem points at tell a defender
whether a round of I-BAU worked?

    python benchmarks/window_signal.py --data-dir ../shared/data --model badnets_8_02 \\
        --rounds-dir runs/s20_r0/s1 --out runs/window_signal.json

Session 20 found that after a round that removed most but not all of the paper's CIFAR-10
BadNets backdoor (7-32 % ASR left), a stamp cut from the input model's inner solution δ₀ no
longer works: what is left answers the exact white patch only.  This script gives the
defender more freedom inside a small region: on the ORIGINAL model it solves the inner
problem once (the paper's pass) and takes the ``w × w`` window where ``Σ_c δ₀²`` sums to the
most; the suspect class is where δ₀ sends most clean images.  For each model (the original
and every saved round of ``benchmarks/round_signals.py --save-dir``) it then fits a pattern
``p ∈ [0, 1]^{w×w×C}`` (:func:`ibau_jax.probe.fit_window`: ``p = sigmoid(u)``, Adam 0.1,
``--steps`` batches of 100 of the first ``--fit-images`` clean images) that replaces the window,

    x' = (1 − m_w) ⊙ x + m_w ⊙ p,      minimising  mean CE(f(x'), suspect),

and reports the share of the last ``--signal-images`` clean images (held out from the fit;
not already predicted as the suspect) that ``x'`` sends to the suspect, next to the real
trigger's ASR on the evaluation images (which the defender cannot compute).  Two fits per
model: from mid-grey (``cold``), and from the pattern fitted on the original model
(``warm``, as ``IBAUConfig.repair_epochs`` does), which follows what is left of the trigger.
Session 21 (docs/results.md): cold fits read 0.01-0.04 after every round 0, warm fits
0.01 / 0.10 / 0.17 where the real ASR was 0.2 / 7 / 20 %.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import flax.serialization
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ibau_jax  # noqa: E402
from ibau_jax import files  # noqa: E402
from ibau_jax import metrics  # noqa: E402
from ibau_jax import probe  # noqa: E402
from benchmarks.trigger_probe import _predict, solve  # noqa: E402
from experiments import reproduce_official as ro  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ro.add_model_args(parser)
  parser.add_argument("--rounds-dir", action="append", default=[])
  parser.add_argument("--windows", default="5,7")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--fit-images", type=int, default=500)
  parser.add_argument("--signal-images", type=int, default=1000)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  m = ro.load_model(args)
  apply_fn = m.model.apply
  fit_x = np.asarray(m.clean_x[:args.fit_images])
  sig_x = np.asarray(m.clean_x[-args.signal_images:])  # held out from the fit
  pseudo = _predict(apply_fn, m.variables, m.clean_x)
  delta = np.asarray(solve(ibau_jax.IBAUConfig.official(), apply_fn, m.variables, m.clean_x,
                           pseudo, 1))
  after = probe.predict(apply_fn, m.variables, sig_x + delta)
  before = probe.predict(apply_fn, m.variables, sig_x)
  counts = np.bincount(after[after != before], minlength=int(after.max()) + 1)
  suspect = int(counts.argmax())
  real = np.any(np.asarray(m.attack.apply(m.eval_x[:1]))[0] != m.eval_x[0], axis=-1)
  windows = {}
  for w in [int(v) for v in args.windows.split(",")]:
    corner = probe.best_window(delta, w)
    mask = probe.window_mask(delta.shape, corner, w)
    windows[w] = dict(corner=list(corner), mask=mask,
                      on_trigger=int(np.sum(mask[..., 0] * real)))
  print(f"suspect {suspect}; windows "
        + ", ".join(f"{w}: at {d['corner']}, {d['on_trigger']} of {int(real.sum())} trigger px"
                    for w, d in windows.items()), flush=True)
  fit = lambda v, d, init=None: probe.fit_window(apply_fn, v, fit_x, d["mask"], suspect,
                                                 init=init, steps=args.steps)
  share = lambda v, d, u: probe.window_share(apply_fn, v, sig_x, d["mask"], u, suspect)
  for d in windows.values():
    d["u0"] = fit(m.variables, d)

  def signals(variables):
    out = {}
    for w, d in windows.items():
      out[f"cold{w}"] = share(variables, d, fit(variables, d))
      out[f"warm{w}"] = share(variables, d, fit(variables, d, d["u0"]))
    return out

  rows = []

  def record(name, variables):
    ev = metrics.evaluate(apply_fn, variables, m.eval_x, m.eval_y, m.attack.apply,
                          m.info["target"])
    rows.append(dict(name=name, **ev, window=signals(variables)))
    r = rows[-1]
    print(f"{name}: ACC {r['acc']:.2%} ASR {r['asr']:.2%} | "
          + " ".join(f"{w}: {v:.3f}" for w, v in r["window"].items()), flush=True)
    files.atomic_write(pathlib.Path(args.out), json.dumps(dict(
        model=args.model, suspect=suspect,
        windows={w: dict(corner=d["corner"], on_trigger=d["on_trigger"])
                 for w, d in windows.items()}, rows=rows), indent=1))

  record("original", m.variables)
  for folder in args.rounds_dir:
    for path in sorted(pathlib.Path(folder).glob("round_*.msgpack"),
                       key=lambda f: int(f.stem.split("_")[1])):
      if path.stem == "round_-1":
        continue
      record(f"{folder}/{path.stem}",
             flax.serialization.from_bytes(m.variables, path.read_bytes()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
