"""Adafactor's building blocks: factored second moment, update clipping, relative step size.

A matrix-shaped gradient (any tensor with two or more dims; the last two are
factored, leading dims are batch dims) keeps only the row and column means of
its squared values: ``m + n`` numbers instead of ``m * n``. Vectors and
scalars keep a full second moment.

Every parameter of a group carries the same state keys (the optimizer core
stacks each key over the group); the keys a parameter does not use hold an
empty placeholder tensor (``numel() == 0``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.tensorlist import dense
from ..core.transform import Context, Transform


def placeholder(p: Tensor) -> Tensor:
    """An empty state tensor, for a state key this parameter does not use."""
    return p.new_zeros(0)


def is_factored(t: Tensor) -> bool:
    return t.dim() >= 2


class ScaleByFactoredRMS(Transform):
    r"""Adafactor's second moment, in the form of ``torch.optim.Adafactor``.

    With ``1 - beta2_t = t ** beta2_decay`` (``beta2_decay`` <= 0)::

        matrices:  R <- lerp(R, rowmean(G^2), 1 - beta2_t)      (shape [..., m, 1])
                   C <- lerp(C, colmean(G^2), 1 - beta2_t)      (shape [..., 1, n])
                   V = R C / max(mean(R), eps1)
        vectors:   V <- lerp(V, G^2, 1 - beta2_t)
        update:    G / max(sqrt(V), eps1)

    ``eps1`` is ``eps[0]``, or the machine epsilon of the parameter's dtype when
    it is None. State: ``row_var``, ``col_var`` (matrices), ``variance``
    (vectors), named as in torch.
    """

    nonnegative = ("row_var", "col_var", "variance")

    def init(self, p, group):
        if is_factored(p):
            return {"row_var": p.new_zeros(*p.shape[:-1], 1),
                    "col_var": p.new_zeros(*p.shape[:-2], 1, p.shape[-1]),
                    "variance": placeholder(p)}
        return {"row_var": placeholder(p), "col_var": placeholder(p), "variance": p.new_zeros(p.shape)}

    def scalars(self, group, step, sstate):
        eps1 = group["eps"][0]
        return {"factored_w": float(step) ** group["beta2_decay"],
                "factored_eps1_auto": eps1 is None,
                "factored_eps1": 0.0 if eps1 is None else float(eps1)}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        w = ctx.hp["factored_w"]
        auto = ctx.static["factored_eps1_auto"]
        eps1_hp = ctx.hp["factored_eps1"]

        def one(g: Tensor, row: Tensor, col: Tensor, var: Tensor) -> Tensor:
            eps1 = torch.finfo(g.dtype).eps if auto else eps1_hp
            if is_factored(g):
                # mean of squares along a dim, as a squared norm (no g*g temporary)
                row.lerp_(torch.linalg.vector_norm(g, dim=-1, keepdim=True).square_().div_(g.shape[-1]), w)
                col.lerp_(torch.linalg.vector_norm(g, dim=-2, keepdim=True).square_().div_(g.shape[-2]), w)
                v = (row * col).div_(row.mean(dim=-2, keepdim=True).clamp_min(eps1))
            else:
                var.lerp_(g * g, w)
                v = var.clone()
            return v.clamp_min_(eps1 * eps1).rsqrt_().mul_(g)

        return g.map(one, ctx.state["row_var"], ctx.state["col_var"], ctx.state["variance"])


class ClipByRMS(Transform):
    """Update clipping: ``u <- u / max(1, RMS(u) / d)`` per tensor.

    Args:
        key: the hyperparameter holding the threshold ``d`` (``"d"`` in torch's
            Adafactor, ``"clip_threshold"`` in the paper, transformers and CAME).
    """

    def __init__(self, key: str = "d"):
        self.key = key

    def __call__(self, u, ctx: Context):
        u = dense(u)
        d = ctx.hp[self.key]
        scale = [1.0 / torch.clamp_min(n / (math.sqrt(max(t.numel(), 1)) * d), 1.0)
                 for n, t in zip(u.norm(), u)]
        return u.mul(scale)


class RelativeStepSize(Transform):
    r"""Adafactor's step size ``alpha_t = max(eps2, RMS(theta)) * rho_t``, as a factor of ``lr``.

    ``rho_t = min(lr, 1/sqrt(t))`` with ``relative_step`` (torch's Adafactor;
    the paper's rule with ``lr = 1e-2``), else ``rho_t = lr``. The parameter
    scale ``max(eps2, RMS(theta))`` applies when ``scale_parameter``. Since the
    apply stage multiplies by ``lr``, the update is scaled by ``alpha_t / lr``.
    ``eps2`` is ``eps[1]``. Must run before any change to the parameters
    (weight decay) in the same step.
    """

    def scalars(self, group, step, sstate):
        lr = group["lr"]
        ratio = 1.0
        if group["relative_step"] and lr > 0:
            ratio = min(1.0, 1.0 / (lr * math.sqrt(step)))
        return {"relative_step_ratio": ratio, "relative_step_eps2": float(group["eps"][1])}

    def __call__(self, u, ctx: Context):
        u = dense(u)
        ratio = ctx.hp["relative_step_ratio"]
        if not ctx.static["scale_parameter"]:
            return u.mul(ratio)
        eps2 = ctx.hp["relative_step_eps2"]
        scale = [torch.clamp_min(n / math.sqrt(max(p.numel(), 1)), eps2) * ratio
                 for n, p in zip(ctx.params.norm(), ctx.params)]
        return u.mul(scale)


class EMA(Transform):
    """First moment of the incoming update: ``m <- b m + (1 - b) u``, returned as the update.

    Inactive (no state) when the hyperparameter ``key`` is None or zero.
    State: ``buffer`` (default ``exp_avg``).
    """

    def __init__(self, key: str = "beta1", buffer: str = "exp_avg"):
        self.key = key
        self.buffer = buffer

    def init(self, p, group):
        return {self.buffer: p.new_zeros(p.shape)} if group[self.key] else {}

    def __call__(self, u, ctx: Context):
        if not ctx.static[self.key]:
            return u
        m = ctx.state[self.buffer]
        return m.lerp_(dense(u), 1 - ctx.hp[self.key])


__all__ = ["ClipByRMS", "EMA", "RelativeStepSize", "ScaleByFactoredRMS", "is_factored", "placeholder"]
