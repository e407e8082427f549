"""Step sizes from one global scalar: Polyak's (SPS, SPSmax, preconditioned PSPS) and
AdaGrad-Norm."""
from __future__ import annotations

import math
import torch

from ..core import validation as v
from ..core.estimate import GlobalEstimate, GlobalScalarTransform, Sums, wide
from ..core.optimizer import _local
from ..core.tensorlist import dense
from ..core.transform import Context


class GlobalScale(GlobalScalarTransform):
    """``u <- s g`` with ``s`` one number per step computed over every tensor by the
    optimizer's :meth:`GlobalEstimate.estimate` (``global_scale``)."""

    def __call__(self, u, ctx: Context):
        return dense(u).mul(ctx.hp["global_scale"])


class _GlobalStep(GlobalEstimate):
    """Shared plumbing: the squared norm of every gradient of every group gives one
    scale for the step."""

    def build(self):
        return [GlobalScale()]

    def _scale(self, squared_norm: float) -> float:
        raise NotImplementedError

    def estimate(self, work) -> None:
        sums = Sums("sq")
        for num, group, params, grads in work:
            for g in grads:
                g = torch.view_as_real(g) if g.is_complex() else _local(g)  # FSDP2: the local shard
                sums.add("sq", wide(g).double().pow(2).sum())
        squared = sums.total()["sq"]
        if work:  # FSDP2 (DTensor parameters): the sum over every rank's shards
            squared = self._reduce([squared], work[0][1])[0]
        scale = float(self._scale(squared))
        for group in self.param_groups:
            self._step_values[id(group)] = {"global_scale": scale}


class SPS(_GlobalStep):
    r"""Stochastic Polyak step size (Loizou et al. 2021), in optax's form
    (``optax.polyak_sgd``)::

        gamma = min((f(theta) - f_star) / (||g||^2 + eps), max_lr)     (one ||g|| over all tensors)
        theta <- theta - lr gamma g

    ``step(closure)`` needs the closure: it returns this batch's loss ``f`` (the
    same batch as the gradient). ``lr`` is optax's ``scaling`` (the paper's
    ``1/c``; ``c = 0.5`` in its theory is ``lr = 2``), ``max_lr`` its
    ``max_learning_rate`` (``inf``: plain SPS; :class:`SPSmax` bounds it),
    ``f_star`` the optimal loss value (0 under interpolation). A loss below
    ``f_star`` gives a negative step, as in optax; ``||g|| = 0`` with ``eps = 0``
    gives no step.

    Paper: Loizou et al., "Stochastic Polyak Step-size for SGD: An Adaptive
    Learning Rate for Fast Convergence" (AISTATS 2021). Checked against the
    equations written out (tests/test_polyak.py).
    """

    name = "sps"
    family = "parameter-free"
    paper = "Stochastic Polyak Step-size for SGD: An Adaptive Learning Rate for Fast Convergence"
    reference = "optax.polyak_sgd (google-deepmind/optax)"
    state_bytes = 0
    requires_closure = True
    defaults = dict(lr=1.0, max_lr=math.inf, f_star=0.0, eps=0.0)
    rules = {"max_lr": v.positive_or_inf, "f_star": v.real, "eps": v.nonneg}

    def step(self, closure=None):
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step() needs a closure that returns this batch's loss "
                               "(the Polyak step size is (loss - f_star) / ||g||^2)")
        with torch.enable_grad():
            loss = closure()
        self._loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        super().step()
        return loss

    def _scale(self, squared_norm: float) -> float:
        head = v.as_numbers(self.param_groups[0])
        denom = squared_norm + head["eps"]
        if denom == 0.0:
            return 0.0
        return min((self._loss - head["f_star"]) / denom, head["max_lr"])


class SPSmax(SPS):
    r"""SPS with a bounded step size (``max_lr``, default 1.0 as optax's
    ``polyak_sgd``): see :class:`SPS`."""

    name = "sps_max"
    defaults = dict(SPS.defaults, max_lr=1.0)


class AdaGradNorm(_GlobalStep):
    r"""AdaGrad-Norm (Ward, Wu & Bottou 2019): one accumulator for the whole model::

        b^2 <- b^2 + ||g||^2          (b_0 = b0; ||g|| over every tensor of every group)
        theta <- theta - lr g / b

    ``b^2`` lives in the param groups (``sum_sq``), so the state dict holds it.

    Paper: Ward, Wu & Bottou, "AdaGrad stepsizes: sharp convergence over nonconvex
    landscapes" (ICML 2019); the high-probability analysis of "SGD with AdaGrad
    Stepsizes: Full Adaptivity with High Probability..." (Attia & Koren 2023).
    Checked against the equations written out (tests/test_polyak.py).
    """

    name = "adagrad_norm"
    family = "parameter-free"
    paper = "AdaGrad stepsizes: sharp convergence over nonconvex landscapes"
    reference = "closed form (Ward, Wu & Bottou 2019, Algorithm 1)"
    state_bytes = 0
    defaults = dict(lr=1.0, b0=1e-2, sum_sq=None)
    rules = {"b0": v.positive, "sum_sq": v.optional(v.nonneg)}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["sum_sq"] is None:
            others = [g["sum_sq"] for g in self.param_groups[:-1]]
            group["sum_sq"] = others[0] if others else float(group["b0"]) ** 2

    def _scale(self, squared_norm: float) -> float:
        total = self.param_groups[0]["sum_sq"] + squared_norm
        for group in self.param_groups:
            group["sum_sq"] = total
        return 1.0 / math.sqrt(total)


