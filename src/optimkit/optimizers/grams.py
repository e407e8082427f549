"""Grams: Adam's update magnitude with the current gradient's sign."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..transforms import WeightDecay
from ..transforms.grams import ScaleByGrams


class Grams(Optimizer):
    r"""Grams (Gradient Descent with Adaptive Momentum Scaling).

    Update (as the authors' ``grams.Grams``)::

        theta <- theta (1 - lr wd)
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        theta <- theta - lr s sign(g) |m| / (sqrt(v) + eps),   s = sqrt(1 - b2^t) / (1 - b1^t)
                                                              (s = 1 if not correct_bias)

    Paper: Cao et al., "Grams: Gradient Descent with Adaptive Momentum Scaling" (2024).
    Checked against ``grams.Grams`` (pip ``grams-pytorch``). eps is added to the
    uncorrected sqrt(v), as there (not to the bias-corrected one as in torch's Adam).
    The reference overwrites ``p.grad`` with the update numerator; optimkit does not.
    ``pytorch_optimizer.Grams`` is close but not identical to the authors' package.
    """

    name = "grams"
    paper = "Grams: Gradient Descent with Adaptive Momentum Scaling"
    reference = "grams.Grams (grams-pytorch)"
    state_bytes = 8
    has_momentum = True
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True)

    def build(self):
        return [WeightDecay(decoupled=True), ScaleByGrams()]
