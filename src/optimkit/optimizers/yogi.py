"""Yogi: additive second-moment updates with bounded growth."""
from __future__ import annotations

import math

from ..core.optimizer import Optimizer
from ..core.tensorlist import Ratio, dense
from ..core.transform import Context, Transform
from ..core.validation import betas, nonneg
from ..transforms.decay import WeightDecay


class ScaleByYogi(Transform):
    """``m <- b1 m + (1 - b1) g``; ``v <- v - (1 - b2) sign(v - g^2) g^2``;
    update ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)``.

    Both moments start at ``initial_accumulator`` (as torch_optimizer).
    State: ``exp_avg``, ``exp_avg_sq``.
    """

    nonnegative = ("exp_avg_sq",)

    def init(self, p, group):
        init = group["initial_accumulator"]
        return {"exp_avg": p.new_full(p.shape, init), "exp_avg_sq": p.new_full(p.shape, init)}

    def scalars(self, group, step, sstate):
        b1, b2 = group["betas"]
        return {"bc1": 1 - b1 ** step, "bc2_sqrt": math.sqrt(1 - b2 ** step)}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        hp = ctx.hp
        b1, b2 = hp["betas"]
        m, v = ctx.state["exp_avg"], ctx.state["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        g2 = g.square()
        v.addcmul_(v.sub(g2).sign_(), g2, b2 - 1)
        den = v.sqrt().div_(hp["bc2_sqrt"]).add_(hp["eps"])
        return Ratio(m, den, 1 / hp["bc1"])


class Yogi(Optimizer):
    r"""Yogi.

    Update (as ``torch_optimizer.Yogi``)::

        g <- g + wd theta
        m <- b1 m + (1 - b1) g
        v <- v - (1 - b2) sign(v - g^2) g^2
        theta <- theta - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    ``m`` and ``v`` start at ``initial_accumulator`` (1e-6), not zero. ``v`` moves
    by at most ``(1 - b2) g^2`` per step, so the effective learning rate cannot
    jump up as fast as Adam's when ``v`` overshoots.

    Paper: Zaheer et al., "Adaptive Methods for Nonconvex Optimization" (NeurIPS
    2018). Checked against ``torch_optimizer.Yogi`` (pip ``torch-optimizer``).

    Pitfalls: TF-Addons' Yogi starts ``m`` at zero (only ``v`` at the accumulator)
    and adds eps to the uncorrected ``sqrt(v)``; its ``lr=0.01, eps=1e-3`` defaults
    therefore behave slightly differently early on.
    """

    name = "yogi"
    paper = "Adaptive Methods for Nonconvex Optimization"
    reference = "torch_optimizer.Yogi"
    state_bytes = 8
    has_momentum = True
    rules = {"betas": betas(2), "initial_accumulator": nonneg}
    defaults = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-3, initial_accumulator=1e-6, weight_decay=0.0)

    def build(self):
        return [WeightDecay(), ScaleByYogi()]
