"""Shampoo's preconditioned direction with grafting, in the order of Distributed Shampoo.

Per parameter (blocks and factors: :mod:`optimkit.transforms.kronecker`)::

    g <- g + wd theta                                     (not use_decoupled_weight_decay)
    F_k <- F_k + G_(k) G_(k)^T   (beta2 = 1)  or  beta2 F_k + (1 - beta2) G_(k) G_(k)^T
    A <- A + g^2 (adagrad)  or  beta2' A + (1 - beta2') g^2 (rmsprop, adam)     grafting state
    refresh steps: R_k <- (F_k / bc2 + eps I)^(-e_k)      e_k = 1 / (2 order) unless overridden
    G_bar <- lerp(m, g, 1 - beta3) / (1 - beta3 beta1^(t-1));  m <- lerp(m, g, 1 - beta1)
    per block:  D = graft(G_bar) = G_bar (sgd) or G_bar / (sqrt(A / bc2') + eps')
                P = D                                  before start_preconditioning_step
                P = R_0 G_bar R_1 ... * ||D|| / (||.|| + 1e-16)   (no grafting: unscaled)
    P <- P + wd theta                                     (use_decoupled_weight_decay)
    M <- mu M + (1 - dampening) P;  P <- M  or  (1 - dampening) P + mu M (nesterov)
    theta <- theta - lr P

Tensors that are not preconditioned (vectors unless ``precondition_1d``,
scalars) take the grafting direction (``G_bar`` without grafting).
"""
from __future__ import annotations

import torch

from ..core.tensorlist import TensorList, dense
from ..core.transform import Context, Transform
from .kronecker import block_plan, contract, inverse_root, outer

GRAFTING = (None, "sgd", "adagrad", "rmsprop", "adam")
#: grafting beta2 / epsilon when the group leaves them None (Distributed Shampoo's configs)
GRAFTING_BETA2 = {"adagrad": 1.0, "rmsprop": 0.99, "adam": 0.999}
GRAFTING_EPSILON = {"adagrad": 1e-10, "rmsprop": 1e-8, "adam": 1e-8}
#: orders with their own exponent slot (higher orders use the default 1 / (2 order))
MAX_ORDER = 8


def _empty(p):
    return p.new_zeros(0)


def plan_of(shape, group):
    return block_plan(tuple(shape), group["max_preconditioner_dim"], group["use_merge_dims"],
                      group["precondition_1d"])


def start_step(group) -> int:
    start = group["start_preconditioning_step"]
    return group["precondition_frequency"] if start == -1 else start


