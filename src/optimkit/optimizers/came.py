"""CAME: confidence-guided adaptive memory-efficient optimization."""
from __future__ import annotations

from ..core import validation as V
from ..core.optimizer import Optimizer
from ..transforms import WeightDecay
from ..transforms.came import CameConfidence, ScaleByFactoredSecondMoment
from ..transforms.factored import ClipByRMS


class CAME(Optimizer):
    r"""CAME: Adafactor's factored second moment plus a factored confidence (instability) estimate.

    Update (as ``came_pytorch.CAME``), ``betas = (b1, b2, b3)``, ``eps = (eps1, eps2)``::

        S = G^2 + eps1
        matrices (last two dims): R <- b2 R + (1-b2) rowmean(S), C likewise; U = G / sqrt(R C / mean(R))
        vectors:                  V <- b2 V + (1-b2) S;                      U = G / sqrt(V)
        U <- U / max(1, RMS(U) / clip_threshold)
        m <- b1 m + (1-b1) U
        matrices: D = (U - m)^2 + eps2; R' <- b3 R' + (1-b3) rowmean(D), C' likewise;
                  update = m / sqrt(R' C' / mean(R'))
        vectors:  update = m
        theta <- theta (1 - lr wd) - lr * update

    Paper: Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization"
    (ACL 2023). Checked against ``came_pytorch.CAME`` (the authors' package). The
    authors' class has no default lr; 2e-4 is the default of ``pytorch_optimizer.CAME``.
    """

    name = "came"
    family = "memory"
    paper = "CAME: Confidence-guided Adaptive Memory Efficient Optimization"
    reference = "came_pytorch.CAME"
    state_bytes = 4.0  # m; the factored statistics are (m + n) / (m n) each
    has_momentum = True
    defaults = dict(lr=2e-4, eps=(1e-30, 1e-16), clip_threshold=1.0, betas=(0.9, 0.999, 0.9999),
                    weight_decay=0.0)
    rules = {"eps": V.betas(2, check=V.eps_positive), "clip_threshold": V.positive, "betas": V.betas(3)}

    def build(self):
        return [WeightDecay(decoupled=True), ScaleByFactoredSecondMoment(), ClipByRMS("clip_threshold"),
                CameConfidence()]
