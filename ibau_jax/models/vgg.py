"""The "small VGG16" of the I-BAU paper (Zeng et al., ICLR 2022).

Three stages of widths 32, 64, 128; each stage is
``conv3x3 -> BatchNorm -> ELU -> conv3x3 -> BatchNorm -> ELU -> MaxPool 2x2 -> Dropout``
(dropout rates 0.3, 0.4, 0.4), then flatten and one linear layer.  Inputs are raw
pixels in [0, 1] (no mean/std normalisation), NHWC.

The flatten follows PyTorch's (C, H, W) order so that the released PyTorch weights
(see :mod:`ibau_jax.models.torch_import`) load without permuting the classifier.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class SmallVGG16(nn.Module):
  """Small VGG16: ``(N, H, W, 3)`` images in [0, 1] -> ``(N, num_classes)`` logits.

  Attributes:
    num_classes: number of output classes.
    widths: channel widths of the three stages.
    dropout_rates: dropout after each stage's pooling.
  """

  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  dropout_rates: Sequence[float] = (0.3, 0.4, 0.4)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    for stage, (width, rate) in enumerate(zip(self.widths, self.dropout_rates)):
      for j in range(2):
        x = nn.Conv(width, (3, 3), padding=1, name=f"conv{stage}_{j}")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         name=f"bn{stage}_{j}")(x)
        x = nn.elu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.Dropout(rate, deterministic=not train)(x)
    # Flatten in PyTorch's (C, H, W) order.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, name="classifier")(x)
