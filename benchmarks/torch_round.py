"""Wall time and peak memory of I-BAU rounds written in PyTorch, for the JAX/PyTorch ratio.

    .venv-torch/bin/python benchmarks/torch_round.py --data-dir ../shared/data \\
        --reference-dir ../shared/reference/ibau_official --out runs/bench_torch_round.json

The PyTorch counterpart of ``benchmarks/ibau_round.py``: the same command-line options and
JSON fields, so that both can be run on the same CPU and their round times compared.  It
needs only ``torch`` and ``numpy`` (no JAX, no ``ibau_jax`` import): the weights and the
CIFAR-10 arrays are read from the ``.npz`` files directly.  Setup (kept out of the project's
own ``.venv``)::

    python3.11 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 numpy

Model: the "small VGG16" of the paper (three stages of widths 32, 64, 128, each
``conv3x3 -> BN -> ELU -> conv3x3 -> BN -> ELU -> MaxPool 2x2 -> Dropout``, then a linear
layer on the 2048 features flattened in (C, H, W) order), loaded from
``<reference-dir>/badnets_8_02.npz`` (PyTorch key names and layouts), in inference mode
throughout (``model.eval()``: BatchNorm running statistics frozen, dropout off).  Clean set:
the last ``--clean-size`` CIFAR-10 training images, raw pixels in [0, 1], NCHW.

One round (``IBAUConfig.official()`` of ``ibau_jax``; ``--rounds`` rounds, default 3, share
the Adam state; each round reshuffles):

* shuffle the clean set, batches of B = 100;
* inner problem: δ (1x3x32x32) starts at 0 and takes one SGD pass (lr 10) over the batches on
  ``L_in(δ) = −CE(f(x + δ), ŷ) + λ‖δ‖²``, λ = 1e-3, ``ŷ = argmax f(x)`` (no gradient); then
  δ ← δ · min(1, C / ‖δ‖₂), C = 10;
* outer problem, for each batch (x, y): a random 1 % of the batch (one image) gets +δ
  (mask m), ``L_out(δ, θ) = CE(f_θ(x + m ⊙ δ), y)``, and θ takes one Adam step (lr 1e-3)
  along the hypergradient

      g = ∇_θ L_out + (∂_θ Φ)ᵀ v,   v = Σ_{j=0}^{K−1} ((∂_δ Φ)ᵀ)^j ∇_δ L_out,   K = 5,

  of the fixed-point map ``Φ(δ, θ) = δ − η ∇_δ L_in(δ, θ)``, η = 0.1, with ``L_in`` on the
  round's FIRST batch (x₀, y₀) with its TRUE labels.  With ``h = ∇_δ L_in`` computed once per
  outer step with ``create_graph=True``, every product is a double-backward:
  ``(∂_δ Φ)ᵀ u = u − η ∂(h·u)/∂δ`` (K − 1 of them) and ``(∂_θ Φ)ᵀ v = −η ∂(h·v)/∂θ``.
  ``--zero-start`` runs the Neumann loop as the paper's code does instead: from v = 0, K
  products (the first one on the zero vector), the same v.

``--check-hypergradient`` compares that Neumann loop with the explicit Hessian
(``torch.autograd.functional``) on a tiny float64 model and exits.  ``--eval-size N``
also reports the clean accuracy on the first N (pixel-exact) CIFAR-10 test images before and
after the rounds (the official model scores 84.3 % on the exact 1,000).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time

import numpy as np

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError:  # the project's own .venv has no PyTorch: say how to get one
  sys.exit("benchmarks/torch_round.py needs PyTorch, kept out of the project's .venv: "
           "python3.11 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 numpy, "
           "then run it with .venv-torch/bin/python")

DATA_DIR_ENV = "IBAU_DATA_DIR"

# IBAUConfig.official()
BATCH_SIZE = 100
INNER_LR = 10.0
INNER_REG = 1e-3
NORM_BOUND = 10.0
PERTURBED_FRACTION = 0.01
FIXED_POINT_LR = 0.1
NEUMANN_K = 5
OUTER_LR = 1e-3


def small_vgg16(num_classes: int = 10) -> nn.Sequential:
  """Small VGG16 as an ``nn.Sequential`` whose indices match the released state dicts
  (``features.{0,3,8,11,16,19}`` convolutions, ``features.{1,4,9,12,17,20}`` BatchNorms)."""

  class Net(nn.Module):

    def __init__(self):
      super().__init__()
      layers, cin = [], 3
      for width, rate in zip((32, 64, 128), (0.3, 0.4, 0.4)):
        for _ in range(2):
          layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width, eps=1e-5),
                     nn.ELU()]
          cin = width
        layers += [nn.MaxPool2d(2, 2), nn.Dropout(rate)]
      self.features = nn.Sequential(*layers)
      self.classifier = nn.Linear(128 * 4 * 4, num_classes)

    def forward(self, x):
      return self.classifier(torch.flatten(self.features(x), 1))  # (C, H, W) order

  return Net()


def load_model(path: pathlib.Path) -> nn.Module:
  """The small VGG16 with the weights of a released ``.npz`` state dict, in eval mode."""
  arrays = np.load(path)
  model = small_vgg16(int(arrays["classifier.weight"].shape[0]))
  state = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in arrays.files}
  missing, unexpected = model.load_state_dict(state, strict=False)
  if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
    raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
  return model.eval()


def load_cifar10(data_dir: pathlib.Path, split: str, count: int, last: bool):
  """``count`` images of a CIFAR-10 split as float32 NCHW in [0, 1] and int64 labels: the
  last ``count`` (``last``) or the first ``count`` (pixel-exact ones for the test split)."""
  root = data_dir / "cifar10"
  if split == "test":
    with np.load(root / "test.npz") as f:
      x, y, exact = f["x"], f["y"], f["exact"]
    if count > int(exact.sum()):
      raise ValueError(f"only {int(exact.sum())} pixel-exact test images")
    x, y = x[exact][:count], y[exact][:count]
  else:
    xs, ys = [], []
    for name in ("train_1.npz", "train_0.npz") if last else ("train_0.npz", "train_1.npz"):
      with np.load(root / name) as f:
        xs.append(f["x"])
        ys.append(f["y"])
      if sum(len(a) for a in xs) >= count:
        break
    if last:
      x, y = np.concatenate(xs[::-1])[-count:], np.concatenate(ys[::-1])[-count:]
    else:
      x, y = np.concatenate(xs)[:count], np.concatenate(ys)[:count]
    if len(x) < count:
      raise ValueError(f"asked for {count} images, the split has {len(x)}")
  images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float().div_(255.0)
  return images, torch.from_numpy(y.astype(np.int64))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
  correct = sum(int((model(images[i:i + 500]).argmax(1) == labels[i:i + 500]).sum())
                for i in range(0, len(images), 500))
  return correct / len(images)


def inner_loss(model, delta, x, y, reg=INNER_REG):
  """``L_in(δ, θ) = −CE(f_θ(x + δ), y) + λ‖δ‖²``."""
  return -F.cross_entropy(model(x + delta), y) + reg * (delta * delta).sum()


def neumann(h, delta, b, eta=FIXED_POINT_LR, K=NEUMANN_K, zero_start=False):
  """``v = Σ_{j<K} ((∂_δ Φ)ᵀ)^j b`` with ``(∂_δ Φ)ᵀ u = u − η ∂(h·u)/∂δ``, ``h = ∇_δ L_in``
  (built with ``create_graph=True``).  ``zero_start``: from v = 0 with K products
  (``v ← (∂_δ Φ)ᵀ v + b``), as the paper's code; else from v = b with K − 1 products."""

  def product(u):
    return u - eta * torch.autograd.grad(h, delta, grad_outputs=u, retain_graph=True)[0]

  if zero_start or K == 0:
    v = torch.zeros_like(b)
    for _ in range(K):
      v = product(v) + b
    return v
  v = p = b
  for _ in range(K - 1):
    p = product(p)
    v = v + p
  return v


