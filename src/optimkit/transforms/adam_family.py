"""Adam relatives with torch.optim parity: NAdam, RAdam and Adamax scalings.

Each transform keeps Adam's first moment ``exp_avg`` (and ``exp_avg_sq`` or
``exp_inf``) and differs in how the moments become an update; all step
dependent coefficients are computed in Python in :meth:`scalars`.
"""
from __future__ import annotations

import math

import torch

from ..core.tensorlist import Ratio, TensorList, dense
from ..core.transform import Context, Transform


def _update_moments(g: TensorList, ctx: Context) -> tuple[TensorList, TensorList]:
    """``m <- b1 m + (1-b1) g`` and ``v <- b2 v + (1-b2) g^2`` in place; return (m, v)."""
    b1, b2 = ctx.hp["betas"][:2]
    m, v = ctx.state["exp_avg"], ctx.state["exp_avg_sq"]
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, 1 - b2)
    return m, v


def _moment_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"exp_avg": p.new_zeros(p.shape), "exp_avg_sq": p.new_zeros(p.shape)}


def _times_float32(x: float, y: float) -> float:
    """``x * y`` rounded as a float32 tensor product (as a float32 state tensor would be)."""
    return (torch.tensor(x, dtype=torch.float32) * y).item()


class ScaleByNAdam(Transform):
    r"""NAdam's update with the momentum schedule of Dozat (2016), as ``torch.optim.NAdam``.

    ``mu_t = b1 (1 - 0.5 * 0.96^(t psi))`` (``psi = momentum_decay``), ``Pi_t = Pi_{t-1} mu_t``
    (scalar state ``mu_product``, kept in float32 like torch), then the update is
    ``((1 - mu_t)/(1 - Pi_t) g + mu_{t+1}/(1 - Pi_t mu_{t+1}) m) / (sqrt(v / bc2) + eps)``.

    State: ``exp_avg``, ``exp_avg_sq``; scalar state ``mu_product``.
    """

    nonnegative = ("exp_avg_sq",)

    scalar_state = {"mu_product": 1.0}

    def init(self, p, group):
        return _moment_state(p)

    def scalars(self, group, step, sstate):
        b1, b2 = group["betas"][:2]
        psi = group["momentum_decay"]
        mu = b1 * (1.0 - 0.5 * 0.96 ** (step * psi))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
        mu_product = _times_float32(sstate["mu_product"], mu)
        sstate["mu_product"] = mu_product
        return {
            "nadam_grad_coef": (1.0 - mu) / (1.0 - mu_product),
            "nadam_momentum_coef": mu_next / (1.0 - mu_product * mu_next),
            "bc2": 1.0 - b2 ** step,
        }

    def __call__(self, u, ctx: Context):
        g = dense(u)
        hp = ctx.hp
        m, v = _update_moments(g, ctx)
        den = v.div(hp["bc2"]).sqrt_().add_(hp["eps"])
        num = g.mul(hp["nadam_grad_coef"]).add_(m.mul(hp["nadam_momentum_coef"]))
        return Ratio(num, den)


class ScaleByRAdam(Transform):
    r"""RAdam's rectified update, as ``torch.optim.RAdam``.

    ``rho_inf = 2/(1-b2) - 1``, ``rho_t = rho_inf - 2 t b2^t / bc2``. When ``rho_t > 5``
    the update is ``r_t (m / bc1) sqrt(bc2) / (sqrt(v) + eps)`` with
    ``r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t))``, otherwise
    the bias-corrected momentum ``m / bc1``. The branch is a static bool (``radam_rectify``).

    State: ``exp_avg``, ``exp_avg_sq``.
    """

    threshold = 5.0
    nonnegative = ("exp_avg_sq",)

    def init(self, p, group):
        return _moment_state(p)

    def scalars(self, group, step, sstate):
        b1, b2 = group["betas"][:2]
        bc1 = 1.0 - b1 ** step
        bc2 = 1.0 - b2 ** step
        rho_inf = 2.0 / (1.0 - b2) - 1.0
        rho_t = rho_inf - 2.0 * step * b2 ** step / bc2
        rectify = rho_t > self.threshold
        if rectify:
            r = math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                          / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
            scale = r * math.sqrt(bc2) / bc1
        else:
            scale = 1.0 / bc1
        return {"radam_rectify": rectify, "radam_scale": scale, "bc1": bc1}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        hp = ctx.hp
        m, v = _update_moments(g, ctx)
        if ctx.static["radam_rectify"]:
            return Ratio(m, v.sqrt().add_(hp["eps"]), hp["radam_scale"])
        return m.div(hp["bc1"])


class ScaleByAdamax(Transform):
    r"""Adamax (Adam paper, section 7), as ``torch.optim.Adamax``.

    ``m <- b1 m + (1-b1) g``, ``u <- max(b2 u, |g| + eps)`` (eps inside the max);
    update ``(m / bc1) / u``. State: ``exp_avg``, ``exp_inf``.
    """

    nonnegative = ("exp_inf",)

    def init(self, p, group):
        return {"exp_avg": p.new_zeros(p.shape), "exp_inf": p.new_zeros(p.shape)}

    def scalars(self, group, step, sstate):
        b1 = group["betas"][0]
        return {"adamax_scale": 1.0 / (1.0 - b1 ** step)}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        hp = ctx.hp
        b1, b2 = hp["betas"][:2]
        m, inf = ctx.state["exp_avg"], ctx.state["exp_inf"]
        m.lerp_(g, 1 - b1)
        inf.mul_(b2).maximum_(g.abs().add_(hp["eps"]))
        return Ratio(m, inf, hp["adamax_scale"])
