"""PSGD's Kronecker-factored ("whitening") preconditioner, fitted on the Lie group
of upper-triangular matrices with positive diagonal (Li, "Preconditioned Stochastic
Gradient Descent", 2015/2018; the Kron variant as in kron_torch / psgd_kron).

Per parameter ``W`` with momentum ``m`` and factors ``Q_k`` (one per dim: upper
triangular ``d_k x d_k``, or a diagonal vector)::

    m <- b1 m + (1 - b1) g;   M = m / (1 - b1^t)
    with probability p_t (one coin per step, shared by the group):
        balance the factors' max-abs norms to their geometric mean (about 1 in 100)
        V ~ N(0, 1) of W's shape (a generator seeded from ``seed``, t and the param)
        A = G x_k Q_k              (G = M, or g without momentum_into_precond_update)
        B = V x_k Q_k^(-T)
        for each k:  T1 = A_(k) A_(k)^T,  T2 = B_(k) B_(k)^T
            triangular:  Q_k <- Q_k - precond_lr / lb(T1 + T2) * triu(T1 - T2) Q_k
            diagonal:    Q_k <- Q_k - precond_lr / max|T1 + T2| * (T1 - T2) * Q_k
    P = M x_k (Q_k^T Q_k);   P <- P * min(1, 1.1 / (rms(P) + 1e-6))
    P <- P + wd W                               (tensors with two or more dims)
    W <- W - lr P                               (the facade's apply)

``x_k`` multiplies along dim ``k``; ``lb`` is a cheap lower bound of the spectral
norm (one power iteration from the largest column). All factors of a parameter
live in one flat state tensor ``psgd_q`` at static offsets computed from the
shape (:func:`kron_plan`); its last slot holds the parameter's noise key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.tensorlist import TensorList, dense
from ..core.transform import Context, Transform

MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "all_diag")
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
#: chance that an update step also balances the factors (kron_torch's 0.01)
BALANCE_PROBABILITY = 0.01
#: bfloat16's smallest normal number: the floor of the step normalizers, as the reference
TINY = torch.finfo(torch.bfloat16).tiny
#: the step number reaches a compiled kernel as two floats, exact in float32
_STEP_SPLIT = 20
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class KronPlan:
    shape: tuple[int, ...]
    #: per dim ``(offset, size, triangular)`` in the flat tensor (a scalar: one diagonal of size 1)
    factors: tuple[tuple[int, int, bool], ...]
    numel: int            # length of the flat tensor, the key slot included

    @property
    def key_index(self) -> int:
        return self.numel - 1

    def views(self, flat: Tensor) -> list[Tensor]:
        out = []
        for offset, size, tri in self.factors:
            if tri:
                out.append(flat[offset:offset + size * size].view(size, size))
            else:
                out.append(flat[offset:offset + size])
        return out


_PLANS: dict[tuple, KronPlan] = {}


def kron_plan(shape: tuple[int, ...], max_size: int, min_ndim: int, memory_save_mode) -> KronPlan:
    """Which dims get a triangular factor: not dims of size 1, not dims above
    ``max_size``, not tensors with fewer than ``min_ndim`` dims, and not the dims
    ``memory_save_mode`` makes diagonal (``"one_diag"``: the largest, the last of
    equal largest; ``"smart_one_diag"``: the largest only when strictly larger than
    the others; ``"all_diag"``: every dim)."""
    shape = tuple(int(d) for d in shape)
    key = (shape, int(max_size), int(min_ndim), memory_save_mode)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.setdefault(key, _make_plan(*key))
    return plan


def _make_plan(shape: tuple[int, ...], max_size: int, min_ndim: int, memory_save_mode) -> KronPlan:
    if not shape:
        return KronPlan(shape, ((0, 1, False),), 2)
    n = len(shape)
    diag = [False] * n
    if memory_save_mode in ("one_diag", "smart_one_diag") and n:
        biggest = max(shape)
        last = max(i for i, d in enumerate(shape) if d == biggest)
        ranked = sorted(shape)
        if memory_save_mode == "one_diag" or (n >= 2 and ranked[-1] > ranked[-2]):
            diag[last] = True
    elif memory_save_mode == "all_diag":
        diag = [True] * n
    factors, offset = [], 0
    for d, dg in zip(shape, diag):
        tri = not (d == 1 or d > max_size or n < min_ndim or dg)
        factors.append((offset, d, tri))
        offset += d * d if tri else d
    return KronPlan(shape, tuple(factors), offset + 1)


def plan_of(shape, group) -> KronPlan:
    return kron_plan(tuple(shape), group["max_size_triangular"], group["min_ndim_triangular"],
                     group["memory_save_mode"])


def init_factors(plan: KronPlan, flat: Tensor, init_scale: float, key: int) -> Tensor:
    """``flat`` (zeros) filled with ``s I`` / ``s 1`` factors, ``s = init_scale^(1/ndim)``
    (a scalar's one factor: ``init_scale``), and the noise key."""
    scale = float(init_scale) ** (1.0 / max(len(plan.shape), 1))
    for (offset, size, tri), q in zip(plan.factors, plan.views(flat)):
        if tri:
            q.diagonal().fill_(scale)
        else:
            q.fill_(scale)
    flat[plan.key_index] = float(key)
    return flat


# --------------------------------------------------------------------------- randomness
def _mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): the seed of one draw."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def coins(seed: int, step: int) -> tuple[float, float]:
    """The two uniform draws of step ``step`` (update coin, balance coin): a function
    of ``seed`` and the step alone, so a resumed run draws what an uninterrupted
    one does."""
    g = torch.Generator().manual_seed(_mix(seed, step, 0))
    u = torch.rand(2, generator=g, dtype=torch.float64)
    return float(u[0]), float(u[1])


