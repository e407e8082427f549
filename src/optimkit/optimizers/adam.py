"""Adam, AdamW and AMSGrad."""
from __future__ import annotations

import torch

from ..core.optimizer import Optimizer
from ..transforms import ScaleByAdam, WeightDecay


def _seeds_usable(st: dict, m: tuple, v: tuple) -> bool:
    """Stochastic q8 states: the kernel reads and advances each state's encode counter
    (an int64 CPU tensor)."""
    for name, meta in (("exp_avg", m), ("exp_avg_sq", v)):
        if len(meta) > 3 and meta[3]:
            seed = st[name + ":seed"]
            if not (seed.is_cpu and seed.dtype is torch.int64):
                return False
    return True


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

        f32_dtype = torch.float32
        q8, f32 = [], []
        for i, (p, g, st) in enumerate(zip(params, grads, states)):
            # cheapest checks first: this loop runs every step for every tensor
            if not (p.is_cpu and p.dtype is f32_dtype and g.dtype is f32_dtype
                    and p.is_contiguous() and g.is_contiguous()):
                continue
            lay = st.get("_layout")
            if lay:
                m, v = lay.get("exp_avg"), lay.get("exp_avg_sq")
                if (m is not None and v is not None and m[0] == "q8" and v[0] == "q8" and m[1] and not v[1]
                        and st["exp_avg:codes"].is_cpu and _seeds_usable(st, m, v)):
                    q8.append(i)
                continue
            m, v = st.get("exp_avg"), st.get("exp_avg_sq")
            if m is not None and v is not None and m.is_cpu and m.is_contiguous() and v.is_contiguous():
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
