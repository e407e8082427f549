"""Adamax: Adam with the infinity norm."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..transforms.adam_family import ScaleByAdamax
from ..transforms.decay import WeightDecay


class Adamax(Optimizer):
    r"""Adamax: Adam's second moment replaced by an exponentially weighted infinity norm.

    Update (as ``torch.optim.Adamax``)::

        g <- g + wd * theta
        m <- b1 m + (1 - b1) g;   u <- max(b2 u, |g| + eps)
        theta <- theta - (lr / (1 - b1^t)) * m / u

    Paper: Kingma & Ba, "Adam: A Method for Stochastic Optimization" (2015), section 7.
    Checked against ``torch.optim.Adamax``.
    """

    name = "adamax"
    paper = "Adam: A Method for Stochastic Optimization"
    reference = "torch.optim.Adamax"
    state_bytes = 8
    has_momentum = True
    defaults = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def build(self):
        return [WeightDecay(), ScaleByAdamax()]
