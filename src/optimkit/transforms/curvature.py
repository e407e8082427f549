"""Update directions of the Hessian-diagonal optimizers (AdaHessian, Sophia).

Their curvature state (AdaHessian's ``exp_hessian_diag_sq``, Sophia's ``hessian``)
is folded in eagerly before the kernel runs (``prepare_step`` from Hutchinson
products, or SophiaG's ``update_hessian``); these transforms only read it, so the
same code runs eagerly and compiled.
"""
from __future__ import annotations

import torch

from ..core.tensorlist import Ratio, dense
from ..core.transform import Context, Transform


def refreshes_before(step: int, period: int) -> int:
    """How many curvature refreshes steps 1..step held (refresh on steps 1, 1 + period, ...)."""
    return (step - 1) // period + 1


class AdaHessianScale(Transform):
    """``m <- b1 m + (1 - b1) g``; update ``(m / bc1) / ((v / bc2)^(k/2) + eps)``.

    ``v`` (state ``exp_hessian_diag_sq``) is the EMA of the squared (spatially
    averaged) Hessian diagonal estimates; ``bc2 = 1 - b2^r`` with ``r`` the number
    of refreshes so far (``r = t`` for ``update_each = 1``), ``k = hessian_power``.
    """

    nonnegative = ("exp_hessian_diag_sq",)

    def init(self, p, group):
        return {"exp_avg": p.new_zeros(p.shape), "exp_hessian_diag_sq": p.new_zeros(p.shape)}

    def scalars(self, group, step, sstate):
        b1, b2 = group["betas"]
        r = refreshes_before(step, group["update_each"])
        return {"bc1": 1 - b1 ** step, "bc2": 1 - b2 ** r}

    def __call__(self, u, ctx: Context):
        hp = ctx.hp
        b1 = hp["betas"][0]
        m = ctx.state["exp_avg"]
        m.lerp_(dense(u), 1 - b1)
        v = ctx.state["exp_hessian_diag_sq"]
        half_power = hp["hessian_power"] * 0.5
        den = v.div(hp["bc2"]).map(lambda x: x.pow(half_power)).add_(hp["eps"])
        return Ratio(m, den, 1 / hp["bc1"])


class SophiaHClip(Transform):
    """SophiaH as pytorch_optimizer: ``m <- lerp(m, g, 1 - b1)``; update
    ``clamp(m / max(h, eps), -p, p)`` (``h``: state ``hessian``, signed)."""

    def init(self, p, group):
        return {"exp_avg": p.new_zeros(p.shape), "hessian": p.new_zeros(p.shape)}

    def __call__(self, u, ctx: Context):
        hp = ctx.hp
        m = ctx.state["exp_avg"]
        m.lerp_(dense(u), 1 - hp["betas"][0])
        eps, clip = hp["eps"], hp["p"]
        return m.map(lambda mi, hi: (mi / hi.clamp_min(eps)).clamp_(-clip, clip), ctx.state["hessian"])


class SophiaGClip(Transform):
    """SophiaG as the authors: ``m <- b1 m + (1 - b1) g``; update
    ``sign(m) * min(|m| / (rho * bs * h + 1e-15), 1)`` (``h``: state ``hessian``,
    the EMA of Gauss-Newton-Bartlett estimates ``g_hat * g_hat``)."""

    nonnegative = ("hessian",)

    def init(self, p, group):
        return {"exp_avg": p.new_zeros(p.shape), "hessian": p.new_zeros(p.shape)}

    def __call__(self, u, ctx: Context):
        hp = ctx.hp
        m = ctx.state["exp_avg"]
        m.mul_(hp["betas"][0]).add_(dense(u), alpha=1 - hp["betas"][0])
        scale = hp["rho"] * hp["bs"]

        def clipped(mi, hi):
            ratio = (mi.abs() / (hi * scale + 1e-15)).clamp_(max=1.0)
            return torch.sign(mi) * ratio

        return m.map(clipped, ctx.state["hessian"])
