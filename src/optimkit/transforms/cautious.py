"""Cautious masking ("Cautious Optimizers: Improving Training with One Line of Code").

Zeroes the components of the update whose sign disagrees with the current
gradient and rescales the survivors. Appended by the facade to the chain of
every momentum optimizer; inactive unless the group has ``cautious`` set.
"""
from __future__ import annotations

import torch

from ..core.tensorlist import TensorList, dense
from ..core.transform import Context, Transform


class Cautious(Transform):
    def __call__(self, u, ctx: Context):
        mode = ctx.static.get("cautious")
        if not mode:
            return u
        u = dense(u)
        mask = TensorList([(a * g > 0).to(a.dtype) for a, g in zip(u, ctx.grads)])
        kept = mask.norm(1)  # number of kept components per tensor
        if mode == "timm":
            scale = [1.0 / torch.clamp_min(k / m.numel(), 1e-3) for k, m in zip(kept, mask)]
        else:
            scale = [m.numel() / (k + 1) for k, m in zip(kept, mask)]
        return u.mul(mask).mul_(scale)
