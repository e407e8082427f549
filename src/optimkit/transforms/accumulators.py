"""Second-moment accumulators with torch.optim parity: Adagrad, RMSprop, Adadelta."""
from __future__ import annotations

import torch

from ..core.tensorlist import Ratio, dense
from ..core.transform import Context, Transform


class ScaleByAdagrad(Transform):
    r"""Adagrad: ``s <- s + g^2``; update ``g / (sqrt(s) + eps) / (1 + (t-1) lr_decay)``.

    State: ``sum``, initialised to ``initial_accumulator_value`` (as ``torch.optim.Adagrad``).
    """

    nonnegative = ("sum",)

    def init(self, p, group):
        return {"sum": torch.full_like(p, group["initial_accumulator_value"],
                                       memory_format=torch.preserve_format)}

    def scalars(self, group, step, sstate):
        return {"adagrad_scale": 1.0 / (1.0 + (step - 1) * group["lr_decay"])}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        s = ctx.state["sum"]
        s.addcmul_(g, g, 1)
        return Ratio(g, s.sqrt().add_(ctx.hp["eps"]), ctx.hp["adagrad_scale"])


class ScaleByRMSprop(Transform):
    r"""RMSprop as ``torch.optim.RMSprop``.

    ``v <- alpha v + (1-alpha) g^2``; centered: ``gbar <- alpha gbar + (1-alpha) g`` and
    ``den = sqrt(v - gbar^2) + eps``, else ``den = sqrt(v) + eps``. With momentum ``mu > 0``:
    ``b <- mu b + g / den`` (b starts at zero) and the update is ``b``; else ``g / den``.

    State: ``square_avg`` (+ ``momentum_buffer`` if momentum > 0, + ``grad_avg`` if centered).
    """

    nonnegative = ("square_avg",)

    def init(self, p, group):
        st = {"square_avg": p.new_zeros(p.shape)}
        if group["momentum"] > 0:
            st["momentum_buffer"] = p.new_zeros(p.shape)
        if group["centered"]:
            st["grad_avg"] = p.new_zeros(p.shape)
        return st

    def __call__(self, u, ctx: Context):
        g = dense(u)
        hp = ctx.hp
        alpha = hp["alpha"]
        v = ctx.state["square_avg"]
        v.mul_(alpha).addcmul_(g, g, 1 - alpha)
        if ctx.static["centered"]:
            gbar = ctx.state["grad_avg"]
            gbar.lerp_(g, 1 - alpha)
            den = v.clone().addcmul_(gbar, gbar, -1).sqrt_()
        else:
            den = v.sqrt()
        den.add_(hp["eps"])
        if ctx.static["momentum"]:
            buf = ctx.state["momentum_buffer"]
            buf.mul_(hp["momentum"]).addcdiv_(g, den, 1)
            return buf
        return Ratio(g, den)


class ScaleByAdadelta(Transform):
    r"""Adadelta as ``torch.optim.Adadelta`` (eps inside both roots).

    ``v <- rho v + (1-rho) g^2``; ``d = sqrt(u + eps) / sqrt(v + eps) * g``;
    ``u <- rho u + (1-rho) d^2``; the update is ``d``. State: ``square_avg``, ``acc_delta``.
    """

    nonnegative = ("square_avg", "acc_delta")

    def init(self, p, group):
        return {"square_avg": p.new_zeros(p.shape), "acc_delta": p.new_zeros(p.shape)}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        hp = ctx.hp
        rho, eps = hp["rho"], hp["eps"]
        v, acc = ctx.state["square_avg"], ctx.state["acc_delta"]
        v.mul_(rho).addcmul_(g, g, 1 - rho)
        std = v.add(eps).sqrt_()
        delta = acc.add(eps).sqrt_().div_(std).mul_(g)
        acc.mul_(rho).addcmul_(delta, delta, 1 - rho)
        return delta
