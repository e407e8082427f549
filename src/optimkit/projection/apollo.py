"""APOLLO and APOLLO-Mini: structured (channel- or tensor-wise) gradient scaling
estimated by the rule in a random low-rank space."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.validation import nonneg, positive
from .galore import ProjectionConfig, basis_dtype, choice, positive_int, refresh_due, side_of

_INT64_MAX = torch.iinfo(torch.int64).max


def next_seed(seed: int, advance: int = 15) -> int:
    """The seed after ``seed``: the ``advance``-th int64 drawn from a CPU generator
    seeded with it (the APOLLO reference's rule, so sequences agree with it)."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, _INT64_MAX, (advance,), generator=gen)[-1])


def gaussian_projector(shape, seed: int, rank: int, device, dtype) -> Tensor:
    """N(0, 1/rank) entries from a generator seeded with ``seed`` on ``device``
    (drawn in fp32, then cast to ``dtype``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    proj = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(rank)
    return proj.to(dtype)


class APOLLO(ProjectionConfig):
    r"""APOLLO: the rule runs on a random projection of the gradient; its update
    only sets a channel-wise (or tensor-wise) scaling of the raw gradient.

    For a matrix parameter with gradient ``G`` (m x n), every ``interval`` steps
    a Gaussian projection with N(0, 1/rank) entries is regenerated from a seeded
    generator (the seed advances at each refresh; the matrix is never stored,
    only its seed)::

        m >= n:  R = G P^T, P: rank x n  (R: m x rank; channels are the m rows)
        m <  n:  R = P^T G, P: m x rank  (R: rank x n; channels are the n columns)
        U = rule(R)                                   (e.g. AdamW: m_hat / (sqrt(v_hat) + eps))
        s_j = ||U_j|| / (||R_j|| + 1e-8)   per channel j ("channel"),  or  s = ||U|| / (||R|| + 1e-8) ("tensor")
        G~ = G * s
        norm-growth limiter: if ||G~_t|| > limiter * ||G~_{t-1}||, G~_t <- G~_t * limiter ||G~_{t-1}|| / ||G~_t||
        update = sqrt(scale) * G~   (scale_front=True: the sqrt(scale) factor is applied before the limiter)

    and the facade applies ``theta <- theta - lr * update``.

    Args:
        rank: dimension of the random subspace (not clipped to the matrix size,
            as the reference: a rank above min(m, n) costs more state than AdamW).
        interval: steps between projection refreshes.
        scale: the update is multiplied by ``sqrt(scale)``.
        mode: ``"channel"`` or ``"tensor"`` scaling.
        scale_front: apply ``sqrt(scale)`` before the norm-growth limiter.
        seed: parameter ``i`` (counted from 1 in the order their state is
            created) starts from seed ``seed + i``.
        limiter: the norm-growth limit ``gamma`` (1.01), or ``None`` to disable.

    State per projected m x n matrix (m >= n): the rule's state of shape
    m x rank, plus ``proj:seed`` (int64) and ``proj:norm`` (the last update's
    norm for the limiter): AdamW costs ``8 rank / n`` bytes per parameter.
    The projection matrix is drawn and applied in fp32 (fp64 for fp64
    parameters) whatever the parameter dtype; with bf16/fp16 parameters the
    rule sees the projected gradient in the parameter dtype, and the scaling,
    the limiter and the full-space update are computed in fp32 (the update is
    rounded once into the parameter).

    Paper: Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance"
    (MLSys 2025). Checked against ``apollo_torch.APOLLOAdamW`` (pip
    ``apollo-torch``): same seeds and projections. Pitfall: the reference
    scales with Adam's *uncorrected* ``m / (sqrt(v) + eps)`` and applies the bias
    correction ``sqrt(bc2) / bc1`` in the step size after the limiter; here the
    scaling uses the rule's actual update (bias-corrected, as the paper's
    algorithm), so with the limiter engaged the first ~1/(1 - beta2) steps
    differ from the reference; without the limiter they agree.
    """

    def __init__(self, rank: int = 256, interval: int = 200, scale: float = 1.0, mode: str = "channel",
                 scale_front: bool = False, seed: int = 0, limiter: float | None = 1.01):
        self.rank = positive_int("rank", rank)
        self.interval = positive_int("interval", interval)
        self.scale = nonneg("scale", scale)
        self.mode = choice("mode", mode, ("channel", "tensor"))
        if not isinstance(scale_front, bool):
            raise TypeError(f"scale_front must be a bool, got {type(scale_front).__name__} {scale_front!r}")
        self.scale_front = scale_front
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Invalid seed: {seed!r} (must be an int >= 0)")
        self.seed = seed
        self.limiter = None if limiter is None else positive("limiter", limiter)
        self._count = 0

    def init(self, p: Tensor) -> dict[str, Tensor]:
        self._count += 1
        return {"seed": torch.tensor(self.seed + self._count, dtype=torch.int64),
                "norm": torch.full((), math.inf, dtype=torch.float32, device=p.device)}

    def subspace_shape(self, p: Tensor) -> tuple[int, ...]:
        m, n = p.shape
        return (m, self.rank) if side_of(p.shape, "std") == "right" else (self.rank, n)

    def project(self, g: Tensor, pstate: dict[str, Tensor], step: int) -> Tensor:
        if pstate["seed"].device.type != "cpu":  # load_state_dict moves state to the param's device
            pstate["seed"] = pstate["seed"].cpu()
        if step > 1 and refresh_due(step, self.interval):
            pstate["seed"] = torch.tensor(next_seed(int(pstate["seed"])), dtype=torch.int64)
        seed = int(pstate["seed"])
        m, n = g.shape
        dtype = basis_dtype(g.dtype)
        if side_of(g.shape, "std") == "right":
            r = g.to(dtype) @ gaussian_projector((self.rank, n), seed, self.rank, g.device, dtype).T
        else:
            r = gaussian_projector((m, self.rank), seed, self.rank, g.device, dtype).T @ g.to(dtype)
        return r.to(g.dtype)

    def back(self, u: Tensor, r: Tensor, g: Tensor, pstate: dict[str, Tensor], step: int) -> Tensor:
        dtype = basis_dtype(g.dtype)
        u, r, g = u.to(dtype), r.to(dtype), g.to(dtype)
        if self.mode == "channel":
            dim = 1 if side_of(g.shape, "std") == "right" else 0
            s = (torch.linalg.vector_norm(u, dim=dim, keepdim=True)
                 / (torch.linalg.vector_norm(r, dim=dim, keepdim=True) + 1e-8))
        else:
            s = torch.linalg.vector_norm(u) / (torch.linalg.vector_norm(r) + 1e-8)
        out = g * s
        root = math.sqrt(self.scale)
        if self.scale_front:
            out = out * root
        if self.limiter is not None:
            gamma = self.limiter
            norm = torch.linalg.vector_norm(out)
            ratio = norm / (pstate["norm"] + 1e-8)
            shrink = torch.where(ratio > gamma, ratio / gamma, torch.ones_like(ratio))
            out = out / shrink.to(out.dtype)
            pstate["norm"].copy_(norm / shrink)
        if not self.scale_front:
            out = out * root
        return out


class APOLLOMini(APOLLO):
    r"""APOLLO-Mini: APOLLO with a rank-1 random projection and one tensor-wise
    scale (``rank=1, mode="tensor", scale=128``): the rule's state is a single
    row or column per matrix, so optimizer memory is SGD-like.

    Same update, arguments and reference as :class:`APOLLO`.
    """

    def __init__(self, rank: int = 1, interval: int = 200, scale: float = 128.0, mode: str = "tensor",
                 scale_front: bool = False, seed: int = 0, limiter: float | None = 1.01):
        super().__init__(rank=rank, interval=interval, scale=scale, mode=mode, scale_front=scale_front,
                         seed=seed, limiter=limiter)