class PSPSDirection(GlobalScalarTransform):
    """``u <- gamma B^-1 g`` with ``B = sqrt(acc / bc) + eps`` (``acc``: the AdaGrad sum
    or Adam EMA of ``g^2``, updated by :meth:`PSPS.estimate`) or ``B = 1``."""

    full_precision = ("precond_acc",)
    nonnegative = ("precond_acc",)

    def init(self, p, group):
        return {"precond_acc": p.new_zeros(p.shape) if group["preconditioner"] != "none" else p.new_zeros(0)}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        if ctx.static["preconditioner"] == "none":
            return g.mul(ctx.hp["global_scale"])
        denom = ctx.state["precond_acc"].div(ctx.hp["psps_bc"]).sqrt_().add_(ctx.hp["precond_eps"])
        return g.div(denom).mul_(ctx.hp["global_scale"])


class PSPS(SPS):
    r"""Preconditioned stochastic Polyak step (Abdukhakimov et al. 2023, "Stochastic
    Gradient Descent with Preconditioned Polyak Step-size"): the Polyak step in the
    geometry of a diagonal preconditioner ``B``::

        acc <- acc + g^2 (adagrad)  or  beta2 acc + (1 - beta2) g^2 (adam, bias-corrected)
        B = sqrt(acc / bc) + precond_eps            (preconditioner="none": B = 1, plain SPS)
        gamma = min((f - f_star) / (g^T B^-1 g + eps), max_lr)
        theta <- theta - lr gamma B^-1 g

    As :class:`SPS`, ``step(closure)`` needs the loss of the gradient's batch. This is
    the paper's slack-free variant with the AdaGrad and Adam preconditioners; its
    slack (L1/L2) variants and the Hutchinson preconditioner (whose warm-up and
    smoothing the authors' code sets by hand) are not offered. ``precond_acc``
    stays in full precision. Checked against the equations written out
    (tests/test_polyak.py).
    """

    name = "psps"
    paper = "Stochastic Gradient Descent with Preconditioned Polyak Step-size"
    reference = "the paper's Algorithm (slack-free, AdaGrad/Adam preconditioners); equations in tests"
    state_bytes = 4
    defaults = dict(lr=1.0, max_lr=math.inf, f_star=0.0, eps=0.0, preconditioner="adagrad", beta2=0.999,
                    precond_eps=1e-8)
    rules = {**SPS.rules, "preconditioner": v.choice("none", "adagrad", "adam"), "beta2": v.unit,
             "precond_eps": v.positive}

    def build(self):
        return [PSPSDirection()]

    def estimate(self, work) -> None:
        sums, scales = Sums("weighted"), {}
        for num, group, params, grads in work:
            kind = num["preconditioner"]
            bc = 1.0
            for p, g, st in self._tensors(num, group, params, grads):
                gw = wide(g)
                if kind == "none":
                    sums.add("weighted", gw.double().pow(2).sum())
                    continue
                acc = st["precond_acc"]
                here = acc.to(g.device)
                if kind == "adagrad":
                    here.addcmul_(g.to(here.dtype), g.to(here.dtype))
                else:
                    here.mul_(num["beta2"]).addcmul_(g.to(here.dtype), g.to(here.dtype), value=1 - num["beta2"])
                    bc = 1.0 - num["beta2"] ** (int(st["step"]) + 1)
                if here is not acc:
                    acc.copy_(here)
                denom = wide(here).div(bc).sqrt().add(num["precond_eps"])
                sums.add("weighted", (gw.double().pow(2) / denom.double()).sum())
            scales[id(group)] = bc
        weighted = sums.total()["weighted"]
        head = v.as_numbers(self.param_groups[0])
        total = weighted + head["eps"]
        gamma = 0.0 if total == 0.0 else min((self._loss - head["f_star"]) / total, head["max_lr"])
        for group in self.param_groups:
            self._step_values[id(group)] = {"global_scale": float(gamma), "psps_bc": float(scales.get(id(group), 1.0))}


class MomSPSDirection(GlobalScalarTransform):
    """The heavy-ball displacement ``gamma g - beta (theta - theta_prev)``; state
    ``prev_param`` (the previous iterate, full precision: it is an iterate)."""

    full_precision = ("prev_param",)

    def init(self, p, group):
        return {"prev_param": p.detach().clone()}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        prev = ctx.state["prev_param"]
        d = g.mul(ctx.hp["global_scale"])
        d.sub_(ctx.params.sub(prev), alpha=ctx.hp["beta"])
        prev.copy_(ctx.params)
        return d


class MomSPS(SPS):
    r"""Polyak step size with heavy-ball momentum (MomSPS_max of Oikonomou & Loizou,
    "Stochastic Polyak Step-sizes and Momentum: Convergence Guarantees and
    Practical Performance", 2024)::

        gamma = (1 - beta) min((f - f_star) / (c ||g||^2), gamma_max)
        theta_next = theta - lr gamma g + lr beta (theta - theta_prev)

    ``step(closure)`` needs the loss, as :class:`SPS`; ``lr`` (default 1) scales the
    whole step. State: ``prev_param``. Checked against the update written out
    (tests/test_polyak.py).
    """

    name = "momsps"
    paper = "Stochastic Polyak Step-sizes and Momentum: Convergence Guarantees and Practical Performance"
    reference = "the authors' MomSPS (c, gamma_max, beta); update written out in tests"
    state_bytes = 4
    defaults = dict(lr=1.0, c=1.0, gamma_max=10.0, beta=0.9, f_star=0.0)
    rules = {"c": v.positive, "gamma_max": v.positive, "beta": v.unit, "f_star": v.real}

    def build(self):
        return [MomSPSDirection()]

    def _scale(self, squared_norm: float) -> float:
        head = v.as_numbers(self.param_groups[0])
        if squared_norm == 0.0:
            return 0.0
        return (1 - head["beta"]) * min((self._loss - head["f_star"]) / (head["c"] * squared_norm),
                                        head["gamma_max"])
