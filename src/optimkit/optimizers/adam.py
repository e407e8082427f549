"""Adam, AdamW and AMSGrad."""
from __future__ import annotations

import torch
from torch import Tensor

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

        if not q8_adamw.available():
            return []
        plan = self._fast_plan(group, params, grads, states)
        if plan is None:
            return []
        common = dict(lr=hp["lr"], beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
                      weight_decay=hp["weight_decay"], bc1=hp["bc1"], bc2_sqrt=hp["bc2_sqrt"])
        if plan.q8:
            q8_adamw.step([params[i] for i in plan.q8], [grads[i] for i in plan.q8], plan.q8_packed, **common)
        if plan.f32:
            q8_adamw.step_fp32([params[i] for i in plan.f32], [grads[i] for i in plan.f32], plan.f32_packed,
                               **common)
        return plan.q8 + plan.f32

    def _fast_plan(self, group, params, grads, states) -> _FastPlan | None:
        """Which tensors of the bucket take which kernel, with their states packed for
        C; reused while the bucket's state dicts and storage tensors are the same
        objects (the checks cost a few us; rebuilding it ~0.2 ms on 87 tensors)."""
        cache = self._fast_cache  # one plan per group: replaced states are let go
        plan = cache.get(id(group))
        if plan is None or plan.group is not group or not plan.still_valid(params, grads, states):
            plan = cache[id(group)] = _FastPlan.build(group, params, grads, states)
        return plan if (plan.q8 or plan.f32) else None


def _ok_tensors(p: Tensor, g: Tensor) -> bool:
    return (p.is_cpu and p.dtype is torch.float32 and g.dtype is torch.float32
            and p.is_contiguous() and g.is_contiguous())


class _FastPlan:
    """A bucket's split between the q8 kernel, the fp32 kernel and the tensor-op
    path, and the packed state pointers. It holds the state dicts and storage
    tensors it packed (so their ids and addresses stay theirs while it lives) and
    is used only while the same dicts hold the same tensors at the same addresses
    and the tensors' sizes and dtypes are unchanged."""

    def __init__(self, group, states, q8, f32, q8_packed, f32_packed, watched, sizes):
        self.group, self.states, self.q8, self.f32 = group, states, q8, f32
        self.q8_packed, self.f32_packed = q8_packed, f32_packed
        self.watched = watched  # (state dict, key, tensor, address) that must stay the same
        self.sizes = sizes      # packed element counts, by index

    @classmethod
    def build(cls, group, params, grads, states) -> _FastPlan:
        from ..kernels import q8_adamw

        q8, f32 = [], []
        for i, (p, g, st) in enumerate(zip(params, grads, states)):
            if not _ok_tensors(p, g):
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
        watched = []

        def storage(st, name):
            parts = ("codes", "absmax", "seed") if st["_layout"][name][3:4] == (True,) else ("codes", "absmax")
            out = {}
            for part in parts:
                key = f"{name}:{part}"
                out[part] = st[key]
                watched.append((st, key, st[key], st[key].data_ptr()))
            return out

        q8_packed = q8_adamw.pack_q8([params[i] for i in q8], [storage(states[i], "exp_avg") for i in q8],
                                     [storage(states[i], "exp_avg_sq") for i in q8]) if q8 else None
        for i in f32:
            watched += [(states[i], k, states[i][k], states[i][k].data_ptr()) for k in ("exp_avg", "exp_avg_sq")]
        f32_packed = q8_adamw.pack_fp32([params[i] for i in f32], [states[i]["exp_avg"] for i in f32],
                                        [states[i]["exp_avg_sq"] for i in f32]) if f32 else None
        sizes = {i: params[i].numel() for i in q8 + f32}
        return cls(group, list(states), q8, f32, q8_packed, f32_packed, watched, sizes)

    def still_valid(self, params, grads, states) -> bool:
        if len(states) != len(self.states) or any(a is not b for a, b in zip(states, self.states)):
            return False
        for st, key, t, ptr in self.watched:
            if st.get(key) is not t or t.data_ptr() != ptr:
                return False
        for i, n in self.sizes.items():  # element counts are packed
            p = params[i]
            if p.numel() != n or not _ok_tensors(p, grads[i]):
                return False
        return True


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
