"""Adam-mini: Adam with one second-moment scalar per block of parameters."""
from __future__ import annotations

from ..core.optimizer import Optimizer
from ..transforms import WeightDecay
from ..transforms.blockwise import ScaleByBlockwiseAdam, blocks_per_row


class AdamMini(Optimizer):
    r"""Adam-mini, with the blocking that needs no model structure.

    Update (as ``adam_mini.Adam_mini`` for its neuron-wise blocks)::

        theta <- theta (1 - lr wd)
        m <- b1 m + (1 - b1) g                              (full)
        v_B <- b2 v_B + (1 - b2) mean_{i in B} g_i^2        (one number per block B)
        theta <- theta - (lr / bc1) m / (sqrt(v_B / bc2) + eps)

    Blocks: one per output row (first dim) of a tensor with two or more dims,
    all trailing dims flattened (the authors' rule for MLP, value, output
    projection, embedding and output layers: one learning rate per neuron or
    token); one block for a whole vector or scalar (the authors' rule for
    LayerNorm-like "other" blocks). Not reproduced, because they need names and
    head counts: per-head blocks for query/key weights, plain Adam for biases,
    and the automatic weight_decay=0 for norms and biases (use param groups).
    State: ``m`` (full) and ``vmean`` (``[rows, 1]``), named as in the authors' code.

    Paper: Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More" (ICLR 2025).
    Checked against ``adam_mini.Adam_mini`` (the authors' package, version 1.1.1).
    """

    name = "adam_mini"
    family = "memory"
    paper = "Adam-mini: Use Fewer Learning Rates To Gain More"
    reference = "adam_mini.Adam_mini"
    state_bytes = 4.0
    has_momentum = True
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def build(self):
        return [WeightDecay(decoupled=True),
                ScaleByBlockwiseAdam(blocks_per_row, reduce="mean", m_key="m", v_key="vmean")]
