"""Adam-mini: Adam with one second-moment scalar per block of parameters."""
from __future__ import annotations

from torch import Tensor

from ..core.optimizer import Optimizer
from ..transforms import WeightDecay
from ..transforms.blockwise import ScaleByBlockwiseAdam, blocks_per_row


def _blocks_rule(name, value):
    if isinstance(value, str):
        if value not in ("rows", "elements"):
            raise ValueError(f"Invalid {name}: {value!r} (expected 'rows', 'elements' or a number of heads)")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be 'rows', 'elements' or an int (heads), got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"Invalid {name}: {value} (a number of heads must be >= 1)")
    return value


def mini_blocks(p, group) -> int:
    """Blocks of a tensor by the group's ``blocks`` setting: ``"rows"`` (one per
    output row of a matrix, one per vector), ``"elements"`` (plain Adam) or an int
    ``h`` (h equal contiguous blocks: attention heads)."""
    how = group["blocks"]
    if how == "rows":
        return blocks_per_row(p, group)
    if how == "elements":
        return max(p.numel(), 1)
    if p.numel() % how:
        raise ValueError(f"Invalid blocks: a tensor of shape {tuple(p.shape)} does not split into {how} heads")
    return how


class AdamMini(Optimizer):
    r"""Adam-mini, with the blocking that needs no model structure.

    Update (as ``adam_mini.Adam_mini`` for its neuron-wise blocks)::

        theta <- theta (1 - lr wd)
        m <- b1 m + (1 - b1) g                              (full)
        v_B <- b2 v_B + (1 - b2) mean_{i in B} g_i^2        (one number per block B)
        theta <- theta - (lr / bc1) m / (sqrt(v_B / bc2) + eps)

    Blocks, per param group (``blocks``):

    * ``"rows"`` (default): one per output row (first dim) of a tensor with two
      or more dims, trailing dims flattened (the authors' rule for MLP, value,
      output projection, embedding and output layers: one learning rate per
      neuron or token); one block for a whole vector or scalar (their rule for
      LayerNorm-like "other" blocks);
    * an int ``h``: ``h`` equal contiguous blocks per tensor, the authors' rule
      for query and key weights with ``h`` heads (for grouped-query keys, the
      number of key/value heads);
    * ``"elements"``: one per element, i.e. Adam (their rule for biases).

    The authors find these roles from parameter names; here they are param
    groups, e.g. ``[{"params": qk, "blocks": n_heads}, {"params": biases,
    "blocks": "elements", "weight_decay": 0.0}, {"params": rest}]`` (their
    automatic weight_decay=0 for norms and biases is also a group setting).
    State: ``m`` (full) and ``vmean`` (``[blocks, 1]``), named as in the authors' code.

    Paper: Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More" (ICLR 2025).
    Checked against ``adam_mini.Adam_mini`` (the authors' package, version 1.1.1).
    """

    name = "adam_mini"
    family = "memory"
    paper = "Adam-mini: Use Fewer Learning Rates To Gain More"
    reference = "adam_mini.Adam_mini"
    state_bytes = 4.0
    has_momentum = True
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, blocks="rows")
    rules = {"blocks": _blocks_rule}

    def build(self):
        return [WeightDecay(decoupled=True),
                ScaleByBlockwiseAdam(mini_blocks, reduce="mean", m_key="m", v_key="vmean")]

    def add_param_group(self, param_group: dict) -> None:
        how = param_group.get("blocks", self.defaults.get("blocks"))
        params = param_group.get("params")
        if isinstance(how, int) and not isinstance(how, bool) and how > 0 and params is not None:
            params = [params] if isinstance(params, Tensor) else list(params)
            param_group = {**param_group, "params": params}
            for p in params:
                if isinstance(p, Tensor) and p.numel() % how:
                    raise ValueError(f"Invalid blocks: a parameter of shape {tuple(p.shape)} does not "
                                     f"split into {how} heads")
        super().add_param_group(param_group)
