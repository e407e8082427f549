"""Sign of an interpolated momentum (Lion's update direction).

Lion ("Symbolic Discovery of Optimization Algorithms") steps along
``sign(b1 m + (1 - b1) g)`` and only then moves the momentum
``m <- b2 m + (1 - b2) g``; with ``b1 == b2`` this is signed heavy-ball
momentum (Signum). Written as its own block so that Lion variants (other
betas, cautious masking, projected subspaces) reuse it.
"""
from __future__ import annotations

from ..core.tensorlist import dense
from ..core.transform import Context, Transform


class ScaleBySignMomentum(Transform):
    """``u = sign(lerp(m, g, 1 - b1))`` then ``m <- lerp(m, g, 1 - b2)``.

    State: ``exp_avg`` (as lion_pytorch and pytorch_optimizer name it).

    Args:
        key: the hyperparameter holding ``(b1, b2)``.
    """

    def __init__(self, key: str = "betas"):
        self.key = key

    def init(self, p, group):
        return {"exp_avg": p.new_zeros(p.shape)}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        b1, b2 = ctx.hp[self.key][:2]
        m = ctx.state["exp_avg"]
        direction = m.clone().lerp_(g, 1 - b1).sign_()
        m.lerp_(g, 1 - b2)
        return direction
