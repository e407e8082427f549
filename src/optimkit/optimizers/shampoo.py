"""Shampoo: per-dimension Kronecker-factored preconditioning with grafting."""
from __future__ import annotations

import math
import numbers
from typing import Any

from ..core import validation as v
from ..core.optimizer import Optimizer
from ..transforms.kronecker import DTYPES
from ..transforms.shampoo import GRAFTING, ShampooPreconditioner, start_step


def _betas(name: str, value: Any) -> tuple[float, float]:
    """``(beta1, beta2)``: beta1 in [0, 1), beta2 in (0, 1] (1: sums, as AdaGrad)."""
    b1, b2 = v.betas(2, v.closed_unit)(name, value)
    if b1 == 1.0:
        raise ValueError(f"Invalid {name}[0]: {b1} (must be in [0, 1))")
    if b2 == 0.0:
        raise ValueError(f"Invalid {name}[1]: {b2} (must be in (0, 1])")
    return b1, b2


def _beta3(name: str, value: Any) -> float:
    x = v.real(name, value)
    if x != -1.0 and not 0.0 <= x < 1.0:
        raise ValueError(f"Invalid {name}: {x} (must be in [0, 1), or -1 for betas[0])")
    return x


def _betas_one(name: str, value: Any) -> float:
    """A coefficient in (0, 1] (1: a sum)."""
    x = v.closed_unit(name, value)
    if x == 0.0:
        raise ValueError(f"Invalid {name}: {x} (must be in (0, 1])")
    return x


def _start(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < -1:
        raise ValueError(f"Invalid {name}: {value} (must be >= 1, or -1 for precondition_frequency)")
    return int(value)


def _exponents(name: str, value: Any) -> dict[int, float] | None:
    """``{tensor order: exponent}``: factors of blocks of that order are raised to
    ``-exponent`` (default ``1 / (2 order)``; ``{2: 0.5}`` is Shampoo^2, 0 skips
    preconditioning)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict {{order: exponent}} or None, got {type(value).__name__}")
    out = {}
    for order, e in value.items():
        if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 1:
            raise ValueError(f"Invalid {name}: key {order!r} (tensor orders are ints >= 1)")
        x = v.nonneg(f"{name}[{order}]", e)
        if not math.isfinite(x):
            raise ValueError(f"Invalid {name}[{order}]: {x} (must be finite)")
        out[int(order)] = x
    return out


def _positive_eps(name: str, value: Any) -> float:
    x = v.positive(name, value)
    if not math.isfinite(x):
        raise ValueError(f"Invalid {name}: {x} (must be finite)")
    return x


class Shampoo(Optimizer):
    r"""Shampoo with blocking and grafting, as Distributed Shampoo (Shi et al. 2023).

    For a matrix block ``G`` (``m x n``)::

        L <- L + G G^T,  R <- R + G^T G           (betas[1] = 1; else EMAs, bias-corrected)
        every precondition_frequency steps: L~ = (L + eps I)^(-1/4), R~ = (R + eps I)^(-1/4)
        G_bar = EMA of G (betas[0], bias-corrected; beta3 look-ahead)
        P = L~ G_bar R~ * ||D(G_bar)|| / ||L~ G_bar R~||          D: the grafting direction
        theta <- theta - lr * momentum(P + wd theta)

    A tensor of order ``k`` gets one factor per dim, each raised to ``-1/(2k)``
    (``inverse_exponent_override={order: exponent}`` changes it: ``{2: 0.5}`` is
    Shampoo^2 / "A New Perspective on Shampoo's Preconditioner"). Dims are merged
    (``use_merge_dims``) and dims larger than ``max_preconditioner_dim`` cut into
    blocks, each with its own factors and its own grafting norm. Before
    ``start_preconditioning_step`` (``-1``: ``precondition_frequency``) the step is
    the grafting method's. ``grafting``: ``None``, ``"sgd"``, ``"adagrad"``,
    ``"rmsprop"``, ``"adam"`` (second moment only: the grafted method uses the
    same filtered gradient), with ``grafting_beta2`` / ``grafting_epsilon``
    (``None``: 1 / 0.99 / 0.999 and 1e-10 / 1e-8 / 1e-8, Distributed Shampoo's
    config defaults). Vectors and scalars are not preconditioned: they take the
    grafting direction (``precondition_1d=True`` gives vectors a full factor, as
    Distributed Shampoo does).

    Inverse roots: eigendecomposition in ``preconditioner_dtype`` (``"fp32"`` or
    ``"fp64"``) of the factor with negative eigenvalues shifted to zero, plus
    ``epsilon``; a decomposition that fails or is not finite keeps the previous
    root. Factors and roots stay float32 (float64 for float64 parameters)
    whatever ``state_precision`` says; the filtered gradient, grafting and
    momentum states follow it.

    Differences from Distributed Shampoo: plain keyword settings instead of config
    objects (so state dicts are plain values and load with ``torch.load``'s
    defaults); vectors take the grafting rule by default; no distributed config
    (see the distributed issue).

    Paper: Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor
    Optimization" (2018); Anil et al., "Scalable Second Order Optimization for Deep
    Learning" (2020); Shi et al., "A Distributed Data-Parallel PyTorch
    Implementation of the Distributed Shampoo Optimizer" (arXiv:2309.06497).
    Checked against a reference step written from those equations, and by reduction
    to torch.optim's Adam/AdamW, Adagrad and SGD (tests/test_shampoo.py).
    """

    projection_refused = "preconditions the full tensor"
    name = "shampoo"
    family = "second-order"
    paper = "Shampoo: Preconditioned Stochastic Tensor Optimization"
    reference = "distributed_shampoo.DistributedShampoo (facebookresearch/optimizers)"
    state_bytes = 24  # filtered gradient 4 + grafting 4 + factors 8 + roots 8 (square blocks: 2 d^2 each)
    defaults = dict(lr=1e-2, betas=(0.9, 1.0), beta3=-1.0, epsilon=1e-12, momentum=0.0, dampening=0.0,
                    weight_decay=0.0, max_preconditioner_dim=1024, precondition_frequency=1,
                    start_preconditioning_step=-1, inverse_exponent_override=None, use_nesterov=False,
                    use_bias_correction=True, use_decoupled_weight_decay=True, grafting=None,
                    grafting_beta2=None, grafting_epsilon=None, use_merge_dims=True, precondition_1d=False,
                    preconditioner_dtype="fp32")
    rules = {"betas": _betas, "beta3": _beta3, "epsilon": _positive_eps, "momentum": v.unit,
             "dampening": v.unit, "max_preconditioner_dim": v.positive_int,
             "precondition_frequency": v.positive_int, "start_preconditioning_step": _start,
             "inverse_exponent_override": _exponents, "use_nesterov": v.boolean,
             "use_bias_correction": v.boolean, "use_decoupled_weight_decay": v.boolean,
             "grafting": v.choice(*GRAFTING), "grafting_beta2": v.optional(_betas_one),
             "grafting_epsilon": v.optional(v.eps_positive), "use_merge_dims": v.boolean,
             "precondition_1d": v.boolean, "preconditioner_dtype": v.choice(*DTYPES)}

    def build(self):
        return [ShampooPreconditioner()]

    def check(self, group):
        if start_step(group) < group["precondition_frequency"]:
            raise ValueError(f"Invalid start_preconditioning_step: {group['start_preconditioning_step']} "
                             f"(must be >= precondition_frequency = {group['precondition_frequency']}, "
                             "or -1)")
