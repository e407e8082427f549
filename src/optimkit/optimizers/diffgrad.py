"""diffGrad: Adam with a friction coefficient from the gradient change."""
from __future__ import annotations

import math

from ..core.optimizer import Optimizer
from ..core.tensorlist import Ratio, dense
from ..core.transform import Context, Transform
from ..core.validation import betas
from ..transforms.decay import WeightDecay


class ScaleByDiffGrad(Transform):
    """Adam moments with the first moment damped by ``xi = sigmoid(|g_prev - g|)``.

    Update ``(sqrt(bc2) / bc1) * xi * m / (sqrt(v) + eps)`` (eps added to the
    uncorrected ``sqrt(v)``, as the reference). ``g_prev`` starts at zero.
    State: ``exp_avg``, ``exp_avg_sq``, ``previous_grad``.
    """

    nonnegative = ("exp_avg_sq",)

    def init(self, p, group):
        return {"exp_avg": p.new_zeros(p.shape), "exp_avg_sq": p.new_zeros(p.shape),
                "previous_grad": p.new_zeros(p.shape)}

    def scalars(self, group, step, sstate):
        b1, b2 = group["betas"]
        return {"diffgrad_step_size": math.sqrt(1 - b2 ** step) / (1 - b1 ** step)}

    def __call__(self, u, ctx: Context):
        g = dense(u)
        b1, b2 = ctx.hp["betas"]
        m, v, prev = ctx.state["exp_avg"], ctx.state["exp_avg_sq"], ctx.state["previous_grad"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, 1 - b2)
        friction = prev.sub(g).abs_().sigmoid()
        prev.copy_(g)
        return Ratio(friction.mul_(m), v.sqrt().add_(ctx.hp["eps"]), ctx.hp["diffgrad_step_size"])


class DiffGrad(Optimizer):
    r"""diffGrad.

    Update (as ``torch_optimizer.DiffGrad``)::

        g <- g + wd theta
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        xi = sigmoid(|g_prev - g|);   g_prev <- g          (g_prev starts at 0)
        theta <- theta - lr (sqrt(1 - b2^t) / (1 - b1^t)) xi m / (sqrt(v) + eps)

    ``xi`` lies in [0.5, 1): steps shrink where the gradient barely changes.

    Paper: Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural
    Networks" (2019). Checked against ``torch_optimizer.DiffGrad`` (pip
    ``torch-optimizer``), which also adds the decay to ``p.grad`` in place
    (optimkit leaves ``p.grad`` alone).

    Pitfalls: eps is added to the uncorrected ``sqrt(v)`` (Adam in torch adds it
    after dividing by ``sqrt(1 - b2^t)``); ``g_prev`` is the gradient after L2 decay.
    """

    name = "diffgrad"
    paper = "diffGrad: An Optimization Method for Convolutional Neural Networks"
    reference = "torch_optimizer.DiffGrad"
    state_bytes = 12
    has_momentum = True
    rules = {"betas": betas(2)}
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def build(self):
        return [WeightDecay(), ScaleByDiffGrad()]
