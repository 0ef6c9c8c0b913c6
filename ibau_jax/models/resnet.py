"""PreAct-ResNet18 for 32x32 images (He et al., ECCV 2016), as used by BackdoorBench.

The network maps ``(N, H, W, 3)`` images to ``(N, num_classes)`` logits:

* stem: ``conv3x3(64, stride 1, pad 1, no bias)``;
* four stages of two pre-activation basic blocks, widths 64, 128, 256, 512 and
  first-block strides 1, 2, 2, 2.  A block computes, for input ``x``::

      a = relu(bn1(x))
      s = shortcut(a) if the block changes shape else x   # 1x1 conv, no bias
      y = conv2(relu(bn2(conv1(a)))) + s                  # 3x3 convs, no bias

  (``conv1`` carries the block's stride; the shortcut exists when the stride is not
  1 or the width changes);
* head: ``relu(bn(.))``, global average pooling, ``Dense(num_classes)``.

All BatchNorms use momentum 0.9 (PyTorch's 0.1) and eps 1e-5; the batch statistics
live in the ``batch_stats`` collection.  Convolutions use explicit symmetric padding
(1 for 3x3, 0 for 1x1) so stride-2 layers sample the same pixels as PyTorch's
``Conv2d(..., stride=2, padding=1)``; ``"SAME"`` padding would differ.  Input
normalisation, if any, is the caller's business (BackdoorBench normalises in the
data pipeline).

Module names mirror the PyTorch state-dict keys (``conv1``, ``layer1_0/bn1``,
``layer2_0/shortcut``, ``bn``, ``linear``) so :mod:`ibau_jax.models.torch_import`
maps them one to one.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ibau_jax import _prng


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      name=name)


class PreActBlock(nn.Module):
  """Pre-activation basic block: ``conv(relu(bn(conv(relu(bn(x)))))) + shortcut``.

  Attributes:
    features: output channels.
    stride: stride of the first 3x3 convolution (and of the shortcut).
  """

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    out = nn.relu(_batch_norm(train, "bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), strides=self.stride, padding=0,
                         use_bias=False, kernel_init=_prng.lecun_normal(),
                         name="shortcut")(out)
    else:
      shortcut = x
    out = nn.Conv(self.features, (3, 3), strides=self.stride, padding=1,
                  use_bias=False, kernel_init=_prng.lecun_normal(), name="conv1")(out)
    out = nn.relu(_batch_norm(train, "bn2")(out))
    out = nn.Conv(self.features, (3, 3), strides=1, padding=1, use_bias=False,
                  kernel_init=_prng.lecun_normal(), name="conv2")(out)
    return out + shortcut


class PreActResNet18(nn.Module):
  """PreAct-ResNet18: ``(N, H, W, 3)`` images -> ``(N, num_classes)`` logits.

  Attributes:
    num_classes: number of output classes, an integer >= 1.
    widths: channel widths of the four stages.
    strides: stride of the first block of each stage.
    blocks_per_stage: number of basic blocks per stage (2 for ResNet18).

  Raises:
    ValueError: at construction, for a ``num_classes`` that is not a positive integer.
  """

  num_classes: int = 10
  widths: Sequence[int] = (64, 128, 256, 512)
  strides: Sequence[int] = (1, 2, 2, 2)
  blocks_per_stage: int = 2

  def __post_init__(self):
    n = self.num_classes
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"PreActResNet18.num_classes must be a positive integer, got {n!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if len(self.widths) != len(self.strides):
      raise ValueError(f"widths {tuple(self.widths)} and strides {tuple(self.strides)} "
                       "must have the same length")
    x = nn.Conv(self.widths[0], (3, 3), strides=1, padding=1, use_bias=False,
                kernel_init=_prng.lecun_normal(), name="conv1")(x)
    for stage, (width, stride) in enumerate(zip(self.widths, self.strides)):
      for b in range(self.blocks_per_stage):
        x = PreActBlock(width, stride if b == 0 else 1,
                        name=f"layer{stage + 1}_{b}")(x, train=train)
    x = nn.relu(_batch_norm(train, "bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=_prng.lecun_normal(),
                    name="linear")(x)
