"""RMSprop (centered, with momentum)."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..transforms.accumulators import ScaleByRMSprop
from ..transforms.decay import WeightDecay


class RMSprop(Optimizer):
    r"""RMSprop with optional centering and momentum.

    Update (as ``torch.optim.RMSprop``)::

        g <- g + wd * theta
        v <- alpha v + (1 - alpha) g^2
        den = sqrt(v - gbar^2) + eps  with gbar <- alpha gbar + (1 - alpha) g   (centered)
              sqrt(v) + eps                                                     (otherwise)
        b <- momentum b + g / den;  theta <- theta - lr b                       (momentum > 0)
        theta <- theta - lr g / den                                             (otherwise)

    Paper: Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning", lecture 6e
    (2012); centered form: Graves, "Generating Sequences With Recurrent Neural Networks" (2013).
    Checked against ``torch.optim.RMSprop``.
    """

    name = "rmsprop"
    paper = "Neural Networks for Machine Learning, Lecture 6e: rmsprop"
    reference = "torch.optim.RMSprop"
    state_bytes = 4  # + 4 with momentum, + 4 centered
    has_momentum = True
    defaults = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False)

    def check(self, group):
        if not group["centered"]:
            return
        if group["alpha"] == 0:
            raise ValueError("Invalid alpha: 0.0 with centered=True: the variance estimate "
                             "square_avg - grad_avg^2 is then always 0 and every step is g / eps; "
                             "use alpha > 0 (e.g. 0.99) or centered=False")
        spec = group["state_precision"]
        for key in ("square_avg", "grad_avg"):
            prec = spec.get(key, spec.get("default", "fp32")) if isinstance(spec, dict) else spec
            if prec in ("q8", "q4", "fp8"):
                raise ValueError(
                    f"Invalid state_precision: centered RMSprop takes sqrt(square_avg - grad_avg^2), a small "
                    f"difference of two states that {prec} rounding makes negative (NaN steps); keep "
                    f"{key} in 'fp32' or 'bf16', e.g. state_precision={{'square_avg': 'bf16', "
                    f"'grad_avg': 'bf16', 'default': '{prec}'}}")

    def build(self):
        return [WeightDecay(), ScaleByRMSprop()]
