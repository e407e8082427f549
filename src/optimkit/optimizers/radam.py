"""RAdam (RAdamW with ``decoupled_weight_decay``)."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..transforms.adam_family import ScaleByRAdam
from ..transforms.decay import WeightDecay


class RAdam(Optimizer):
    r"""RAdam: Adam with a rectified adaptive learning rate.

    Update (as ``torch.optim.RAdam``)::

        g <- g + wd * theta                       (or theta <- theta (1 - lr wd) if decoupled_weight_decay)
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        rho_inf = 2 / (1 - b2) - 1;   rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
        if rho_t > 5:
            r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
            theta <- theta - lr r_t (m / (1 - b1^t)) sqrt(1 - b2^t) / (sqrt(v) + eps)
        else:
            theta <- theta - lr m / (1 - b1^t)

    Paper: Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond" (ICLR 2020).
    Checked against ``torch.optim.RAdam``.
    """

    name = "radam"
    paper = "On the Variance of the Adaptive Learning Rate and Beyond"
    reference = "torch.optim.RAdam"
    state_bytes = 8
    has_momentum = True
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False)

    def build(self):
        return [WeightDecay(decoupled="decoupled_weight_decay"), ScaleByRAdam()]
