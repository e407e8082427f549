"""AdEMAMix: a mixture of a fast and a slow gradient EMA in Adam's numerator."""
from __future__ import annotations

from ..core import validation as v
from ..core.optimizer import Optimizer
from ..transforms import WeightDecay
from ..transforms.ademamix import ScaleByAdEMAMix


class AdEMAMix(Optimizer):
    r"""AdEMAMix.

    Update (as apple/ml-ademamix ``AdEMAMix``)::

        theta <- theta (1 - lr wd)
        m1 <- b1 m1 + (1 - b1) g;   m2 <- b3 m2 + (1 - b3) g;   v <- b2 v + (1 - b2) g^2
        theta <- theta - lr (m1 / (1 - b1^t) + alpha m2) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Optional warmups: ``alpha_t = alpha t / alpha_warmup`` and ``b3_t`` from ``b1`` to
    ``b3`` linearly in half-life ``ln(0.5)/ln(b) - 1``, for ``t < warmup``.

    Paper: Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older"
    (2024). Checked against the equations of apple/ml-ademamix (not on PyPI) and
    ``pytorch_optimizer.AdEMAMix`` with ``alpha=2, weight_decouple=True``. Pitfalls: that
    package defaults to alpha=5 and L2 (coupled) decay, has one warmup length for both
    schedules, and its ``cautious`` masks only the fast EMA; here ``cautious`` masks the
    final update.
    """

    name = "ademamix"
    paper = "The AdEMAMix Optimizer: Better, Faster, Older"
    reference = "apple/ml-ademamix AdEMAMix"
    state_bytes = 12
    has_momentum = True
    defaults = dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None, alpha_warmup=None,
                    eps=1e-8, weight_decay=0.0)
    rules = {"beta3_warmup": v.optional(v.nonneg_int), "alpha_warmup": v.optional(v.nonneg_int)}

    def check(self, group):
        if len(group["betas"]) != 3:
            raise ValueError(f"Invalid betas: {group['betas']!r} (expected 3 values: beta1, beta2, beta3)")

    def build(self):
        return [WeightDecay(decoupled=True), ScaleByAdEMAMix()]
