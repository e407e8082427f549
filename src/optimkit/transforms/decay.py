"""Weight decay: L2 (added to the gradient) or decoupled (shrinks the parameters)."""
from __future__ import annotations

from ..core.tensorlist import dense
from ..core.transform import Context, Transform


class WeightDecay(Transform):
    """``g <- g + wd * theta`` (L2) or ``theta <- theta * (1 - lr * wd)`` (decoupled).

    Args:
        decoupled: True, False, or the name of a bool hyperparameter that selects
            decoupled decay per group (e.g. Adam's ``decoupled_weight_decay``).
        key: the hyperparameter holding the decay coefficient.
    """

    def __init__(self, decoupled: bool | str = False, key: str = "weight_decay"):
        self.decoupled = decoupled
        self.key = key

    def couples_params(self, group: dict) -> bool:
        """True when this adds ``wd * theta`` to the gradient (L2) for ``group``."""
        decoupled = group[self.decoupled] if isinstance(self.decoupled, str) else self.decoupled
        return group[self.key] != 0 and not decoupled

    def __call__(self, u, ctx: Context):
        if not ctx.static[self.key]:
            return u
        decoupled = ctx.static[self.decoupled] if isinstance(self.decoupled, str) else self.decoupled
        wd = ctx.hp[self.key]
        if decoupled:
            ctx.params.mul_(1 - ctx.hp["lr"] * wd)
            return u
        return dense(u).add(ctx.params, alpha=wd)
