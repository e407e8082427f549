"""Subspace projections usable with every optimizer (``projection=``)."""
from .base import Projection

__all__ = ["Projection"]
