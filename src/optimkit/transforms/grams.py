"""Grams: the magnitude of Adam's update with the sign of the current gradient."""
from __future__ import annotations

import math

from ..core.tensorlist import Ratio, dense
from ..core.transform import Context, Transform
from .adam import update_moments


class ScaleByGrams(Transform):
    r"""``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``; update
    ``s * sign(g) |m| / (sqrt(v) + eps)`` with ``s = sqrt(1 - b2^t) / (1 - b1^t)``
    (``correct_bias``) or 1. Note ``eps`` is added to the uncorrected ``sqrt(v)``
    (as the authors' ``grams.Grams``).

    State: ``exp_avg``, ``exp_avg_sq``.
    """

    nonnegative = ("exp_avg_sq",)

    def init(self, p, group):
        return {"exp_avg": p.new_zeros(p.shape), "exp_avg_sq": p.new_zeros(p.shape)}

    def scalars(self, group, step, sstate):
        if not group.get("correct_bias", True):
            return {"grams_scale": 1.0}
        b1, b2 = group["betas"][:2]
        return {"grams_scale": math.sqrt(1 - b2 ** step) / (1 - b1 ** step)}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        hp = ctx.hp
        m, v = update_moments(g, ctx)
        num = g.sign().mul_(m.abs())
        return Ratio(num, v.sqrt().add_(hp["eps"]), hp["grams_scale"])
