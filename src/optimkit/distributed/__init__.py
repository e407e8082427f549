"""Distributed training helpers (docs/distributed.md)."""
from .diloco import DiLoCo

__all__ = ["DiLoCo"]
