"""NAdam (NAdamW with ``decoupled_weight_decay``)."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..transforms.adam_family import ScaleByNAdam
from ..transforms.decay import WeightDecay


class NAdam(Optimizer):
    r"""NAdam: Adam with Nesterov momentum and Dozat's momentum schedule.

    Update (as ``torch.optim.NAdam``)::

        g <- g + wd * theta                       (or theta <- theta (1 - lr wd) if decoupled_weight_decay)
        mu_t = b1 (1 - 0.5 * 0.96^(t * momentum_decay));   mu_product <- mu_product * mu_t
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   den = sqrt(v / (1 - b2^t)) + eps
        theta <- theta - lr (1 - mu_t) / (1 - mu_product) * g / den
                       - lr mu_{t+1} / (1 - mu_product mu_{t+1}) * m / den

    Paper: Dozat, "Incorporating Nesterov Momentum into Adam" (ICLR workshop 2016).
    Checked against ``torch.optim.NAdam``.
    """

    name = "nadam"
    paper = "Incorporating Nesterov Momentum into Adam"
    reference = "torch.optim.NAdam"
    state_bytes = 8
    has_momentum = True
    defaults = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                    decoupled_weight_decay=False)

    def build(self):
        return [WeightDecay(decoupled="decoupled_weight_decay"), ScaleByNAdam()]
