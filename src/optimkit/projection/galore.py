"""GaLore: the rule runs on the gradient projected on its top singular vectors."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core import validation
from ..core.validation import nonneg, positive_int  # noqa: F401  (positive_int: used by apollo/frugal)
from .base import Projection

#: ``proj_type`` values: which side of ``G`` (m x n) is projected.
SIDES = ("std", "reverse_std", "left", "right", "full")


# ---------------------------------------------------------------- shared helpers
def choice(name: str, value: Any, options: tuple) -> Any:
    return validation.choice(*options)(name, value)


def side_of(shape, proj_type: str) -> str:
    """``"left"`` (R = P^T G), ``"right"`` (R = G Q^T) or ``"full"`` (R = P^T G Q^T).

    ``"std"`` projects the larger dimension away: right when m >= n, else left,
    so the subspace keeps the smaller of the two."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def basis_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype projector bases are kept and applied in: float32, or the parameter's
    dtype when that is wider (float64). bf16/fp16 parameters get fp32 bases, so the
    products with the basis are computed in fp32 and rounded once."""
    return torch.promote_types(dtype, torch.float32)


def project_down(g: Tensor, side: str, pstate: dict[str, Tensor]) -> Tensor:
    """``R = down(G)``, computed (and returned) in the basis dtype."""
    b = pstate["Q"] if side == "right" else pstate["P"]
    g = g.to(b.dtype)
    if side == "right":
        return g @ pstate["Q"].T
    if side == "left":
        return pstate["P"].T @ g
    return pstate["P"].T @ g @ pstate["Q"].T


def project_up(u: Tensor, side: str, pstate: dict[str, Tensor]) -> Tensor:
    """``up(U)``, computed (and returned) in the basis dtype."""
    b = pstate["Q"] if side == "right" else pstate["P"]
    u = u.to(b.dtype)
    if side == "right":
        return u @ pstate["Q"]
    if side == "left":
        return pstate["P"] @ u
    return pstate["P"] @ u @ pstate["Q"]


def svd_basis(g: Tensor, k: int, side: str, pstate: dict[str, Tensor]) -> None:
    """Top-``k`` singular vectors of ``g`` (fp32 thin SVD) into ``pstate`` in place:
    ``P`` (m x k) left vectors, ``Q`` (k x n) right vectors (rows of V^T)."""
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    if side in ("left", "full"):
        pstate["P"].copy_(u[:, :k])
    if side in ("right", "full"):
        pstate["Q"].copy_(vh[:k])


def basis_state(p: Tensor, k: int, side: str) -> dict[str, Tensor]:
    m, n = p.shape
    dtype = basis_dtype(p.dtype)
    st = {}
    if side in ("left", "full"):
        st["P"] = torch.zeros((m, k), dtype=dtype, device=p.device)
    if side in ("right", "full"):
        st["Q"] = torch.zeros((k, n), dtype=dtype, device=p.device)
    return st


def subspace_of(shape, k: int, side: str) -> tuple[int, int]:
    m, n = shape
    if side == "right":
        return (m, k)
    if side == "left":
        return (k, n)
    return (k, k)


def refresh_due(step: int, interval: int) -> bool:
    """Steps are counted from 1: the projector is (re)computed at steps 1, 1 + interval, ..."""
    return (step - 1) % interval == 0


class ProjectionConfig(Projection):
    """A projection whose public attributes are its configuration (private ones,
    starting with ``_``, are bookkeeping and not shown)."""

    def refreshes(self, step: int) -> bool:
        return refresh_due(step, self.interval)

    def state_dict_safe(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.state_dict_safe().items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------- GaLore
class GaLore(ProjectionConfig):
    r"""GaLore: gradient low-rank projection on the top singular vectors.

    For a matrix parameter with gradient ``G`` (m x n), every ``interval`` steps
    (steps 1, 1 + interval, ...) the projector is recomputed from an fp32 thin
    SVD ``G = U S V^T`` of the current gradient, keeping ``k = min(rank, m, n)``
    vectors::

        m >= n ("std"):  Q = V[:, :k]^T (k x n)   R = G Q^T  (m x k)   back: U_full = scale * U Q
        m <  n ("std"):  P = U[:, :k]   (m x k)   R = P^T G  (k x n)   back: U_full = scale * P U

    The optimizer's rule runs on ``R`` with state of R's shape and its update
    ``U`` is mapped back; the facade applies ``theta <- theta - lr * U_full``
    (decoupled weight decay, if any, on the full parameter). Other parameters
    (1-D biases, norms) run in full space.

    ``proj_type``: ``"std"`` (above), ``"reverse_std"`` (the other side),
    ``"left"``, ``"right"``, or ``"full"`` (both sides: ``R = P^T G Q^T``, k x k).

    State per projected m x n matrix (m >= n): the rule's state of shape m x k
    plus ``proj:Q`` (k x n). The basis is kept in fp32 (fp64 for fp64
    parameters), whatever the parameter dtype: for bf16/fp16 parameters the
    SVD, the projection ``G Q^T`` and the map back ``U Q`` run in fp32; the
    projected gradient is handed to the rule in the parameter dtype (as a
    full-space gradient would be) and the full-space update is applied in fp32
    and rounded once into the parameter. For fp32 AdamW: ``4 (2 m k + k n)``
    bytes instead of ``8 m n``.

    Pitfalls (as the reference): the rule's state (e.g. Adam's moments) is
    *not* re-projected when the subspace changes; the scale defaults to 0.25
    (the GaLore README's setting; the reference class defaults to 1.0).

    Paper: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient
    Low-Rank Projection" (2024). Checked against ``galore_torch.GaLoreAdamW``
    (pip ``galore-torch``), whose Adam puts ``eps`` outside the bias correction
    (``m / (sqrt(v) + eps) * sqrt(bc2) / bc1``) and applies weight decay after
    the update; optimkit's rules keep their own form (torch's for AdamW).
    """

    def __init__(self, rank: int = 128, interval: int = 200, scale: float = 0.25, proj_type: str = "std"):
        self.rank = positive_int("rank", rank)
        self.interval = positive_int("interval", interval)
        self.scale = nonneg("scale", scale)
        self.proj_type = choice("proj_type", proj_type, SIDES)

    def _k(self, shape) -> int:
        return min(self.rank, *shape)

    def init(self, p: Tensor) -> dict[str, Tensor]:
        return basis_state(p, self._k(p.shape), side_of(p.shape, self.proj_type))

    def subspace_shape(self, p: Tensor) -> tuple[int, ...]:
        return subspace_of(p.shape, self._k(p.shape), side_of(p.shape, self.proj_type))

    def project(self, g: Tensor, pstate: dict[str, Tensor], step: int) -> Tensor:
        side = side_of(g.shape, self.proj_type)
        if refresh_due(step, self.interval):
            svd_basis(g, self._k(g.shape), side, pstate)
        return project_down(g, side, pstate).to(g.dtype)

    def back(self, u: Tensor, r: Tensor, g: Tensor, pstate: dict[str, Tensor], step: int) -> Tensor:
        out = project_up(u, side_of(g.shape, self.proj_type), pstate)
        return out.mul_(self.scale) if self.scale != 1.0 else out