def hypergradient(model, params, delta, x, y, mask, x0, y0, eta=FIXED_POINT_LR, K=NEUMANN_K,
                  reg=INNER_REG, zero_start=False):
  """``(L_out, [∇_θ L_out + (∂_θ Φ)ᵀ v for each parameter])`` (see the module docstring);
  ``mask`` has shape ``(B,)``, ``delta`` is the inner solution (not differentiated through)."""
  delta = delta.detach().requires_grad_(True)
  m = mask.view(-1, *([1] * (x.dim() - 1)))
  loss = F.cross_entropy(model(x + m * delta), y)
  g_delta, *g_params = torch.autograd.grad(loss, [delta] + params)
  h = torch.autograd.grad(inner_loss(model, delta, x0, y0, reg), delta, create_graph=True)[0]
  v = neumann(h, delta, g_delta, eta, K, zero_start)
  cross = torch.autograd.grad(h, params, grad_outputs=v)
  return loss.detach(), [g - eta * c for g, c in zip(g_params, cross)]


def run_round(model, params, optimizer, images, labels, generator, zero_start=False):
  """One I-BAU round (the official configuration) in place; returns its statistics."""
  n = images.shape[0]
  order = torch.randperm(n, generator=generator)
  num_batches = n // BATCH_SIZE
  batches = [(images[idx], labels[idx]) for idx in
             order[:num_batches * BATCH_SIZE].view(num_batches, BATCH_SIZE)]
  # Inner problem: one SGD pass on the pseudo-labelled objective, projection at the end.
  delta = torch.zeros((1,) + tuple(images.shape[1:]), requires_grad=True)
  inner_losses = []
  for x, _ in batches:
    with torch.no_grad():
      pseudo = model(x).argmax(1)
    loss = inner_loss(model, delta, x, pseudo)
    (grad,) = torch.autograd.grad(loss, delta)
    with torch.no_grad():
      delta -= INNER_LR * grad
    inner_losses.append(loss.detach())
  with torch.no_grad():
    delta = delta * torch.clamp(NORM_BOUND / delta.norm().clamp_min(1e-12), max=1.0)
  # Outer problem: one Adam step per batch along the implicit hypergradient.
  x0, y0 = batches[0]
  num_perturbed = max(1, int(round(PERTURBED_FRACTION * BATCH_SIZE)))
  outer_losses = []
  for x, y in batches:
    mask = torch.zeros(BATCH_SIZE)
    mask[torch.randperm(BATCH_SIZE, generator=generator)[:num_perturbed]] = 1.0
    loss, grads = hypergradient(model, params, delta, x, y, mask, x0, y0,
                                zero_start=zero_start)
    for p, g in zip(params, grads):
      p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    outer_losses.append(loss)
  return dict(inner_loss=float(torch.stack(inner_losses).mean()),
              outer_loss=float(torch.stack(outer_losses).mean()),
              delta_norm=float(delta.norm()))


