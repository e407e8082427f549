"""Schedule-free SGD and AdamW (Defazio et al. 2024), with train/eval modes."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from ..core import validation as v
from ..core.optimizer import Optimizer
from ..transforms.schedule_free import ScheduleFreeStep

#: the training iterate ``y`` kept while in eval mode, so that ``train()`` restores it bit for bit
EVAL_Y = "sf_y"


def _open_unit(name: str, value: Any) -> float:
    x = v.unit(name, value)
    if x == 0.0:
        raise ValueError(f"Invalid {name}: {x} (must be in (0, 1): the evaluation point "
                         "x = y + (1 - 1/beta) (z - y) needs beta > 0)")
    return x


def _betas(name: str, value: Any) -> tuple[float, float]:
    b1, b2 = v.betas(2)(name, value)
    _open_unit(f"{name}[0]", b1)
    return b1, b2


class _ScheduleFree(Optimizer):
    """Shared train/eval logic. The parameters hold ``y`` in train mode and the
    evaluation point ``x`` in eval mode; ``step()`` in eval mode raises."""

    projection_refused = "keeps the iterate z in full space"
    family = "schedule-free"
    extra_state_keys = (EVAL_Y,)

    def _beta(self, group: dict) -> float:
        raise NotImplementedError

    def _views(self, group) -> Iterable[tuple[Tensor, dict]]:
        for p in group["params"]:
            st = self.state.get(p)
            if st and "z" in st:
                yield (torch.view_as_real(p) if p.is_complex() else p), st

    @torch.no_grad()
    def eval(self) -> None:
        """Put the evaluation point ``x = y + (1 - 1/beta) (z - y)`` into the
        parameters (keeping ``y`` to restore; it is part of the state dict while in
        eval mode). Call before evaluating or saving the model for inference."""
        for group in self.param_groups:
            if not group["train_mode"]:
                continue
            beta = self._beta(group)
            for view, st in self._views(group):
                st[EVAL_Y] = view.detach().clone()
                view.lerp_(st["z"].to(view.device, view.dtype), 1 - 1 / beta)
            group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Back to the training iterate ``y``: bit for bit the values before
        ``eval()`` (weights changed in eval mode are overwritten). A state without
        the kept ``y`` (e.g. from another package) recomputes it from ``x`` and ``z``."""
        for group in self.param_groups:
            if group["train_mode"]:
                continue
            beta = self._beta(group)
            for view, st in self._views(group):
                kept = st.pop(EVAL_Y, None)
                if kept is not None:
                    view.copy_(kept)
                else:
                    view.lerp_(st["z"].to(view.device, view.dtype), 1 - beta)
            group["train_mode"] = True

    def step(self, closure=None):
        if not all(g["train_mode"] for g in self.param_groups):
            raise RuntimeError(f"{type(self).__name__}.step() called in eval mode: call optimizer.train() "
                               "before training steps (and optimizer.eval() before evaluation)")
        return super().step(closure)

    def apply(self, u, ctx):
        """``y <- y - u``: the transform returns the whole displacement."""
        ctx.params.sub_(u)


class ScheduleFreeAdamW(_ScheduleFree):
    r"""Schedule-free AdamW (Defazio et al. 2024; AlgoPerf 2024 self-tuning winner).

    No learning-rate schedule: the parameters are an interpolation ``y`` of a base
    AdamW-normalized SGD iterate ``z`` and its running average ``x`` (weights
    ``(k+1)^r lr_max^weight_lr_power``); evaluate at ``x``::

        opt.train(); ... opt.step() ...; opt.eval(); evaluate(model); opt.train()

    ``warmup_steps`` ramps lr linearly; weight decay is applied at ``y``. State:
    ``z`` (full precision whatever ``state_precision`` says: it is an iterate),
    ``exp_avg_sq`` (follows it); while in eval mode also the kept ``y``.

    Paper: Defazio et al., "The Road Less Scheduled" (arXiv:2405.15682). Checked
    against ``schedulefree.AdamWScheduleFree`` at the train and the eval point
    (tests/test_schedule_free.py).
    """

    name = "schedulefree_adamw"
    paper = "The Road Less Scheduled"
    reference = "schedulefree.AdamWScheduleFree (facebookresearch/schedule_free)"
    state_bytes = 8  # z and v
    defaults = dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0,
                    weight_lr_power=2.0, train_mode=True)
    rules = {"betas": _betas, "eps": v.eps_positive, "weight_decay": v.nonneg, "warmup_steps": v.nonneg_int,
             "r": v.nonneg, "weight_lr_power": v.nonneg, "train_mode": v.boolean}

    def build(self):
        return [ScheduleFreeStep(adaptive=True)]

    def _beta(self, group):
        return group["betas"][0]


class ScheduleFreeRAdam(_ScheduleFree):
    r"""Schedule-free RAdam (the authors' ``RAdamScheduleFree``): as
    :class:`ScheduleFreeAdamW` with RAdam's rectification in place of warmup: the
    step is ``lr r_k`` with ``r_k`` RAdam's variance rectification while
    ``rho_k > 4``; before that, plain (unnormalized) steps at ``lr`` or, with
    ``silent_sgd_phase`` (default), no step at all.

    Checked against ``schedulefree.RAdamScheduleFree`` (tests/test_schedule_free.py).
    """

    name = "schedulefree_radam"
    paper = "The Road Less Scheduled"
    reference = "schedulefree.RAdamScheduleFree (facebookresearch/schedule_free)"
    state_bytes = 8
    defaults = dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, r=0.0, weight_lr_power=2.0,
                    silent_sgd_phase=True, train_mode=True)
    rules = {"betas": _betas, "eps": v.nonneg, "weight_decay": v.nonneg, "r": v.nonneg,
             "weight_lr_power": v.nonneg, "silent_sgd_phase": v.boolean, "train_mode": v.boolean}

    def build(self):
        return [ScheduleFreeStep(adaptive=True, rectified=True)]

    def _beta(self, group):
        return group["betas"][0]


class ScheduleFreeSGD(_ScheduleFree):
    r"""Schedule-free SGD (Defazio et al. 2024): as :class:`ScheduleFreeAdamW`
    without the second moment, ``momentum`` in place of ``betas[0]``. State: ``z``.

    Checked against ``schedulefree.SGDScheduleFree`` (tests/test_schedule_free.py).
    """

    name = "schedulefree_sgd"
    paper = "The Road Less Scheduled"
    reference = "schedulefree.SGDScheduleFree (facebookresearch/schedule_free)"
    state_bytes = 4
    defaults = dict(lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0,
                    train_mode=True)
    rules = {"momentum": _open_unit, "weight_decay": v.nonneg, "warmup_steps": v.nonneg_int,
             "r": v.nonneg, "weight_lr_power": v.nonneg, "train_mode": v.boolean}

    def build(self):
        return [ScheduleFreeStep(adaptive=False)]

    def _beta(self, group):
        return group["momentum"]


@torch.no_grad()
def schedulefree_bn_update(model: torch.nn.Module, batches: Iterable, forward=None) -> None:
    """Recompute BatchNorm running statistics at the current weights (call it after
    ``opt.eval()``: the statistics gathered during training belong to ``y``, not to
    the evaluation point ``x``). ``batches`` yields inputs (``forward(model, batch)``
    runs one; default ``model(batch)``). Statistics are reset and averaged over all
    batches; the model's train/eval flag is restored."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    try:
        for batch in batches:
            forward(model, batch) if forward is not None else model(batch)
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
        model.train(was_training)
