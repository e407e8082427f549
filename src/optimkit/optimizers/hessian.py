"""Hessian-diagonal optimizers: AdaHessian, SophiaH (Hutchinson) and SophiaG (Gauss-Newton-Bartlett).

The Hutchinson optimizers need the gradient's graph: ``loss.backward(create_graph=True)``
(at least on the steps that refresh the estimate). :meth:`HutchinsonOptimizer.prepare_step`
runs the Hessian-vector products eagerly, once per step and before any parameter
changes, folds the estimate into the curvature state, and detaches ``p.grad`` (the
graph is not needed afterwards; this also frees it); the per-group update kernel
(eager or compiled) only reads the state.

Probes are drawn from a ``torch.Generator`` seeded from ``(seed, step)``, never from
torch's global generator: a run resumed from a state dict draws the same probes as
the uninterrupted run (bit-exact), and the training loop's own randomness is left alone.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import curvature
from ..core import validation as v
from ..core.optimizer import Optimizer
from ..core.validation import as_numbers
from ..curvature import HutchinsonOptimizer, update_state as _update_state
from ..transforms.curvature import AdaHessianScale, SophiaGClip, SophiaHClip
from ..transforms.decay import WeightDecay


def _hessian_power(name: str, value: Any) -> float:
    x = v.real(name, value)
    if not 0.0 < x <= 1.0:
        raise ValueError(f"Invalid {name}: {x} (must be in (0, 1])")
    return x


def _betas(name: str, value: Any) -> tuple[float, float]:
    return v.betas(2, v.unit)(name, value)


class AdaHessian(HutchinsonOptimizer):
    r"""AdaHessian: Adam with the squared Hessian diagonal in the denominator.

    Every ``update_each`` steps (steps 1, 1 + update_each, ...), with ``n_samples``
    Rademacher probes ``z`` (``D = |mean z * (H z)|``, for one probe ``|H z|``)::

        D <- mean of |D| over dims (2, 3)           4-D (conv) kernels: spatial averaging
        v <- b2 v + (1 - b2) D^2
    every step::

        m <- b1 m + (1 - b1) g
        theta <- theta - lr (m / bc1 / ((v / bc2)^(k/2) + eps) + wd theta)

    ``k = hessian_power``, ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^r`` with ``r`` the number
    of refreshes so far. Needs ``loss.backward(create_graph=True)`` on the refresh steps
    (a ``RuntimeError`` says so otherwise). Probes come from a generator seeded by
    ``(seed, step)``: resumed runs are bit-exact.

    Paper: Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning" (AAAI 2021). Checked against a float64 reference step and against
    ``torch_optimizer.Adahessian`` / ``pytorch_optimizer.AdaHessian`` (tests/test_hessian.py,
    which lists where they differ: their probes come from the global generator, the
    torch-optimizer default hessian_power is 0.5, pytorch_optimizer has no spatial
    averaging and updates ``v`` only on refresh steps but bias-corrects by the step count).
    """

    name = "adahessian"
    paper = "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning"
    reference = "torch_optimizer.Adahessian (amirgholami/adahessian)"
    state_bytes = 8
    _period_key = "update_each"
    _samples_key = "n_samples"
    defaults = dict(lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, hessian_power=1.0,
                    update_each=1, n_samples=1, seed=0)
    rules = {"betas": _betas, "hessian_power": _hessian_power, "update_each": v.positive_int,
             "n_samples": v.positive_int, "seed": v.nonneg_int}

    def build(self):
        return [WeightDecay(decoupled=True), AdaHessianScale()]

    def _fold(self, state, estimate, p, group, step):
        b2 = as_numbers(group)["betas"][1]
        d = curvature.spatial_average(estimate)

        def fold(x):
            x.mul_(b2).addcmul_(d.to(x), d.to(x), value=1 - b2)

        _update_state(state, "exp_hessian_diag_sq", fold)


class SophiaH(HutchinsonOptimizer):
    r"""SophiaH: Sophia with Hutchinson estimates of the Hessian diagonal, as
    ``pytorch_optimizer.SophiaH``.

    Every ``update_period`` steps (steps 1, 1 + update_period, ...), with
    ``num_samples`` probes ``z`` (``hessian_distribution``: ``"gaussian"`` or
    ``"rademacher"``)::

        h <- b2 h + (1 - b2) mean(z * (H z))          (signed; negated when maximizing)
    every step::

        theta <- theta (1 - lr wd)   (weight_decouple; else g <- g + wd theta)
        m <- b1 m + (1 - b1) g
        theta <- theta - lr clamp(m / max(h, eps), -p, p)

    ``p`` (Sophia's rho) caps every coordinate's step at ``lr * p``; where ``h <= eps``
    (before the first estimate, or negative curvature) the step is ``lr * p * sign(m)``
    unless ``|m| < p eps``. Needs ``loss.backward(create_graph=True)`` on refresh steps.

    Paper: Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for
    Language Model Pre-training" (ICLR 2024). Checked against a float64 reference
    step and ``pytorch_optimizer.SophiaH`` (tests/test_hessian.py).
    """

    name = "sophia_h"
    paper = "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training"
    reference = "pytorch_optimizer.SophiaH"
    state_bytes = 8
    _period_key = "update_period"
    _samples_key = "num_samples"
    defaults = dict(lr=6e-2, betas=(0.96, 0.99), weight_decay=0.0, weight_decouple=True, p=1e-2,
                    update_period=10, num_samples=1, hessian_distribution="gaussian", eps=1e-12, seed=0)
    rules = {"betas": _betas, "weight_decouple": v.boolean, "p": v.nonneg, "update_period": v.positive_int,
             "num_samples": v.positive_int, "hessian_distribution": v.choice(*curvature.DISTRIBUTIONS),
             "seed": v.nonneg_int}

    def build(self):
        return [WeightDecay(decoupled="weight_decouple"), SophiaHClip()]

    def _distribution(self, group):
        return group["hessian_distribution"]

    def _fold(self, state, estimate, p, group, step):
        b2 = as_numbers(group)["betas"][1]
        d = -estimate if group["maximize"] else estimate

        def fold(x):
            x.lerp_(d.to(x), 1 - b2)

        _update_state(state, "hessian", fold)


class SophiaG(Optimizer):
    r"""SophiaG: Sophia with the Gauss-Newton-Bartlett Hessian estimate, as the authors'
    ``SophiaG`` (Liuhong99/Sophia).

    Every step::

        theta <- theta (1 - lr wd)
        m <- b1 m + (1 - b1) g
        theta <- theta - lr sign(m) min(|m| / (rho bs h + 1e-15), 1)

    ``bs``: tokens (examples) per step. ``h`` (state ``hessian``) changes only in
    :meth:`update_hessian`, which folds the current ``p.grad`` in:
    ``h <- b2 h + (1 - b2) p.grad^2``. The authors call it every ``k = 10`` steps after
    a backward pass of the loss on labels *sampled from the model's own output
    distribution* (``y_hat ~ softmax(logits)``), with the mean loss over the batch (the
    ``bs`` factor restores the sum). Without ``update_hessian`` calls ``h = 0`` and every
    step is ``lr * sign(m)`` (sign momentum). Does not need ``create_graph``.

    Paper: Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for
    Language Model Pre-training" (ICLR 2024). Checked against a float64 reference step
    (tests/test_hessian.py).
    """

    name = "sophia_g"
    projection_refused = "keeps its Hessian estimate in the full parameter space (update_hessian)"
    family = "second-order"
    paper = "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training"
    reference = "sophia.SophiaG (Liuhong99/Sophia)"
    state_bytes = 8
    defaults = dict(lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1, bs=5120.0)
    rules = {"betas": _betas, "rho": v.nonneg, "bs": v.positive}

    def build(self):
        return [WeightDecay(decoupled=True), SophiaGClip()]

    @torch.no_grad()
    def update_hessian(self) -> None:
        """``h <- b2 h + (1 - b2) p.grad^2`` for every parameter with a gradient (its
        state is created if needed). Call it after ``backward`` of the loss on sampled
        labels, then ``zero_grad`` before the training step's own backward."""
        work = [(group, *self._collect(group)) for group in self.param_groups]  # checks first
        for group, params, grads in work:
            b2 = as_numbers(group)["betas"][1]
            for p, g in zip(params, grads):
                view = torch.view_as_real(p) if p.is_complex() else p
                gv = torch.view_as_real(g) if g.is_complex() else g
                state = self._state_for(p, view, group)
                gd = gv.detach()

                def fold(x, gd=gd):
                    gx = gd.to(x)
                    x.mul_(b2).addcmul_(gx, gx, value=1 - b2)

                _update_state(state, "hessian", fold)
