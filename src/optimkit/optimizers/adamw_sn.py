"""AdamWSN: AdamW with a subset-norm (blockwise) second moment."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..transforms.blockwise import ScaleByBlockwiseAdam, subset_blocks


def _subset_size(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value == 0:
        raise ValueError(f"Invalid {name}: {value} (must be a positive subset size, or negative -k "
                         "for sqrt(numel)/k)")
    return value


class AdamWSN(Optimizer):
    r"""AdamW whose second moment is shared by subsets of each matrix (subset-norm).

    Update (as ``pytorch_optimizer.AdamWSN`` with ``sn=True`` on tensors of two or
    more dims, and as its per-element form on vectors)::

        m <- b1 m + (1 - b1) g
        v_S <- b2 v_S + (1 - b2) sum_{i in S} g_i^2      (one number per subset S)
        theta <- theta - lr (sqrt(bc2) / bc1) m / (sqrt(v_S) + eps)
        theta <- theta (1 - lr wd)                       (after the update, as the reference)

    A tensor of numel ``d`` is flattened and cut into contiguous subsets of
    ``k`` elements, ``k`` the largest divisor of ``d`` not above ``subset_size``
    (``subset_size < 0``: not above ``sqrt(d) / |subset_size|``; the default -1
    gives ``k ~ sqrt(d)``, so ``sqrt(d)`` numbers of state). Vectors and scalars keep
    a per-element second moment. State: ``exp_avg``, ``exp_avg_sq`` (``[d / k, 1]``).

    Paper: Nguyen et al., "Efficient Adaptive Optimization via Subset-Norm and
    Subspace-Momentum: Fast, Memory-Reduced Training with Convergence Guarantees" (2024).
    Checked against ``pytorch_optimizer.AdamWSN``.
    """

    name = "adamw_sn"
    family = "memory"
    paper = "Efficient Adaptive Optimization via Subset-Norm and Subspace-Momentum"
    reference = "pytorch_optimizer.AdamWSN"
    state_bytes = 4.0  # + 4 / k for the subset second moment
    has_momentum = True
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, subset_size=-1, eps=1e-8)
    rules = {"subset_size": _subset_size}

    def build(self):
        return [ScaleByBlockwiseAdam(subset_blocks, reduce="sum", eps_after_correction=False)]

    def apply(self, u, ctx):
        super().apply(u, ctx)
        if ctx.static["weight_decay"]:  # decoupled decay after the update, as the reference
            ctx.params.mul_(1 - ctx.hp["lr"] * ctx.hp["weight_decay"])
