"""SIG (Barni, Kallas & Tondi, "A new backdoor attack in CNNs by training set
corruption without label poisoning", ICIP 2019): a sinusoidal signal, clean-label.

``apply(x)[n, i, j, c] = clip(x[n, i, j, c] + delta * sin(2 pi j f / W), 0, 1)``:
a horizontal sinusoid along the columns ``j = 0 .. W-1``, the same on every row and
channel, with ``delta = 20 / 255`` and ``f = 6`` (Barni et al.'s values on 0..255
pixels).

Clean-label: poisoning (:func:`ibau_jax.attacks.poison`) adds the signal to images
OF the target class only and keeps their labels; at test time the signal on an
image of another class should make the model answer ``target``
(:meth:`~ibau_jax.attacks.base.Attack.relabel` gives ``target``).  Barni et al.
note that a stronger signal can be used at test time than for poisoning: ``test_delta``
sets that amplitude (:meth:`~ibau_jax.attacks.base.Attack.for_evaluation` gives the
test-time attack; poisoning always uses ``delta``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

from ibau_jax.attacks.base import Attack, check_batch, check_float


@dataclasses.dataclass(frozen=True, eq=False)
class Sig(Attack):
  """Sinusoidal trigger ``clip(x + delta * sin(2 pi j f / W), 0, 1)``, clean-label.

  Attributes:
    target: target class (the class whose images are poisoned).
    clean_label: True (SIG's threat model); False gives a dirty-label variant.
    delta: amplitude on [0, 1] pixels (20/255) of the poisoned training images.
    frequency: number of periods ``f`` across the image width (6).
    test_delta: None (the test-time signal is the training one), or the amplitude of the
      test-time signal (Barni et al.: it may be stronger than the poisoning one).
  """

  name = "sig"
  evaluation_fields = ("test_delta",)

  clean_label: bool = True
  delta: float = 20.0 / 255.0
  frequency: float = 6.0
  test_delta: Optional[float] = None

  def __post_init__(self) -> None:
    super().__post_init__()
    object.__setattr__(self, "delta", check_float(self.delta, "sig", "delta",
                                                  low=0.0, high=1.0))
    object.__setattr__(self, "frequency", check_float(self.frequency, "sig",
                                                      "frequency"))
    if self.test_delta is not None:
      object.__setattr__(self, "test_delta", check_float(self.test_delta, "sig",
                                                         "test_delta", low=0.0, high=1.0))

  def for_evaluation(self) -> "Sig":
    """This attack with the test-time amplitude (``test_delta``) as its ``delta``."""
    if self.test_delta is None:
      return self
    return dataclasses.replace(self, delta=self.test_delta, test_delta=None)

  def signal(self, width: int) -> np.ndarray:
    """``delta * sin(2 pi j f / W)`` for ``j = 0 .. W-1`` (float64)."""
    j = np.arange(width)
    return self.delta * np.sin(2 * np.pi * j * self.frequency / width)

  def apply(self, images: jnp.ndarray) -> jnp.ndarray:
    images = check_batch(images, "sig")
    v = jnp.asarray(self.signal(images.shape[2]), images.dtype)[None, None, :, None]
    return jnp.clip(images + v, 0.0, 1.0)
