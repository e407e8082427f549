"""Layer-wise trust ratios (LAMB, LARS): rescale each tensor's update by a ratio of norms.

Norms are per-tensor reductions (0-d tensors); the "ratio is 1 when a norm is
zero" rule is a ``torch.where``, so the same code runs under ``torch.compile``.
"""
from __future__ import annotations

import math

import torch

from ..core.tensorlist import Ratio, TensorList, dense
from ..core.transform import Context, Transform
from .adam import update_moments


def _ratio_or_one(num, den, ok):
    """``num / den`` where ``ok``, else 1 (0-d tensors; no division by zero is evaluated)."""
    return torch.where(ok, num / torch.where(ok, den, 1.0), 1.0)


class ScaleByLambMoments(Transform):
    r"""LAMB's Adam direction without bias correction: ``m <- b1 m + (1-b1) g``,
    ``v <- b2 v + (1-b2) g^2``; update ``m / (sqrt(v) + eps)``.

    State: ``exp_avg``, ``exp_avg_sq``.
    """

    nonnegative = ("exp_avg_sq",)

    def init(self, p, group):
        return {"exp_avg": p.new_zeros(p.shape), "exp_avg_sq": p.new_zeros(p.shape)}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        hp = ctx.hp
        m, v = update_moments(g, ctx)
        return Ratio(m, v.sqrt().add_(hp["eps"]))


class LambTrustRatio(Transform):
    r"""LAMB trust ratio: ``u <- trust * u`` with
    ``trust = min(||theta||, clamp_value) / ||u||`` (1 if either norm is 0), as
    ``torch_optimizer.Lamb``. With ``adam`` the ratio is forced to 1; with
    ``debias`` the result is scaled by ``sqrt(1 - b2^t) / (1 - b1^t)``
    (the ratio itself is computed without it).

    Hyperparameters: ``clamp_value``, ``adam``, ``debias``.
    """

    def scalars(self, group, step, sstate):
        if not group.get("debias"):
            return {}
        b1, b2 = group["betas"][:2]
        return {"lamb_debias": math.sqrt(1 - b2 ** step) / (1 - b1 ** step)}

    def __call__(self, u, ctx: Context):
        r = dense(u)
        if not ctx.static.get("adam"):
            w_norms = [torch.clamp_max(n, ctx.hp["clamp_value"]) for n in ctx.params.norm()]
            trust = [_ratio_or_one(w, n, (w != 0) & (n != 0)) for w, n in zip(w_norms, r.norm())]
            r = r.mul(trust)
        if ctx.static.get("debias"):
            r = r.mul(ctx.hp["lamb_debias"])
        return r


class LarsTrustRatio(Transform):
    r"""LARS local learning rate: ``u <- local * (u + wd theta)`` with
    ``local = c ||theta|| / (||u|| + wd ||theta||)`` (1 if ``||theta||`` or the
    denominator is 0), ``c = trust_coefficient``.

    With ``exclude_1d`` (default, as ``pytorch_optimizer.LARS``), tensors with
    ``ndim <= 1`` (biases, norm scales) are left alone: no ratio and no weight
    decay. Apply before momentum.
    """

    def __call__(self, u, ctx: Context):
        u = dense(u)
        hp = ctx.hp
        wd = hp["weight_decay"]
        use_wd = ctx.static["weight_decay"]
        exclude = ctx.static.get("exclude_1d", True)
        w_norms = ctx.params.norm()
        u_norms = u.norm()
        out = []
        for ui, pi, wn, un in zip(u, ctx.params, w_norms, u_norms):
            if exclude and pi.ndim <= 1:
                out.append(ui)
                continue
            den = un + wd * wn if use_wd else un
            local = _ratio_or_one(hp["trust_coefficient"] * wn, den, (wn > 0) & (den > 0))
            d = ui + wd * pi if use_wd else ui
            out.append(d.mul(local))
        return TensorList(out)
