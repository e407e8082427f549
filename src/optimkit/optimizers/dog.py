"""DoG and L-DoG (Ivgi, Hinder & Carmon 2023), DoWG (Khaled, Mishchenko & Jin
2023): SGD whose step size is the distance travelled over the gradients seen, and
the polynomial-decay iterate averager DoG is meant to be used with."""
from __future__ import annotations

import copy
import math
from typing import Any

import torch

from ..core import validation as v
from ..core.transform import Context
from ..core.tensorlist import dense
from ..core.estimate import GlobalEstimate, GlobalScalarTransform, Sums, wide


class DoGStep(GlobalScalarTransform):
    """The gradient with L2 decay ``g + wd p``; the step size is the optimizer's
    (a scalar per group, or the per-tensor ``eta`` state of L-DoG)."""

    full_precision = ("x0", "rbar", "G", "eta")
    nonnegative = ("rbar", "G", "eta")

    def __init__(self, layerwise: bool = False):
        self.layerwise = layerwise

    def init(self, p, group):
        out = {"x0": p.detach().clone()}
        if self.layerwise:
            for key in ("rbar", "G", "eta"):
                out[key] = torch.zeros(1, dtype=torch.float32, device=p.device)
        return out

    def __call__(self, u, ctx: Context):
        g = dense(u)
        if ctx.static["weight_decay"]:
            g = g.add(ctx.params, alpha=ctx.hp["weight_decay"])
        if self.layerwise:
            return g.map(lambda gi, e: gi * e.to(gi.dtype).view(()), ctx.state["eta"])
        return g


class DoG(GlobalEstimate):
    r"""DoG, "Distance over Gradients" (as ``dog.DoG``): SGD with the step size

        rbar <- max(rbar, |x - x0|)      (rbar = reps_rel (1 + |x0|) at the first step)
        G <- G + |g|^2                   (G = |g0|^2 + eps at the first step)
        eta = lr rbar / sqrt(G);  x <- x - eta g          (g with L2 decay wd x)

    norms over the whole param group. ``init_eta`` fixes the first step size
    instead (``reps_rel`` is then unused, as in the package). Meant to be used with
    iterate averaging (:class:`PolynomialDecayAverager`). ``rbar`` and ``G``
    live in the param groups (state dict); ``x0`` stays in full precision (the
    state holds nothing else). A group at lr 0 is frozen (the package refuses
    lr <= 0).

    Paper: Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free
    Dynamic Step Size Schedule" (ICML 2023, arXiv:2302.12022). Checked step for
    step against ``dog.DoG`` (tests/test_dog.py).
    """

    name = "dog"
    paper = "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule"
    reference = "dog.DoG (formll/dog)"
    state_bytes = 4  # x0
    layerwise = False
    defaults = dict(reps_rel=1e-6, lr=1.0, weight_decay=0.0, eps=1e-8, init_eta=None, rbar=None, G=None)
    rules = {"reps_rel": v.nonneg, "weight_decay": v.nonneg, "eps": v.nonneg,
             "init_eta": v.optional(v.positive), "rbar": v.optional(v.nonneg), "G": v.optional(v.nonneg)}

    def build(self):
        return [DoGStep(self.layerwise)]

    def check(self, group):
        super().check(group)
        if group["init_eta"] is None and group["reps_rel"] <= 0.0:
            raise ValueError(f"Invalid reps_rel: {group['reps_rel']} (must be > 0 unless init_eta is given; "
                             "suggested 1e-6, or 1e-4 with batch normalization)")

    def estimate(self, work) -> None:
        for num, group, params, grads in work:
            first = group["rbar"] is None
            reps = 0.0 if num["init_eta"] is not None else num["reps_rel"]
            sums = Sums("x_sq", "dist_sq", "g_sq")
            for view, g, st in self._tensors(num, group, params, grads):
                if num["weight_decay"]:
                    g = g.add(view, alpha=num["weight_decay"])
                x = wide(view)
                sums.add("g_sq", torch.dot(wide(g), wide(g)))
                if first:
                    sums.add("x_sq", torch.dot(x, x))
                else:
                    diff = x - wide(st["x0"].to(view.device)).to(x.dtype)
                    sums.add("dist_sq", torch.dot(diff, diff))
            x_sq, dist_sq, g_sq = sums.total().values()
            if not self.layerwise:  # FSDP2: sums over every rank's local shards
                x_sq, dist_sq, g_sq = self._reduce([x_sq, dist_sq, g_sq], group)
            if first:
                rbar, G = reps * (1 + math.sqrt(x_sq)), g_sq + num["eps"]
            else:
                rbar, G = max(num["rbar"], math.sqrt(dist_sq)), num["G"] + g_sq
            eta = num["lr"] * rbar / math.sqrt(G) if G > 0.0 else 0.0
            if first and num["init_eta"] is not None:
                eta = num["init_eta"]
            group.update(rbar=float(rbar), G=float(G))
            self._step_values[id(group)] = {"dog_eta": float(eta)}

    def apply(self, u, ctx) -> None:
        if not ctx.static["lr"]:  # frozen
            return
        if self.layerwise:
            ctx.params.sub_(u)
        else:
            ctx.params.sub_(u, alpha=ctx.hp["dog_eta"])