def update_probability(group: dict, step: int) -> float:
    """``preconditioner_update_probability``, or (None) the reference schedule
    ``min(1, max(0.03, exp(-0.001 (t - 500))))`` with ``t = step - 1``."""
    prob = group["preconditioner_update_probability"]
    if prob is None:
        return min(1.0, max(0.03, math.exp(-0.001 * (step - 1 - 500))))
    return float(prob)


def noise(shape, dtype, device, seed: int, step: int, key: int) -> Tensor:
    """``V ~ N(0, 1)`` for the parameter with noise ``key`` at ``step``, from a
    generator on the parameter's device (CPU and CUDA streams differ)."""
    seed_value = _mix(seed, step, key + 1)
    if device.type == "meta":
        return torch.empty(shape, dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(seed_value)
    return torch.randn(shape, generator=g, dtype=dtype, device=device)


@torch.library.custom_op("optimkit::psgd_noise", mutates_args=())
def _noise_op(like: Tensor, seed: int, step_lo: Tensor, step_hi: Tensor, key: Tensor) -> Tensor:
    step = int(step_lo.item()) + (int(step_hi.item()) << _STEP_SPLIT)
    return noise(like.shape, like.dtype, like.device, seed, step, int(key.item()))


@_noise_op.register_fake
def _(like, seed, step_lo, step_hi, key):
    return torch.empty_like(like)


def _draw(like: Tensor, seed: int, step_lo, step_hi, key: Tensor) -> Tensor:
    if isinstance(step_lo, Tensor):  # compiled: one opaque operator
        return torch.ops.optimkit.psgd_noise(like, seed, step_lo, step_hi, key)
    if like.device.type == "meta":  # shapes only
        return torch.empty_like(like)
    step = int(step_lo) + (int(step_hi) << _STEP_SPLIT)
    return noise(like.shape, like.dtype, like.device, seed, step, int(key.item()))


# --------------------------------------------------------------------------- factor algebra
def _along(x: Tensor, ops) -> Tensor:
    """Apply ``ops[k]`` (a function of a tensor with dim ``k`` last) along each dim
    in turn: dim 0 is moved last, transformed, and after one op per dim the dims
    are back in their order."""
    for op in ops:
        x = op(x.movedim(0, -1))
    return x


def _mul_q(q: Tensor, tri: bool):
    return (lambda x: x @ q.mT) if tri else (lambda x: x * q)


def _solve_qt(q: Tensor, tri: bool):
    """``x -> Q^(-T) x`` along the last dim, i.e. ``x Q^(-1)`` on rows."""
    if not tri:
        return lambda x: x / q
    return lambda x: torch.linalg.solve_triangular(q, x.reshape(-1, x.shape[-1]), upper=True,
                                                   left=False).reshape(x.shape)


def _precondition(q: Tensor, tri: bool):
    """``x -> Q^T Q x`` along the last dim."""
    return (lambda x: (x @ q.mT) @ q) if tri else (lambda x: x * (q * q))


def spectral_lower_bound(a: Tensor) -> Tensor:
    """A lower bound of ``||a||_2`` for a symmetric ``a`` (one power-iteration step
    from its largest column, on ``a / max|a|``); 0 for a zero matrix."""
    top = a.abs().max()
    s = a / torch.where(top > 0, top, torch.ones_like(top))
    i = torch.argmax((s * s).sum(0))
    x = s.index_select(1, i.view(1)).flatten() @ s
    x = x / x.norm().clamp_min(TINY)
    return (s @ x).norm() * top


def gram(x: Tensor, k: int, tri: bool) -> Tensor:
    """``x_(k) x_(k)^T`` (triangular factors) or its diagonal."""
    xm = x.movedim(k, 0).reshape(x.shape[k], -1)
    return xm @ xm.mT if tri else (xm * xm).sum(1)


def balance(qs: list[Tensor]) -> None:
    """Scale the factors in place so that their max-abs norms are equal (to their
    geometric mean): the Kronecker product is unchanged."""
    norms = torch.stack([q.abs().max() for q in qs])
    mean = norms.prod() ** (1.0 / len(qs))
    for q, n in zip(qs, norms):
        q.mul_(mean / n)


def update_factors(qs: list[Tensor], tris, v: Tensor, g: Tensor, precond_lr) -> None:
    """One Lie-group step of every factor from the pair ``(V, G)`` (in place)."""
    a = _along(g, [_mul_q(q, t) for q, t in zip(qs, tris)])
    b = _along(v, [_solve_qt(q, t) for q, t in zip(qs, tris)])
    for k, (q, tri) in enumerate(zip(qs, tris)):
        t1, t2 = gram(a, k, tri), gram(b, k, tri)
        diff, total = t1 - t2, t1 + t2
        if tri:
            scale = precond_lr / spectral_lower_bound(total).clamp_min(TINY)
            q.sub_(torch.triu(diff).mul_(scale) @ q)
        else:
            scale = precond_lr / total.abs().max().clamp_min(TINY)
            q.sub_(diff.mul_(scale) * q)


def precondition(qs: list[Tensor], tris, x: Tensor) -> Tensor:
    return _along(x, [_precondition(q, t) for q, t in zip(qs, tris)])


# --------------------------------------------------------------------------- transform
class PSGDKronPreconditioner(Transform):
    """See the module docstring. State: ``psgd_q`` (flat factors and the noise key;
    float32, float64 for float64 parameters or ``precond_dtype="fp64"``; kept in full
    precision), ``momentum_buffer`` (if b1 > 0; follows state_precision)."""

    full_precision = ("psgd_q",)

    def __init__(self):
        self._next_key = 0  # noise keys in order of first step: distinct parameters, distinct noise

    def init(self, p, group):
        plan = plan_of(p.shape, group)
        dtype = torch.float64 if p.dtype == torch.float64 else DTYPES[group["precond_dtype"]]
        key, self._next_key = self._next_key, self._next_key + 1
        return {"psgd_q": init_factors(plan, p.new_zeros(plan.numel, dtype=dtype), group["precond_init_scale"],
                                       key % (1 << 24)),
                "momentum_buffer": p.new_zeros(p.shape) if group["b1"] != 0 else p.new_zeros(0)}

    def scalars(self, group, step, sstate):
        u_update, u_balance = coins(group["seed"], step)
        update = u_update < update_probability(group, step)
        b1 = group["b1"]
        return {"psgd_update": bool(update),
                "psgd_balance": bool(update and u_balance < BALANCE_PROBABILITY),
                "psgd_bc1": 1.0 - b1 ** step if b1 else 1.0,
                "psgd_step_lo": float(step & ((1 << _STEP_SPLIT) - 1)),
                "psgd_step_hi": float(step >> _STEP_SPLIT)}

    def __call__(self, u, ctx: Context):
        st, hp = ctx.static, ctx.hp
        g = dense(u)
        state = ctx.state
        for i, p in enumerate(ctx.params):  # before anything is changed
            if st["b1"] and state["momentum_buffer"][i].numel() != p.numel():
                raise RuntimeError("PSGDKron: b1 was 0 when this parameter's state was created; "
                                   "momentum (b1 > 0) cannot be turned on afterwards")
        out = []
        for i, (p, gi) in enumerate(zip(ctx.params, g)):
            flat, buf = state["psgd_q"][i], state["momentum_buffer"][i]
            if st["b1"]:
                buf.mul_(hp["b1"]).add_(gi, alpha=1 - hp["b1"])
                m = buf / hp["psgd_bc1"]
            else:
                m = gi
            if p.numel() == 0:
                out.append(torch.zeros_like(p))
                continue
            plan = plan_of(gi.shape, st)
            work = flat.dtype
            qs, tris = plan.views(flat), [t for _, _, t in plan.factors]
            shape1 = gi.shape if gi.dim() else (1,)
            mw = m.to(work).reshape(shape1)
            if st["psgd_balance"] and gi.dim() > 1:
                balance(qs)
            if st["psgd_update"]:
                target = mw if st["momentum_into_precond_update"] else gi.to(work).reshape(shape1)
                v = _draw(mw, st["seed"], hp["psgd_step_lo"], hp["psgd_step_hi"], flat[plan.key_index])
                update_factors(qs, tris, v, target, hp["precond_lr"])
            pre = precondition(qs, tris, mw).reshape(gi.shape)
            rms = pre.square().mean().sqrt()
            pre = pre * torch.clamp(1.1 / (rms + 1e-6), max=1.0)
            pre = pre.to(p.dtype)
            if st["weight_decay"] and p.dim() >= 2:
                pre = pre.add(p, alpha=hp["weight_decay"])
            out.append(pre)
        return TensorList(out)
