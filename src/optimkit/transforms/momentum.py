"""Heavy-ball momentum as in torch.optim.SGD (dampening, Nesterov)."""
from __future__ import annotations

from ..core.tensorlist import dense
from ..core.transform import Context, Transform


class HeavyBall(Transform):
    """``b <- g`` on the first step, then ``b <- mu * b + (1 - dampening) * g``;
    the update is ``g + mu * b`` (Nesterov) or ``b``. State: ``momentum_buffer``.
    Inactive when ``momentum == 0``."""

    def __init__(self, key: str = "momentum", buffer: str = "momentum_buffer"):
        self.key = key
        self.buffer = buffer

    def init(self, p, group):
        return {self.buffer: p.new_zeros(p.shape)} if group[self.key] != 0 else {}

    def scalars(self, group, step, sstate):
        return {"first_step": step == 1}

    def __call__(self, u, ctx: Context):
        if not ctx.static[self.key]:
            return u
        u = dense(u)
        b = ctx.state[self.buffer]
        mu = ctx.hp[self.key]
        if ctx.static["first_step"]:
            b.copy_(u)
        else:
            b.mul_(mu).add_(u, alpha=1 - ctx.hp.get("dampening", 0.0))
        if ctx.static.get("nesterov"):
            return u.add(b, alpha=mu)
        return b