class LDoG(DoG):
    r"""Layer-wise DoG (as ``dog.LDoG``): DoG's rule with the norms, ``rbar``, ``G``
    and the step size taken per tensor. ``rbar``, ``G`` and this step's ``eta`` are
    one-element fp32 state tensors of each parameter; with ``x0`` they stay in full
    precision.

    Paper: Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend" (L-DoG, section 4).
    Checked step for step against ``dog.LDoG`` (tests/test_dog.py).
    """

    name = "ldog"
    reference = "dog.LDoG (formll/dog)"
    state_bytes = 4  # x0 (+ three scalars per tensor)
    layerwise = True
    defaults = dict(reps_rel=1e-6, lr=1.0, weight_decay=0.0, eps=1e-8, init_eta=None)
    rules = {k: r for k, r in DoG.rules.items() if k not in ("rbar", "G")}

    def estimate(self, work) -> None:
        for num, group, params, grads in work:
            reps = 0.0 if num["init_eta"] is not None else num["reps_rel"]
            for view, g, st in self._tensors(num, group, params, grads):
                if num["weight_decay"]:
                    g = g.add(view, alpha=num["weight_decay"])
                x = wide(view)
                g_sq = float(torch.dot(wide(g), wide(g)))
                first = st["step"] == 0
                if first:
                    rbar, G = reps * (1 + float(x.norm())), g_sq + num["eps"]
                else:
                    dist = float((x - wide(st["x0"].to(view.device)).to(x.dtype)).norm())
                    rbar, G = max(float(st["rbar"]), dist), float(st["G"]) + g_sq
                eta = num["lr"] * rbar / math.sqrt(G) if G > 0.0 else 0.0
                if first and num["init_eta"] is not None:
                    eta = num["init_eta"]
                st["rbar"].fill_(rbar)
                st["G"].fill_(G)
                st["eta"].fill_(eta)
            self._step_values[id(group)] = {}


