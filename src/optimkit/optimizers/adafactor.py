"""Adafactor: factored second moment, update clipping and relative step sizes."""
from __future__ import annotations

from ..core import validation as V
from ..core.optimizer import Optimizer
from ..transforms import WeightDecay
from ..transforms.factored import EMA, ClipByRMS, RelativeStepSize, ScaleByFactoredRMS


def _eps_pair(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (eps1, eps2), got {type(value).__name__} {value!r}")
    return (V.optional(V.nonneg)(f"{name}[0]", value[0]), V.nonneg(f"{name}[1]", value[1]))


def _nonpositive(name, value):
    v = V.real(name, value)
    if v > 0:
        raise ValueError(f"Invalid {name}: {v} (must be <= 0)")
    return v


def _at_least_one(name, value):
    v = V.real(name, value)
    if not v >= 1.0:
        raise ValueError(f"Invalid {name}: {v} (must be >= 1)")
    return v


class Adafactor(Optimizer):
    r"""Adafactor (``torch.optim.Adafactor`` by default, with the paper's options as flags).

    Update, step ``t``, ``1 - beta2_t = t^beta2_decay``::

        rho_t   = min(lr, 1/sqrt(t))   (relative_step=True, default; = lr otherwise)
        alpha_t = max(eps2, RMS(theta)) * rho_t   (scale_parameter=True, default; = rho_t otherwise)
        theta  <- theta (1 - lr wd)
        matrices (last two dims): R <- lerp(R, rowmean(G^2), 1 - beta2_t), C likewise with colmean,
                                  V = R C / max(mean(R), eps1)
        vectors:                  V <- lerp(V, G^2, 1 - beta2_t)
        U = G / max(sqrt(V), eps1);   U <- U / max(1, RMS(U) / d)
        m <- beta1 m + (1 - beta1) alpha_t U;  theta <- theta - m      (beta1 given)
        theta <- theta - alpha_t U                                       (beta1 None, default)

    ``eps = (eps1, eps2)``; ``eps1=None`` means the machine epsilon of the
    parameter dtype. With the defaults this is exactly ``torch.optim.Adafactor``
    (whose ``lr`` caps the relative step: the paper's rule is ``lr=1e-2``).
    ``relative_step=False, scale_parameter=...`` and ``beta1`` follow
    ``transformers.Adafactor``; ``d`` is the paper's update clipping threshold.

    Where the references differ (optimkit follows torch in each case):

    * eps1: torch clamps ``mean(R)`` and ``sqrt(V)`` from below by eps1; the paper and
      transformers add eps1 (1e-30) to ``G^2`` before the row/column means.
    * weight decay: torch decays by ``lr * weight_decay``; transformers by
      ``alpha_t * weight_decay``.
    * with ``beta1`` the state ``exp_avg`` averages ``(alpha_t / lr) U`` and the step is
      ``lr * exp_avg``: transformers' ``m`` of ``alpha_t U`` whenever lr is constant.
    * ``relative_step`` is a cap ``min(lr, 1/sqrt(t))`` (torch) rather than the paper's
      fixed ``min(1e-2, 1/sqrt(t))``; transformers' ``warmup_init`` is not provided.

    Paper: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost" (2018). Checked against ``torch.optim.Adafactor`` (defaults) and a
    reference step written from the paper / transformers semantics (the flags).
    """

    name = "adafactor"
    family = "memory"
    paper = "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost"
    reference = "torch.optim.Adafactor"
    state_bytes = 0.0  # (m + n) / (m n) * 4 for matrices; 4 for vectors; +4 with beta1
    has_momentum = True  # with beta1
    defaults = dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
                    relative_step=True, scale_parameter=True, beta1=None)
    rules = {"eps": _eps_pair, "beta2_decay": _nonpositive, "d": _at_least_one,
             "relative_step": V.boolean, "scale_parameter": V.boolean, "beta1": V.optional(V.unit)}

    def build(self):
        # RelativeStepSize reads RMS(theta) before the decoupled weight decay shrinks it (as torch).
        return [ScaleByFactoredRMS(), ClipByRMS("d"), RelativeStepSize(), EMA("beta1", "exp_avg"),
                WeightDecay(decoupled=True)]
