"""Adam, AdamW and AMSGrad."""
from __future__ import annotations

import torch

from ..core.optimizer import Optimizer
from ..transforms import ScaleByAdam, WeightDecay


class Adam(Optimizer):
    r"""Adam (with the ``amsgrad`` flag: AMSGrad).

    Update (as ``torch.optim.Adam``)::

        g <- g + wd * theta                       (or theta <- theta (1 - lr wd) if decoupled_weight_decay)
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   v_max <- max(v_max, v) (amsgrad)
        theta <- theta - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Paper: Kingma & Ba, "Adam: A Method for Stochastic Optimization" (2015); AMSGrad:
    Reddi et al., "On the Convergence of Adam and Beyond" (2018).
    Checked against ``torch.optim.Adam``.
    """

    name = "adam"
    paper = "Adam: A Method for Stochastic Optimization"
    reference = "torch.optim.Adam"
    state_bytes = 8
    has_momentum = True
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                    decoupled_weight_decay=False)

    def build(self):
        return [WeightDecay(decoupled="decoupled_weight_decay"), ScaleByAdam()]

    def fast_step(self, group, hp, params, grads, states):
        """Fused CPU kernels (optimkit.kernels.q8_adamw) where they apply: q8 moments
        always (nearest or stochastic rounding), float32 moments when ``compile=True``
        (on CPU they beat Inductor's kernel) or when the same bucket runs the q8 kernel
        (the small tensors that keep fp32 state under ``min_quant_size``; the tensor-op
        path cost ~0.7 ms a step there)."""
        decoupled = type(self) is not Adam or group["decoupled_weight_decay"] or group["weight_decay"] == 0
        if (group["amsgrad"] or group["maximize"] or not decoupled or group.get("cautious")
                or group["bf16_compensation"]):
            return []
        from ..kernels import q8_adamw

        def eligible(p, g):
            return (p.device.type == "cpu" and p.dtype == torch.float32 and g.dtype == torch.float32
                    and p.is_contiguous() and g.is_contiguous())

        q8, f32 = [], []
        for i, (p, g, st) in enumerate(zip(params, grads, states)):
            if not eligible(p, g):
                continue
            lay = st.get("_layout", {})
            if (lay.get("exp_avg", ("",))[:2] == ("q8", True) and lay.get("exp_avg_sq", ("",))[:2] == ("q8", False)
                    and st["exp_avg:codes"].device.type == "cpu"
                    # stochastic rounding: the kernel reads and advances each state's encode counter
                    and all(st[k + ":seed"].device.type == "cpu" and st[k + ":seed"].dtype == torch.int64
                            for k in ("exp_avg", "exp_avg_sq") if lay[k][3:4] == (True,))):
                q8.append(i)
            elif ("exp_avg" in st and "exp_avg_sq" in st
                  and st["exp_avg"].device.type == "cpu" and st["exp_avg"].is_contiguous()
                  and st["exp_avg_sq"].is_contiguous()):
                f32.append(i)
        if not (group["compile"] or q8):  # eager fp32 groups keep torch's foreach kernels
            f32 = []
        if not (q8 or f32) or not q8_adamw.available():
            return []
        common = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                      weight_decay=group["weight_decay"], bc1=hp["bc1"], bc2_sqrt=hp["bc2_sqrt"])
        if q8:
            sts = [states[i] for i in q8]

            def storage(st, name):
                keys = ("codes", "absmax", "seed") if st["_layout"][name][3:4] == (True,) else ("codes", "absmax")
                return {k: st[f"{name}:{k}"] for k in keys}

            q8_adamw.step([params[i] for i in q8], [grads[i] for i in q8],
                          [storage(st, "exp_avg") for st in sts], [storage(st, "exp_avg_sq") for st in sts],
                          **common)
        if f32:
            q8_adamw.step_fp32([params[i] for i in f32], [grads[i] for i in f32],
                               [states[i]["exp_avg"] for i in f32], [states[i]["exp_avg_sq"] for i in f32], **common)
        return q8 + f32


class AdamW(Adam):
    r"""AdamW: Adam with decoupled weight decay.

    Update (as ``torch.optim.AdamW``)::

        theta <- theta (1 - lr wd)
        m, v (and v_max with amsgrad) as Adam
        theta <- theta - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Paper: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019).
    Checked against ``torch.optim.AdamW``.
    """

    name = "adamw"
    paper = "Decoupled Weight Decay Regularization"
    reference = "torch.optim.AdamW"
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False)

    def build(self):
        return [WeightDecay(decoupled=True), ScaleByAdam()]


class AMSGrad(Adam):
    r"""AMSGrad: Adam with the running maximum of the second moment (``Adam(amsgrad=True)``).

    Paper: Reddi et al., "On the Convergence of Adam and Beyond" (2018).
    Checked against ``torch.optim.Adam(amsgrad=True)``.
    """

    name = "amsgrad"
    paper = "On the Convergence of Adam and Beyond"
    reference = "torch.optim.Adam(amsgrad=True)"
    state_bytes = 12
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=True,
                    decoupled_weight_decay=False)
