"""AdaBelief: Adam with the variance of the gradient around its EMA."""
from __future__ import annotations

import math

from ..core.optimizer import Optimizer
from ..core.tensorlist import Ratio, dense
from ..core.transform import Context, Transform
from ..core.validation import betas
from ..transforms.decay import WeightDecay


def _rectification(b1: float, b2: float, step: int) -> tuple[float, float]:
    """RAdam's length of the SMA and AdaBelief's rectified step size (without lr)."""
    b2_t = b2 ** step
    n_sma_max = 2 / (1 - b2) - 1
    n_sma = n_sma_max - 2 * step * b2_t / (1 - b2_t)
    if n_sma >= 5:
        size = math.sqrt((1 - b2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma
                         * n_sma_max / (n_sma_max - 2)) / (1 - b1 ** step)
    else:
        size = 1.0 / (1 - b1 ** step)
    return n_sma, size


class ScaleByBelief(Transform):
    """AdaBelief's moments and (optionally rectified) scaling.

    ``m <- b1 m + (1 - b1) g``; ``s <- b2 s + (1 - b2) (g - m)^2 + eps`` (new ``m``;
    eps is stored in ``s``); with ``amsgrad`` ``s_max <- max(s_max, s)`` replaces ``s``.

    * ``rectify=False``: update ``(m / bc1) / (sqrt(s) / sqrt(bc2) + eps)``.
    * ``rectify=True`` (RAdam's rule, threshold ``rho_t >= 5``): update
      ``r_t m / (sqrt(s) + eps)`` with ``r_t`` the rectified step size; below the
      threshold ``m / bc1`` (``degenerated_to_sgd``) or nothing.

    State: ``exp_avg``, ``exp_avg_var`` (+ ``max_exp_avg_var``), as adabelief_pytorch.
    """

    nonnegative = ("exp_avg_var", "max_exp_avg_var")

    def init(self, p, group):
        st = {"exp_avg": p.new_zeros(p.shape), "exp_avg_var": p.new_zeros(p.shape)}
        if group["amsgrad"]:
            st["max_exp_avg_var"] = p.new_zeros(p.shape)
        return st

    def scalars(self, group, step, sstate):
        b1, b2 = group["betas"]
        out = {"bc1": 1 - b1 ** step, "bc2_sqrt": math.sqrt(1 - b2 ** step)}
        if group["rectify"]:
            n_sma, size = _rectification(b1, b2, step)
            out["belief_rectified"] = n_sma >= 5
            out["belief_step_size"] = size
        return out

    def __call__(self, u, ctx: Context):
        g = dense(u)
        hp, static = ctx.hp, ctx.static
        b1, b2 = hp["betas"]
        m, s = ctx.state["exp_avg"], ctx.state["exp_avg_var"]
        m.lerp_(g, 1 - b1)
        r = g.sub(m)
        s.mul_(b2).addcmul_(r, r, 1 - b2).add_(hp["eps"])
        if static["amsgrad"]:
            s = ctx.state["max_exp_avg_var"].maximum_(s)
        if not static["rectify"]:
            return Ratio(m, s.sqrt().div_(hp["bc2_sqrt"]).add_(hp["eps"]), 1 / hp["bc1"])
        if static["belief_rectified"]:
            return Ratio(m, s.sqrt().add_(hp["eps"]), hp["belief_step_size"])
        if static["degenerated_to_sgd"]:
            return m.mul(hp["belief_step_size"])
        return m.zeros_like()


class _BeliefWeightDecay(WeightDecay):
    """Decoupled ``theta (1 - lr wd)``, ``fixed_decay``: ``theta (1 - wd)``; else L2."""

    def __call__(self, u, ctx: Context):
        if ctx.static["weight_decay"] and ctx.static["weight_decouple"] and ctx.static["fixed_decay"]:
            ctx.params.mul_(1 - ctx.hp["weight_decay"])
            return u
        return super().__call__(u, ctx)


class AdaBelief(Optimizer):
    r"""AdaBelief.

    Update (as ``adabelief_pytorch.AdaBelief`` 0.2.x)::

        theta <- theta (1 - lr wd)     (weight_decouple; fixed_decay: theta (1 - wd); else g <- g + wd theta)
        m <- b1 m + (1 - b1) g
        s <- b2 s + (1 - b2) (g - m)^2 + eps                   (s_max <- max(s_max, s) with amsgrad)
        rectify=False:  theta <- theta - (lr / (1 - b1^t)) m / (sqrt(s) / sqrt(1 - b2^t) + eps)
        rectify=True:   rho_t = rho_inf - 2 t b2^t / (1 - b2^t),  rho_inf = 2 / (1 - b2) - 1
                        rho_t >= 5: theta <- theta - lr r_t m / (sqrt(s) + eps),
                                    r_t = sqrt((1 - b2^t)(rho_t - 4)(rho_t - 2) rho_inf
                                               / ((rho_inf - 4)(rho_inf - 2) rho_t)) / (1 - b1^t)
                        else:       theta <- theta - lr m / (1 - b1^t)   (degenerated_to_sgd; else no step)

    eps enters twice (inside ``s`` and in the denominator), so Adam's 1e-8 is not
    equivalent to AdaBelief's default 1e-16.

    Paper: Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
    Observed Gradients" (NeurIPS 2020). Checked against ``adabelief_pytorch.AdaBelief``
    0.2.1 (pip ``adabelief-pytorch``) and ``pytorch_optimizer.AdaBelief``. With
    ``amsgrad=True`` and ``rectify=True`` the running maximum is used in both branches
    (as pytorch_optimizer); adabelief_pytorch ignores it in the rectified branch.

    Pitfalls: the rectification threshold is ``rho_t >= 5`` (torch's RAdam: ``> 5``).
    pytorch_optimizer defaults to ``rectify=False``. adabelief_pytorch sets
    ``weight_decouple``, ``fixed_decay``, ``rectify`` and ``degenerated_to_sgd`` for
    the whole optimizer; here they are per group.
    """

    name = "adabelief"
    paper = "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients"
    reference = "adabelief_pytorch.AdaBelief"
    state_bytes = 8  # 12 with amsgrad
    has_momentum = True
    rules = {"betas": betas(2)}
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, amsgrad=False,
                    weight_decouple=True, fixed_decay=False, rectify=True, degenerated_to_sgd=True)

    def build(self):
        return [_BeliefWeightDecay(decoupled="weight_decouple"), ScaleByBelief()]
