"""Distributed training (docs/distributed.md, docs/distributed_fsdp.md).

* :class:`DiLoCo` (:mod:`optimkit.distributed.diloco`): low-communication data
  parallel training around any optimizer.
* FSDP2 (DTensor) parameters and ``torch.distributed.checkpoint`` support
  (:mod:`optimkit.distributed.sharded`): imported lazily by the facade, only when a
  parameter is a DTensor, so that single-process use never imports
  ``torch.distributed.tensor``.
"""
from .diloco import DiLoCo

__all__ = ["DiLoCo"]