def check_hypergradient() -> dict:
  """The Neumann/double-backward hypergradient against explicit second derivatives
  (``torch.autograd.functional.hessian`` / ``jacobian``) on a tiny float64 conv net."""
  torch.manual_seed(0)
  model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ELU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 4)).double()
  with torch.no_grad():
    model[1].running_mean.uniform_(-0.2, 0.2)
    model[1].running_var.uniform_(0.5, 1.5)
  model.eval()
  params = list(model.parameters())
  x, y = torch.rand(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (6,))
  x0, y0 = torch.rand(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
  delta = torch.randn(1, 2, 4, 4, dtype=torch.float64)
  mask = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.float64)
  eta, K, reg = 0.3, 7, 0.05
  _, got = hypergradient(model, params, delta, x, y, mask, x0, y0, eta, K, reg)
  _, got_zero = hypergradient(model, params, delta, x, y, mask, x0, y0, eta, K, reg, True)
  # Explicit: b = ∇_δ L_out, J = I − η H, v = Σ_{j<K} Jʲ b, g = ∇_θ L_out − η (∂²L_in/∂δ∂θ)ᵀ v.
  d = delta.numel()
  m = mask.view(-1, 1, 1, 1)
  b = torch.autograd.functional.jacobian(
      lambda dd: F.cross_entropy(model(x + m * dd), y), delta).reshape(d)
  hess = torch.autograd.functional.hessian(
      lambda dd: inner_loss(model, dd, x0, y0, reg), delta).reshape(d, d)
  jac = torch.eye(d, dtype=torch.float64) - eta * hess
  v, term = torch.zeros(d, dtype=torch.float64), b
  for _ in range(K):
    v, term = v + term, jac.T @ term
  names = [n for n, _ in model.named_parameters()]
  base = {n: p.detach() for n, p in model.named_parameters()}
  buffers = dict(model.named_buffers())

  def call(theta, dd, xx):
    return torch.func.functional_call(model, {**theta, **buffers}, (xx + dd,))

  def grad_delta_in(*theta):
    th = dict(zip(names, theta))
    return torch.func.grad(lambda dd: -F.cross_entropy(call(th, dd, x0), y0)
                           + reg * (dd * dd).sum())(delta).reshape(d)

  mixed = torch.autograd.functional.jacobian(grad_delta_in, tuple(base[n] for n in names))
  outer = torch.autograd.functional.jacobian(
      lambda *theta: F.cross_entropy(call(dict(zip(names, theta)), m * delta, x), y),
      tuple(base[n] for n in names))
  want = [o - eta * (mx.reshape(d, -1).T @ v).reshape(o.shape) for o, mx in zip(outer, mixed)]
  err = max(float((a - w).abs().max() / w.abs().max().clamp_min(1e-30))
            for a, w in zip(got, want))
  err_zero = max(float((a - w).abs().max() / w.abs().max().clamp_min(1e-30))
                 for a, w in zip(got_zero, want))
  implicit = max(float((eta * (mx.reshape(d, -1).T @ v)).abs().max()) for mx in mixed)
  return dict(max_rel_error=err, max_rel_error_zero_start=err_zero,
              implicit_term_max_abs=implicit, spectral_radius_J=float(
                  torch.linalg.eigvalsh(jac).abs().max()))


