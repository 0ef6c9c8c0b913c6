"""Does a patch cut out of the inner problem's δ tell a defender whether a round worked?

    python benchmarks/stamp_signal.py --data-dir ../shared/data --model badnets_8_02 \\
        --rounds-dir runs/s20_r0/s1 --out runs/stamp_signal_s1.json

Sessions 5 and 18 (docs/results.md) looked for a number, computed from clean images only,
that tells a round of I-BAU that removed the backdoor from one that did not: PGD and
Neural-Cleanse-style probes towards the suspect class ranked the rounds wrongly on the
paper's CIFAR-10 BadNets model (a round can make the model resist universal and
patch-shaped perturbations in general while the real patch still works).  This script tries
a probe that is closer to a stamped trigger.  On the ORIGINAL model it solves the inner
problem once (the paper's pass: SGD lr 10 on the clean set with the model's own predictions,
projected on the L2 ball of radius 10) and cuts a stamp out of the solution δ₀: the ``k``
pixel locations where ``Σ_c δ₀²`` is largest, each channel set to 1 where δ₀ > 0 and to 0
elsewhere (the sign of δ₀, saturated), so that

    stamp_k(x) = (1 − m_k) ⊙ x + m_k ⊙ 1[δ₀ > 0].

The suspect class is where ``stamp_k`` sends most clean images on the original model.
For the original model and each saved round (``round_<r>.msgpack`` of
``benchmarks/round_signals.py --save-dir``), it reports the share of the first
``--signal-images`` clean images (those not already predicted as the suspect) that
``stamp_k`` sends to the suspect, next to the real trigger's ASR on the evaluation images
(which the defender cannot compute), and how many of the stamp's pixels the real trigger
changes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import flax.serialization
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ibau_jax  # noqa: E402
from ibau_jax import files  # noqa: E402
from ibau_jax import metrics  # noqa: E402
from ibau_jax import probe  # noqa: E402
from benchmarks.round_signals import fit_mask  # noqa: E402
from benchmarks.trigger_probe import _predict, solve  # noqa: E402
from experiments import reproduce_official as ro  # noqa: E402


def stamp(delta: np.ndarray, k: int):
  """:func:`ibau_jax.probe.cut_stamp` with ``k`` locations."""
  return probe.cut_stamp(delta, share=k / (delta.shape[0] * delta.shape[1]))


def nc_stamp(apply_fn, variables, images, target, steps, cost):
  """A Neural-Cleanse-style trigger for ``target`` (soft mask, pattern) at a fixed L1 cost."""
  return tuple(np.asarray(a) for a in fit_mask(apply_fn, variables, images, target, steps,
                                               cost))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ro.add_model_args(parser)
  parser.add_argument("--rounds-dir", action="append", default=[])
  parser.add_argument("--ks", default="8,16,32,64")
  parser.add_argument("--signal-images", type=int, default=1000)
  parser.add_argument("--nc-target", type=int, default=None)
  parser.add_argument("--nc-steps", type=int, default=300)
  parser.add_argument("--nc-cost", type=float, default=0.01)
  parser.add_argument("--own-stamp", action="store_true",
                      help="also cut a stamp from the paper's pass on each round's model")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  m = ro.load_model(args)
  apply_fn = m.model.apply
  sig_x = m.clean_x[:args.signal_images]
  pseudo = _predict(apply_fn, m.variables, m.clean_x)
  delta = np.asarray(solve(ibau_jax.IBAUConfig.official(), apply_fn, m.variables, m.clean_x,
                           pseudo, 1))
  ks = [int(k) for k in args.ks.split(",")]
  stamps = {k: stamp(delta, k) for k in ks}
  if args.nc_target is not None:
    stamps["nc"] = nc_stamp(apply_fn, m.variables, sig_x, args.nc_target, args.nc_steps,
                            args.nc_cost)
    ks = ks + ["nc"]
    print(f"nc mask L1 {float(np.sum(stamps['nc'][0])):.1f}")
  real = np.any(np.asarray(m.attack.apply(m.eval_x[:1]))[0] != m.eval_x[0], axis=-1)
  overlap = {k: float(np.sum(stamps[k][0][..., 0] * real)) for k in ks}
  print(f"real trigger: {int(real.sum())} pixels; stamp pixels on it: {overlap}")

  def shares(variables, suspect=None):
    out = {}
    for k, (mask, pattern) in stamps.items():
      target, share = probe.stamp_share(apply_fn, variables, sig_x, mask, pattern,
                                        suspect[k] if suspect else None)
      out[k] = dict(target=target, share=share)
    return out

  original = shares(m.variables)
  suspect = {k: s["target"] for k, s in original.items()}
  rows = [dict(name="original", **metrics.evaluate(apply_fn, m.variables, m.eval_x, m.eval_y,
                                                   m.attack.apply, m.info["target"]),
               stamp=original)]

  def show(row):
    print(f"{row['name']}: ACC {row['acc']:.2%} ASR {row['asr']:.2%} | " + " ".join(
        f"k={k}: {s['share']:.3f}" for k, s in row["stamp"].items()), flush=True)

  show(rows[0])
  for folder in args.rounds_dir:
    for path in sorted(pathlib.Path(folder).glob("round_*.msgpack"),
                       key=lambda f: int(f.stem.split("_")[1])):
      if path.stem == "round_-1":
        continue
      v = flax.serialization.from_bytes(m.variables, path.read_bytes())
      ev = metrics.evaluate(apply_fn, v, m.eval_x, m.eval_y, m.attack.apply, m.info["target"])
      row = dict(name=f"{folder}/{path.stem}", **ev, stamp=shares(v, suspect))
      if args.own_stamp:  # a stamp cut from the paper's pass on this round's model
        own = np.asarray(solve(ibau_jax.IBAUConfig.official(), apply_fn, v, m.clean_x,
                               _predict(apply_fn, v, m.clean_x), 1))
        for k in ks[:len(ks) - ("nc" in stamps)]:
          mask, pattern = stamp(own, k)
          top, _ = probe.stamp_share(apply_fn, v, sig_x, mask, pattern)
          row[f"own_k{k}"] = dict(
              to_suspect=probe.stamp_share(apply_fn, v, sig_x, mask, pattern, suspect[k])[1],
              top=top, on_trigger=float(np.sum(mask[..., 0] * real)))
        print("  own stamp:", {k: v_ for k, v_ in row.items() if k.startswith("own")})
      rows.append(row)
      show(rows[-1])
      files.atomic_write(pathlib.Path(args.out), json.dumps(
          dict(model=args.model, overlap=overlap, suspect=suspect,
               delta_norm=float(jnp.linalg.norm(delta)), rows=rows), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
