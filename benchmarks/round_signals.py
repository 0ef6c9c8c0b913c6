"""Can a defender tell, after each I-BAU round, whether the backdoor is still there?

    python benchmarks/round_signals.py --data-dir ../shared/data \\
        --model gtsrbbadnets_8_02 --seed 0 --set hypergrad_batch=current \\
        --out runs/round_signals_gtsrb_s0.json

The ASR of I-BAU's rounds is not monotone (docs/results.md): the backdoor can come back in a
later round.  A defender who could see that would return the best round instead of the last.
This script runs :func:`ibau_jax.unlearn` on one official model (the protocol of
``experiments.reproduce_official``; ``--set`` overrides on top of ``IBAUConfig()``) and,
before the first round and after every round, records

* what the defender cannot see: ACC / ASR / RA on the evaluation images;
* what the defender can compute from the clean set alone:

  - ``clean_acc``: accuracy on the clean set (which the rounds train on);
  - for each radius C of ``--bounds``: a universal perturbation found by L2 PGD from zero
    (normalised steps of length C/5, projected every step, ``--epochs`` passes over the first
    ``--signal-images`` clean images, maximising CE against the model's own predictions), and
    on those images: ``flip`` (share whose prediction it changes), ``top_share`` (share of
    the images not already predicted as the most frequent new class that it sends there),
    ``top_class`` and the mean CE.

A backdoored model has a small universal perturbation that sends nearly every image to
one class (the trigger is one); if ``top_share`` at a small C tracks the ASR over the rounds,
it is a defender-side signal for choosing the round.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ibau_jax  # noqa: E402
from ibau_jax import files  # noqa: E402
from ibau_jax import metrics  # noqa: E402
from ibau_jax import probe  # noqa: E402
from benchmarks.trigger_probe import _predict, solve  # noqa: E402
from experiments import reproduce_official as ro  # noqa: E402


def targeted(apply_fn, variables, images, target, bound, epochs) -> float:
  """:func:`ibau_jax.probe.targeted_success` with batches of 100."""
  return probe.targeted_success(apply_fn, variables, images, target, bound=bound,
                                epochs=epochs)


@functools.partial(jax.jit, static_argnums=(0,))
def _mask_step(apply_fn, variables, wts, opt_state, x, target, cost):
  import optax
  tx = optax.adam(0.1)

  def loss(w):
    mask, pattern = jax.nn.sigmoid(w[0]), jax.nn.sigmoid(w[1])
    logits = apply_fn(variables, (1 - mask) * x + mask * pattern)
    ce = jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, target])
    return ce + cost * jnp.sum(mask)

  g = jax.grad(loss)(wts)
  updates, opt_state = tx.update(g, opt_state)
  return optax.apply_updates(wts, updates), opt_state


def fit_mask(apply_fn, variables, images, target, steps=300, cost=1e-2, batch=100):
  """A Neural-Cleanse-style trigger for ``target`` at a FIXED L1 cost: (mask (H, W, 1),
  pattern (H, W, C)) in [0, 1] minimising CE(target) + cost * |mask|_1 (Adam 0.1,
  ``steps`` batches)."""
  import optax
  h, w, c = images.shape[1:]
  wts = (jnp.full((h, w, 1), -3.0), jnp.zeros((h, w, c)))
  opt_state = optax.adam(0.1).init(wts)
  n = len(images)
  for s in range(steps):
    i = (s * batch) % (n - batch + 1)
    wts, opt_state = _mask_step(apply_fn, variables, wts, opt_state,
                                jnp.asarray(images[i:i + batch]), target, cost)
  return jax.nn.sigmoid(wts[0]), jax.nn.sigmoid(wts[1])


def mask_probe(apply_fn, variables, images, target, steps=300, cost=1e-2, batch=100) -> dict:
  """:func:`fit_mask`'s mask L1 norm and the share of images (not predicted ``target``)
  its trigger sends to ``target``."""
  mask, pattern = fit_mask(apply_fn, variables, images, target, steps, cost, batch)
  stamped = np.asarray((1 - mask) * images + mask * pattern)
  before, after = _predict(apply_fn, variables, images), _predict(apply_fn, variables, stamped)
  keep = before != target
  return dict(l1=float(jnp.sum(mask)), success=float(np.mean(after[keep] == target)))


def signals(apply_fn, variables, images, bounds, epochs, num_classes, suspect=None) -> dict:
  """The defender-side numbers above for one model (``images``: the signal subset)."""
  pseudo = _predict(apply_fn, variables, images)
  out = {}
  if suspect is not None:
    for bound in bounds:
      out[f"to_suspect_C{bound:g}"] = targeted(apply_fn, variables, images, suspect, bound,
                                               epochs)
    return out
  if isinstance(bounds, dict):  # the offline study: relative probes and the mask probe
    suspect_class, others = bounds["suspect"], bounds["others"]
    for bound in bounds["radii"]:
      own = targeted(apply_fn, variables, images, suspect_class, bound, epochs)
      rest = [targeted(apply_fn, variables, images, k, bound, epochs) for k in others]
      out[f"C{bound:g}"] = dict(suspect=own, others=rest,
                                relative=own / max(float(np.mean(rest)), 1e-3))
    for cost in bounds["costs"]:
      out[f"mask_cost{cost:g}"] = mask_probe(apply_fn, variables, images, suspect_class,
                                             cost=cost)
    return out
  for bound in bounds:
    pgd = ibau_jax.IBAUConfig(norm_bound=bound, inner_optimizer="normalized",
                              inner_lr=bound / 5, inner_projection="step", inner_candidates=())
    delta = np.asarray(solve(pgd, apply_fn, variables, images, pseudo, epochs))
    logits = np.concatenate([np.asarray(apply_fn(variables, images[i:i + 500] + delta))
                             for i in range(0, len(images), 500)])
    pred = logits.argmax(-1)
    counts = np.bincount(pred[pred != pseudo], minlength=num_classes)
    top = int(counts.argmax())
    ce = float(np.mean(jax.nn.logsumexp(logits, -1) - logits[np.arange(len(pseudo)), pseudo]))
    out[f"C{bound:g}"] = dict(flip=float(np.mean(pred != pseudo)), top_class=top,
                              top_share=float(np.mean(pred[pseudo != top] == top)), ce=ce)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ro.add_model_args(parser)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="IBAUConfig field on top of the default (as in reproduce_official)")
  parser.add_argument("--bounds", default="1,2,4")
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--signal-images", type=int, default=1000)
  parser.add_argument("--out", required=True)
  parser.add_argument("--save-dir", default=None,
                      help="also write each round's variables there (round_<r>.msgpack), for "
                           "studying further signals without rerunning the rounds")
  parser.add_argument("--no-signals", action="store_true",
                      help="only ACC / ASR / clean-set ACC (with --save-dir)")
  parser.add_argument("--from-dir", default=None,
                      help="offline: read round_<r>.msgpack from this folder (a --save-dir) "
                           "and compute the relative and mask probes for each")
  parser.add_argument("--suspect", type=int, default=None)
  parser.add_argument("--others", default="", help="comma-separated classes to compare with")
  parser.add_argument("--costs", default="0.01")
  args = parser.parse_args(argv)
  m = ro.load_model(args)
  info, classes, model, variables, attack = m.info, m.classes, m.model, m.variables, m.attack
  clean_x, clean_y, eval_x, eval_y = m.clean_x, m.clean_y, m.eval_x, m.eval_y
  bounds = [float(c) for c in args.bounds.split(",")]
  sig_x = clean_x[:args.signal_images]
  out = pathlib.Path(args.out)
  rows = []

  suspect = []

  def record(r, v, stats=None):
    start = time.perf_counter()
    m = metrics.evaluate(model.apply, v, eval_x, eval_y, attack.apply, info["target"])
    clean_acc = float(np.mean(_predict(model.apply, v, clean_x) == clean_y))
    if args.save_dir:
      folder = pathlib.Path(args.save_dir)
      folder.mkdir(parents=True, exist_ok=True)
      files.atomic_write(folder / f"round_{r}.msgpack",
                         flax.serialization.to_bytes(jax.device_get(v)))
    sig = {} if args.no_signals else signals(model.apply, v, sig_x, bounds, args.epochs,
                                             classes)
    if not suspect and sig:  # the class the first universal perturbation sends most images to
      suspect.append(max(sig.values(), key=lambda s: s["top_share"])["top_class"])
    if suspect:
      sig.update(signals(model.apply, v, sig_x, bounds, args.epochs, classes, suspect[0]))
    row = dict(round=r, acc=m["acc"], asr=m["asr"], ra=m["ra"], clean_acc=clean_acc,
               suspect=suspect[0] if suspect else None, signals=sig,
               **({k: stats[k] for k in ("inner_loss", "inner_choice", "residual_mean", "delta_norm",
                                         "seconds") if k in stats} if stats else {}))
    row["signal_seconds"] = time.perf_counter() - start
    rows.append(row)
    sig = "; ".join(f"{k}: flip {s['flip']:.3f} top {s['top_class']} {s['top_share']:.3f} "
                    f"CE {s['ce']:.2f}" if isinstance(s, dict) else f"{k} {s:.3f}"
                    for k, s in row["signals"].items())
    print(f"round {r}: ACC {m['acc']:.2%} ASR {m['asr']:.2%} clean-set ACC {clean_acc:.2%} | "
          f"{sig} ({row['signal_seconds']:.0f} s)", flush=True)
    files.atomic_write(out, json.dumps(dict(model=args.model, seed=args.seed, set=args.set,
                                            bounds=bounds, rows=rows), indent=1))

  if args.from_dir:
    study = dict(suspect=args.suspect, others=[int(k) for k in args.others.split(",") if k],
                 radii=bounds, costs=[float(c) for c in args.costs.split(",")])
    for path in sorted(pathlib.Path(args.from_dir).glob("round_*.msgpack"),
                       key=lambda f: int(f.stem.split("_")[1])):
      r = int(path.stem.split("_")[1])
      v = flax.serialization.from_bytes(variables, path.read_bytes())
      start = time.perf_counter()
      m = metrics.evaluate(model.apply, v, eval_x, eval_y, attack.apply, info["target"])
      sig = signals(model.apply, v, sig_x, study, args.epochs, classes)
      rows.append(dict(round=r, acc=m["acc"], asr=m["asr"], signals=sig))
      rounded = lambda x: ({k: rounded(y) for k, y in x.items()} if isinstance(x, dict) else
                           [rounded(y) for y in x] if isinstance(x, list) else round(x, 3))
      print(f"round {r}: ACC {m['acc']:.2%} ASR {m['asr']:.2%} | " + "; ".join(
          f"{k}: {rounded(v_)}" for k, v_ in sig.items())
          + f" ({time.perf_counter() - start:.0f} s)", flush=True)
      files.atomic_write(out, json.dumps(dict(model=args.model, study=study, rows=rows),
                                         indent=1))
    return 0
  record(-1, variables)
  config = ro._config("default", ro._parse_overrides(args.set)).replace(
      callback=lambda r, stats, v: record(r, v, stats))
  ibau_jax.unlearn(model.apply, variables, clean_x, clean_y, config,
                   key=jax.random.PRNGKey(args.seed))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
