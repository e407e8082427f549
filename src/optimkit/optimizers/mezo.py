"""MeZO: zeroth-order SGD from two forward passes (SPSA), no backward pass."""
from __future__ import annotations

import math

import warnings

import torch

from ..core import validation as v
from ..core.optimizer import Optimizer

_MIX = 0x9E3779B97F4A7C15  # spreads (seed, step, tensor) into distinct generator seeds


def _seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 + step * _MIX + index * 7919) % (2 ** 63 - 1)


class MeZO(Optimizer):
    r"""MeZO (Malladi et al. 2023): SPSA with seed-replayed perturbations.

    ``step(closure)`` needs a closure that returns the loss of one batch; it runs
    under ``torch.no_grad`` (a closure that also calls ``backward``, as written for
    gradient optimizers, is rerun with autograd on, with a warning). Per step, with ``z``
    a standard normal direction regenerated from a seed (never stored)::

        l+ = L(theta + eps z);  l- = L(theta - eps z)       (the closure, twice)
        g = (l+ - l-) / (2 eps)                              (projected gradient)
        theta <- theta - lr (g z + wd theta)

    The weights are moved in place (``+eps z``, ``-2 eps z``, ``+eps z``), so the
    extra memory is one tensor's ``z`` at a time: inference memory. ``z`` comes
    from a generator seeded by (``seed``, step, tensor index): a run is
    reproducible and a resumed run equals an uninterrupted one. ``step`` returns
    ``l+``. Gradients are never read or written; ``state_precision``, placement
    and ``compile`` have nothing to act on (there is no state but the step count).

    Paper: Malladi et al., "Fine-Tuning Language Models with Just Forward Passes"
    (arXiv:2305.17333); the update as in the authors' trainer (princeton-nlp/MeZO,
    ``zo_step``/``zo_update``). Checked against the equations written out in
    tests/test_mezo.py.
    """

    projection_refused = "perturbs the weights themselves"
    name = "mezo"
    family = "zeroth-order"
    paper = "Fine-Tuning Language Models with Just Forward Passes"
    reference = "princeton-nlp/MeZO (zo_step, zo_update)"
    state_bytes = 0
    gradient_free = True
    defaults = dict(lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0)
    rules = {"eps": v.positive, "weight_decay": v.nonneg, "seed": v.nonneg_int}

    def build(self):
        return []

    def _tensors(self):
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    out.append((group, p, torch.view_as_real(p) if p.is_complex() else p))
        return out

    @staticmethod
    def _direction(view, seed: int) -> torch.Tensor:
        gen = torch.Generator(device=view.device).manual_seed(seed)
        return torch.randn(view.shape, generator=gen, device=view.device, dtype=view.dtype)

    def _perturb(self, tensors, seeds, scale: float) -> None:
        for (group, _, view), s in zip(tensors, seeds):
            view.add_(self._direction(view, s), alpha=scale * group["eps"])

    def _evaluate(self, closure):
        """The closure's loss (detached), computed without autograd: inference memory.
        A closure written for gradient optimizers (``zero_grad``, ``backward``) fails
        there; it is then run with autograd on, from this call on, with a warning (the
        gradients it computes are not used)."""
        if not getattr(self, "_closure_backprops", False):
            try:
                with torch.no_grad():
                    loss = closure()
                return loss.detach() if isinstance(loss, torch.Tensor) else loss
            except RuntimeError as err:
                if "does not require grad" not in str(err):
                    raise
                self._closure_backprops = True
                warnings.warn("MeZO: the closure calls backward(); MeZO needs only the loss, so it now runs "
                              "the closure with autograd on (training memory, gradients unused). A closure "
                              "that only returns the loss keeps inference memory.", stacklevel=3)
        with torch.enable_grad():
            loss = closure()
        return loss.detach() if isinstance(loss, torch.Tensor) else loss

    @torch.no_grad()
    def step(self, closure=None):
        """One SPSA step; ``closure()`` returns the loss (no ``backward``)."""
        if closure is None:
            raise RuntimeError("MeZO.step() needs a closure that returns the loss (it is evaluated twice, "
                               "at theta + eps z and theta - eps z; no backward pass)")
        tensors = self._tensors()
        if not tensors:
            return closure()
        for _, p, view in tensors:
            if not view.is_floating_point():
                raise TypeError(f"MeZO cannot update a parameter of dtype {p.dtype}")
        states = [self.state[p] for _, p, _ in tensors]
        step = max(int(st.get("step", 0)) for st in states) + 1
        seeds = [_seed(group["seed"], step, i) for i, (group, _, _) in enumerate(tensors)]
        self._perturb(tensors, seeds, 1.0)
        plus = self._evaluate(closure)
        self._perturb(tensors, seeds, -2.0)
        minus = self._evaluate(closure)
        self._perturb(tensors, seeds, 1.0)
        if not math.isfinite(float(plus) - float(minus)):  # the nonfinite guard, on the two losses
            modes = {g["nonfinite"] for g in self.param_groups} - {None}
            if "raise" in modes:
                raise RuntimeError(f"MeZO: non-finite loss difference ({float(plus)} - {float(minus)}) "
                                   "(nonfinite='raise'); the parameters were restored, no update made")
            if modes:
                self.skipped_steps = getattr(self, "skipped_steps", 0) + 1
                return plus
        grads = {}
        for i, (group, _, view) in enumerate(tensors):
            key = id(group)
            if key not in grads:  # one projected gradient per group (its own eps)
                grads[key] = float((plus - minus) / (2 * group["eps"]))
            g = grads[key]
            lr = float(group["lr"])
            if group["weight_decay"]:
                view.sub_(view, alpha=lr * group["weight_decay"])
            view.sub_(self._direction(view, seeds[i]), alpha=lr * g)
            states[i]["step"] = step
        return plus