class DoWG(DoG):
    r"""DoWG, "Distance over Weighted Gradients" (as ``optax.contrib.dowg``)::

        r2 <- max(r2, |x - x0|^2)              (r2 = init_estim_sq_dist, or eps, at the start)
        v <- v + r2 |g|^2                      (g with L2 decay wd x)
        x <- x - lr r2 / (sqrt(v) + eps) g

    norms over the whole param group (optax: over every parameter it is given).
    ``estim_sq_dist`` and ``weighted_sq_norm_grads`` live in the param groups;
    ``x0`` stays in full precision. A group at lr 0 is frozen.

    Paper: Khaled, Mishchenko & Jin, "DoWG Unleashed: An Efficient Universal
    Parameter-Free Gradient Descent Method" (NeurIPS 2023, arXiv:2305.16284).
    Checked step for step against the optax form written out in tests/test_dog.py.
    """

    name = "dowg"
    paper = "DoWG Unleashed: An Efficient Universal Parameter-Free Gradient Descent Method"
    reference = "optax.contrib.dowg"
    state_bytes = 4  # x0
    layerwise = False
    defaults = dict(lr=1.0, init_estim_sq_dist=None, eps=1e-4, weight_decay=0.0,
                    estim_sq_dist=None, weighted_sq_norm_grads=0.0)
    rules = {"init_estim_sq_dist": v.optional(v.nonneg), "eps": v.nonneg, "weight_decay": v.nonneg,
             "estim_sq_dist": v.optional(v.nonneg), "weighted_sq_norm_grads": v.nonneg}

    def check(self, group):
        GlobalEstimate.check(self, group)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["estim_sq_dist"] is None:
            init = group["init_estim_sq_dist"]
            group["estim_sq_dist"] = float(group["eps"] if init is None else init)

    def estimate(self, work) -> None:
        for num, group, params, grads in work:
            sums = Sums("dist_sq", "g_sq")
            for view, g, st in self._tensors(num, group, params, grads):
                if num["weight_decay"]:
                    g = g.add(view, alpha=num["weight_decay"])
                diff = wide(view) - wide(st["x0"].to(view.device))
                sums.add("dist_sq", torch.dot(diff, diff))
                sums.add("g_sq", torch.dot(wide(g), wide(g)))
            dist_sq, g_sq = sums.total().values()
            dist_sq, g_sq = self._reduce([dist_sq, g_sq], group)  # FSDP2: over every rank's shards
            r2 = max(num["estim_sq_dist"], dist_sq)
            weighted = r2 * g_sq + num["weighted_sq_norm_grads"]
            eta = num["lr"] * r2 / (math.sqrt(weighted) + num["eps"]) if weighted + num["eps"] > 0 else 0.0
            group.update(estim_sq_dist=float(r2), weighted_sq_norm_grads=float(weighted))
            self._step_values[id(group)] = {"dog_eta": float(eta)}


class PolynomialDecayAverager:
    r"""Polynomial-decay iterate averaging (Shamir & Zhang 2013), as
    ``dog.PolynomialDecayAverager``: after each optimizer step, ``step()`` updates

        xbar <- (1 - c) xbar + c x,   c = (1 + gamma) / (t + gamma),   t = 1, 2, ...

    over the model's state dict (parameters and floating buffers; integer
    buffers such as BatchNorm's step count are copied). ``averaged_model`` is a
    deep copy of the model holding the average; evaluate it, not the model.
    ``state_dict()`` / ``load_state_dict()`` carry ``t`` and the average.
    """

    def __init__(self, model: torch.nn.Module, gamma: float = 8.0):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"PolynomialDecayAverager averages a torch.nn.Module, got {type(model).__name__}")
        gamma = v.nonneg("gamma", gamma)
        self.t = 1
        self.gamma = gamma
        self.model = model
        self.av_model = copy.deepcopy(model)
        self._devices_matched = False

    def step(self) -> None:
        """Fold the model's current weights into the average (call after ``opt.step()``)."""
        self._match_devices()
        c = (self.gamma + 1) / (self.gamma + self.t)
        current = self.model.state_dict()
        average = self.av_model.state_dict()
        with torch.no_grad():
            for key, x in current.items():
                a = average[key]
                if not (a.is_floating_point() or a.is_complex()):
                    a.copy_(x)
                else:
                    a.mul_(1 - c).add_(x, alpha=c)
        self.t += 1

    def _match_devices(self) -> None:
        if self._devices_matched:
            return
        first = next(iter(self.model.parameters()), None)
        if first is not None:
            self.av_model.to(first.device)
        self._devices_matched = True

    def reset(self) -> None:
        """Start averaging afresh: the next ``step()`` copies the model (c = 1)."""
        self.t = 1

    @property
    def averaged_model(self) -> torch.nn.Module:
        return self.av_model

    @property
    def base_model(self) -> torch.nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """The step count and the averaged model's state dict."""
        return {"t": self.t, "av_model": self.av_model.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.t = int(state_dict["t"])
        self.av_model.load_state_dict(state_dict["av_model"])
