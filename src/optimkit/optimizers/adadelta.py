"""Adadelta."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..transforms.accumulators import ScaleByAdadelta
from ..transforms.decay import WeightDecay


class Adadelta(Optimizer):
    r"""Adadelta: step sizes from running averages of squared gradients and squared updates.

    Update (as ``torch.optim.Adadelta``)::

        g <- g + wd * theta
        v <- rho v + (1 - rho) g^2
        d = sqrt(u + eps) / sqrt(v + eps) * g
        u <- rho u + (1 - rho) d^2
        theta <- theta - lr d

    Paper: Zeiler, "ADADELTA: An Adaptive Learning Rate Method" (2012); the paper has no
    learning rate (lr=1.0 here, as in torch). Checked against ``torch.optim.Adadelta``.
    """

    name = "adadelta"
    paper = "ADADELTA: An Adaptive Learning Rate Method"
    reference = "torch.optim.Adadelta"
    state_bytes = 8
    defaults = dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0)

    def build(self):
        return [WeightDecay(), ScaleByAdadelta()]
