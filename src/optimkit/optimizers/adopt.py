"""ADOPT: Adam with the second moment taken before the current gradient."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..core.tensorlist import dense
from ..core.transform import Context, Transform
from ..core.validation import betas
from ..transforms.decay import WeightDecay


class ScaleByADOPT(Transform):
    """ADOPT's normalised momentum.

    First step: ``v <- g^2`` only (the update is the still-zero ``m``; the
    optimizer skips it). Later steps, with ``t`` the number of previous steps::

        n = clip(g / max(sqrt(v), eps), -t^(1/4), t^(1/4))
        m <- b1 m + (1 - b1) n;   update = m
        v <- b2 v + (1 - b2) g^2                    (after its use)

    State: ``exp_avg`` (m), ``exp_avg_sq`` (v). Static scalar ``adopt_init``.
    """

    nonnegative = ("exp_avg_sq",)

    def init(self, p, group):
        return {"exp_avg": p.new_zeros(p.shape), "exp_avg_sq": p.new_zeros(p.shape)}

    def scalars(self, group, step, sstate):
        return {"adopt_init": step == 1, "adopt_clip": float(step - 1) ** 0.25}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        b1, b2 = ctx.hp["betas"]
        m, v = ctx.state["exp_avg"], ctx.state["exp_avg_sq"]
        if ctx.static["adopt_init"]:
            v.addcmul_(g, g)
            return m
        clip = ctx.hp["adopt_clip"]
        normed = g.div(v.sqrt().maximum_(ctx.hp["eps"])).clamp(-clip, clip)
        m.lerp_(normed, 1 - b1)
        v.mul_(b2).addcmul_(g, g, 1 - b2)
        return m


class _ADOPTWeightDecay(WeightDecay):
    """L2 from the first step; decoupled decay only on steps that update (as the reference)."""

    def __call__(self, u, ctx: Context):
        if ctx.static["decoupled"] and ctx.static["adopt_init"]:
            return u
        return super().__call__(u, ctx)


class ADOPT(Optimizer):
    r"""ADOPT (ADaptive gradient method with the OPTimal convergence rate).

    Update (as the authors' ``adopt.ADOPT``, pip ``torch-adopt``)::

        g <- g + wd theta                                  (unless decoupled)
        t = 1:  v <- g^2, no parameter update
        t > 1:  theta <- theta (1 - lr wd)                 (if decoupled)
                n = clip(g / max(sqrt(v), eps), +-(t - 1)^(1/4))
                m <- b1 m + (1 - b1) n;   theta <- theta - lr m
                v <- b2 v + (1 - b2) g^2

    No bias correction. The clip bound uses the number of *previous* steps, as the
    authors' code (pytorch_optimizer uses ``t^(1/4)``); the unclipped original
    version (``clip_lambda=None``) is not offered. ``decoupled`` is the authors'
    ``decouple`` flag.

    Paper: Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with
    the Optimal Rate" (NeurIPS 2024). Checked against ``adopt.ADOPT`` (torch-adopt 0.1.0).
    """

    name = "adopt"
    paper = "ADOPT: Modified Adam Can Converge with Any β2 with the Optimal Rate"
    reference = "adopt.ADOPT"
    state_bytes = 8
    has_momentum = True
    rules = {"betas": betas(2)}
    defaults = dict(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, decoupled=False)

    def build(self):
        return [_ADOPTWeightDecay(decoupled="decoupled"), ScaleByADOPT()]

    def apply(self, u, ctx: Context) -> None:
        if ctx.static["adopt_init"]:  # the first step only initialises v
            return
        super().apply(u, ctx)
