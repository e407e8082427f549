"""Heavy-ball momentum with a zero-initialised buffer (SGDP, LARS).

Unlike torch.optim.SGD (whose buffer is the first gradient), the buffer starts
at zero, so dampening already applies on the first step.
"""
from __future__ import annotations

from ..core.tensorlist import dense
from ..core.transform import Context, Transform


class ZeroInitMomentum(Transform):
    r"""``b <- mu b + (1 - dampening) u`` from ``b = 0``; the update is ``u + mu b``
    (``nesterov``) or ``b``.

    With ``momentum == 0`` no state is kept and the update is ``(1 - dampening) u``
    (``u`` with ``nesterov``), which is what the recursion gives.

    Args:
        key: the momentum hyperparameter.
        buffer: name of the state tensor (as the reference implementation names it).
    """

    def __init__(self, key: str = "momentum", buffer: str = "momentum_buffer"):
        self.key = key
        self.buffer = buffer

    def init(self, p, group):
        return {self.buffer: p.new_zeros(p.shape)} if group[self.key] != 0 else {}

    def __call__(self, u, ctx: Context):
        u = dense(u)
        damp = ctx.hp.get("dampening", 0.0)
        has_damp = ctx.static.get("dampening", False)
        if not ctx.static[self.key]:
            if has_damp and not ctx.static.get("nesterov"):
                return u.mul(1 - damp)
            return u
        mu = ctx.hp[self.key]
        b = ctx.state[self.buffer]
        b.mul_(mu).add_(u, alpha=1 - damp if has_damp else 1)
        if ctx.static.get("nesterov"):
            return u.add(b, alpha=mu)
        return b
