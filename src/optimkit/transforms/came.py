"""CAME's building blocks: factored second moment (paper-style eps) and confidence-guided scaling.

Factored tensors (two or more dims; the last two are factored) keep row and
column means; vectors and scalars keep full moments. As in the reference
implementation, row statistics have the gradient's shape without the last
dim and column statistics without the second-to-last dim. Keys a parameter
does not use hold an empty placeholder (see ``factored.placeholder``).
"""
from __future__ import annotations

from torch import Tensor

from ..core.tensorlist import dense
from ..core.transform import Context, Transform
from .factored import is_factored, placeholder


def factored_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """``1 / sqrt(R C / mean(R))`` from row statistics ``[..., m]`` and column statistics ``[..., n]``."""
    r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c = col.unsqueeze(-2).rsqrt()
    return r * c


def _factored_init(p: Tensor, row: str, col: str, full: str) -> dict:
    if is_factored(p):
        return {row: p.new_zeros(p.shape[:-1]), col: p.new_zeros(*p.shape[:-2], p.shape[-1]),
                full: placeholder(p)}
    return {row: placeholder(p), col: placeholder(p), full: p.new_zeros(p.shape)}


class ScaleByFactoredSecondMoment(Transform):
    r"""Factored second moment with eps added to the squared gradient (paper / transformers style).

    With ``b = betas[1]`` and ``eps1 = eps[0]``::

        S = G^2 + eps1
        matrices:  R <- b R + (1-b) rowmean(S);  C <- b C + (1-b) colmean(S);  U = G / sqrt(R C / mean(R))
        vectors:   V <- b V + (1-b) S;  U = G / sqrt(V)

    State: ``exp_avg_sq_row``, ``exp_avg_sq_col`` (matrices), ``exp_avg_sq`` (vectors).
    """

    nonnegative = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")

    def init(self, p, group):
        return _factored_init(p, "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")

    def __call__(self, u, ctx: Context):
        g = dense(u)
        w = 1 - ctx.hp["betas"][1]
        eps1 = ctx.hp["eps"][0]

        def one(g: Tensor, row: Tensor, col: Tensor, var: Tensor) -> Tensor:
            s = (g * g).add_(eps1)
            if is_factored(g):
                row.lerp_(s.mean(dim=-1), w)
                col.lerp_(s.mean(dim=-2), w)
                return factored_rsqrt(row, col).mul_(g)
            var.lerp_(s, w)
            return var.rsqrt().mul_(g)

        st = ctx.state
        return g.map(one, st["exp_avg_sq_row"], st["exp_avg_sq_col"], st["exp_avg_sq"])


class CameConfidence(Transform):
    r"""CAME's confidence-guided step: momentum of the (clipped) update, divided by the
    factored square root of its instability.

    With ``b1, b3 = betas[0], betas[2]`` and ``eps2 = eps[1]``::

        m <- b1 m + (1-b1) U
        matrices:  D = (U - m)^2 + eps2;  R' <- b3 R' + (1-b3) rowmean(D);  C' likewise
                   update = m / sqrt(R' C' / mean(R'))
        vectors:   update = m

    State: ``exp_avg``, ``exp_avg_res_row``, ``exp_avg_res_col`` (the last two
    are placeholders for vectors).
    """

    nonnegative = ("exp_avg_res_row", "exp_avg_res_col")

    def init(self, p, group):
        st = {"exp_avg": p.new_zeros(p.shape)}
        if is_factored(p):
            st.update(exp_avg_res_row=p.new_zeros(p.shape[:-1]),
                      exp_avg_res_col=p.new_zeros(*p.shape[:-2], p.shape[-1]))
        else:
            st.update(exp_avg_res_row=placeholder(p), exp_avg_res_col=placeholder(p))
        return st

    def __call__(self, u, ctx: Context):
        u = dense(u)
        b1, _, b3 = ctx.hp["betas"]
        eps2 = ctx.hp["eps"][1]
        m = ctx.state["exp_avg"]
        m.lerp_(u, 1 - b1)

        def one(u: Tensor, m: Tensor, row: Tensor, col: Tensor) -> Tensor:
            if not is_factored(u):
                return m
            res = (u - m).square_().add_(eps2)
            row.lerp_(res.mean(dim=-1), 1 - b3)
            col.lerp_(res.mean(dim=-2), 1 - b3)
            return factored_rsqrt(row, col).mul_(m)

        return u.map(one, m, ctx.state["exp_avg_res_row"], ctx.state["exp_avg_res_col"])


__all__ = ["CameConfidence", "ScaleByFactoredSecondMoment", "factored_rsqrt"]
