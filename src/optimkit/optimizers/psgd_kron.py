"""PSGD-Kron: a Kronecker-factored preconditioner fitted on the Lie group."""
from __future__ import annotations

from typing import Any

from ..core import validation as v
from ..core.optimizer import Optimizer
from ..transforms.psgd_kron import DTYPES, MEMORY_SAVE_MODES, PSGDKronPreconditioner
from .shampoo import _positive_eps as _positive_finite  # a positive, finite float


def _b1(name: str, value: Any) -> float:
    x = v.real(name, value)
    if not 0.0 <= x < 1.0:
        raise ValueError(f"Invalid {name}: {x} (must be in [0, 1))")
    return x


class PSGDKron(Optimizer):
    r"""PSGD with the Kronecker-factored ("Kron") preconditioner, as kron_torch.

    For a matrix ``W`` with gradient ``g``::

        m <- b1 m + (1 - b1) g;  M = m / (1 - b1^t)
        with probability p_t:  V ~ N(0, 1);  A = Q_l M Q_r^T;  B = Q_l^(-T) V Q_r^(-1)
            Q_l <- Q_l - precond_lr triu(A A^T - B B^T) Q_l / lb(A A^T + B B^T)   (Q_r likewise)
        P = Q_l^T Q_l M Q_r^T Q_r;  P <- P min(1, 1.1 / rms(P))
        W <- W - lr (P + wd W)

    Each dim of a tensor gets an upper-triangular factor ``Q_k`` (started at
    ``precond_init_scale^(1/ndim) I``), or a diagonal one for dims of size 1, dims
    above ``max_size_triangular``, tensors with fewer than ``min_ndim_triangular``
    dims (vectors by default) and the dims ``memory_save_mode`` picks (``"one_diag"``:
    the largest; ``"smart_one_diag"``: the largest if strictly the largest;
    ``"all_diag"``). Scalars have one diagonal factor. ``lb`` is a lower bound of the
    spectral norm (max-abs for diagonal factors), so the Lie-group step is
    normalized. ``preconditioner_update_probability`` ``None`` is kron_torch's
    schedule ``min(1, max(0.03, exp(-0.001 (t - 500))))`` (``t`` from 0): every step
    for the first 500, then decaying to 3%; the update is then balanced (factor
    norms equalized) with probability 1/100. The coins and ``V`` come from
    generators seeded by ``seed``, the step and the parameter (its order of first
    step), never from torch's global RNG: a resumed run equals an uninterrupted
    one bit for bit, and the coin is the same for every parameter of a group's step.

    ``momentum_into_precond_update``: fit ``Q`` to the debiased momentum (True)
    or to the raw gradient. Weight decay is decoupled and, as in kron_torch,
    applied to tensors with two or more dims only. Factors are kept in float32
    (``precond_dtype="fp64"``: float64; float64 parameters always float64) whatever
    ``state_precision`` asks for; the momentum follows it (kron_torch's
    ``mu_dtype`` is ``state_precision={"momentum_buffer": "bf16"}`` here).

    Differences from kron_torch: randomness from per-step generators (above)
    instead of a Python ``random.Random`` and torch's global RNG; a scalar
    probability (or the default schedule), not a callable, so state dicts are plain
    values; complex parameters are stepped as their real views (a trailing dim of 2).

    Paper: Xi-Lin Li, "Preconditioned Stochastic Gradient Descent" (IEEE TNNLS 2018)
    and "Black Box Lie Group Preconditioners for SGD" (2022).
    """

    projection_refused = "preconditions the full tensor"
    name = "psgd_kron"
    family = "second-order"
    paper = "Preconditioned Stochastic Gradient Descent"
    reference = "kron_torch.Kron (evanatyourservice/kron_torch); pytorch_optimizer.Kron"
    state_bytes = 12  # momentum (4) + the two d x d float32 factors of a d x d matrix (8)
    defaults = dict(lr=3e-4, b1=0.9, weight_decay=0.0, preconditioner_update_probability=None,
                    max_size_triangular=8192, min_ndim_triangular=2, memory_save_mode=None,
                    momentum_into_precond_update=True, precond_lr=0.1, precond_init_scale=1.0,
                    precond_dtype="fp32", seed=0)
    rules = {"b1": _b1, "preconditioner_update_probability": v.optional(v.closed_unit),
             "max_size_triangular": v.positive_int, "min_ndim_triangular": v.nonneg_int,
             "memory_save_mode": v.choice(*MEMORY_SAVE_MODES), "momentum_into_precond_update": v.boolean,
             "precond_lr": _positive_finite, "precond_init_scale": _positive_finite,
             "precond_dtype": v.choice(*DTYPES), "seed": v.nonneg_int}

    def build(self):
        return [PSGDKronPreconditioner()]

