"""Prodigy (Mishchenko & Defazio 2023): Adam whose step size d is estimated from
the distance travelled."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..core import validation as v
from ..core.estimate import GlobalEstimate, GlobalScalarTransform, Sums
from ..core.optimizer import _sharded_in
from ..core.transform import Context
from ..core.tensorlist import TensorList, dense


def _beta3(name: str, value: Any) -> float | None:
    return None if value is None else v.unit(name, value)


def _growth(name: str, value: Any) -> float:
    x = v.positive_or_inf(name, value)
    if x < 1.0:
        raise ValueError(f"Invalid {name}: {x} (must be >= 1; inf: unbounded)")
    return x


class ProdigyMoments(GlobalScalarTransform):
    """Adam's moments scaled by d: ``m <- beta1 m + d (1 - beta1) g``,
    ``v <- beta2 v + d^2 (1 - beta2) g^2``; the direction ``m / (sqrt(v) + d' eps)``
    (``d'``: the new estimate). ``s`` and ``p0`` are kept by the optimizer
    (:meth:`Prodigy.prepare_step`)."""

    nonnegative = ("exp_avg_sq",)
    full_precision = ("s", "p0")

    def init(self, p, group):
        sliced = p.detach().reshape(-1)[::group["slice_p"]]
        return {"s": torch.zeros_like(sliced), "p0": sliced.clone(),
                "exp_avg": p.new_zeros(p.shape) if group["betas"][0] > 0 else p.new_zeros(0),
                "exp_avg_sq": p.new_zeros(p.shape)}

    def __call__(self, u, ctx: Context):
        st, hp = ctx.static, ctx.hp
        g = dense(u)
        if st["weight_decay"] and not st["decouple"]:
            g = g.add(ctx.params, alpha=hp["weight_decay"])
        beta1, beta2 = hp["betas"]
        d = hp["prodigy_d_prev"]
        state = ctx.state
        if st["prodigy_update_moments"]:
            if st["betas"][0]:
                state["exp_avg"].mul_(beta1).add_(g, alpha=d * (1 - beta1))
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=d * d * (1 - beta2))
        denom = state["exp_avg_sq"].sqrt().add_(hp["d"] * hp["eps"])
        if st["betas"][0]:
            return state["exp_avg"] / denom
        return TensorList([gi * hp["d"] for gi in g]) / denom


class Prodigy(GlobalEstimate):
    r"""Prodigy: Adam with the step size ``d`` learned from the distance travelled.

    Per step, with ``dlr = d lr bc`` (``bc = sqrt(1 - beta2^k) / (1 - beta1^k)``
    with ``use_bias_correction``, else 1) and ``beta3 = sqrt(beta2)`` by default::

        r <- beta3 r + (d / d0) dlr <g, p0 - p>            (the numerator, over all tensors)
        s <- beta3 s + (d / d0) dlr g                       (d instead of dlr: safeguard_warmup)
        m <- beta1 m + d (1 - beta1) g;  v <- beta2 v + d^2 (1 - beta2) g^2
        d_hat = d_coef r / sum |s|;  d <- min(max(d, d_hat) ... , d growth_rate)   (as prodigyopt)
        p <- p - dlr wd p  (decouple);  p <- p - dlr m / (sqrt(v) + d eps)

    ``d`` and its companions (``d_max``, ``d_numerator``, ...) live in the param
    groups, so the state dict holds them. ``slice_p`` estimates with every
    ``slice_p``-th element only (memory). One ``d`` is shared by every group, as
    in prodigyopt, except groups with ``independent_d=True``, which each estimate
    their own (the change most asked for upstream). Groups share one learning rate
    (the largest) or have lr 0 (frozen here; prodigyopt still moves them with the
    shared step), as prodigyopt requires. ``s`` and ``p0`` stay in full precision
    whatever ``state_precision`` says; the moments follow it.

    Paper: Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive
    Parameter-Free Learner" (arXiv:2306.06101). Checked step for step against
    ``prodigyopt.Prodigy`` (tests/test_prodigy.py).
    """

    projection_refused = "estimates its step size from the full tensors' distance travelled"
    name = "prodigy"
    family = "parameter-free"
    paper = "Prodigy: An Expeditiously Adaptive Parameter-Free Learner"
    reference = "prodigyopt.Prodigy (konstmish/prodigy)"
    state_bytes = 16  # m, v, s, p0 (s and p0 a 1/slice_p fraction)
    defaults = dict(lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0, decouple=True,
                    use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0,
                    growth_rate=math.inf, slice_p=1, independent_d=False,
                    d=None, d_max=None, d_numerator=0.0, d_hat=None, d_denom=0.0, k=0.0)
    rules = {"betas": v.betas(2), "beta3": _beta3, "eps": v.positive, "weight_decay": v.nonneg,
             "decouple": v.boolean, "use_bias_correction": v.boolean, "safeguard_warmup": v.boolean,
             "d0": v.positive, "d_coef": v.positive, "growth_rate": _growth, "slice_p": v.positive_int,
             "independent_d": v.boolean, "d": v.optional(v.positive), "d_max": v.optional(v.positive),
             "d_numerator": v.real, "d_hat": v.optional(v.real), "d_denom": v.nonneg, "k": v.nonneg}

    def build(self):
        return [ProdigyMoments()]

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in ("d", "d_max"):  # a new group starts from d0 (or what it was given)
            if group[key] is None:
                group[key] = group["d0"]
        if group["d_hat"] is None:
            group["d_hat"] = group["d0"]

    # ------------------------------------------------------------------ the estimate of d
    def _pools(self) -> list[list[dict]]:
        shared = [g for g in self.param_groups if not g["independent_d"]]
        return ([shared] if shared else []) + [[g] for g in self.param_groups if g["independent_d"]]

    def estimate(self, work) -> None:
        """Update ``s`` and the numerator with the current ``d`` over every tensor of
        a pool of groups sharing ``d``, then the estimate of ``d``; leave this step's
        values for the kernels (``prodigy_*`` scalars)."""
        by_group = {id(w[1]): w for w in work}
        for pool in self._pools():
            self._estimate([by_group.get(id(g), (v.as_numbers(g), g, [], [])) for g in pool])

    def _estimate(self, pool) -> None:
        head = pool[0][0]
        beta1, beta2 = head["betas"]
        beta3 = head["beta3"] if head["beta3"] is not None else math.sqrt(beta2)
        k = int(head["k"])
        d, d_max, d0 = head["d"], head["d_max"], head["d0"]
        lr = max(num["lr"] for num, *_ in pool)
        bc = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if head["use_bias_correction"] else 1.0
        numerator = head["d_numerator"] * beta3
        sums = Sums("delta", "denom")
        for num, group, params, grads in pool:
            dlr = d * num["lr"] * bc  # prodigyopt: one lr for all groups (it refuses others)
            if num["lr"] <= 0.0:
                continue
            for view, g, st in self._tensors(num, group, params, grads):
                if num["weight_decay"] and not num["decouple"]:
                    g = g.add(view, alpha=num["weight_decay"])
                s, p0 = st["s"], st["p0"]
                step = num["slice_p"]
                sliced = g.reshape(-1)[::step]
                here = s.to(sliced.device)
                moved = p0.to(here.device) - view.reshape(-1)[::step].to(here.dtype)
                sums.add("delta", torch.dot(sliced.to(here.dtype), moved), (d / d0) * dlr)
                here.mul_(beta3).add_(sliced.to(here.dtype),
                                      alpha=(d / d0) * (d if num["safeguard_warmup"] else dlr))
                sums.add("denom", here.abs().sum())
                if here is not s:
                    s.copy_(here)
        delta, denom = sums.total().values()
        if _sharded_in(p for *_, params, _ in pool for p in params):  # FSDP2: sums over all shards
            from ..distributed.sharded import all_reduce_sums

            delta, denom = all_reduce_sums([delta, denom], [p for *_, params, _ in pool for p in params])
        skip = denom == 0.0
        d_new, d_hat = d, d
        if not skip and lr > 0.0:
            numerator = numerator + delta
            d_hat = head["d_coef"] * numerator / denom
            if d == d0:
                d_new = max(d, d_hat)
            d_max = max(d_max, d_hat)
            d_new = min(d_max, d_new * head["growth_rate"])
        for num, group, *_ in pool:
            self._step_values[id(group)] = {
                "prodigy_d_prev": float(d), "prodigy_dlr": float(d * num["lr"] * bc), "prodigy_skip": skip,
                "prodigy_update_moments": bool(num["lr"] > 0.0)}
            if not skip:  # prodigyopt leaves everything as it was when sum |s| is 0
                group.update(d=float(d_new), d_max=float(d_max), d_numerator=float(numerator),
                             d_hat=float(d_hat), d_denom=float(denom), k=float(k + 1))

    def apply(self, u, ctx) -> None:
        """Decoupled decay then ``p <- p - dlr u``; nothing when prodigyopt skips the
        update (sum |s| = 0) or for a group at lr 0."""
        st, hp = ctx.static, ctx.hp
        if st["prodigy_skip"] or not st["prodigy_update_moments"]:
            return
        if st["weight_decay"] and st["decouple"]:
            ctx.params.add_(ctx.params, alpha=-hp["weight_decay"] * hp["prodigy_dlr"])
        ctx.params.sub_(u, alpha=hp["prodigy_dlr"])
