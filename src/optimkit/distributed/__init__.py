"""Distributed training support: FSDP2 (DTensor) parameters and torch.distributed.checkpoint.

Imported lazily by the facade (:mod:`optimkit.distributed.sharded`), only when a
parameter is a DTensor, so that optimkit does not import ``torch.distributed``
for single-process use.
"""
