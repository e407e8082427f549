"""Subspace momentum: the first moment lives in a low-rank SVD subspace of the gradient.

For a matrix gradient ``G`` (m x n) and an orthonormal basis of the top-``k``
singular vectors on its smaller side (``Q``, k x n, when m >= n; ``P``, m x k,
otherwise), the momentum is kept for the projected gradient ``R = down(G)``
only and the rest of the gradient passes through without momentum::

    M <- b1 M + (1 - b1) R                        (k x n or m x k: the state)
    numerator = up(M) + (G - up(R))                (momentum in the subspace, SGD outside)

The basis is recomputed from the current gradient (fp32 thin SVD) at step 1 and
at every multiple of ``interval``, and the momentum restarts from zero then.
Tensors that are not matrices, or whose smaller side is not above ``rank``, keep
an ordinary full-size EMA momentum (``numerator = M``).
"""
from __future__ import annotations

from torch import Tensor

from ..core.transform import Context, Transform
from ..projection.galore import project_down, project_up, side_of, svd_basis


def subspace_rank(p: Tensor, group: dict) -> int:
    """``k`` for a projected matrix, 0 for a tensor that keeps full momentum."""
    if p.dim() != 2 or min(p.shape) <= group["rank"]:
        return 0
    return group["rank"]


def _key(side: str) -> str:
    return "Q" if side == "right" else "P"


class SubspaceMomentum(Transform):
    """EMA momentum in an SVD subspace plus the orthogonal rest of the gradient.

    State: ``m_key`` (subspace shape for projected matrices, the parameter's shape
    otherwise) and ``basis_key`` (the basis; an empty tensor for tensors with full
    momentum). The basis is kept at full precision whatever ``state_precision`` says.
    """

    def __init__(self, m_key: str = "exp_avg", basis_key: str = "sm_basis"):
        self.m_key, self.basis_key = m_key, basis_key
        self.full_precision = (basis_key,)

    def init(self, p, group):
        k = subspace_rank(p, group)
        if not k:
            return {self.m_key: p.new_zeros(p.shape), self.basis_key: p.new_zeros(0)}
        m, n = p.shape
        if side_of(p.shape, "std") == "right":
            return {self.m_key: p.new_zeros(m, k), self.basis_key: p.new_zeros(k, n)}
        return {self.m_key: p.new_zeros(k, n), self.basis_key: p.new_zeros(m, k)}

    def scalars(self, group, step, sstate):
        return {"sm_refresh": step == 1 or step % group["interval"] == 0}

    def __call__(self, u, ctx: Context):
        b1 = ctx.hp["betas"][0]
        refresh = ctx.static["sm_refresh"]

        def one(g: Tensor, m: Tensor, basis: Tensor) -> Tensor:
            if basis.numel() == 0:
                return m.lerp_(g, 1 - b1)
            side = side_of(g.shape, "std")
            pstate = {_key(side): basis}
            if refresh:
                svd_basis(g, min(basis.shape), side, pstate)
                m.zero_()
            r = project_down(g, side, pstate)
            m.lerp_(r, 1 - b1)
            return project_up(m - r, side, pstate).add_(g)  # up(M) + (G - up(R)), one product

        return u.map(one, ctx.state[self.m_key], ctx.state[self.basis_key])


__all__ = ["SubspaceMomentum", "subspace_rank"]
