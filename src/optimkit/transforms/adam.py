"""Adam's moment estimates and bias-corrected scaling."""
from __future__ import annotations

import math

from ..core.tensorlist import Ratio, dense
from ..core.transform import Context, Transform


def update_moments(g, ctx: Context):
    """Adam's moments in place: ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``
    (states ``exp_avg``/``exp_avg_sq``, betas from ``hp["betas"]``); returns (m, v)."""
    b1, b2 = ctx.hp["betas"][:2]
    m, v = ctx.state["exp_avg"], ctx.state["exp_avg_sq"]
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, 1 - b2)
    return m, v


class ScaleByAdam(Transform):
    """``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2`` (AMSGrad: running max of v);
    update ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)``.

    State: ``exp_avg``, ``exp_avg_sq`` (+ ``max_exp_avg_sq``), named as in torch.optim.
    """

    nonnegative = ("exp_avg_sq", "max_exp_avg_sq")

    def init(self, p, group):
        st = {"exp_avg": p.new_zeros(p.shape), "exp_avg_sq": p.new_zeros(p.shape)}
        if group.get("amsgrad"):
            st["max_exp_avg_sq"] = p.new_zeros(p.shape)
        return st

    def scalars(self, group, step, sstate):
        b1, b2 = group["betas"][:2]
        return {"bc1": 1 - b1 ** step, "bc2_sqrt": math.sqrt(1 - b2 ** step)}

    def __call__(self, u, ctx: Context):
        hp = ctx.hp
        m, v = update_moments(dense(u), ctx)
        if ctx.static.get("amsgrad"):
            vmax = ctx.state["max_exp_avg_sq"]
            vmax.maximum_(v)
            v = vmax
        den = v.sqrt().div_(hp["bc2_sqrt"]).add_(hp["eps"])
        return Ratio(m, den, 1 / hp["bc1"])
