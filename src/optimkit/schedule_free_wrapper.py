"""``ScheduleFreeWrapper``: make any optimizer (optimkit's or torch's) schedule-free.

The wrapped optimizer steps the base iterate ``z``; the parameters hold
``y = (1 - beta) z + beta x`` during training, ``x`` (the weighted average of
the ``z`` iterates) being the point to evaluate::

    x <- (y - (1 - beta) z) / beta                    (recovered from y and z)
    params <- z; base.step(); z <- params              (the base rule moves z)
    c = w_k / sum w,  w_k = (k + 1)^r (lr_max d)^weight_lr_power
    x <- (1 - c) x + c z;  y <- beta x + (1 - beta) z

``weight_decay_at_y`` decays at ``y`` (z and y alike) before the base step; a
weight decay of the base optimizer itself acts at ``z``. A base group's ``d``
(Prodigy, D-Adaptation) scales its lr in the weights. As the authors'
``schedulefree.ScheduleFreeWrapper``, with three differences: ``train()`` after
``eval()`` restores ``y`` bit for bit (kept while in eval mode), the wrapper's
own values (``z``, step counts, weight sums) live in its state dict beside the
base optimizer's instead of inside the base's param groups and state (so an
optimkit base keeps loading with ``torch.load``'s defaults and its kernels see
no foreign keys), and it starts in train mode.
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor


def _check(name: str, value: Any, low: float, high: float | None, open_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    x = float(value)
    if not (x > low if open_low else x >= low) or (high is not None and not x < high) or x != x:
        bounds = f"({low}, {high})" if high is not None else f"[{low}, inf)"
        raise ValueError(f"Invalid {name}: {x} (must be in {bounds})")
    return x


class ScheduleFreeWrapper(torch.optim.Optimizer):
    """Schedule-free iterate averaging around ``base`` (any ``torch.optim.Optimizer``).

    ``opt = ok.ScheduleFreeWrapper(torch.optim.RMSprop(model.parameters(), lr=2.5e-3))``;
    ``opt.train()`` / ``opt.eval()`` as the schedule-free optimizers
    (docs/tuning_free.md). ``momentum`` is the interpolation ``beta``; the base's
    own momentum can be turned off.

    It is a ``torch.optim.Optimizer`` (``param_groups``, ``state`` and ``defaults``
    are the base's; step and state-dict hooks work), so LR schedulers, Lightning's
    ``configure_optimizers`` and accelerate's ``prepare`` take it as they take the base.
    """

    def __init__(self, base: torch.optim.Optimizer, momentum: float = 0.9, weight_decay_at_y: float = 0.0,
                 r: float = 0.0, weight_lr_power: float = 2.0):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        self.base = base
        self.momentum = _check("momentum", momentum, 0.0, 1.0, open_low=True)
        self.weight_decay_at_y = _check("weight_decay_at_y", weight_decay_at_y, 0.0, None, open_low=False)
        self.r = _check("r", r, 0.0, None, open_low=False)
        self.weight_lr_power = _check("weight_lr_power", weight_lr_power, 0.0, None, open_low=False)
        self.train_mode = True
        self._z: dict[Tensor, Tensor] = {}      # base iterate per parameter
        self._kept_y: dict[Tensor, Tensor] = {}  # y while in eval mode
        self._groups = [self._fresh() for _ in base.param_groups]
        # torch.optim.Optimizer's bookkeeping (its __init__ would replace param_groups and
        # state, which are the base's here): hook registries, step profiling and hooks
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post",
                     "load_state_dict_pre", "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()

    def __getstate__(self) -> dict:
        """All attributes (torch.optim's would keep only defaults, state and groups), but
        not an instance ``step`` (an LR scheduler's wrapper that calls the original)."""
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @staticmethod
    def _fresh() -> dict:
        return {"k": 0, "lr_max": 0.0, "weight_sum": 0.0}

    # --------------------------------------------------------------- the torch.optim surface
    @property
    def param_groups(self):
        return self.base.param_groups

    @property
    def state(self):
        return self.base.state

    @property
    def defaults(self):
        return self.base.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.base.add_param_group(param_group)
        self._groups.append(self._fresh())

    def _params(self):
        return [p for g in self.base.param_groups for p in g["params"]]

    # --------------------------------------------------------------- modes
    @torch.no_grad()
    def eval(self) -> None:
        """Parameters to ``x``; ``y`` is kept for :meth:`train`."""
        if not self.train_mode:
            return
        for p in self._params():
            z = self._z.get(p)
            if z is not None:
                self._kept_y[p] = p.detach().clone()
                p.lerp_(z, 1 - 1 / self.momentum)
        self.train_mode = False

    @torch.no_grad()
    def train(self) -> None:
        """Parameters back to ``y``, bit for bit."""
        if self.train_mode:
            return
        for p in self._params():
            kept = self._kept_y.pop(p, None)
            if kept is not None:
                p.copy_(kept)
            elif p in self._z:
                p.lerp_(self._z[p], 1 - self.momentum)
        self.train_mode = True

    # --------------------------------------------------------------- step
    @staticmethod
    def _swap(a: Tensor, b: Tensor) -> None:
        tmp = a.clone()
        a.copy_(b)
        b.copy_(tmp)

    def step(self, closure=None):
        if not self.train_mode:
            raise RuntimeError("ScheduleFreeWrapper.step() called in eval mode: call optimizer.train() before "
                               "training steps (and optimizer.eval() before evaluation)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        guard = getattr(self.base, "_nonfinite_skip", None)  # the base's nonfinite="skip"|"raise"
        if guard is not None and guard():  # before z and the parameters are touched
            return loss
        beta = self.momentum
        active = []
        with torch.no_grad():
            for group in self.base.param_groups:
                lr = float(group["lr"])
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    z = self._z.get(p)
                    if z is None:
                        z = self._z[p] = p.detach().clone()
                    if self.weight_decay_at_y:
                        z.sub_(p, alpha=lr * self.weight_decay_at_y)
                        p.sub_(p, alpha=lr * self.weight_decay_at_y * (1 - beta))
                    p.lerp_(z, 1 - 1 / beta)  # p = x
                    self._swap(p, z)            # p = z, buffer = x
                    active.append(p)
        self.base.step()
        with torch.no_grad():
            for group, mine in zip(self.base.param_groups, self._groups):
                lr = float(group["lr"]) * float(group.get("d", 1.0))
                mine["lr_max"] = max(lr, mine["lr_max"])
                weight = (mine["k"] + 1) ** self.r * mine["lr_max"] ** self.weight_lr_power
                mine["weight_sum"] += weight
                ckp1 = weight / mine["weight_sum"] if mine["weight_sum"] else 0.0
                for p in group["params"]:
                    if p.grad is None or p not in self._z:
                        continue
                    z = self._z[p]
                    self._swap(p, z)           # p = x, buffer = new z
                    p.lerp_(z, ckp1)           # x
                    p.lerp_(z, 1 - beta)       # y
                mine["k"] += 1
        return loss

    # --------------------------------------------------------------- state dict
    def state_dict(self) -> dict:
        """``{"base": base.state_dict(), "schedulefree": {...}}``: tensors and plain
        values only (``torch.load``'s defaults read it)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        params = self._params()
        out = {"base": self.base.state_dict(),
                "schedulefree": {
                    "momentum": self.momentum, "weight_decay_at_y": self.weight_decay_at_y, "r": self.r,
                    "weight_lr_power": self.weight_lr_power, "train_mode": self.train_mode,
                    "groups": [dict(g) for g in self._groups],
                    "z": {i: self._z[p].clone() for i, p in enumerate(params) if p in self._z},
                    "kept_y": {i: self._kept_y[p].clone() for i, p in enumerate(params) if p in self._kept_y}}}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            out = out if result is None else result
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a dict from :meth:`state_dict` (checked before anything changes)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "schedulefree"}:
            raise ValueError("ScheduleFreeWrapper.load_state_dict expects {'base': ..., 'schedulefree': ...} "
                             "(a dict from ScheduleFreeWrapper.state_dict())")
        mine = state_dict["schedulefree"]
        params = self._params()
        for key in ("z", "kept_y"):
            for i, t in mine[key].items():
                if not 0 <= int(i) < len(params) or tuple(t.shape) != tuple(params[int(i)].shape):
                    raise ValueError(f"schedulefree {key}[{i}] does not match parameter {i}")
        if len(mine["groups"]) != len(self.base.param_groups):
            raise ValueError(f"schedulefree groups: {len(mine['groups'])} saved, "
                             f"{len(self.base.param_groups)} here")
        self.base.load_state_dict(state_dict["base"])
        self.momentum, self.weight_decay_at_y = float(mine["momentum"]), float(mine["weight_decay_at_y"])
        self.r, self.weight_lr_power = float(mine["r"]), float(mine["weight_lr_power"])
        self.train_mode = bool(mine["train_mode"])
        self._groups = [{"k": int(g["k"]), "lr_max": float(g["lr_max"]), "weight_sum": float(g["weight_sum"])}
                        for g in mine["groups"]]
        self._z = {params[int(i)]: t.to(params[int(i)].device, params[int(i)].dtype).clone()
                   for i, t in mine["z"].items()}
        self._kept_y = {params[int(i)]: t.to(params[int(i)].device, params[int(i)].dtype).clone()
                        for i, t in mine["kept_y"].items()}
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
