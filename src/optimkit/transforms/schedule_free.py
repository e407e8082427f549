"""Schedule-free iterates (Defazio et al. 2024): no learning-rate schedule, an
average of the iterates instead.

The parameters hold ``y`` during training; the state holds ``z`` (the base
iterate). Per step ``k`` (counted from 0)::

    lr_k = lr * min(1, (k + 1) / warmup_steps)       (RAdam: lr * RAdam's rectification r_k, or
                                                    0 / lr with plain SGD steps while rho_k <= 4)
    lr_max <- max(lr_max, lr_k);  w_k = (k + 1)^r * lr_max^weight_lr_power   (0 if lr_k = 0)
    c = w_k / sum_{i <= k} w_i
    g' = g / (sqrt(v / bc2) + eps) (AdamW; v <- beta2 v + (1 - beta2) g^2), g (SGD);  g' += wd y
    y <- (1 - c) y + c z + lr_k (beta1 (1 - c) - 1) g'
    z <- z - lr_k g'

and ``x = y + (1 - 1 / beta1) (z - y)`` is the point to evaluate (``opt.eval()``).
"""
from __future__ import annotations

import math

from ..core.tensorlist import TensorList, dense
from ..core.transform import Context, Transform


class ScheduleFreeStep(Transform):
    """The full displacement of ``y`` for one step (the optimizer applies it with
    step size 1) and the update of ``z``. ``adaptive``: AdamW's second-moment
    normalization (state ``exp_avg_sq``), else SGD. State ``z`` stays in full
    precision: it is an iterate, not a statistic."""

    scalar_state = {"sf_lr_max": -1.0, "sf_weight_sum": 0.0}
    full_precision = ("z",)
    nonnegative = ("exp_avg_sq",)

    def __init__(self, adaptive: bool, rectified: bool = False):
        self.adaptive = adaptive
        self.rectified = rectified  # RAdam's rectification of lr (and plain SGD while rho_t <= 4)

    def init(self, p, group):
        state = {"z": p.detach().clone()}
        if self.adaptive:
            state["exp_avg_sq"] = p.new_zeros(p.shape)
        return state

    def scalars(self, group, step, sstate):
        k = step - 1
        normalize = self.adaptive
        if self.rectified:
            beta2 = group["betas"][1]
            rho_inf = 2 / (1 - beta2) - 1
            rho = rho_inf - 2 * step * beta2 ** step / (1 - beta2 ** step)
            normalize = rho > 4.0
            rect = (math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) if normalize
                    else float(not group["silent_sgd_phase"]))
            lr = group["lr"] * rect
        else:
            warmup = group["warmup_steps"]
            lr = group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
        lr_max = max(lr, sstate["sf_lr_max"])
        # a group at lr 0 is frozen (the authors' code keeps averaging y toward z)
        weight = (k + 1) ** group["r"] * lr_max ** group["weight_lr_power"] if lr else 0.0
        weight_sum = sstate["sf_weight_sum"] + weight
        sstate["sf_lr_max"], sstate["sf_weight_sum"] = lr_max, weight_sum
        ckp1 = weight / weight_sum if weight_sum else 0.0
        beta1 = group["betas"][0] if self.adaptive else group["momentum"]
        out = {"sf_lr": float(lr), "sf_ckp1": float(ckp1), "sf_y_coef": float(lr * (beta1 * (1 - ckp1) - 1))}
        if self.adaptive:
            out["sf_bc2"] = float(1.0 - group["betas"][1] ** (k + 1))
            out["sf_normalize"] = bool(normalize)
        return out

    def __call__(self, u, ctx: Context):
        hp, st = ctx.hp, ctx.static
        g = dense(u)
        y, z = ctx.params, ctx.state["z"]
        if self.adaptive:
            v = ctx.state["exp_avg_sq"]
            beta2 = hp["betas"][1]
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if st["sf_normalize"]:
                g = g / v.div(hp["sf_bc2"]).sqrt_().add_(hp["eps"])
        if st["weight_decay"]:
            g = g.add(y, alpha=hp["weight_decay"])
        # y_new = lerp(y, z, c) + y_coef g'  ->  displacement y - y_new
        d = TensorList([(yi - zi).mul_(hp["sf_ckp1"]) for yi, zi in zip(y, z)])
        d.add_(g, alpha=-hp["sf_y_coef"])
        z.sub_(g, alpha=hp["sf_lr"])
        return d
