"""Curvature estimates from Hessian-vector products (Hutchinson's estimator).

For a loss ``L`` with Hessian ``H`` and a random probe ``z`` with ``E[z z^T] = I``
(Rademacher: entries +-1 with probability 1/2; Gaussian: standard normal),
``E[z * (H z)] = diag(H)``. ``H z`` is one extra backward pass through the
gradient's graph (``torch.autograd.grad(grads, params, grad_outputs=z)``), so
the gradients must be taken with ``create_graph=True``.

Used by :class:`optimkit.AdaHessian` and :class:`optimkit.SophiaH` (their
``prepare_step`` runs the products eagerly, before the possibly compiled
update kernel).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .core import layout
from .core.optimizer import Optimizer

DISTRIBUTIONS = ("rademacher", "gaussian")

GRAPH_HINT = ("call loss.backward(create_graph=True) (or torch.autograd.grad(..., create_graph=True)) "
              "so that the gradient keeps the graph that Hessian-vector products need")


def probe_like(p: Tensor, distribution: str = "rademacher", generator: torch.Generator | None = None) -> Tensor:
    """A random probe shaped like ``p`` (real dtype of ``p``): Rademacher entries in
    {-1, +1} with equal probability (``torch.randint(0, 2) * 2 - 1``, mean 0), or
    standard normal ones."""
    dtype = p.real.dtype if p.is_complex() else p.dtype
    shape = torch.view_as_real(p).shape if p.is_complex() else p.shape
    if distribution == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator, device=p.device, dtype=dtype)
        z = z.mul_(2).sub_(1)
    elif distribution == "gaussian":
        z = torch.randn(shape, generator=generator, device=p.device, dtype=dtype)
    else:
        raise ValueError(f"Invalid distribution: {distribution!r} (must be one of {DISTRIBUTIONS})")
    return torch.view_as_complex(z) if p.is_complex() else z


def has_graph(g: Tensor | None) -> bool:
    """Whether a gradient tensor carries a graph (was made with ``create_graph=True``)."""
    return g is not None and g.requires_grad


def _estimate(grads: Sequence[Tensor], params: Sequence[Tensor], n_samples: int, distribution: str,
              generator_for: Callable[[torch.device], torch.Generator | None]) -> list[Tensor]:
    """``(1/S) sum_s z_s * (H z_s)`` per parameter; gradients without a graph (constant
    in every parameter: their rows of ``H`` are zero) take part as zero rows."""
    outputs = [i for i, g in enumerate(grads) if has_graph(g)]
    inputs = [i for i, p in enumerate(params) if p.requires_grad]  # others: constants, zero rows
    out = [torch.zeros_like(torch.view_as_real(p) if p.is_complex() else p) for p in params]
    if not outputs or not inputs:
        return out
    for _ in range(n_samples):
        zs = [probe_like(p, distribution, generator_for(p.device)) for p in params]
        hzs = torch.autograd.grad([grads[i] for i in outputs], [params[i] for i in inputs],
                                  grad_outputs=[zs[i] for i in outputs], retain_graph=True, allow_unused=True)
        for i, hz in zip(inputs, hzs):
            acc, z = out[i], zs[i]
            if hz is None:
                continue
            if z.is_complex():
                z, hz = torch.view_as_real(z), torch.view_as_real(hz)
            acc.addcmul_(z, hz.detach())
    if n_samples > 1:
        for acc in out:
            acc.div_(n_samples)
    return out


def hutchinson_diagonal(loss_or_grads, params, n_samples: int = 1, *, distribution: str = "rademacher",
                        generator: torch.Generator | None = None) -> list[Tensor]:
    """Hutchinson estimate of the Hessian diagonal, one tensor per parameter.

    Args:
        loss_or_grads (Tensor | Sequence[Tensor]): a scalar loss (its gradients are taken here with
            ``create_graph=True``) or a sequence of gradients, one per parameter,
            that carry their graph (``loss.backward(create_graph=True)`` then
            ``[p.grad for p in params]``).
        params (Iterable[Tensor]): the parameters (tensors that require grad).
        n_samples: number of probes averaged.
        distribution: ``"rademacher"`` (default) or ``"gaussian"`` probes.
        generator: a ``torch.Generator`` on the parameters' device for the probes
            (default: torch's global generator).

    Returns ``[(1/S) sum_s z_s * (H z_s) for each parameter]`` (complex parameters:
    in their real view's layout, as real tensors). The estimate is unbiased; its
    variance for Rademacher probes is ``sum_{j != i} H_ij^2 / S`` per entry.
    Raises ``RuntimeError`` if no gradient carries a graph.
    """
    params = list(params)
    if not params:
        raise ValueError("Invalid params: an empty list of parameters")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params must be tensors, got {type(p).__name__} at index {i}")
        if not p.requires_grad:
            raise ValueError(f"Invalid params: parameter {i} (shape {tuple(p.shape)}) does not require grad")
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"Invalid n_samples: {n_samples!r} (must be an int >= 1)")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"Invalid distribution: {distribution!r} (must be one of {DISTRIBUTIONS})")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if isinstance(loss_or_grads, Tensor):
        if loss_or_grads.numel() != 1:
            raise ValueError("Invalid loss_or_grads: a loss must be a scalar tensor, got shape "
                             f"{tuple(loss_or_grads.shape)} (or pass a sequence of gradients)")
        if not loss_or_grads.requires_grad:
            raise RuntimeError("hutchinson_diagonal: the loss does not require grad (was it computed "
                               "under torch.no_grad()?)")
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_or_grads.reshape(()), params, create_graph=True,
                                        allow_unused=True)
    else:
        grads = list(loss_or_grads)
        if len(grads) != len(params):
            raise ValueError(f"Invalid loss_or_grads: {len(grads)} gradients for {len(params)} parameters")
        for i, (g, p) in enumerate(zip(grads, params)):
            if g is not None and (not isinstance(g, Tensor) or g.shape != p.shape):
                raise ValueError(f"Invalid loss_or_grads: gradient {i} does not match parameter {i} "
                                 f"(shape {tuple(p.shape)})")
        if not any(has_graph(g) for g in grads):
            raise RuntimeError(f"hutchinson_diagonal: none of the gradients carries a graph; {GRAPH_HINT}")
    with torch.enable_grad():
        return _estimate(grads, params, n_samples, distribution, lambda device: generator)


def spatial_average(d: Tensor) -> Tensor:
    """AdaHessian's spatial averaging: a 4-D (convolution) kernel's ``|D|`` averaged
    over its two spatial dims (broadcast back to the kernel's shape); other tensors
    ``|D|``."""
    if d.dim() == 4:
        return d.abs().mean(dim=(2, 3), keepdim=True).expand_as(d).clone()
    return d.abs()


def update_state(state: dict, key: str, fn) -> None:
    """Decode one state tensor (whatever its precision), update it in place with ``fn``,
    store it back."""
    entries, signature = layout.gather([state], [key])
    decoded = layout.decode(entries, signature)
    fn(decoded[key][0])
    layout.encode(decoded, entries, signature)


def _seed_of(seed: int, step: int) -> int:
    return (int(seed) * 0x9E3779B1 + int(step) * 0x85EBCA77) % (2 ** 63 - 1)


class HutchinsonOptimizer(Optimizer):
    """Base of optimizers that fold a Hutchinson estimate ``z * (H z)`` into their
    state in :meth:`prepare_step`. Subclasses name their hyperparameters
    (``_period_key``, ``_samples_key``) and implement :meth:`_distribution` and
    :meth:`_fold`."""

    family = "second-order"
    requires_create_graph = True
    _period_key = "update_period"
    _samples_key = "n_samples"
    projection_refused = "estimates the Hessian diagonal of the full parameter"

    def _distribution(self, group: dict) -> str:
        return "rademacher"

    def _fold(self, state: dict, estimate: torch.Tensor, p: torch.Tensor, group: dict, step: int) -> None:
        raise NotImplementedError

    def prepare_step(self) -> None:
        todo = []  # (group, param, view, step) of the parameters that refresh now
        stepped = []
        for group in self.param_groups:
            params, _ = self._collect(group)  # the usual checks (dtype, sparse) come first
            period = group[self._period_key]
            for p in params:
                state = self.state.get(p)
                step = (int(state["step"]) if state else 0) + 1
                stepped.append(p)
                if (step - 1) % period == 0:
                    todo.append((group, p, step))
        if todo:
            if not any(has_graph(p.grad) for _, p, _ in todo):
                raise RuntimeError(f"{type(self).__name__} estimates the Hessian diagonal from "
                                   "Hessian-vector products, but no gradient carries its graph: "
                                   f"{GRAPH_HINT}")
            estimates = self._estimates(todo)
            for (group, p, step), d in zip(todo, estimates):
                view = torch.view_as_real(p) if p.is_complex() else p
                state = self._state_for(p, view, group)
                self._fold(state, d, view, group, step)
        for p in stepped:  # the graph is not needed any more: free it
            if p.grad is not None and p.grad.requires_grad:
                p.grad = p.grad.detach()

    def _estimates(self, todo) -> list[torch.Tensor]:
        """Hutchinson estimates for ``todo``: one batch of Hessian-vector products per
        (samples, distribution, seed) setting, probes from a generator per device seeded
        from the seed and the step of the batch's first parameter."""
        batches: dict[tuple, list[int]] = {}
        for i, (group, p, step) in enumerate(todo):
            key = (group[self._samples_key], self._distribution(group), group["seed"])
            batches.setdefault(key, []).append(i)
        out: list[Any] = [None] * len(todo)
        with torch.enable_grad():
            for (samples, dist, seed), idx in batches.items():
                step = todo[idx[0]][2]
                gens: dict[torch.device, torch.Generator] = {}

                def generator_for(device, gens=gens, base=_seed_of(seed, step)):
                    if device not in gens:
                        gens[device] = torch.Generator(device=device).manual_seed(base)
                    return gens[device]

                params = [todo[i][1] for i in idx]
                est = _estimate([p.grad for p in params], params, samples, dist, generator_for)
                for i, d in zip(idx, est):
                    out[i] = d
        return out


__all__ = ["DISTRIBUTIONS", "HutchinsonOptimizer", "hutchinson_diagonal", "probe_like", "spatial_average"]
