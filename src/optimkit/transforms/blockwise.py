"""Adam with a second moment shared by blocks of elements (Adam-mini, subset-norm).

A parameter is viewed (flattened, row-major) as ``(num_blocks, block_size)``;
the first moment stays full, the second moment keeps one number per block:
the mean (Adam-mini) or the sum (subset-norm) of the squared gradient over
the block. The number of blocks is fixed at state creation and read back
from the state's shape, so no integer needs to be stored.
"""
from __future__ import annotations

import math
from typing import Callable

from torch import Tensor

from ..core.tensorlist import dense
from ..core.transform import Context, Transform


def blocks_per_row(p: Tensor, group: dict) -> int:
    """Adam-mini without model structure: one block per output row (first dim) of a
    tensor with two or more dims; one block for a vector or scalar."""
    return p.shape[0] if p.dim() >= 2 and p.numel() > 0 else 1


def largest_divisor_at_most(n: int, k: int) -> int:
    """The largest divisor of ``n`` that is <= ``k`` (at least 1)."""
    k = max(1, min(int(k), n))
    for i in range(k, 0, -1):
        if n % i == 0:
            return i
    return 1


def subset_blocks(p: Tensor, group: dict) -> int:
    """Subset-norm: tensors with two or more dims are cut into contiguous subsets of
    ``k`` elements, ``k`` the largest divisor of numel not above ``subset_size``
    (or above ``sqrt(numel) / |subset_size|`` when ``subset_size < 0``); vectors keep
    one second moment per element."""
    n = p.numel()
    if p.dim() < 2 or n == 0:
        return max(n, 1)
    s = group["subset_size"]
    target = s if s > 0 else int(math.sqrt(n) / abs(s))
    return n // largest_divisor_at_most(n, target)


class ScaleByBlockwiseAdam(Transform):
    r"""``m <- lerp(m, g, 1-b1)``; per block ``v <- lerp(v, reduce_block(g^2), 1-b2)``;
    update ``(m / bc1) / (sqrt(v / bc2) + eps)`` (``eps_after_correction``, Adam's
    form) or ``(m sqrt(bc2) / bc1) / (sqrt(v) + eps)`` (the original Adam/transformers form).

    Args:
        blocks: ``(param, group) -> number of blocks``.
        reduce: ``"mean"`` or ``"sum"`` of the squared gradient over a block.
        m_key, v_key: state names of the first moment (full) and the block second
            moment (shape ``[num_blocks, 1]``). ``m_key=None``: no first moment here;
            the incoming update (e.g. subspace momentum) is the numerator and the
            second moment is taken from the gradient ``ctx.grads``.
        eps_after_correction: where eps enters, see above.
    """

    def __init__(self, blocks: Callable[[Tensor, dict], int], reduce: str = "mean",
                 m_key: str = "exp_avg", v_key: str = "exp_avg_sq", eps_after_correction: bool = True):
        if reduce not in ("mean", "sum"):
            raise ValueError(f"Invalid reduce: {reduce!r} (expected 'mean' or 'sum')")
        self.blocks, self.reduce = blocks, reduce
        self.m_key, self.v_key = m_key, v_key
        self.nonnegative = (v_key,)
        self.eps_after_correction = eps_after_correction

    def init(self, p, group):
        st = {self.v_key: p.new_zeros(self.blocks(p, group), 1)}
        if self.m_key is not None:
            st[self.m_key] = p.new_zeros(p.shape)
        return st

    def scalars(self, group, step, sstate):
        b1, b2 = group["betas"][:2]
        return {"block_bc1": 1 - b1 ** step, "block_bc2_sqrt": math.sqrt(1 - b2 ** step)}

    def __call__(self, u, ctx: Context):
        hp = ctx.hp
        b1, b2 = hp["betas"][:2]
        bc1, bc2_sqrt, eps = hp["block_bc1"], hp["block_bc2_sqrt"], hp["eps"]
        if self.m_key is None:
            g, m = ctx.grads, dense(u)
        else:
            g, m = dense(u), ctx.state[self.m_key]
            m.lerp_(g, 1 - b1)
        mean = self.reduce == "mean"
        after = self.eps_after_correction

        def one(g: Tensor, m: Tensor, v: Tensor) -> Tensor:
            nb = v.shape[0]
            sq = g.reshape(nb, -1).square()
            v.lerp_(sq.mean(dim=1, keepdim=True) if mean else sq.sum(dim=1, keepdim=True), 1 - b2)
            if after:
                den = v.sqrt().div_(bc2_sqrt).add_(eps).mul_(bc1)
            else:
                den = v.sqrt().add_(eps).mul_(bc1 / bc2_sqrt)
            return (m.reshape(nb, -1) / den).view(m.shape)

        return g.map(one, m, ctx.state[self.v_key])


__all__ = ["ScaleByBlockwiseAdam", "blocks_per_row", "largest_divisor_at_most", "subset_blocks"]
