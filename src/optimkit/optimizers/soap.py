"""SOAP: Shampoo's eigenbasis, Adam inside it."""
from __future__ import annotations

from typing import Any

from ..core import validation as v
from ..core.optimizer import Optimizer
from ..transforms.soap import SOAPPreconditioner


def _shampoo_beta(name: str, value: Any) -> float:
    x = v.real(name, value)
    if (x < 0 and x != -1.0) or x >= 1.0:
        raise ValueError(f"Invalid {name}: {x} (must be in [0, 1), or -1 for betas[1])")
    return x


class SOAP(Optimizer):
    r"""SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's preconditioner.

    For a matrix ``G`` with factors ``L, R`` (EMAs of ``G G^T``, ``G^T G`` with
    ``shampoo_beta``; ``-1``: ``betas[1]``) and their eigenbases ``Q_L, Q_R``::

        G' = Q_L^T G Q_R;  m <- beta1 m + (1 - beta1) G';  v <- beta2 v + (1 - beta2) G'^2
        theta <- theta - lr sqrt(bc2) / bc1 * Q_L (m / (sqrt(v) + eps)) Q_R^T
        theta <- theta - lr wd theta

    Bases: ``eigh`` at the first step, then every ``precondition_frequency`` steps
    one power iteration and a QR decomposition (``m`` re-rotated, ``v`` only
    re-ordered), as the authors. The first step only builds the preconditioner
    (no update, no decay) and the bias corrections count from the second, as in
    the authors' code. Dims larger than ``max_precond_dim`` stay in the original
    basis (with all dims so, SOAP is Adam); vectors too unless ``precondition_1d``;
    ``merge_dims`` merges neighbouring dims up to ``max_precond_dim`` (conv
    filters); ``normalize_grads`` scales each update to unit RMS; ``data_format``
    ``"channels_last"`` treats 4-D tensors as ``(out, h, w, in)`` when merging.

    Factors and bases stay float32 (float64 for float64 parameters) whatever
    ``state_precision`` says; ``exp_avg``/``exp_avg_sq`` (in the rotated basis)
    follow it.

    Paper: Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam"
    (arXiv:2409.11321). Checked against a float64 reference step written from the
    paper, against ``pytorch_optimizer.SOAP`` (a port of the authors' code), and
    by reduction to torch.optim.Adam (tests/test_soap.py).
    """

    projection_refused = "preconditions the full tensor"
    name = "soap"
    family = "second-order"
    paper = "SOAP: Improving and Stabilizing Shampoo using Adam"
    reference = "soap.SOAP (nikhilvyas/SOAP); pytorch_optimizer.SOAP"
    state_bytes = 24  # m and v 8 + factors 8 + bases 8 for a square matrix (8 (m^2 + n^2) bytes each for m x n)
    defaults = dict(lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1.0, eps=1e-8, weight_decay=0.01,
                    precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False,
                    normalize_grads=False, data_format="channels_first", correct_bias=True)
    rules = {"betas": v.betas(2), "shampoo_beta": _shampoo_beta, "eps": v.nonneg, "weight_decay": v.nonneg,
             "precondition_frequency": v.positive_int, "max_precond_dim": v.positive_int,
             "merge_dims": v.boolean, "precondition_1d": v.boolean, "normalize_grads": v.boolean,
             "data_format": v.choice("channels_first", "channels_last"), "correct_bias": v.boolean}

    def build(self):
        return [SOAPPreconditioner()]

    def apply(self, u, ctx):
        """``theta <- theta - lr u``, then the decoupled decay of the updated weights
        (the authors' order); nothing at the first, preconditioner-only step."""
        if ctx.static["soap_init"]:
            return
        super().apply(u, ctx)
        if ctx.static["weight_decay"]:
            ctx.params.add_(ctx.params, alpha=-ctx.hp["lr"] * ctx.hp["weight_decay"])