class ShampooPreconditioner(Transform):
    """See the module docstring. State: ``shampoo_factors``, ``shampoo_roots`` (flat
    fp32 factor matrices and their inverse roots; kept in full precision),
    ``filtered_grad`` (if beta1 > 0), ``grafting_sum`` (adagrad/rmsprop/adam
    grafting), ``momentum_buffer`` (if momentum > 0)."""

    nonnegative = ("grafting_sum",)
    full_precision = ("shampoo_factors", "shampoo_roots")

    def init(self, p, group):
        n = plan_of(p.shape, group).numel
        fdtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        graft = group["grafting"]
        return {
            "shampoo_factors": p.new_zeros(n, dtype=fdtype),
            "shampoo_roots": p.new_zeros(n, dtype=fdtype),
            "filtered_grad": p.new_zeros(p.shape) if group["betas"][0] != 0 else _empty(p),
            "grafting_sum": p.new_zeros(p.shape) if graft not in (None, "sgd") else _empty(p),
            "momentum_buffer": p.new_zeros(p.shape) if group["momentum"] != 0 else _empty(p),
        }

    def scalars(self, group, step, sstate):
        beta1, beta2 = group["betas"]
        beta3 = beta1 if group["beta3"] == -1 else group["beta3"]
        start, freq = start_step(group), group["precondition_frequency"]
        graft = group["grafting"]
        gbeta2 = group["grafting_beta2"]
        if gbeta2 is None:
            gbeta2 = GRAFTING_BETA2.get(graft, 1.0)
        geps = group["grafting_epsilon"]
        if geps is None:
            geps = GRAFTING_EPSILON.get(graft, 0.0)
        bias = group["use_bias_correction"]
        override = group["inverse_exponent_override"] or {}
        orders = max([MAX_ORDER, *override])
        exponents = tuple(float(override.get(k, 1.0 / (2 * k))) for k in range(1, orders + 1))
        return {
            "shampoo_refresh": bool((step % freq == 0 and step > start) or step == start),
            "shampoo_graft_only": bool(step < start and graft is not None),
            "shampoo_factor_sum": beta2 == 1.0,
            "shampoo_factor_bc": 1.0 - beta2 ** step if bias and beta2 < 1.0 else 1.0,
            "shampoo_beta3": float(beta3),
            "shampoo_lookahead": beta3 != beta1,
            "shampoo_bc1": 1.0 - beta3 * beta1 ** (step - 1) if bias and beta1 != 0 else 1.0,
            "shampoo_graft_beta2": float(gbeta2),
            "shampoo_graft_sum": gbeta2 == 1.0,
            "shampoo_graft_bc2": 1.0 - gbeta2 ** step if graft == "adam" else 1.0,
            "shampoo_graft_eps": float(geps),
            "shampoo_exponents": exponents,
        }

    def __call__(self, u, ctx: Context):
        st, hp = ctx.static, ctx.hp
        beta1, beta2 = hp["betas"]
        graft = st["grafting"]
        g = dense(u)
        if st["weight_decay"] and not st["use_decoupled_weight_decay"]:
            g = g.add(ctx.params, alpha=hp["weight_decay"])
        state = ctx.state
        for i, p in enumerate(ctx.params):  # before anything is changed
            _check_state(p, state["filtered_grad"][i], state["grafting_sum"][i], state["momentum_buffer"][i],
                         st, graft)
        out = []
        for i, (p, gi) in enumerate(zip(ctx.params, g)):
            factors, roots = state["shampoo_factors"][i], state["shampoo_roots"][i]
            filt, gsum = state["filtered_grad"][i], state["grafting_sum"][i]
            plan = plan_of(gi.shape, st)
            # preconditioner and grafting statistics, from the raw gradient
            if plan.preconditioned:
                gm = gi.reshape(plan.merged)
                for block in plan.blocks:
                    gb = block.view(gm).to(factors.dtype)
                    for k in range(gb.dim()):
                        f = block.factor(factors, k)
                        if st["shampoo_factor_sum"]:
                            f.add_(outer(gb, k))
                        else:
                            f.mul_(beta2).add_(outer(gb, k), alpha=1 - beta2)
            if graft not in (None, "sgd"):
                if st["shampoo_graft_sum"]:
                    gsum.addcmul_(gi, gi)
                else:
                    b = hp["shampoo_graft_beta2"]
                    gsum.mul_(b).addcmul_(gi, gi, value=1 - b)
            if plan.preconditioned and st["shampoo_refresh"]:
                exponent = _exponent(hp["shampoo_exponents"], len(plan.merged))
                for block in plan.blocks:
                    for k in range(len(block.slices)):
                        f, r = block.factor(factors, k), block.factor(roots, k)
                        r.copy_(inverse_root(f / hp["shampoo_factor_bc"], exponent, hp["epsilon"],
                                             st["preconditioner_dtype"], r))
            # filtered gradient (EMA of g, optionally with a one-step look-ahead beta3)
            if st["betas"][0]:
                bar = filt.lerp(gi, 1 - hp["shampoo_beta3"]) if st["shampoo_lookahead"] else None
                filt.lerp_(gi, 1 - beta1)
                bar = filt if bar is None else bar
                bar = bar / hp["shampoo_bc1"]
            else:
                bar = gi
            out.append(self._direction(p, bar, gsum, plan, roots, st, hp))
        d = TensorList(out)
        if st["weight_decay"] and st["use_decoupled_weight_decay"]:
            d.add_(ctx.params, alpha=hp["weight_decay"])
        if st["momentum"]:
            m = TensorList([state["momentum_buffer"][i] for i in range(len(d))])
            m.mul_(hp["momentum"]).add_(d, alpha=1 - hp["dampening"])
            if st["use_nesterov"]:
                d.mul_(1 - hp["dampening"]).add_(m, alpha=hp["momentum"])
            else:
                d = TensorList([x.clone() for x in m])
        return d

    @staticmethod
    def _graft(bar, gsum, st, hp):
        if st["grafting"] in (None, "sgd"):
            return bar
        return bar / (gsum / hp["shampoo_graft_bc2"]).sqrt().add_(hp["shampoo_graft_eps"])

    def _direction(self, p, bar, gsum, plan, roots, st, hp):
        if not plan.preconditioned or st["shampoo_graft_only"]:
            return self._graft(bar, gsum, st, hp).to(p.dtype, copy=True)  # a fresh tensor
        grafted = st["grafting"] is not None
        out = bar.new_empty(plan.merged, dtype=p.dtype)
        bar_m = bar.reshape(plan.merged)
        gsum_m = gsum.reshape(plan.merged) if gsum.numel() else gsum
        for block in plan.blocks:
            b = block.view(bar_m)
            pre = contract(b.to(roots.dtype), [block.factor(roots, k) for k in range(b.dim())])
            if grafted:
                ref = self._graft(b, block.view(gsum_m) if gsum.numel() else gsum, st, hp)
                pre = pre * (ref.norm() / (pre.norm() + 1e-16))
            block.view(out).copy_(pre)
        return out.reshape(p.shape)


def _exponent(exponents, order: int):
    return exponents[order - 1] if order <= len(exponents) else 1.0 / (2 * order)


def _check_state(p, filt, gsum, mom, st, graft) -> None:
    """A setting that needs a state tensor created at the first step cannot be turned
    on later (the state keys are fixed then): say which."""
    if st["betas"][0] and filt.numel() != p.numel():
        raise RuntimeError("Shampoo: betas[0] was 0 when this parameter's state was created; "
                           "filtering (betas[0] > 0) cannot be turned on afterwards")
    if graft not in (None, "sgd") and gsum.numel() != p.numel():
        raise RuntimeError(f"Shampoo: grafting={graft!r} needs a grafting state this parameter's "
                           "state was created without (change grafting before the first step)")
    if st["momentum"] and mom.numel() != p.numel():
        raise RuntimeError("Shampoo: momentum was 0 when this parameter's state was created; "
                           "it cannot be turned on afterwards")
