"""Seconds per I-BAU round and per training epoch versus the number of devices.

    python benchmarks/devices.py --devices 1,2,4,8 --out runs/bench_devices.json

Each device count runs in its own process.  On a CPU the devices are forced host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) that share the same cores, so this
measures the overhead of splitting batches, not a speed-up; on a GPU/TPU host the counts
must not exceed the real devices (``--real``, which uses the first N of ``jax.devices()``).
Data: random CIFAR-shaped images (timing does not depend on pixel values), small-VGG16.
The JSON holds, per device count, the round time without compilation, the epoch time without
compilation, images per second for both, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys

_CHILD = r"""
import json, sys, time
import jax, numpy as np
import ibau_jax
from ibau_jax import train
from ibau_jax.models import get_model
n_dev, clean, train_n, real = {n_dev}, {clean}, {train_n}, {real}
devices = jax.devices()[:n_dev]
assert len(devices) == n_dev, (n_dev, jax.devices())
mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
rng = np.random.RandomState(0)
model = get_model("small_vgg16", 10)
variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
x = rng.rand(clean, 32, 32, 3).astype(np.float32)
y = (np.arange(clean) % 10).astype(np.int32)
apply_fn = lambda v, im: model.apply(v, im, train=False)
config = ibau_jax.IBAUConfig.official(rounds=2, batch_size={batch})
r = ibau_jax.unlearn(apply_fn, variables, x, y, config, key=jax.random.PRNGKey(0), mesh=mesh)
round_s = r.history[1]["seconds"]
tx = rng.rand(train_n, 32, 32, 3).astype(np.float32)
ty = (np.arange(train_n) % 10).astype(np.int32)
tconfig = train.TrainConfig(epochs=2, batch_size=128)
times = []
start = [time.perf_counter()]
def cb(epoch, metrics):
  times.append(time.perf_counter() - start[0]); start[0] = time.perf_counter()
train.fit(model, tx, ty, tconfig, key=jax.random.PRNGKey(1), callback=cb, mesh=mesh)
epoch_s = times[1]
print(json.dumps(dict(devices=n_dev, device_kind=str(devices[0]), round_seconds=round_s,
                      round_images_per_second=clean / round_s, epoch_seconds=epoch_s,
                      epoch_images_per_second=(train_n // 128) * 128 / epoch_s)))
"""


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--clean-size", type=int, default=1000)
  parser.add_argument("--train-size", type=int, default=2560)
  parser.add_argument("--batch-size", type=int, default=96,
                      help="I-BAU batch size; must be divisible by every device count "
                           "(96: 1, 2, 4, 8; training uses 128)")
  parser.add_argument("--real", action="store_true",
                      help="use the first N real devices instead of forced host devices")
  parser.add_argument("--out", default="runs/bench_devices.json")
  args = parser.parse_args(argv)
  rows = []
  for n in [int(v) for v in args.devices.split(",")]:
    env = dict(os.environ)
    if not args.real:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={n}").strip()
      env["JAX_PLATFORMS"] = "cpu"
    code = _CHILD.format(n_dev=n, clean=args.clean_size, train_n=args.train_size,
                         real=args.real, batch=args.batch_size)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
      print(proc.stderr[-3000:], file=sys.stderr)
      return 1
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    rows.append(row)
    print(f"{n} device(s): round {row['round_seconds']:.1f} s, epoch "
          f"{row['epoch_seconds']:.1f} s", flush=True)
  report = dict(benchmark="devices", forced_host_devices=not args.real,
                batch_size=args.batch_size,
                clean_size=args.clean_size, train_size=args.train_size, rows=rows,
                cpu_count=os.cpu_count(), machine=platform.machine(),
                note=("forced host devices share the same CPU cores: this measures the cost "
                      "of splitting, not a speed-up") if not args.real else "")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
