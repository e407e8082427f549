"""Lion: evolved sign momentum."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..core.validation import betas
from ..transforms.decay import WeightDecay
from ..transforms.sign_momentum import ScaleBySignMomentum


class Lion(Optimizer):
    r"""Lion (EvoLved Sign Momentum).

    Update (as ``lion_pytorch.Lion`` and ``pytorch_optimizer.Lion``)::

        theta <- theta (1 - lr wd)                                (decoupled weight decay)
        theta <- theta - lr * sign(b1 m + (1 - b1) g)
        m <- b2 m + (1 - b2) g

    Every coordinate moves by exactly ``lr``, so Lion wants a learning rate 3-10x
    smaller and a weight decay 3-10x larger than AdamW. With decoupled decay Lion
    solves ``min f`` subject to ``||theta||_inf <= 1 / wd`` ("Lion Secretly Solves
    Constrained Optimization: As Lyapunov Predicts").

    Paper: Chen et al., "Symbolic Discovery of Optimization Algorithms" (2023).
    Checked against ``lion_pytorch.Lion`` (pip ``lion-pytorch``) and
    ``pytorch_optimizer.Lion``.

    Pitfalls: lion_pytorch's ``decoupled_weight_decay=True`` divides the decay by
    the *initial* lr (fully decoupled decay); that option is not offered here.
    ``sign(0) = 0``: a coordinate whose interpolated momentum is exactly zero does
    not move.
    """

    name = "lion"
    paper = "Symbolic Discovery of Optimization Algorithms"
    reference = "lion_pytorch.Lion"
    state_bytes = 4
    has_momentum = True
    rules = {"betas": betas(2)}
    defaults = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)

    def build(self):
        return [WeightDecay(decoupled=True), ScaleBySignMomentum()]
