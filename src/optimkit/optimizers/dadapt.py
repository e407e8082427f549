"""D-Adaptation (Defazio & Mishchenko 2023): Adam, SGD and Lion whose step size d
is a lower bound on the distance to the solution, estimated as they go."""
from __future__ import annotations

import logging
import math

import torch

from ..core import validation as v
from ..core.estimate import GlobalEstimate, GlobalScalarTransform, Sums, accumulator, wide
from ..core.transform import Context
from ..core.tensorlist import dense
from .prodigy import _growth

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- Adam
class DAdaptAdamMoments(GlobalScalarTransform):
    """``m <- beta1 m + r dlr (1 - beta1) g``; ``v <- beta2 v + (1 - beta2) g^2``;
    the update ``m / (sqrt(v) + eps)`` (the step size is inside ``m``). ``s`` is kept
    by :meth:`DAdaptAdam.estimate`."""

    nonnegative = ("exp_avg_sq",)
    full_precision = ("s",)

    def init(self, p, group):
        return {"s": accumulator(p), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def __call__(self, u, ctx: Context):
        st, hp, state = ctx.static, ctx.hp, ctx.state
        g = dense(u)
        if st["weight_decay"] and not st["decouple"]:
            g = g.add(ctx.params, alpha=hp["weight_decay"])
        beta1, beta2 = hp["betas"]
        if st["dadapt_update"]:
            state["exp_avg"].mul_(beta1).add_(g, alpha=hp["layer_scale"] * hp["dadapt_dlr"] * (1 - beta1))
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        return state["exp_avg"] / state["exp_avg_sq"].sqrt().add_(hp["eps"])


class DAdaptAdam(GlobalEstimate):
    r"""D-Adaptation Adam (as ``dadaptation.DAdaptAdam``).

    Per step, with ``dlr = d lr bc`` (``bc = sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))``
    with ``use_bias_correction``, else 1) and ``r`` the group's ``layer_scale``::

        num <- sqrt(beta2) num + (1 - sqrt(beta2)) sum r dlr <g, s / (sqrt(v) + eps)>   (old s, v)
        m <- beta1 m + r dlr (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        s <- sqrt(beta2) s + (1 - sqrt(beta2)) dlr g
        d_hat = num / ((1 - sqrt(beta2)) sum r |s|);  d <- max(d, min(d_hat, d growth_rate))
        p <- p - dlr wd p (decouple);  p <- p - m / (sqrt(v) + eps)

    ``weight_decay`` is L2 (added to the gradient) unless ``decouple=True``: the
    package's default is ``decouple=False``, unlike Prodigy. One ``d`` is shared by
    every group; ``d``, ``k`` and ``numerator_weighted`` live in the param groups
    (state dict). Groups may have different lrs (each moves by ``d lr_group``;
    dadaptation raises) and a group at lr 0 is frozen. ``s`` stays in full
    precision; ``exp_avg`` and ``exp_avg_sq`` follow ``state_precision``.

    Paper: Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation"
    (ICML 2023, arXiv:2301.07733). Checked step for step against
    ``dadaptation.DAdaptAdam`` (tests/test_dadapt.py).
    """

    name = "dadapt_adam"
    paper = "Learning-Rate-Free Learning by D-Adaptation"
    reference = "dadaptation.DAdaptAdam (facebookresearch/dadaptation)"
    state_bytes = 12  # s, m, v
    defaults = dict(lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, log_every=0, decouple=False,
                    use_bias_correction=False, d0=1e-6, growth_rate=math.inf, fsdp_in_use=False,
                    layer_scale=1.0, d=None, k=0.0, numerator_weighted=0.0)
    rules = {"betas": v.betas(2), "eps": v.positive, "weight_decay": v.nonneg, "log_every": v.nonneg_int,
             "decouple": v.boolean, "use_bias_correction": v.boolean, "d0": v.positive,
             "growth_rate": _growth, "fsdp_in_use": v.boolean, "layer_scale": v.positive,
             "d": v.optional(v.positive), "k": v.nonneg, "numerator_weighted": v.real}

    def build(self):
        return [DAdaptAdamMoments()]

    def estimate(self, work) -> None:
        if not work:
            return
        head = work[0][0]
        beta1, beta2 = head["betas"]
        k, d = int(head["k"]), head["d"]
        lr = max(num["lr"] for num, *_ in work)
        bc = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if head["use_bias_correction"] else 1.0
        sqrt_beta2 = math.sqrt(beta2)
        sums = Sums("acc", "sk_l1")
        for num, group, params, grads in work:
            dlr = d * num["lr"] * bc
            self._step_values[id(group)] = {"dadapt_dlr": float(dlr), "dadapt_update": bool(num["lr"] > 0.0)}
            if num["lr"] <= 0.0:
                continue
            r = num["layer_scale"]
            for view, g, st in self._tensors(num, group, params, grads):
                if num["weight_decay"] and not num["decouple"]:
                    g = g.add(view, alpha=num["weight_decay"])
                s = st["s"]
                here = s.to(g.device)
                denom = wide(self._read(st, "exp_avg_sq", g.device)).sqrt().add_(num["eps"])
                sums.add("acc", torch.dot(wide(g), wide(here).div(denom.to(wide(g).dtype))), r * dlr)
                here.mul_(sqrt_beta2).add_(g.to(here.dtype), alpha=dlr * (1 - sqrt_beta2))
                sums.add("sk_l1", here.abs().sum(), r)
                if here is not s:
                    s.copy_(here)
        acc, sk_l1 = sums.total().values()
        numerator = sqrt_beta2 * head["numerator_weighted"] + (1 - sqrt_beta2) * acc
        # the groups keep this process's numerator (as dadaptation); d uses the sums over all
        total, sk_l1 = self._reduce([numerator, sk_l1], head)
        skip = sk_l1 == 0.0  # no gradient yet: dadaptation returns before any update
        d_hat = d
        if not skip and lr > 0.0:
            d_hat = total / ((1 - sqrt_beta2) * sk_l1)
            d = max(d, min(d_hat, d * head["growth_rate"]))
        for num, group, *_ in work:
            self._step_values[id(group)]["dadapt_skip"] = skip
        if skip:
            return
        if head["log_every"] > 0 and k % head["log_every"] == 0:
            logger.info("lr: %s dlr: %s d_hat: %s, d: %s. sk_l1=%.1e numerator_weighted=%.1e",
                        lr, d * lr * bc, d_hat, d, sk_l1, numerator)
        for group in self.param_groups:
            group.update(d=float(d), numerator_weighted=float(numerator), k=float(k + 1))

    def apply(self, u, ctx) -> None:
        st, hp = ctx.static, ctx.hp
        if st["dadapt_skip"] or not st["dadapt_update"]:
            return
        if st["weight_decay"] and st["decouple"]:
            ctx.params.add_(ctx.params, alpha=-hp["weight_decay"] * hp["dadapt_dlr"])
        ctx.params.sub_(u)


# ---------------------------------------------------------------------------- SGD
class DAdaptSGDStep(GlobalScalarTransform):
    """The dual-averaging point ``z = x0 - s`` (``s``, the step-size weighted sum of
    gradients, is kept by :meth:`DAdaptSGD.estimate`)."""

    full_precision = ("s", "x0")

    def init(self, p, group):
        return {"s": accumulator(p), "x0": p.detach().clone()}

    def __call__(self, u, ctx: Context):
        return ctx.state["x0"].to(ctx.state["s"][0].dtype) - ctx.state["s"]


class DAdaptSGD(GlobalEstimate):
    r"""D-Adaptation SGD (dual averaging, as ``dadaptation.DAdaptSGD``).

    With ``g0`` the norm of the first gradient (all tensors) and ``dlr = d lr / |g0|``::

        num <- num + dlr <g, s>;  s <- s + dlr g                  (g with L2 decay)
        d_hat = 2 num / |s|;  d <- max(d, min(d_hat, d growth_rate))
        z = x0 - s;  p <- momentum p + (1 - momentum) z

    The step uses this step's ``s`` (built with the old ``d``); the new ``d`` is the
    next step's. ``momentum`` defaults to 0 as in the package (its README
    suggests 0.9). One ``d`` for all groups; ``d``, ``k``, ``g0_norm`` and
    ``numerator_weighted`` live in the param groups. A group at lr 0 is frozen.
    ``s`` and ``x0`` stay in full precision (the state holds nothing else; the
    package also keeps ``z``, recomputed here).

    Paper: Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation".
    Checked step for step against ``dadaptation.DAdaptSGD`` (tests/test_dadapt.py).
    """

    name = "dadapt_sgd"
    paper = "Learning-Rate-Free Learning by D-Adaptation"
    reference = "dadaptation.DAdaptSGD (facebookresearch/dadaptation)"
    state_bytes = 8  # s, x0
    defaults = dict(lr=1.0, momentum=0.0, weight_decay=0.0, log_every=0, d0=1e-6, growth_rate=math.inf,
                    fsdp_in_use=False, d=None, k=0.0, numerator_weighted=0.0, g0_norm=0.0)
    rules = {"momentum": v.unit, "weight_decay": v.nonneg, "log_every": v.nonneg_int, "d0": v.positive,
             "growth_rate": _growth, "fsdp_in_use": v.boolean, "d": v.optional(v.positive),
             "k": v.nonneg, "numerator_weighted": v.real, "g0_norm": v.nonneg}

    def build(self):
        return [DAdaptSGDStep()]

    def estimate(self, work) -> None:
        if not work:
            return
        head = work[0][0]
        k, d = int(head["k"]), head["d"]
        lr = max(num["lr"] for num, *_ in work)
        g0_norm = head["g0_norm"]
        if k == 0:  # the first gradient's norm, without weight decay (as dadaptation)
            first = Sums("g_sq")
            for num, group, params, grads in work:
                if num["lr"] > 0.0:
                    for view, g, st in self._tensors(num, group, params, grads):
                        first.add("g_sq", torch.dot(wide(g), wide(g)))
            g0_norm = math.sqrt(self._reduce([first.total()["g_sq"]], head)[0])
        sums = Sums("numerator", "sk_sq")
        for num, group, params, grads in work:
            dlr = d * num["lr"] / g0_norm if g0_norm > 0.0 else 0.0
            self._step_values[id(group)] = {"dadapt_update": bool(num["lr"] > 0.0)}
            for view, g, st in self._tensors(num, group, params, grads):
                if num["lr"] <= 0.0 or g0_norm == 0.0:
                    continue
                if num["weight_decay"]:
                    g = g.add(view, alpha=num["weight_decay"])
                s = st["s"]
                here = s.to(g.device)
                sums.add("numerator", torch.dot(wide(g), wide(here)), dlr)
                here.add_(g.to(here.dtype), alpha=dlr)
                sums.add("sk_sq", torch.dot(wide(here), wide(here)))
                if here is not s:
                    s.copy_(here)
        added, sk_sq = sums.total().values()
        numerator = head["numerator_weighted"] + added
        # the groups keep this process's numerator (as dadaptation); d uses the sums over all
        sk_sq, total = self._reduce([sk_sq, numerator], head)
        skip = sk_sq == 0.0  # no gradient yet (dadaptation divides by zero here)
        for num, group, *_ in work:
            self._step_values[id(group)]["dadapt_skip"] = skip
        if skip:
            return
        d_hat = d
        if lr > 0.0:
            d_hat = 2 * total / math.sqrt(sk_sq)
            d = max(d, min(d_hat, d * head["growth_rate"]))
        if head["log_every"] > 0 and k % head["log_every"] == 0:
            logger.info("(k=%s) d_hat: %s, d: %s. sk_norm=%s numerator_weighted=%s g0_norm=%s",
                        k, d_hat, d, math.sqrt(sk_sq), numerator, g0_norm)
        for group in self.param_groups:
            group.update(d=float(d), numerator_weighted=float(numerator), g0_norm=float(g0_norm), k=float(k + 1))

    def apply(self, u, ctx) -> None:
        st, hp = ctx.static, ctx.hp
        if st["dadapt_skip"] or not st["dadapt_update"]:
            return
        if st["momentum"]:
            ctx.params.mul_(hp["momentum"]).add_(u, alpha=1 - hp["momentum"])
        else:
            ctx.params.copy_(u)


# ---------------------------------------------------------------------------- Lion
class DAdaptLionStep(GlobalScalarTransform):
    """Lion's sign update ``sign(beta1 m + (1 - beta1) g)``, then
    ``m <- beta2 m + (1 - beta2) dlr g``; ``s`` is kept by :meth:`DAdaptLion.estimate`."""

    full_precision = ("s",)

    def init(self, p, group):
        return {"exp_avg": torch.zeros_like(p), "s": accumulator(p)}

    def __call__(self, u, ctx: Context):
        hp, state = ctx.hp, ctx.state
        g = dense(u)
        beta1, beta2 = hp["betas"]
        m = state["exp_avg"]
        update = m.mul(beta1).add_(g, alpha=1 - beta1).sign_()
        if ctx.static["dadapt_update"]:
            m.mul_(beta2).add_(g, alpha=(1 - beta2) * hp["dadapt_dlr"])
        return update


class DAdaptLion(GlobalEstimate):
    r"""D-Adaptation Lion (as ``dadaptation.DAdaptLion``).

    With ``dlr = d lr`` and ``u = sign(beta1 m + (1 - beta1) g)``::

        p <- p (1 - dlr wd);  p <- p - dlr u;  m <- beta2 m + (1 - beta2) dlr g
        num <- sqrt(beta2) num + (1 - sqrt(beta2)) sum dlr <u, s>   (old s)
        s <- sqrt(beta2) s + (1 - sqrt(beta2)) dlr u
        d_hat = num / ((1 - sqrt(beta2)) sum |s|);  d <- max(d, d_hat)

    ``weight_decay`` is decoupled (AdamW style). One ``d`` for all groups, in the
    param groups with ``k`` and ``numerator_weighted``; a group at lr 0 is
    frozen. ``s`` stays in full precision; ``exp_avg`` follows ``state_precision``.

    Paper: Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation"
    (the Lion variant is the package's). Checked step for step against
    ``dadaptation.DAdaptLion`` (tests/test_dadapt.py).
    """

    name = "dadapt_lion"
    paper = "Learning-Rate-Free Learning by D-Adaptation"
    reference = "dadaptation.DAdaptLion (facebookresearch/dadaptation)"
    state_bytes = 8  # m, s
    defaults = dict(lr=1.0, betas=(0.9, 0.99), weight_decay=0.0, log_every=0, d0=1e-6, fsdp_in_use=False,
                    d=None, k=0.0, numerator_weighted=0.0)
    rules = {"betas": v.betas(2), "weight_decay": v.nonneg, "log_every": v.nonneg_int, "d0": v.positive,
             "fsdp_in_use": v.boolean, "d": v.optional(v.positive), "k": v.nonneg,
             "numerator_weighted": v.real}

    def build(self):
        return [DAdaptLionStep()]

    def estimate(self, work) -> None:
        if not work:
            return
        head = work[0][0]
        beta1, beta2 = head["betas"]
        k, d = int(head["k"]), head["d"]
        lr = max(num["lr"] for num, *_ in work)
        sqrt_beta2 = math.sqrt(beta2)
        sums = Sums("acc", "sk_l1")
        for num, group, params, grads in work:
            dlr = d * num["lr"]
            b1 = num["betas"][0]
            self._step_values[id(group)] = {"dadapt_dlr": float(dlr), "dadapt_update": bool(num["lr"] > 0.0)}
            if num["lr"] <= 0.0:
                continue
            for view, g, st in self._tensors(num, group, params, grads):
                s = st["s"]
                here = s.to(g.device)
                m = self._read(st, "exp_avg", g.device)
                update = (m * b1).add_(g.to(m.dtype), alpha=1 - b1).sign_()
                sums.add("acc", torch.dot(wide(update), wide(here).to(wide(update).dtype)), dlr)
                here.mul_(sqrt_beta2).add_(update.to(here.dtype), alpha=(1 - sqrt_beta2) * dlr)
                sums.add("sk_l1", here.abs().sum())
                if here is not s:
                    s.copy_(here)
        acc, sk_l1 = sums.total().values()
        numerator = sqrt_beta2 * head["numerator_weighted"] + (1 - sqrt_beta2) * acc
        # the groups keep this process's numerator (as dadaptation); d uses the sums over all
        total, sk_l1 = self._reduce([numerator, sk_l1], head)
        # dadaptation has already moved the weights when it finds sum |s| = 0 (zero
        # gradients and momentum): only d and the counters stay as they were
        for num, group, *_ in work:
            self._step_values[id(group)]["dadapt_skip"] = False
        if sk_l1 == 0.0:
            return
        d_hat = d
        if lr > 0.0:
            d_hat = total / ((1 - sqrt_beta2) * sk_l1)
            d = max(d, d_hat)
        if head["log_every"] > 0 and k % head["log_every"] == 0:
            logger.info("lr: %s d_hat: %s, d: %s. sk_l1=%.1e numerator_weighted=%.1e", lr, d_hat, d, sk_l1,
                        numerator)
        for group in self.param_groups:
            group.update(d=float(d), numerator_weighted=float(numerator), k=float(int(group["k"]) + 1))

    def apply(self, u, ctx) -> None:
        st, hp = ctx.static, ctx.hp
        if not st["dadapt_update"]:
            return
        if st["weight_decay"]:
            ctx.params.mul_(1 - hp["dadapt_dlr"] * hp["weight_decay"])
        ctx.params.sub_(u, alpha=hp["dadapt_dlr"])
