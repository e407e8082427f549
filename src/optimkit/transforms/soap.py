"""SOAP: Adam run in the eigenbasis of Shampoo's Kronecker factors.

Per parameter, with ``Q_k`` the eigenbasis of factor ``F_k`` (one per dim of at
most ``max_precond_dim``; other dims are left in the original basis)::

    step 1:   F_k <- lerp(0, G_(k) G_(k)^T, 1 - beta_s);  Q_k <- eigh(F_k) (descending)    (no update)
    step t:   s = t - 1
              G' = G x_k Q_k                               (rotate: Q_L^T G Q_R for a matrix)
              m <- beta1 m + (1 - beta1) G';  v <- beta2 v + (1 - beta2) G'^2
              D = (m / (sqrt(v) + eps)) x_k Q_k^T           (rotate back)
              D <- D / rms(D)                              (normalize_grads)
              theta <- theta - lr sqrt(1 - beta2^s) / (1 - beta1^s) D;  theta <- theta - lr wd theta
              F_k <- lerp(F_k, G_(k) G_(k)^T, 1 - beta_s)
              every precondition_frequency steps (s % f == 0): per dim, sort Q_k's columns by
              the estimated eigenvalues diag(Q_k^T F_k Q_k) (descending), reorder v alike,
              Q_k <- qr(F_k Q_k) (one power iteration); m is rotated into the new basis

``m`` and ``v`` live in the rotated basis, as in the authors' code. A rotation
of ``m`` only happens when the basis changes (the authors rotate it back and
forth every step; the same values up to rounding). ``merge_dims`` merges
neighbouring dims while their product stays within ``max_precond_dim``
(``data_format="channels_last"``: 4-D tensors ``(out, h, w, in)`` are permuted to
``(out, in, h, w)`` first, as the authors do when merging).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.tensorlist import TensorList, dense
from ..core.transform import Context, Transform
from .kronecker import contract, merge_dims, outer


@dataclass(frozen=True)
class SoapPlan:
    shape: tuple[int, ...]     # the parameter's shape
    merged: tuple[int, ...]    # the shape the factors see
    factors: tuple             # per merged dim: (offset, size) in the flat factor tensor, or None
    numel: int                 # length of the flat factor tensor
    permute: bool              # channels_last 4-D tensor, permuted before merging

    def factor(self, flat: Tensor, k: int) -> Tensor | None:
        spec = self.factors[k]
        if spec is None:
            return None
        offset, size = spec
        return flat[offset:offset + size * size].view(size, size)

    def to_merged(self, x: Tensor) -> Tensor:
        return (x.permute(0, 3, 1, 2) if self.permute else x).reshape(self.merged)

    def from_merged(self, x: Tensor) -> Tensor:
        if self.permute:
            s = self.shape
            return x.reshape(s[0], s[3], s[1], s[2]).permute(0, 2, 3, 1)
        return x.reshape(self.shape)


@functools.lru_cache(maxsize=4096)
def soap_plan(shape: tuple[int, ...], max_dim: int, merge: bool, precondition_1d: bool,
              channels_last: bool) -> SoapPlan:
    """Which dims of a tensor of ``shape`` get a factor, as the authors decide: a
    vector only with ``precondition_1d`` (and at most ``max_dim`` long), otherwise
    every (merged) dim of at most ``max_dim``; empty tensors and scalars none."""
    shape = tuple(int(d) for d in shape)
    permute = channels_last and merge and len(shape) == 4
    if math.prod(shape) == 0 or not shape:
        return SoapPlan(shape, shape, (None,) * len(shape), 0, False)
    if len(shape) == 1:
        merged = shape
        wanted = [precondition_1d and shape[0] <= max_dim]
    else:
        base = (shape[0], shape[3], shape[1], shape[2]) if permute else shape
        merged = merge_dims(base, max_dim) if merge else base
        wanted = [d <= max_dim for d in merged]
    factors, offset = [], 0
    for d, want in zip(merged, wanted):
        factors.append((offset, d) if want else None)
        offset += d * d if want else 0
    return SoapPlan(shape, merged, tuple(factors), offset, permute)


def plan_of(shape, group) -> SoapPlan:
    return soap_plan(tuple(shape), group["max_precond_dim"], group["merge_dims"], group["precondition_1d"],
                     group["data_format"] == "channels_last")


# --------------------------------------------------------------------------- eigenbases
def eigenbasis(a: Tensor) -> Tensor:
    """Eigenvectors of the symmetric matrix ``a``, by descending eigenvalue (the
    authors' first basis). A decomposition that fails in ``a``'s dtype is redone
    in float64; one that is not finite gives the identity. Inside a compiled step
    this is one opaque operator (``torch.ops.optimkit.eigenbasis``)."""
    if torch.compiler.is_compiling():
        return torch.ops.optimkit.eigenbasis(a)
    return _eigenbasis(a)


def _eigenbasis(a: Tensor) -> Tensor:
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    try:
        q = torch.linalg.eigh(a + 1e-30 * eye)[1]
    except torch.linalg.LinAlgError:
        try:
            q = torch.linalg.eigh(a.double() + 1e-30 * eye.double())[1].to(a.dtype)
        except torch.linalg.LinAlgError:
            return eye
    if not bool(torch.isfinite(q).all()):
        return eye
    return q.flip(1)


@torch.library.custom_op("optimkit::eigenbasis", mutates_args=())
def _eigenbasis_op(a: Tensor) -> Tensor:
    return _eigenbasis(a).contiguous()


@_eigenbasis_op.register_fake
def _(a):
    return torch.empty_like(a)


def refresh_basis(f: Tensor, q: Tensor, v: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """One power iteration and QR on ``q`` (the authors' refresh), its columns first
    sorted by the estimated eigenvalues ``diag(q^T f q)`` (descending); ``v``'s dim
    ``k`` is reordered alike. Returns ``(new q, reordered v)``."""
    order = torch.argsort((q * (f @ q)).sum(0), descending=True)
    new_q, _ = torch.linalg.qr(f @ q[:, order])
    return new_q, v.index_select(k, order)


class SOAPPreconditioner(Transform):
    """See the module docstring. State: ``exp_avg``, ``exp_avg_sq`` (rotated basis;
    follow ``state_precision``), ``soap_factors`` and ``soap_basis`` (flat factor
    matrices and their eigenbases; kept in full precision)."""

    nonnegative = ("exp_avg_sq",)
    full_precision = ("soap_factors", "soap_basis")

    def init(self, p, group):
        n = plan_of(p.shape, group).numel
        fdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        return {"exp_avg": p.new_zeros(p.shape), "exp_avg_sq": p.new_zeros(p.shape),
                "soap_factors": p.new_zeros(n, dtype=fdtype), "soap_basis": p.new_zeros(n, dtype=fdtype)}

    def scalars(self, group, step, sstate):
        beta1, beta2 = group["betas"]
        s = step - 1  # the authors count from the first real update
        scale = 1.0
        if group["correct_bias"] and s > 0:
            scale = math.sqrt(1.0 - beta2 ** s) / (1.0 - beta1 ** s)
        beta_s = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
        return {"soap_init": step == 1,
                "soap_refresh": bool(s > 0 and s % group["precondition_frequency"] == 0),
                "soap_scale": float(scale), "soap_factor_weight": float(1.0 - beta_s)}

    def __call__(self, u, ctx: Context):
        st, hp = ctx.static, ctx.hp
        beta1, beta2 = hp["betas"]
        state = ctx.state
        out = []
        for i, (p, gi) in enumerate(zip(ctx.params, dense(u))):
            plan = plan_of(p.shape, st)
            flat_f, flat_q = state["soap_factors"][i], state["soap_basis"][i]
            fs = [plan.factor(flat_f, k) for k in range(len(plan.merged))]
            qs = [plan.factor(flat_q, k) for k in range(len(plan.merged))]
            g = plan.to_merged(gi).to(flat_f.dtype)
            if st["soap_init"]:  # the first step only builds the preconditioner
                for k, f in enumerate(fs):
                    if f is not None:
                        f.lerp_(outer(g, k), hp["soap_factor_weight"])
                        qs[k].copy_(eigenbasis(f))
                out.append(torch.zeros_like(p))
                continue
            m = state["exp_avg"][i].view(plan.merged)
            v = state["exp_avg_sq"][i].view(plan.merged)
            rotated = contract(g, qs)
            m.mul_(beta1).add_(rotated.to(m.dtype), alpha=1 - beta1)
            v.mul_(beta2).addcmul_(rotated.to(v.dtype), rotated.to(v.dtype), value=1 - beta2)
            back = [None if q is None else q.mT for q in qs]
            d = contract((m / v.sqrt().add_(hp["eps"])).to(flat_q.dtype), back)
            if st["normalize_grads"]:
                d = d / (d.square().mean().sqrt() + 1e-30)
            out.append(plan.from_merged(d * hp["soap_scale"]).to(p.dtype))
            for k, f in enumerate(fs):
                if f is not None:
                    f.lerp_(outer(g, k), hp["soap_factor_weight"])
            if st["soap_refresh"] and plan.numel:
                original = contract(m.to(flat_q.dtype), back)
                reordered = v
                for k, (f, q) in enumerate(zip(fs, qs)):
                    if f is not None:
                        new_q, reordered = refresh_basis(f, q, reordered, k)
                        q.copy_(new_q)
                v.copy_(reordered)
                m.copy_(contract(original, qs))
        return TensorList(out)
