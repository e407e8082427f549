"""Adagrad."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..transforms.accumulators import ScaleByAdagrad
from ..transforms.decay import WeightDecay


class Adagrad(Optimizer):
    r"""Adagrad: per-coordinate step sizes from the sum of squared gradients.

    Update (as ``torch.optim.Adagrad``)::

        g <- g + wd * theta
        s <- s + g^2                               (s starts at initial_accumulator_value)
        theta <- theta - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)

    Sparse gradients are accepted (densified: rows without gradient are left
    unchanged, as in torch's sparse path); like torch, ``weight_decay`` is
    rejected with sparse gradients.

    Paper: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization" (JMLR 2011). Checked against ``torch.optim.Adagrad``.
    """

    name = "adagrad"
    paper = "Adaptive Subgradient Methods for Online Learning and Stochastic Optimization"
    reference = "torch.optim.Adagrad"
    state_bytes = 4
    supports_sparse = True
    defaults = dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10)

    def _collect(self, group):
        if group["weight_decay"] != 0 and any(p.grad is not None and p.grad.is_sparse
                                              for p in group["params"]):
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")
        return super()._collect(group)

    def build(self):
        return [WeightDecay(), ScaleByAdagrad()]
