"""Seconds per step of the defenses' inner loops: a compiled ``lax.scan`` over steps versus
one compiled step per Python iteration.

    python benchmarks/loops.py --out runs/bench_loops.json

XLA:CPU runs weight gradients inside while-loop bodies much more slowly than the same
program outside a loop, so on CPU the I-BAU rounds, DeepInspect, Neural Cleanse's
unlearning and DP-SGD loop in Python (their ``loop="auto"``).  This measures, on
small-VGG16 (the ``cpu`` preset's model, random weights) with random CIFAR-shaped images:

* ``dp``: one DP-SGD step (per-example gradients of a batch of 128, clipping, noise);
* ``nc_unlearning``: one Neural Cleanse unlearning step (batch 32, the ``cpu`` preset's);
* ``nc_reverse``: one step of Neural Cleanse's reverse engineering (10 classes x 32
  images; gradients with respect to the masks and patterns only, which stays a scan);
* ``anp``: one ANP iteration (batch 128; gradients with respect to the masks only).

Each is timed as a scan over ``--steps`` steps and as ``--steps`` calls of the one-step
program (for ``nc_reverse`` and ``anp``, which have no separate step program, a scan of
length 1), after a warm-up call (compilation excluded).  Timing does not depend on pixel
values.  The JSON holds the seconds per step for both and their ratio, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time


def _time(fn, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn())
  return (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=4, help="steps per timed scan")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--only", default="dp,nc_unlearning,nc_reverse,anp")
  parser.add_argument("--out", default="runs/bench_loops.json")
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from ibau_jax.defenses import anp, dp, nc
  from ibau_jax.models import get_model

  model = get_model("small_vgg16", 10, dropout_rates=(0.0, 0.0, 0.0))
  apply_fn = lambda v, x: model.apply(v, x, train=False)
  rng = np.random.RandomState(0)
  n = 512
  images = jnp.asarray(rng.rand(n, 32, 32, 3).astype(np.float32))
  labels = jnp.asarray((np.arange(n) % 10).astype(np.int32))
  variables = jax.device_get(model.init(jax.random.PRNGKey(0), images[:1], train=False))
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  key = jax.random.PRNGKey(1)
  steps = args.steps
  results = {}

  def record(name, scan_fn, step_fn, batch):
    scan = _time(scan_fn, args.repeats) / steps
    python = _time(step_fn, args.repeats) / steps
    results[name] = dict(batch=batch, scan_seconds_per_step=scan,
                         python_seconds_per_step=python, scan_over_python=scan / python)
    print(f"{name}: scan {scan:.2f} s/step, python loop {python:.2f} s/step "
          f"({scan / python:.1f}x)", flush=True)

  wanted = args.only.split(",")
  if "dp" in wanted:
    config = dp.DPConfig(batch_size=128)
    state = dp._tx(config.learning_rate, config.momentum).init(params)
    idx = (jnp.arange(steps * 128) % n).reshape(steps, 128)
    keys = jax.random.split(key, steps)
    record("dp",
           lambda: dp._epoch(config.replace(loop="scan"), apply_fn, params, state, rest, images,
                             labels, idx, keys),
           lambda: dp._epoch(config.replace(loop="python"), apply_fn, params, state, rest,
                             images, labels, idx, keys), 128)
  if "nc_unlearning" in wanted:
    config = nc._unlearn_static(nc.NCConfig(batch_size=32))
    state = nc._unlearn_tx(config).init(params)
    subset = images[:steps * 32], labels[:steps * 32]
    masks, patterns = jnp.zeros((1, 32, 32, 1)), jnp.zeros((1, 32, 32, 3))
    record("nc_unlearning",
           lambda: nc._unlearn_epoch(config, apply_fn, params, state, rest, *subset, masks,
                                     patterns, key, "scan"),
           lambda: nc._unlearn_epoch(config, apply_fn, params, state, rest, *subset, masks,
                                     patterns, key, "python"), 32)
  if "nc_reverse" in wanted:
    config = nc._reverse_static(nc.NCConfig(batch_size=32))
    carry = nc._reverse_start(config, apply_fn, None, 10, (32, 32, 3), key)

    def one_by_one():
      c = carry
      for s in range(steps):
        c = nc._reverse_chunk(config, apply_fn, None, 10, 1, variables, images, labels, key,
                              c, jnp.int32(s))
      return c

    record("nc_reverse",
           lambda: nc._reverse_chunk(config, apply_fn, None, 10, steps, variables, images,
                                     labels, key, carry, jnp.int32(0)),
           one_by_one, 320)
  if "anp" in wanted:
    config = anp.ANPConfig(batch_size=128)
    channels = anp.resolve_layers(apply_fn, variables, images[:1])
    names = tuple(channels)
    biases = {k: jnp.asarray(anp._layer_params(params, k)["bias"]) for k in names}
    masks = {k: jnp.ones((c,)) for k, c in channels.items()}
    state = anp._tx(config).init(masks)
    idx = (jnp.arange(steps * 128) % n).reshape(steps, 128)
    keys = jax.random.split(key, steps)

    def one_by_one():
      m, s = masks, state
      for t in range(steps):
        m, s, _ = anp._chunk(config, apply_fn, names, variables, biases, m, s, images, labels,
                             idx[t:t + 1], keys[t:t + 1])
      return m

    record("anp",
           lambda: anp._chunk(config, apply_fn, names, variables, biases, masks, state, images,
                              labels, idx, keys),
           one_by_one, 128)

  out = dict(results=results, steps=steps, repeats=args.repeats, jax=jax.__version__,
             backend=jax.default_backend(), machine=platform.machine(),
             processor=platform.processor(), cpus=os.cpu_count())
  path = pathlib.Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
