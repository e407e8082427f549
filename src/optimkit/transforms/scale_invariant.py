"""Projection of updates for scale-invariant weights (AdamP / SGDP).

A weight followed by a normalization layer is scale invariant: its gradient is
orthogonal to it, and the radial part of a momentum update only inflates its
norm, which shrinks the effective step size. AdamP/SGDP detect such weights
with a cosine test between the gradient and the weight and, where it fires,
remove the radial component of the update and weaken weight decay by
``wd_ratio``.

The test has a data-dependent outcome, so every branch is computed and the
result picked with ``torch.where``: the same code runs eagerly and under
``torch.compile``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.tensorlist import Ratio, TensorList, dense
from ..core.transform import Context, Transform


def _abs_cos_max(x: Tensor, y: Tensor, eps) -> Tensor:
    """Largest ``|cos|`` between matching rows of 2-D ``x`` and ``y``; each norm is
    clamped below at ``eps`` (as ``torch.nn.functional.cosine_similarity``, written
    out so that ``eps`` may be a tensor under ``torch.compile``)."""
    nx = torch.clamp_min(torch.linalg.vector_norm(x, dim=1, keepdim=True), eps)
    ny = torch.clamp_min(torch.linalg.vector_norm(y, dim=1, keepdim=True), eps)
    return ((x / nx) * (y / ny)).sum(dim=1).abs().amax()


def _remove_radial(u: Tensor, p: Tensor, eps) -> Tensor:
    """``u - p_n (p_n . u)`` with ``p_n = p / (||p|| + eps)``, rows of 2-D views."""
    p_n = p / (torch.linalg.vector_norm(p, dim=1, keepdim=True) + eps)
    return u - p_n * (p_n * u).sum(dim=1, keepdim=True)


def project_scale_invariant(u: Tensor, g: Tensor, p: Tensor, delta, eps, wd_ratio) -> tuple[Tensor, Tensor]:
    """Projected update and weight-decay factor for one tensor with ``p.ndim > 1``.

    First per output channel (rows of ``p.reshape(p.shape[0], -1)``), then for
    the whole tensor: if the largest ``|cos(g, p)|`` over the view's rows is
    below ``delta / sqrt(row length)``, the radial component (along each row of
    ``p``) is removed from ``u`` and the decay factor is ``wd_ratio``; the
    first view that fires wins. Otherwise ``u`` is returned with factor 1.
    """
    rows = p.shape[0]
    p_c, g_c, u_c = p.reshape(rows, -1), g.reshape(rows, -1), u.reshape(rows, -1)
    p_l, g_l, u_l = p.reshape(1, -1), g.reshape(1, -1), u.reshape(1, -1)
    cos_c = _abs_cos_max(g_c, p_c, eps)
    cos_l = _abs_cos_max(g_l, p_l, eps)
    hit_c = cos_c < delta / math.sqrt(p_c.shape[1])
    hit_l = cos_l < delta / math.sqrt(p_l.shape[1])
    proj_c = _remove_radial(u_c, p_c, eps).reshape(u.shape)
    proj_l = _remove_radial(u_l, p_l, eps).reshape(u.shape)
    out = torch.where(hit_c, proj_c, torch.where(hit_l, proj_l, u))
    if not isinstance(wd_ratio, Tensor):  # a Python float would make a float32 factor for fp64 params
        wd_ratio = torch.tensor(wd_ratio, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
    factor = torch.where(hit_c | hit_l, wd_ratio, 1.0)
    return out, factor


class ScaleInvariantProjection(Transform):
    r"""AdamP/SGDP projection: for tensors with ``ndim > 1`` whose gradient is nearly
    orthogonal to the weight (channel-wise, then layer-wise cosine test against
    ``delta / sqrt(view dim)``), ``u <- u - p_n (p_n . u)``.

    The weight-decay factor of each tensor (``wd_ratio`` where the projection
    fired, else 1) is left in ``ctx.extra["wd_factor"]`` for
    :class:`FactoredDecoupledDecay`. Hyperparameters: ``delta``, ``wd_ratio``, ``eps``.

    Args:
        buffer: name of a momentum buffer that the incoming update *is* when
            ``momentum`` is non-zero and ``nesterov`` is off. The projected
            update is then stored back into it, as in the authors' SGDP, whose
            in-place projection acts on the momentum buffer itself.
    """

    def __init__(self, buffer: str | None = None):
        self.buffer = buffer

    def __call__(self, u, ctx: Context):
        u = dense(u)
        hp = ctx.hp
        outs, factors = [], []
        for ui, gi, pi in zip(u, ctx.grads, ctx.params):
            if pi.ndim > 1:
                ui, f = project_scale_invariant(ui, gi, pi, hp["delta"], hp["eps"], hp["wd_ratio"])
            else:
                f = 1.0
            outs.append(ui)
            factors.append(f)
        ctx.extra["wd_factor"] = factors
        if self.buffer is not None and ctx.static["momentum"] and not ctx.static.get("nesterov"):
            for b, o, pi in zip(ctx.state[self.buffer], outs, ctx.params):
                if pi.ndim > 1:
                    b.copy_(o)
        return TensorList(outs)


class FactoredDecoupledDecay(Transform):
    r"""Decoupled weight decay scaled per tensor: ``theta <- theta (1 - lr wd f / (1 - mu))``.

    ``f`` comes from ``ctx.extra["wd_factor"]`` (set by :class:`ScaleInvariantProjection`;
    1 if absent). With ``momentum_key`` (SGDP), the decay is divided by
    ``1 - momentum``. Inactive when ``weight_decay == 0``.
    """

    def __init__(self, momentum_key: str | None = None):
        self.momentum_key = momentum_key

    def __call__(self, u, ctx: Context):
        if not ctx.static["weight_decay"]:
            return u
        hp = ctx.hp
        coef = hp["lr"] * hp["weight_decay"]
        if self.momentum_key is not None and ctx.static[self.momentum_key]:
            coef = coef / (1 - hp[self.momentum_key])
        factors = ctx.extra.get("wd_factor", [1.0] * len(ctx.params))
        ctx.params.mul_([1 - coef * f for f in factors])
        return u


class AdamNesterovNumerator(Transform):
    r"""With ``nesterov``, replace the numerator of an Adam ratio ``m / den`` by
    ``b1 m + (1 - b1) g`` (AdamP's Nesterov variant). Expects the lazy ratio
    returned by :class:`~optimkit.transforms.ScaleByAdam`; a no-op otherwise.
    """

    def __call__(self, u, ctx: Context):
        if not ctx.static.get("nesterov"):
            return u
        if not isinstance(u, Ratio):
            raise TypeError("AdamNesterovNumerator expects the Ratio returned by ScaleByAdam")
        b1 = ctx.hp["betas"][0]
        num = ctx.state["exp_avg"].mul(b1).add_(ctx.grads, alpha=1 - b1)
        return Ratio(num, u.den, u.scale)
