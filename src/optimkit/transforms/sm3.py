"""SM3's cover-based second moment ("Memory-Efficient Adaptive Optimization", SM3-II).

Each dim ``i`` of a tensor of shape ``(n_0, ..., n_{r-1})`` has an accumulator
of ``n_i`` numbers (one per slice along that dim: the covers of SM3). All of
them live in one flat state tensor ``accumulator`` of ``sum(n_i)`` numbers
(one number for a 0-d tensor), which keeps the state keys the same for every
parameter of a group whatever its rank.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.tensorlist import dense
from ..core.transform import Context, Transform


def _covers(acc: Tensor, shape: torch.Size) -> list[Tensor]:
    """Views of the flat accumulator, one per dim, shaped to broadcast against ``shape``."""
    r = len(shape)
    if r == 0:
        return [acc.view(())]
    return [a.view([1] * i + [n] + [1] * (r - 1 - i)) for i, (a, n) in enumerate(zip(acc.split(list(shape)), shape))]


class ScaleBySM3(Transform):
    r"""SM3-II: ``nu = min_i(acc_i) [* beta] + (1 - beta) g^2``; ``acc_i <- max over the other dims of nu``
    (running max with it when ``beta > 0``); update ``g / sqrt(nu + eps)``.

    With ``beta == 0`` this is the paper's SM3-II (an Adagrad-like sum); ``beta > 0``
    gives the exponential-moving-average variant of ``pytorch_optimizer.SM3``.
    State: ``accumulator`` (flat, ``sum(shape)`` numbers).
    """

    nonnegative = ("accumulator",)

    def init(self, p, group):
        return {"accumulator": p.new_zeros(max(sum(p.shape), 1) if p.dim() else 1)}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        beta = ctx.hp["beta"]
        has_beta = ctx.static["beta"]
        eps = ctx.hp["eps"]

        def one(g: Tensor, acc: Tensor) -> Tensor:
            covers = _covers(acc, g.shape)
            nu = covers[0]
            for c in covers[1:]:
                nu = torch.minimum(nu, c)
            if has_beta:
                nu = nu * beta + (g * g) * (1 - beta)
            else:
                nu = nu + g * g
            r = g.dim()
            for i, c in enumerate(covers):
                if r <= 1:
                    new = nu.view(c.shape)
                else:
                    new = nu.amax(dim=[d for d in range(r) if d != i], keepdim=True)
                if has_beta:
                    c.copy_(torch.maximum(c, new))
                else:
                    c.copy_(new)
            return (nu + eps).rsqrt_().mul_(g)

        return g.map(one, ctx.state["accumulator"])


__all__ = ["ScaleBySM3"]
