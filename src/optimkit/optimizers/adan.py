"""Adan: adaptive Nesterov momentum."""
from __future__ import annotations

import math

import torch

from ..core.optimizer import Optimizer
from ..core.tensorlist import Ratio, dense
from ..core.transform import Context, Transform
from ..core.validation import betas, nonneg


class ClipByGlobalNorm(Transform):
    """``g <- g * min(1, max_grad_norm / (||g||_global + eps))`` when ``max_grad_norm > 0``.

    The norm is taken over the gradients of *all* param groups, as in the Adan
    reference; the owning optimizer measures it before the group steps
    (:meth:`Adan.step`) and stores it in :attr:`norm`.
    """

    def __init__(self):
        self.norm: torch.Tensor | None = None

    def scalars(self, group, step, sstate):
        if group["max_grad_norm"] == 0 or self.norm is None:
            return {"clip_coef": 1.0}
        # float32 arithmetic, like the reference (which computes it with tensors)
        coef = torch.clamp(torch.tensor(group["max_grad_norm"], dtype=torch.float32)
                           / (self.norm + group["eps"]), max=1.0)
        return {"clip_coef": coef.item()}

    def __call__(self, u, ctx: Context):
        if not ctx.static["max_grad_norm"]:
            return u
        return dense(u).mul(ctx.hp["clip_coef"])


class ScaleByAdan(Transform):
    """Adan's three moments; update ``(m / bc1 + b2 d / bc2) / (sqrt(n / bc3) + eps)``.

    With ``diff = g - g_prev`` (0 on the first step)::

        m <- b1 m + (1 - b1) g;   d <- b2 d + (1 - b2) diff;   n <- b3 n + (1 - b3) (g + b2 diff)^2

    State (names of the reference): ``exp_avg`` (m), ``exp_avg_diff`` (d),
    ``exp_avg_sq`` (n) and ``neg_pre_grad`` (minus the previous gradient).
    """

    nonnegative = ("exp_avg_sq",)

    def init(self, p, group):
        return {"exp_avg": p.new_zeros(p.shape), "exp_avg_sq": p.new_zeros(p.shape),
                "exp_avg_diff": p.new_zeros(p.shape), "neg_pre_grad": p.new_zeros(p.shape)}

    def scalars(self, group, step, sstate):
        b1, b2, b3 = group["betas"]
        return {"adan_first": step == 1,
                "adan_m_scale": 1.0 / (1 - b1 ** step),
                "adan_d_scale": b2 / (1 - b2 ** step),
                "adan_bc3_sqrt": math.sqrt(1 - b3 ** step)}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        hp, st = ctx.hp, ctx.state
        b1, b2, b3 = hp["betas"]
        m, n, d, neg_prev = st["exp_avg"], st["exp_avg_sq"], st["exp_avg_diff"], st["neg_pre_grad"]
        diff = g.zeros_like() if ctx.static["adan_first"] else g.add(neg_prev)
        m.lerp_(g, 1 - b1)
        d.lerp_(diff, 1 - b2)
        w = diff.mul_(b2).add_(g)
        n.mul_(b3).addcmul_(w, w, 1 - b3)
        neg_prev.copy_(g).neg_()
        den = n.sqrt().div_(hp["adan_bc3_sqrt"]).add_(hp["eps"])
        num = m.mul(hp["adan_m_scale"]).add_(d, alpha=hp["adan_d_scale"])
        return Ratio(num, den)


class Adan(Optimizer):
    r"""Adan (Adaptive Nesterov momentum).

    Update (as the authors' ``Adan`` and ``pytorch_optimizer.Adan``)::

        g <- g * min(1, max_grad_norm / (||g||_all groups + eps))   (if max_grad_norm > 0)
        diff = g - g_prev                                           (0 on the first step)
        m <- b1 m + (1 - b1) g
        d <- b2 d + (1 - b2) diff
        n <- b3 n + (1 - b3) (g + b2 diff)^2
        u = (m / (1 - b1^t) + b2 d / (1 - b2^t)) / (sqrt(n) / sqrt(1 - b3^t) + eps)
        theta <- (theta - lr u) / (1 + lr wd)                       (proximal, default)
        theta <- theta (1 - lr wd) - lr u                           (no_prox=True)

    ``betas`` follow the reference code (0.98, 0.92, 0.99), i.e. one minus the
    paper's (0.02, 0.08, 0.01).

    Paper: Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models" (2022). Checked against the authors' code (sail-sg/Adan,
    reproduced from its equations in the tests) and ``pytorch_optimizer.Adan``.

    Pitfalls: the references read ``max_grad_norm`` (and the clipping eps) once
    for the whole optimizer; here each group uses its own values against the norm
    of all gradients (identical when they agree). ``adan-pytorch`` on PyPI is a
    different early variant (betas written as the paper's ``1 - beta``, no moment
    update on the first step, ``(1 - b2) d`` in the update), not this rule.
    """

    name = "adan"
    paper = "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models"
    reference = "sail-sg Adan (adan.Adan)"
    state_bytes = 16
    has_momentum = True
    rules = {"betas": betas(3), "max_grad_norm": nonneg}
    defaults = dict(lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0,
                    max_grad_norm=0.0, no_prox=False)

    def build(self):
        self._clip = ClipByGlobalNorm()
        return [self._clip, ScaleByAdan()]

    def prepare_step(self) -> None:
        """The clipping norm is taken over the gradients of all groups, before any group steps."""
        self._clip.norm = None
        if any(group["max_grad_norm"] > 0 for group in self.param_groups):
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                grads = [g.to_dense() if g.is_sparse else g for g in grads]
                grads = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
                device = grads[0].device
                squares = torch.stack([g.float().pow(2).sum().to(device) for g in grads])
                self._clip.norm = squares.sum().sqrt()

    def apply(self, u, ctx: Context) -> None:
        """``theta <- (theta - lr u) / (1 + lr wd)``, or decoupled decay first with ``no_prox``."""
        decay = ctx.static["weight_decay"]
        lr, wd = ctx.hp["lr"], ctx.hp["weight_decay"]
        if decay and ctx.static["no_prox"]:
            ctx.params.mul_(1 - lr * wd)
        super().apply(u, ctx)
        if decay and not ctx.static["no_prox"]:
            ctx.params.div_(1 + lr * wd)
