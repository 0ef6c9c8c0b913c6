"""``python -m experiments.gtsrb --attack ATTACK``: poison, train, defend and report on GTSRB.

See :mod:`experiments.pipeline` for the protocol and ``--help`` for the options.
"""

from __future__ import annotations

import sys

from experiments import pipeline


def run(config: pipeline.ExperimentConfig, workdir, **kwargs):
  """The pipeline's entry (:func:`experiments.pipeline.run`) for a gtsrb config."""
  if config.dataset != "gtsrb":
    raise ValueError(f"experiments.gtsrb runs dataset 'gtsrb', got {config.dataset!r}")
  return pipeline.run(config, workdir, **kwargs)


def main(argv=None) -> int:
  return pipeline.main("gtsrb", argv)


if __name__ == "__main__":
  sys.exit(main())
