"""AdEMAMix: Adam whose numerator mixes a fast EMA with a slow one (no bias correction).

Optional warmups (Pagliardini et al., 2024; apple/ml-ademamix): ``alpha`` grows
linearly from 0, and ``beta3`` grows from ``beta1`` linearly in half-life
space, over ``alpha_warmup`` / ``beta3_warmup`` steps. Both are plain Python
scalar math in :meth:`ScaleByAdEMAMix.scalars`.
"""
from __future__ import annotations

import math

from ..core.tensorlist import Ratio, dense
from ..core.transform import Context, Transform


def alpha_schedule(step: int, alpha: float, warmup: int | None) -> float:
    """Linear warmup of ``alpha`` from 0 over ``warmup`` steps (constant if ``None``)."""
    if warmup is None or step >= warmup:
        return alpha
    return step / warmup * alpha


def beta3_schedule(step: int, beta3: float, beta_start: float, warmup: int | None) -> float:
    """``beta3`` warmup from ``beta_start``: linear in the half-life ``t(b) = ln(0.5)/ln(b + 1e-8) - 1``,
    mapped back by ``b = 0.5^(1/(t+1))`` (constant if ``warmup`` is ``None``)."""
    if warmup is None or step >= warmup:
        return beta3

    def half_life(b):
        return math.log(0.5) / math.log(b + 1e-8) - 1.0

    a = step / warmup
    t = (1.0 - a) * half_life(beta_start) + a * half_life(beta3)
    return 0.5 ** (1.0 / (t + 1.0))


class ScaleByAdEMAMix(Transform):
    r"""``m1 <- b1 m1 + (1-b1) g``, ``m2 <- b3 m2 + (1-b3) g``, ``v <- b2 v + (1-b2) g^2``;
    update ``(m1 / bc1 + alpha m2) / (sqrt(v) / sqrt(bc2) + eps)`` (``m2`` is not
    bias corrected). ``alpha``/``b3`` follow their warmup schedules.

    State: ``exp_avg_fast``, ``exp_avg_slow``, ``exp_avg_sq`` (names of the apple reference).
    """

    nonnegative = ("exp_avg_sq",)

    def init(self, p, group):
        return {"exp_avg_fast": p.new_zeros(p.shape), "exp_avg_slow": p.new_zeros(p.shape),
                "exp_avg_sq": p.new_zeros(p.shape)}

    def scalars(self, group, step, sstate):
        b1, b2, b3 = group["betas"]
        return {
            "bc1": 1 - b1 ** step,
            "bc2_sqrt": math.sqrt(1 - b2 ** step),
            "alpha_t": alpha_schedule(step, group["alpha"], group.get("alpha_warmup")),
            "beta3_t": beta3_schedule(step, b3, b1, group.get("beta3_warmup")),
        }

    def __call__(self, u, ctx: Context):
        g = dense(u)
        hp = ctx.hp
        b1, b2 = hp["betas"][:2]
        m1, m2, v = ctx.state["exp_avg_fast"], ctx.state["exp_avg_slow"], ctx.state["exp_avg_sq"]
        m1.lerp_(g, 1 - b1)
        m2.lerp_(g, 1 - hp["beta3_t"])
        v.mul_(b2).addcmul_(g, g, 1 - b2)
        num = m1.div(hp["bc1"]).add_(m2, alpha=hp["alpha_t"])
        den = v.sqrt().div_(hp["bc2_sqrt"]).add_(hp["eps"])
        return Ratio(num, den)
