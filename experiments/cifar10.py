"""``python -m experiments.cifar10 --attack ATTACK``: poison, train, defend and report on CIFAR-10.

See :mod:`experiments.pipeline` for the protocol and ``--help`` for the options.
"""

from __future__ import annotations

import sys

from experiments import pipeline


def run(config: pipeline.ExperimentConfig, workdir, **kwargs):
  """The pipeline's entry (:func:`experiments.pipeline.run`) for a cifar10 config."""
  if config.dataset != "cifar10":
    raise ValueError(f"experiments.cifar10 runs dataset 'cifar10', got {config.dataset!r}")
  return pipeline.run(config, workdir, **kwargs)


def main(argv=None) -> int:
  return pipeline.main("cifar10", argv)


if __name__ == "__main__":
  sys.exit(main())