def write_json(path: pathlib.Path, report: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(report, f, indent=1)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV))
  parser.add_argument("--reference-dir", default="../shared/reference/ibau_official")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--clean-size", type=int, default=5000)
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="torch.set_num_threads (default: os.cpu_count())")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--zero-start", action="store_true",
                      help="Neumann loop from v = 0 with K products, as the paper's code")
  parser.add_argument("--eval-size", type=int, default=0,
                      help="also measure accuracy on this many exact test images (0: off)")
  parser.add_argument("--check-hypergradient", action="store_true",
                      help="compare the hypergradient with explicit Hessians and exit")
  parser.add_argument("--out", default="runs/bench_torch_round.json")
  args = parser.parse_args(argv)
  if args.clean_size < BATCH_SIZE or args.rounds < 1:
    parser.error(f"--clean-size must be >= {BATCH_SIZE} and --rounds >= 1")

  torch.set_num_threads(args.threads)
  if args.check_hypergradient:
    print(json.dumps(check_hypergradient(), indent=1))
    return 0
  torch.manual_seed(args.seed)
  model = load_model(pathlib.Path(args.reference_dir) / "badnets_8_02.npz")
  params = list(model.parameters())
  if args.data_dir:
    images, labels = load_cifar10(pathlib.Path(args.data_dir), "train", args.clean_size, True)
  else:  # Timing does not depend on pixel values: random images of the same shape.
    rng = np.random.RandomState(0)
    images = torch.from_numpy(rng.rand(args.clean_size, 3, 32, 32).astype(np.float32))
    labels = torch.from_numpy((np.arange(args.clean_size) % 10).astype(np.int64))
  test = None
  if args.eval_size and args.data_dir:
    test = load_cifar10(pathlib.Path(args.data_dir), "test", args.eval_size, False)
  acc_before = accuracy(model, *test) if test is not None else None
  if acc_before is not None:
    print(f"clean accuracy before: {acc_before:.4f} on {args.eval_size} exact test images",
          flush=True)

  optimizer = torch.optim.Adam(params, lr=OUTER_LR)
  generator = torch.Generator().manual_seed(args.seed)
  history = []
  start = time.perf_counter()
  for r in range(args.rounds):
    t = time.perf_counter()
    stats = run_round(model, params, optimizer, images, labels, generator, args.zero_start)
    stats.update(round=r, seconds=time.perf_counter() - t)
    history.append(stats)
    print(f"round {r}: {stats['seconds']:.2f} s  inner_loss {stats['inner_loss']:.4f}  "
          f"outer_loss {stats['outer_loss']:.4f}  |delta| {stats['delta_norm']:.3f}",
          flush=True)
  total = time.perf_counter() - start
  acc_after = accuracy(model, *test) if test is not None else None
  if acc_after is not None:
    print(f"clean accuracy after: {acc_after:.4f}", flush=True)

  seconds = [h["seconds"] for h in history]
  report = dict(
      benchmark="torch_round", config="official", clean_size=args.clean_size,
      batch_size=BATCH_SIZE, solver="neumann", K=NEUMANN_K, zero_start=args.zero_start,
      data="cifar10" if args.data_dir else "random",
      round_seconds=seconds, first_round_seconds=seconds[0],
      round_seconds_without_first=(float(np.mean(seconds[1:])) if len(seconds) > 1
                                   else None),
      median_round_seconds_without_first=(float(np.median(seconds[1:]))
                                          if len(seconds) > 1 else None),
      total_seconds=total, history=history,
      peak_host_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      clean_accuracy_before=acc_before, clean_accuracy_after=acc_after,
      eval_size=args.eval_size if test is not None else 0,
      device="cpu", threads=torch.get_num_threads(),
      interop_threads=torch.get_num_interop_threads(), cpu_count=os.cpu_count(),
      machine=platform.machine(), processor=platform.processor(), torch=torch.__version__,
      numpy=np.__version__, python=sys.version.split()[0], seed=args.seed,
      torch_parallel_info=torch.__config__.parallel_info().splitlines()[:6])
  write_json(pathlib.Path(args.out), report)
  print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
