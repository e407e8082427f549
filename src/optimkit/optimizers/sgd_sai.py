"""SGD-SaI: SGD with momentum whose per-tensor learning rates are fixed at the
first step by the gradient's signal-to-noise ratio."""
from __future__ import annotations

import torch

from ..core import validation as v
from ..core.optimizer import Optimizer
from ..core.tensorlist import TensorList, dense
from ..core.transform import Context, Transform


class SaIMomentum(Transform):
    """``b <- g`` at the first step, then ``b <- mu b + (1 - mu) g``; the update is
    ``b gsnr / gsnr_max``. State: ``momentum_buffer``, ``gsnr`` (0-d, full
    precision, set by :meth:`SGDSaI.prepare_step`)."""

    full_precision = ("gsnr",)

    def init(self, p, group):
        exact = torch.float64 if p.dtype == torch.float64 else torch.float32
        return {"momentum_buffer": p.new_zeros(p.shape), "gsnr": p.new_zeros((), dtype=exact)}

    def scalars(self, group, step, sstate):
        # every gsnr is 0 when gsnr_max is (all first gradients zero): divide by 1, not 0
        top = group["gsnr_max"]
        return {"first_step": step == 1, "gsnr_div": float(top) if top else 1.0}

    def __call__(self, u, ctx: Context):
        mu = ctx.hp["momentum"]
        b = ctx.state["momentum_buffer"]
        g = dense(u)
        if ctx.static["first_step"]:
            b.copy_(g)
        else:
            b.mul_(mu).add_(g, alpha=1 - mu)
        scale = [s / ctx.hp["gsnr_div"] for s in ctx.state["gsnr"]]
        return TensorList([bi * si.to(bi.dtype) for bi, si in zip(b, scale)])


class SGDSaI(Optimizer):
    r"""SGD-SaI (Xu et al. 2024): momentum SGD with learning rates scaled at
    initialization, no adaptive state.

    At a tensor's first step, ``gsnr = ||g|| / (std(g) + eps)`` (unbiased std, NaN
    taken as 0) and ``gsnr_max`` is the largest over every tensor of every group;
    then per step::

        b <- g (first step), else mu b + (1 - mu) g
        theta <- theta (1 - lr wd) - lr (gsnr / gsnr_max) b

    ``gsnr`` is kept per tensor (0-d, in the state dict), ``gsnr_max`` in the
    param groups. As the authors' code, a one-element tensor (std NaN -> 0) gets
    ``gsnr = |g| / eps``, which can dominate ``gsnr_max``; give such tensors their
    own optimizer if that matters. A tensor whose first gradient arrives later is
    measured then (and may raise ``gsnr_max``).

    Paper: Xu et al., "No More Adam: Learning Rate Scaling at Initialization is All
    You Need" (arXiv:2412.11768). Checked against ``sgd_sai.SGD_sai`` 1.0.4 (the
    max-normalized version; written out in tests/test_sgd_sai.py) and 1.0.3 where
    installed.
    """

    projection_refused = "measures each full tensor's gradient"
    name = "sgd_sai"
    family = "first-order"
    paper = "No More Adam: Learning Rate Scaling at Initialization is All You Need"
    reference = "sgd_sai.SGD_sai 1.0.4 (AnonymousAlethiometer/SGD_SaI)"
    state_bytes = 4
    defaults = dict(lr=1e-2, momentum=0.9, eps=1e-8, weight_decay=1e-2, gsnr_max=None)
    rules = {"momentum": v.unit, "eps": v.eps_positive, "weight_decay": v.nonneg,
             "gsnr_max": v.optional(v.nonneg)}

    def build(self):
        return [SaIMomentum()]

    @torch.no_grad()
    def prepare_step(self) -> None:
        """The signal-to-noise ratio of every tensor at its first step, and the
        largest of all (one value for every group)."""
        work = [(g, *self._collect(g)) for g in self.param_groups]  # validates before any change
        from ..core.optimizer import _sharded_in

        if any(_sharded_in(params) for _, params, _ in work):  # every rank raises, before any change
            raise ValueError("Invalid sharded_strategy: SGDSaI's signal-to-noise ratio of each whole "
                             "gradient is not computed on FSDP2 (DTensor) parameters yet; no "
                             "sharded_strategy supports it")
        known = [g["gsnr_max"] for g in self.param_groups if g["gsnr_max"] is not None]
        top = max(known) if known else None
        for group, params, grads in work:
            for p, g in zip(params, grads):
                view = torch.view_as_real(p) if p.is_complex() else p
                st = self._state_for(p, view, group)
                if st["step"] != 0:
                    continue
                g = torch.view_as_real(g) if g.is_complex() else g
                g = -g if group["maximize"] else g
                g = g.to(st["gsnr"].dtype)
                # one element: the unbiased std is NaN, taken as 0 (as the authors' nan_to_num)
                sigma = g.std() if g.numel() > 1 else g.new_zeros(())
                gsnr = g.norm() / (sigma.nan_to_num() + group["eps"])
                st["gsnr"].copy_(gsnr)
                value = float(gsnr)
                top = value if top is None else max(top, value)
        if top is not None:
            for group in self.param_groups:
                group["gsnr_max"] = top

    def apply(self, u, ctx) -> None:
        """``theta <- theta (1 - lr wd) - lr u`` (the authors' order)."""
        if ctx.static["weight_decay"]:
            ctx.params.mul_(1 - ctx.hp["lr"] * ctx.hp["weight_decay"])
        super().apply(u, ctx)
