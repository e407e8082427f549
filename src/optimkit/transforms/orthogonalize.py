"""Muon's orthogonalized momentum, and the AdamW rule for what Muon does not take.

A Muon group routes each parameter to one of two rules (:func:`takes_muon`):
matrices (two or more dims) get momentum followed by Newton-Schulz
orthogonalization (:class:`OrthogonalizedMomentum`); vectors and scalars, and
every parameter of a ``use_muon=False`` group, get AdamW moments
(:class:`AuxAdamW`). The optimizer steps the two kinds separately (each call of
the chain sees one kind, with ``use_muon`` set accordingly), so each transform
branches only on the static ``use_muon`` flag.

How a tensor is seen as matrices (:func:`matrix_shape`), per group setting
``reshape``: 2-D as it is; 3-D as a stack of matrices along dim 0 (``"auto"``,
``"batch"``) or flattened to ``(shape[0], -1)`` (``"flatten"``); 4-D and more
flattened (``"auto"``, ``"flatten"``: conv filters ``(out, in, kh, kw)``) or a
stack over the leading dims (``"batch"``). ``split=k`` then cuts each matrix into
``k`` equal blocks of rows (fused QKV projections, heads), each orthogonalized
and scaled as a matrix of its own. Stacks and blocks go through one batched
matrix product per Newton-Schulz iteration.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..core.tensorlist import Ratio, TensorList, dense
from ..core.transform import Context, Transform

#: Keller Jordan's quintic coefficients (a, b, c), also torch.optim.Muon's default
KELLER_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# The Polar Express degree-5 schedule: Amsel, Persson, Musco & Gower, "The Polar
# Express: Optimal Matrix Sign Methods and Their Application to the Muon
# Algorithm" (arXiv:2505.16932), Algorithm 1 (also github.com/NoahAmsel/PolarExpress).
# One (a, b, c) per iteration; the last one is the limit the later ones reach.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)


def _polar_express_schedule(safety: float = 1.01) -> tuple[tuple[float, float, float], ...]:
    """The paper's Algorithm 1 as a plain schedule for ``X / max(||X||_F, eps)``.

    The paper divides every polynomial but the last by the safety factor
    (``p(x / 1.01)``: a, b, c over 1.01, 1.01^3, 1.01^5) and also normalizes its
    input by ``1.01 ||X||_F``. Scaling the input of the first polynomial is the
    same as dividing its coefficients by the safety factor once more, so that
    normalization is folded into the first triple here."""
    out = []
    for i, (a, b, c) in enumerate(_POLAR_EXPRESS_RAW):
        k = 0 if i == len(_POLAR_EXPRESS_RAW) - 1 else (2 if i == 0 else 1)
        s = safety ** k
        out.append((a / s, b / s ** 3, c / s ** 5))
    return tuple(out)


POLAR_EXPRESS = _polar_express_schedule()
NAMED_SCHEDULES = {"polar_express": POLAR_EXPRESS}


def schedule(coefficients, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each of ``steps`` iterations: one triple for all of them, or
    a per-iteration schedule (a name in ``NAMED_SCHEDULES`` or a sequence of
    triples) whose last triple repeats past its end and whose extra entries are
    unused (the Polar Express convention)."""
    if isinstance(coefficients, str):
        coefficients = NAMED_SCHEDULES[coefficients]
    if coefficients and not isinstance(coefficients[0], (tuple, list)):
        return (tuple(coefficients),) * steps
    coefficients = tuple(tuple(c) for c in coefficients)
    return tuple(coefficients[min(i, len(coefficients) - 1)] for i in range(steps))


def newton_schulz(g: Tensor, coefficients: Sequence, eps, dtype: torch.dtype) -> Tensor:
    """Approximate orthogonalization ``U V^T`` of each matrix in the last two dims of ``g``.

    ``X <- X / max(||X||_F, eps)`` per matrix, then per iteration with its
    ``(a, b, c)``: ``A = X X^T``, ``X <- a X + (b A + c A A) X`` (the odd quintic
    ``a x + b x^3 + c x^5`` applied to the singular values). Computed in
    ``dtype``, on the transpose when a matrix has more rows than columns (the
    Gram matrix is then the smaller one).

    Coefficients and ``eps`` are numbers (eager) or 0-d tensors (inside the
    compiled step). There the iteration is one opaque operator
    (``torch.ops.optimkit.newton_schulz``): its matrix products are library
    calls either way, and generating code for its few elementwise ops cost
    ~30 s of C++ compilation per kernel on CPU for no gain in step time."""
    flat = [x for abc in coefficients for x in abc]
    if isinstance(eps, Tensor) or any(isinstance(x, Tensor) for x in flat):
        like = next(x for x in [eps, *flat] if isinstance(x, Tensor))
        as_t = [x if isinstance(x, Tensor) else like.new_tensor(x) for x in flat]
        eps_t = eps if isinstance(eps, Tensor) else like.new_tensor(eps)
        return torch.ops.optimkit.newton_schulz(g, as_t, eps_t, dtype)
    return _newton_schulz(g, coefficients, eps, dtype)


def _newton_schulz(g: Tensor, coefficients: Sequence, eps, dtype: torch.dtype) -> Tensor:
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    norm = x.norm(dim=(-2, -1), keepdim=True)
    x = x / torch.clamp_min(norm, eps)
    if x.dim() == 2 and all(not isinstance(t, Tensor) for abc in coefficients for t in abc):
        # fused scale-and-add products (as torch.optim.Muon): 3 GEMMs and no elementwise
        # passes per iteration; about 25% faster than the unfused form on CPU
        for a, b, c in coefficients:
            gram = x @ x.mT
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.mT if tall else x
    for a, b, c in coefficients:
        gram = x @ x.mT
        poly = gram * b + (gram @ gram) * c
        x = x * a + poly @ x
    return x.mT if tall else x


