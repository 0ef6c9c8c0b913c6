"""ibau_jax: backdoor removal with I-BAU (Zeng et al., ICLR 2022) in JAX.

The public face: :func:`unlearn`, :class:`IBAUConfig`, :class:`UnlearnResult`; models,
attacks, metrics and data live in their submodules (``ibau_jax.models``, ...).
"""

from ibau_jax.ibau import IBAUConfig
from ibau_jax.ibau import NonFiniteHypergradientError
from ibau_jax.ibau import UnlearnResult
from ibau_jax.ibau import unlearn

__version__ = "0.1.0"

__all__ = ["IBAUConfig", "NonFiniteHypergradientError", "UnlearnResult", "unlearn",
           "__version__"]
