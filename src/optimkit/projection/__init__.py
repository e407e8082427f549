"""Subspace projections usable with every optimizer (``projection=``).

* :class:`GaLore`: top singular vectors of the gradient.
* :class:`APOLLO` / :class:`APOLLOMini`: random projection; the rule only sets
  a channel- or tensor-wise scaling of the raw gradient.
* :class:`FRUGAL`: the rule in a subspace plus signSGD/SGD on the residual.
"""
from .apollo import APOLLO, APOLLOMini
from .base import Projection
from .frugal import FRUGAL
from .galore import GaLore

__all__ = ["Projection", "GaLore", "APOLLO", "APOLLOMini", "FRUGAL"]