@torch.library.custom_op("optimkit::newton_schulz", mutates_args=())
def _newton_schulz_op(g: Tensor, coefficients: list[Tensor], eps: Tensor, dtype: torch.dtype) -> Tensor:
    flat = torch.stack(coefficients).tolist() if coefficients else []  # plain numbers for addmm
    abc = [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]
    return _newton_schulz(g, abc, eps, dtype).contiguous()


@_newton_schulz_op.register_fake
def _(g, coefficients, eps, dtype):
    return torch.empty(g.shape, dtype=dtype, device=g.device)


def matrix_shape(shape: Sequence[int], reshape: str = "auto", split: int = 1) -> tuple[int, ...]:
    """``(*stack, rows, cols)``: how a tensor of ``shape`` is orthogonalized (see the module doc)."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"a tensor of shape {shape} is not a matrix")
    if len(shape) == 2:
        out = shape
    elif reshape == "flatten" or (reshape == "auto" and len(shape) >= 4):
        out = (shape[0], math.prod(shape[1:]))
    else:
        out = shape
    if split != 1:
        rows = out[-2]
        if rows % split:
            raise ValueError(f"Invalid split: {split} does not divide the {rows} rows of a matrix "
                             f"of shape {out[-2:]} (parameter shape {shape})")
        out = out[:-2] + (split, rows // split, out[-1])
    return out


def lr_ratio(rows: int, cols: int, adjust_lr_fn: str | None) -> float:
    """torch.optim.Muon's learning-rate adjustment for a ``rows x cols`` matrix:
    ``sqrt(max(1, rows / cols))`` (None / ``"original"``, Keller Jordan's) or
    ``0.2 sqrt(max(rows, cols))`` (``"match_rms_adamw"``, Moonlight's: the update
    RMS of AdamW, so AdamW's learning rate and weight decay carry over)."""
    if rows == 0 or cols == 0:
        return 1.0
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def takes_muon(p: Tensor, group: dict) -> bool:
    """Whether ``p`` takes the Muon rule in ``group`` (else the AdamW rule)."""
    return bool(group["use_muon"]) and p.dim() >= 2 and p.numel() > 0


NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


class OrthogonalizedMomentum(Transform):
    """Muon's rule for matrices (``use_muon`` groups)::

        b <- lerp(b, g, 1 - mu)                    (b += (1 - mu) (g - b))
        d <- lerp(g, b, mu) if nesterov else b
        u <- ratio(rows, cols) * NS(d)             per matrix of matrix_shape(d)

    State: ``momentum_buffer`` (as torch.optim.Muon). Inactive (passes ``u``
    through) in AdamW calls."""

    def init(self, p, group):
        return {"momentum_buffer": p.new_zeros(p.shape)} if takes_muon(p, group) else {}

    def scalars(self, group, step, sstate):
        flat = tuple(float(x) for abc in schedule(group["ns_coefficients"], group["ns_steps"]) for x in abc)
        return {"ns_abc": flat}

    def __call__(self, u, ctx: Context):
        st, hp = ctx.static, ctx.hp
        if not st["use_muon"]:
            return u
        g = dense(u)
        buf = ctx.state["momentum_buffer"]
        mu = hp["momentum"]
        buf.lerp_(g, 1 - mu)
        d = g.clone().lerp_(buf, mu) if st["nesterov"] else buf
        abc = hp["ns_abc"]
        coefficients = [abc[3 * i:3 * i + 3] for i in range(st["ns_steps"])]
        dtype = NS_DTYPES[st["ns_dtype"]]
        out = []
        for p, x in zip(ctx.params, d):
            shape = matrix_shape(x.shape, st["reshape"], st["split"])
            o = newton_schulz(x.reshape(shape), coefficients, hp["eps"], dtype).reshape(x.shape)
            ratio = lr_ratio(shape[-2], shape[-1], st["adjust_lr_fn"])
            if ratio != 1.0:  # scaled in the wider of the two dtypes, rounded once to p's
                o = o.to(torch.promote_types(o.dtype, p.dtype)) * ratio
            out.append(o.to(p.dtype))
        return TensorList(out)


class AuxAdamW(Transform):
    """The AdamW rule for parameters Muon does not take, as torch.optim.AdamW
    (decoupled decay is the chain's ``WeightDecay``)::

        m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2
        u <- (m / bc1) / (sqrt(v) / sqrt(bc2) + adamw_eps)      betas = adamw_betas

    State: ``exp_avg``, ``exp_avg_sq`` (as torch.optim.AdamW). Inactive in Muon calls."""

    nonnegative = ("exp_avg_sq",)

    def init(self, p, group):
        if takes_muon(p, group):
            return {}
        return {"exp_avg": p.new_zeros(p.shape), "exp_avg_sq": p.new_zeros(p.shape)}

    def scalars(self, group, step, sstate):
        b1, b2 = group["adamw_betas"]
        return {"adamw_bc1": 1 - b1 ** step, "adamw_bc2_sqrt": math.sqrt(1 - b2 ** step)}

    def __call__(self, u, ctx: Context):
        if ctx.static["use_muon"]:
            return u
        hp = ctx.hp
        g = dense(u)
        b1, b2 = hp["adamw_betas"]
        m, v = ctx.state["exp_avg"], ctx.state["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, 1 - b2)
        den = v.sqrt().div_(hp["adamw_bc2_sqrt"]).add_(hp["adamw_eps"])
        return Ratio(m, den, 1 / hp["adamw_bc1"])
