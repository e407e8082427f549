"""AdamWSN: AdamW with a subset-norm (blockwise) second moment; SN + subspace momentum."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..core.validation import positive_int
from ..transforms.blockwise import ScaleByBlockwiseAdam, subset_blocks
from ..transforms.subspace_momentum import SubspaceMomentum


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


class AdamWSNSM(AdamWSN):
    r"""AdamW with a subset-norm second moment and subspace momentum (SN + SM).

    Update (the authors' ``GenericOptim`` with ``momentum_type="sm"``,
    ``second_moment_type="sn"``, ``proj_type="svd"``)::

        matrices with min(m, n) > rank (k = rank; R = G Q^T when m >= n, else P^T G):
            every `interval` steps (and at step 1): Q (or P) <- top-k singular vectors of G; M <- 0
            M <- b1 M + (1 - b1) R                         (the only full-rank-free state: m x k)
            N <- up(M) + (G - up(R))                        (momentum in the subspace, SGD on the rest)
        other tensors:  N <- M <- b1 M + (1 - b1) G
        v_S <- b2 v_S + (1 - b2) sum_{i in S} g_i^2         (subset-norm, as AdamWSN)
        theta <- theta - lr (sqrt(bc2) / bc1) N / (sqrt(v_S) + eps)
        theta <- theta (1 - lr wd)

    State per projected m x n matrix (m >= n): the momentum ``exp_avg`` (m x k),
    the basis ``sm_basis`` (k x n, always full precision) and ``exp_avg_sq``
    (one number per subset, about sqrt(m n)); that is ``4 k (m + n) / (m n)``
    bytes per parameter plus the subset norm.

    Paper: Nguyen et al., "Efficient Adaptive Optimization via Subset-Norm and
    Subspace-Momentum" (2024); defaults from the authors' examples (rank 128,
    eps 1e-6 as their ``GenericOptim``). Checked against a reference step written
    from the equations. Deviation: at a refresh the authors' code zeroes the
    stored momentum only after using the old one for that step (it rebinds the
    state entry while updating the previous tensor); here the momentum restarts
    at the refresh step itself, in the new basis.
    """

    name = "sn_sm"
    paper = "Efficient Adaptive Optimization via Subset-Norm and Subspace-Momentum"
    reference = "reference step from the equations (authors' GenericOptim, sn + sm)"
    state_bytes = 0.0  # 4 k (m + n) / (m n) on projected matrices + the subset norm; 4 elsewhere
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, subset_size=-1, eps=1e-6,
                    rank=128, interval=200)
    rules = {"subset_size": _subset_size, "rank": positive_int, "interval": positive_int}

    def build(self):
        return [SubspaceMomentum(),
                ScaleByBlockwiseAdam(subset_blocks, reduce="sum", m_key=None, eps_after_correction=False)]
