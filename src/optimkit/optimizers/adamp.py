"""AdamP and SGDP: momentum optimizers that project out the radial update of scale-invariant weights."""
from __future__ import annotations

from ..core import validation as v
from ..core.optimizer import Optimizer
from ..transforms import ScaleByAdam
from ..transforms.scale_invariant import AdamNesterovNumerator, FactoredDecoupledDecay, ScaleInvariantProjection
from ..transforms.zero_init_momentum import ZeroInitMomentum

_RULES = {"delta": v.nonneg, "wd_ratio": v.nonneg}


def _no_projection(name: str, group: dict) -> None:
    if group.get("projection") is not None:
        raise ValueError(f"Invalid projection: {name}'s scale-invariance test compares the gradient with "
                         "the weight elementwise and has no projected form; use projection=None")


class AdamP(Optimizer):
    r"""AdamP: Adam with projection of the update for scale-invariant weights.

    Update (as the authors' ``adamp.AdamP``)::

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        u <- (b1 m + (1 - b1) g if nesterov else m) / (sqrt(v) / sqrt(1 - b2^t) + eps)
        for tensors with ndim > 1, for view in (rows = output channels, whole tensor):
            if max |cos(g, theta)| over the view's rows < delta / sqrt(row length):
                u <- u - theta_n (theta_n . u)  (theta_n = theta / (||theta|| + eps), per row)
                f <- wd_ratio; stop                      (else f = 1)
        theta <- theta (1 - lr wd f)
        theta <- theta - lr / (1 - b1^t) * u

    Paper: Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights" (ICLR 2021). Checked against ``adamp.AdamP`` (pip ``adamp``).
    Pitfalls: ``pytorch_optimizer.AdamP`` adds eps to the uncorrected ``sqrt(v)``, and its
    ``cautious`` masks ``m`` before the projection; here ``cautious`` masks the final
    (projected) update.
    """

    name = "adamp"
    paper = "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights"
    reference = "adamp.AdamP"
    state_bytes = 8
    has_momentum = True
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1,
                    nesterov=False)
    rules = _RULES

    def check(self, group):
        _no_projection("AdamP", group)

    def build(self):
        return [ScaleByAdam(), AdamNesterovNumerator(), ScaleInvariantProjection(), FactoredDecoupledDecay()]


class SGDP(Optimizer):
    r"""SGDP: SGD with momentum and projection of the update for scale-invariant weights.

    Update (as the authors' ``adamp.SGDP``)::

        b <- mu b + (1 - dampening) g            (b starts at 0)
        u <- g + mu b (nesterov) or b
        projection of u and factor f as AdamP (on the gradient's cosine with theta);
            without nesterov, b <- u (projected)
        theta <- theta (1 - lr wd f / (1 - mu))
        theta <- theta - lr u

    Paper: Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights" (ICLR 2021). Checked against ``adamp.SGDP`` (pip ``adamp``).
    The reference has no default lr; 1e-3 here. As in the authors' code (where the update
    aliases the buffer and is projected in place), the non-Nesterov momentum buffer keeps
    the projection; the paper's algorithm and ``pytorch_optimizer.SGDP`` project a copy.
    """

    name = "sgdp"
    paper = "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights"
    reference = "adamp.SGDP"
    state_bytes = 4  # with momentum; 0 without
    has_momentum = True
    defaults = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, eps=1e-8,
                    delta=0.1, wd_ratio=0.1)
    rules = {**_RULES, "momentum": v.unit}

    def check(self, group):
        _no_projection("SGDP", group)

    def build(self):
        return [ZeroInitMomentum(buffer="momentum"), ScaleInvariantProjection(buffer="momentum"),
                FactoredDecoupledDecay(momentum_key="momentum")]
