"""Does a universal warp single out a warping (WaNet) backdoor, and nothing else?

    python benchmarks/warp_signal.py --data-dir ../shared/data \\
        --model-dirs runs/s22/models_e8/*,runs/s24/models/wanet_seed0_93024376fe57 \\
        --reference-dir ../shared/reference/ibau_official --out runs/warp_signal.json

For every model it runs the check of ``IBAUConfig(warp_epochs=...)``: the untargeted
universal warp of :func:`ibau_jax.probe.fit_warp` (``--grid`` × ``--grid`` control
displacements in ``[−bound, bound]`` pixels for every ``--bounds`` value, ``--steps`` Adam
steps over batches of 100) on the first ``--images`` images of the defender's clean set
(CIFAR-10: the last 5,000 training images; the paper's models: ``reproduce_official``'s
split), and reports the class the warped images go to most and the share of them (not
already predicted there) that go there (:func:`ibau_jax.probe.warp_share`).  Models are
the folders of the experiments' model cache (``variables.msgpack`` + ``info.json``; CIFAR-10
small-VGG16 with the options in ``info.json``) and, with ``--reference-dir``, the paper's
three released models.  Session 25 (docs/results.md): 0.954-0.992 to the target on the
CIFAR-10 WaNet models, at most 0.181 to any class on the clean model and 0.137 on every
other attack's model, 0.003-0.067 on the released models.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", default=os.environ.get("IBAU_DATA_DIR"), required=False)
  parser.add_argument("--model-dirs", default="",
                      help="comma-separated model cache folders (globs allowed)")
  parser.add_argument("--reference-dir", default=None,
                      help="the paper's released models (../shared/reference/ibau_official)")
  parser.add_argument("--bounds", default="0.5", help="comma-separated bounds in pixels")
  parser.add_argument("--grid", type=int, default=4)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--out", default=None, help="JSON file for the rows")
  args = parser.parse_args(argv)
  if not args.data_dir:
    parser.error("--data-dir (or $IBAU_DATA_DIR) is required")
  import flax.serialization
  import jax
  import jax.numpy as jnp
  import numpy as np
  from experiments import pipeline, reproduce_official
  from ibau_jax import data as data_lib, probe
  from ibau_jax.models import get_model

  bounds = [float(b) for b in args.bounds.split(",")]
  models = []  # (name, apply_fn, variables, clean images)
  folders = sorted(f for pattern in filter(None, args.model_dirs.split(","))
                   for f in glob.glob(pattern))
  if folders:
    train = data_lib.load("cifar10", "train", data_dir=args.data_dir, download=False)
    clean = data_lib.to_float(train.images[-5000:][:args.images])
  for folder in folders:
    spec = json.loads((pathlib.Path(folder) / "info.json").read_text())["spec"]
    if spec["dataset"] != "cifar10":
      print(f"skipped {folder}: {spec['dataset']}", file=sys.stderr)
      continue
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in spec.get("model_options", {}).items()}
    if spec.get("model_widths"):
      kwargs["widths"] = tuple(spec["model_widths"])
    model = get_model(spec["model"], 10, **kwargs)
    template = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + clean.shape[1:]), train=False)
    variables = flax.serialization.from_bytes(
        template, (pathlib.Path(folder) / "variables.msgpack").read_bytes())
    models.append((pathlib.Path(folder).name, pipeline._apply_fn(model), variables, clean))
  if args.reference_dir:
    for name in reproduce_official.MODELS:
      m = reproduce_official.load_model(argparse.Namespace(
          data_dir=args.data_dir, reference_dir=args.reference_dir, model=name))
      models.append((name, lambda v, x, m=m: m.model.apply(v, x, train=False), m.variables,
                     np.asarray(m.clean_x[:args.images])))
  if not models:
    parser.error("no models: give --model-dirs and/or --reference-dir")
  rows = []
  for name, apply_fn, variables, images in models:
    for bound in bounds:
      start = time.perf_counter()
      phi = probe.fit_warp(apply_fn, variables, images, bound=bound, grid=args.grid,
                           steps=args.steps)
      target, share = probe.warp_share(apply_fn, variables, images, phi)
      rows.append(dict(model=name, bound=bound, grid=args.grid, steps=args.steps,
                       images=int(len(images)), target=target, share=share,
                       seconds=time.perf_counter() - start))
      print(f"{name}: bound {bound} px -> class {target}, share {share:.3f} "
            f"({rows[-1]['seconds']:.0f} s)", flush=True)
      if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
