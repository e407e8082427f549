"""Stochastic gradient descent with heavy-ball / Nesterov momentum."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..transforms import HeavyBall, WeightDecay


class SGD(Optimizer):
    r"""SGD with optional momentum, dampening, Nesterov momentum and L2 weight decay.

    Update (as ``torch.optim.SGD``)::

        g <- g + wd * theta
        b <- g (first step), else b <- mu * b + (1 - dampening) * g      (if mu > 0)
        d <- g + mu * b (nesterov) or b (momentum) or g
        theta <- theta - lr * d

    Sparse gradients are accepted as in ``torch.optim.SGD`` (densified: rows
    without gradient move only by their momentum, exactly as torch's sparse
    momentum buffer moves them; the buffer itself is stored dense); like torch,
    ``weight_decay`` is refused with sparse gradients.

    Paper: Sutskever et al., "On the importance of initialization and momentum in
    deep learning" (2013); Polyak (1964). Checked against ``torch.optim.SGD``.
    """

    name = "sgd"
    paper = "On the importance of initialization and momentum in deep learning"
    reference = "torch.optim.SGD"
    state_bytes = 4  # with momentum; 0 without
    has_momentum = True
    supports_sparse = True
    torch_state_has_step = False
    defaults = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)

    def check(self, group):
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum and zero dampening")

    def build(self):
        return [WeightDecay(), HeavyBall()]
