"""Optimizers whose step size is estimated from sums over every tensor before any
tensor is updated (D-Adaptation, DoG, DoWG): the shared plumbing."""
from __future__ import annotations

import torch

from . import layout
from . import validation as v
from .optimizer import Optimizer, _local, _sharded_in
from .transform import Transform


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened, in float64 if it is float64, else float32 (for sums)."""
    return x.reshape(-1).to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def accumulator(p: torch.Tensor) -> torch.Tensor:
    """A zero sum buffer shaped like ``p``: fp32 for bf16/fp16 parameters (a sum of
    many small steps would stall in 8 or 11 bits), else ``p``'s dtype."""
    low = p.dtype in (torch.bfloat16, torch.float16)
    return torch.zeros_like(p, dtype=torch.float32 if low else p.dtype)


class Sums:
    """Sums of many 0-d tensors read with one device-to-host copy, instead of one
    sync per tensor (``float(t)`` in a loop): ``add(key, t, scale)``, then
    ``total()`` gives ``{key: float}`` (float64 sums)."""

    def __init__(self, *keys: str):
        self._parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}

    def add(self, key: str, value: torch.Tensor, scale: float = 1.0) -> None:
        value = value.double()
        self._parts[key].append(value * scale if scale != 1.0 else value)

    def total(self) -> dict[str, float]:
        parts = [t for ts in self._parts.values() for t in ts]
        if not parts:
            return {k: 0.0 for k in self._parts}
        device = parts[0].device
        sums = [torch.stack([t.to(device) for t in ts]).sum() if ts
                else torch.zeros((), dtype=torch.float64, device=device) for ts in self._parts.values()]
        return dict(zip(self._parts, torch.stack(sums).tolist()))


class GlobalScalarTransform(Transform):
    """A transform whose per-step scalars come from the optimizer's
    :meth:`Optimizer.prepare_step` (set in ``current`` before each group's kernel)."""

    current: dict = {}

    def scalars(self, group, step, sstate):
        return dict(self.current)


class GlobalEstimate(Optimizer):
    """Base of optimizers whose step size is estimated from sums over many tensors
    before any tensor is updated: :meth:`estimate` runs eagerly once per step (in
    ``prepare_step``), keeps its running values as floats in the param groups (the
    state dict holds them) and leaves per-group scalars for the kernels."""

    family = "parameter-free"
    projection_refused = "estimates its step size from sums over the full tensors"

    @torch.no_grad()
    def prepare_step(self) -> None:
        work = [(v.as_numbers(g), g, *self._collect(g)) for g in self.param_groups]  # validates first
        self._step_values = {}
        self.estimate([w for w in work if w[2]])

    def _tensors(self, num, group, params, grads):
        """(real view of p, gradient with maximize applied, state) of each tensor."""
        for p, g in zip(params, grads):
            view = torch.view_as_real(p) if p.is_complex() else _local(p)  # FSDP2: the local shard
            g = torch.view_as_real(g) if g.is_complex() else _local(g)
            if num["maximize"]:
                g = -g
            yield view, g, self._state_for(p, view, group)

    @staticmethod
    def _read(state: dict, key: str, device) -> torch.Tensor:
        """A state tensor as the kernel will see it (decoded if stored in low precision)."""
        entries, signature = layout.gather([state], [key])
        return layout.decode(entries, signature)[key][0].to(device)

    @staticmethod
    def _reduce(values: list[float], group: dict) -> list[float]:
        """Sum across processes when torch.distributed is running and the group holds
        FSDP2 (DTensor) parameters (each rank summed over its local shards) or sets
        ``fsdp_in_use``."""
        if _sharded_in(group["params"]):
            from ..distributed.sharded import all_reduce_sums

            return all_reduce_sums(values, group["params"])
        if not group.get("fsdp_in_use") or not torch.distributed.is_available() \
                or not torch.distributed.is_initialized():
            return values
        device = group["params"][0].device
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def estimate(self, work) -> None:
        raise NotImplementedError

    def _run_bucket(self, group, step, params, grads, states) -> None:
        self._transforms[0].current = self._step_values[id(group)]
        super()._run_bucket(group, step, params, grads, states)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "d" in group and group["d"] is None:
            group["d"] = group["d0"]
