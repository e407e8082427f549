"""FRUGAL: a state-full rule in a subspace, a state-free rule on the rest."""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.validation import boolean, closed_unit, nonneg
from .apollo import next_seed
from .galore import (ProjectionConfig, basis_state, choice, positive_int, project_down, project_up,
                     refresh_due, side_of, subspace_of, svd_basis)

_RESIDUALS = ("signsgd", "sgd", None)


class FRUGAL(ProjectionConfig):
    r"""FRUGAL: gradient splitting into a projected part, updated by the
    optimizer's (state-full) rule, and the residual, updated state-free.

    For a matrix parameter with gradient ``G`` (m x n), every ``interval`` steps
    the projector is re-chosen: top singular vectors of ``G`` (``proj_type="svd"``,
    fp32 thin SVD) or a random orthonormal basis (``"random"``, drawn from a
    seeded generator). With ``"std"`` orientation (as GaLore, projecting the
    larger side away), ``k = rank`` or ``round(density * d)`` where ``d`` is the
    projected dimension::

        R = down(G)                       (m >= n: G Q^T; else P^T G)
        U = up(rule(R)) + residual_lr_scale * h(G - up(R))
        h = sign ("signsgd"), identity ("sgd"), or the residual is dropped (None)

    and the facade applies ``theta <- theta - lr * U`` (decoupled weight decay,
    if any, on the full parameter). Other parameters run the rule in full space.

    Args:
        rank: subspace dimension; ``None`` uses ``density``.
        density: fraction of the projected dimension kept when ``rank`` is None.
        interval: steps between projector refreshes (the reference's ``update_gap``).
        residual: state-free rule on the residual: ``"signsgd"`` (default),
            ``"sgd"`` or ``None``.
        residual_lr_scale: learning-rate multiplier of the residual update (the
            reference's ``inactive_lr_scale``; 0.1 is its fine-tuning setting).
        proj_type: ``"svd"`` or ``"random"``.
        side: which side is projected, as GaLore's ``proj_type``:
            ``"std"``, ``"reverse_std"``, ``"left"``, ``"right"``.
        seed: ``"random"`` bases of parameter ``i`` (counted from 1 in the
            order their state is created) start from seed ``seed + i``.
        reset_state: restart the rule (moments and step count, as first
            created) whenever the subspace changes, as the reference's
            ``reset_statistics=True`` (its default); ``False`` keeps the rule's
            state across refreshes (as GaLore).

    State per projected m x n matrix (m >= n): the rule's state of shape m x k,
    plus the basis ``proj:Q`` (k x n) (and ``proj:seed`` for ``"random"``).
    As for :class:`GaLore`, the basis is kept in fp32 (fp64 for fp64
    parameters): with bf16/fp16 parameters the projections, the residual and
    the full-space update are computed in fp32; the rule sees the projected
    gradient in the parameter dtype.

    Paper: Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing
    State Overhead for Scalable Training" (2024). Checked against a step written
    from the authors' code (``GaloreOptimizer``), which is not on PyPI. The
    reference's ``proj_params_lr_scale`` is a per-group learning rate here.
    """

    def __init__(self, rank: int | None = None, density: float = 0.25, interval: int = 200,
                 residual: str | None = "signsgd", residual_lr_scale: float = 1.0, proj_type: str = "svd",
                 side: str = "std", seed: int = 0, reset_state: bool = True):
        self.rank = None if rank is None else positive_int("rank", rank)
        self.density = closed_unit("density", density)
        self.interval = positive_int("interval", interval)
        self.residual = choice("residual", residual, _RESIDUALS)
        self.residual_lr_scale = nonneg("residual_lr_scale", residual_lr_scale)
        self.proj_type = choice("proj_type", proj_type, ("svd", "random"))
        self.side = choice("side", side, ("std", "reverse_std", "left", "right"))
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Invalid seed: {seed!r} (must be an int >= 0)")
        self.seed = seed
        self.reset_state = boolean("reset_state", reset_state)
        self._count = 0

    @property
    def resets_state(self) -> bool:
        return self.reset_state

    def _k(self, shape) -> int:
        m, n = shape
        d = n if side_of(shape, self.side) == "right" else m
        k = self.rank if self.rank is not None else round(d * self.density)
        limit = min(m, n) if self.proj_type == "svd" else d
        return max(1, min(k, limit))

    def init(self, p: Tensor) -> dict[str, Tensor]:
        st = basis_state(p, self._k(p.shape), side_of(p.shape, self.side))
        if self.proj_type == "random":
            self._count += 1
            st["seed"] = torch.tensor(self.seed + self._count, dtype=torch.int64)
        return st

    def subspace_shape(self, p: Tensor) -> tuple[int, ...]:
        return subspace_of(p.shape, self._k(p.shape), side_of(p.shape, self.side))

    def _random_basis(self, g: Tensor, side: str, pstate: dict[str, Tensor]) -> None:
        seed = int(pstate["seed"])
        gen = torch.Generator(device=g.device).manual_seed(seed)
        key = "Q" if side == "right" else "P"
        basis = torch.empty(pstate[key].shape, device=g.device, dtype=torch.float32)
        torch.nn.init.orthogonal_(basis, generator=gen)
        pstate[key].copy_(basis)
        pstate["seed"] = torch.tensor(next_seed(seed), dtype=torch.int64)  # kept on the CPU

    def project(self, g: Tensor, pstate: dict[str, Tensor], step: int) -> Tensor:
        side = side_of(g.shape, self.side)
        if refresh_due(step, self.interval):
            if self.proj_type == "svd":
                svd_basis(g, self._k(g.shape), side, pstate)
            else:
                self._random_basis(g, side, pstate)
        return project_down(g, side, pstate).to(g.dtype)

    def back(self, u: Tensor, r: Tensor, g: Tensor, pstate: dict[str, Tensor], step: int) -> Tensor:
        side = side_of(g.shape, self.side)
        out = project_up(u, side, pstate)
        if self.residual is None:
            return out
        rest = g.to(out.dtype) - project_up(r, side, pstate)
        if self.residual == "signsgd":
            rest = rest.sign()
        return out.add_(rest, alpha=self.residual_lr_scale)
