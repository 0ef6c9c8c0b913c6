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
import jax
import jax.numpy as jnp
import numpy as np

from ibau_jax import _prng


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max pooling with stride 2 (odd trailing rows/columns dropped, as ``nn.max_pool``).

  The same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, computed as a max over a
  reshaped axis: on CPU its gradient (an equality mask) is about 5x faster than XLA's
  select-and-scatter.  At ties the gradient is split evenly between the maxima instead of
  going to one of them.
  """
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2, :]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def conv_im2col(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated`` for NHWC/HWIO stride-1 convolutions as one matrix product.

  Gathers the kh*kw shifted copies of the padded input along the channel axis (im2col) and
  multiplies by the kernel reshaped to ``(kh*kw*C_in, C_out)``.  Used for convolutions with
  few input channels (the first layer), where XLA's CPU convolution and its kernel gradient
  are about 2.5x slower than the matrix product.  Falls back to ``lax.conv_general_dilated``
  for anything else (strides, dilation, groups).
  """
  simple = (tuple(window_strides) == (1, 1) and not kwargs and feature_group_count == 1
            and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
            and (rhs_dilation is None or tuple(rhs_dilation) == (1, 1))
            and not isinstance(padding, str)
            and (dimension_numbers is None or tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")
                 or getattr(dimension_numbers, "lhs_spec", None) == (0, 3, 1, 2)
                 and dimension_numbers.rhs_spec == (3, 2, 0, 1)
                 and dimension_numbers.out_spec == (0, 3, 1, 2)))
  if not simple:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)
  kh, kw, cin, cout = rhs.shape
  (pt, pb), (pl, pr) = padding
  x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  n, hp, wp, _ = x.shape
  h, w = hp - kh + 1, wp - kw + 1
  cols = jnp.concatenate([x[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)],
                         axis=-1)
  out = jnp.dot(cols.reshape(n * h * w, kh * kw * cin), rhs.reshape(kh * kw * cin, cout),
                precision=precision)
  return out.reshape(n, h, w, cout)


def _positive_int(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


class SmallVGG16(nn.Module):
  """Small VGG16: ``(N, H, W, 3)`` images in [0, 1] -> ``(N, num_classes)`` logits.

  Stage ``i`` has width ``widths[i]`` and dropout rate ``dropout_rates[i]``; there are
  ``len(widths)`` stages (three in the paper; fewer make smaller test models, e.g.
  ``widths=(4,)``, which use the first ``len(widths)`` rates).

  Attributes:
    num_classes: number of output classes, an integer >= 1.
    widths: channel widths of the stages (the paper's three), positive integers.
    dropout_rates: dropout after each stage's pooling, in [0, 1]; at least one per width
      (``len(dropout_rates) >= len(widths)``), so no width is left out.

  Raises:
    ValueError: at construction, for fields that break these rules.
  """

  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  dropout_rates: Sequence[float] = (0.3, 0.4, 0.4)

  def __post_init__(self):
    if not _positive_int(self.num_classes):
      raise ValueError(f"SmallVGG16.num_classes must be a positive integer, "
                       f"got {self.num_classes!r}")
    widths, rates = tuple(self.widths), tuple(self.dropout_rates)
    if not widths or not all(_positive_int(w) for w in widths):
      raise ValueError(f"SmallVGG16.widths must be a non-empty sequence of positive "
                       f"integers, got {self.widths!r}")
    if not all(not isinstance(r, bool) and isinstance(r, (int, float, np.integer, np.floating))
               and 0.0 <= r <= 1.0 for r in rates):
      raise ValueError(f"SmallVGG16.dropout_rates must be numbers in [0, 1], "
                       f"got {self.dropout_rates!r}")
    if len(rates) < len(widths):
      raise ValueError(f"SmallVGG16 needs a dropout rate per stage: got {len(widths)} widths "
                       f"{widths} and {len(rates)} dropout_rates {rates}; pass "
                       f"dropout_rates of length {len(widths)}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    for stage, (width, rate) in enumerate(zip(self.widths, self.dropout_rates)):
      for j in range(2):
        # im2col for thin inputs (the RGB layer): same parameters, same function.
        conv = conv_im2col if x.shape[-1] <= 4 else jax.lax.conv_general_dilated
        x = nn.Conv(width, (3, 3), padding=1, conv_general_dilated=conv,
                    kernel_init=_prng.lecun_normal(), name=f"conv{stage}_{j}")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         name=f"bn{stage}_{j}")(x)
        x = nn.elu(x)
      x = max_pool_2x2(x)
      x = _prng.Dropout(rate, deterministic=not train)(x)
    # Flatten in PyTorch's (C, H, W) order.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, kernel_init=_prng.lecun_normal(), name="classifier")(x)
