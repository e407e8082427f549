"""Kronecker-factored preconditioning: how a tensor is cut into blocks with one
factor matrix per block dimension, and matrix inverse roots of those factors.

A parameter's factors live in one flat state tensor: the factor of dimension
``k`` of block ``b`` is the ``d_k x d_k`` matrix at a static offset computed from
the parameter's shape alone (:func:`block_plan`). Every parameter of a group so
has the same state keys whatever its number of blocks and dims, and the state
dict holds plain tensors.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Block:
    """One block of a (merged) tensor: its index ranges, and per dim the
    ``(offset, size)`` of its factor matrix in the flat factor tensor."""

    slices: tuple[tuple[int, int], ...]
    factors: tuple[tuple[int, int], ...]

    def view(self, x: Tensor) -> Tensor:
        """This block of ``x`` (a view; ``x`` has the merged shape)."""
        for dim, (start, stop) in enumerate(self.slices):
            x = x.narrow(dim, start, stop - start)
        return x

    def factor(self, flat: Tensor, k: int) -> Tensor:
        offset, size = self.factors[k]
        return flat[offset:offset + size * size].view(size, size)


@dataclass(frozen=True)
class BlockPlan:
    shape: tuple[int, ...]       # the parameter's shape
    merged: tuple[int, ...]      # the shape the blocks cut (dims merged)
    blocks: tuple[Block, ...]    # empty: the tensor is not preconditioned
    numel: int                   # length of the flat factor tensor

    @property
    def preconditioned(self) -> bool:
        return bool(self.blocks)


def merge_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Merge neighbouring dims while their product stays within ``max_dim`` (dims
    of size 1 always merge): a conv filter ``(64, 3, 3, 3)`` is preconditioned as
    ``(64, 27)``, a ``(1, n)`` matrix as a vector."""
    if not shape:
        return shape
    out = [shape[0]]
    for d in shape[1:]:
        if out[-1] == 1 or d == 1 or out[-1] * d <= max_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def block_plan(shape: tuple[int, ...], max_dim: int, merge: bool, precondition_1d: bool) -> BlockPlan:
    """Blocks of a tensor of ``shape``: dims merged (``merge``), then every dim cut
    into chunks of at most ``max_dim``; each block gets one factor per dim.

    Not preconditioned (no blocks): empty tensors, scalars, and vectors unless
    ``precondition_1d``. A tensor of two or more dims merged into one (a small
    matrix, ``(1, n)``) is preconditioned by one full factor of its flattening."""
    shape = tuple(int(d) for d in shape)
    merged = merge_dims(shape, max_dim) if merge else shape
    if math.prod(shape) == 0 or len(shape) == 0 or (len(shape) == 1 and not precondition_1d):
        return BlockPlan(shape, merged, (), 0)
    ranges = [[(s, min(s + max_dim, d)) for s in range(0, d, max_dim)] for d in merged]
    blocks, offset = [], 0
    for combo in _product(ranges):
        factors = []
        for start, stop in combo:
            factors.append((offset, stop - start))
            offset += (stop - start) ** 2
        blocks.append(Block(tuple(combo), tuple(factors)))
    return BlockPlan(shape, merged, tuple(blocks), offset)


def _product(ranges):
    out = [[]]
    for options in ranges:
        out = [prefix + [r] for prefix in out for r in options]
    return out


def contract(x: Tensor, matrices) -> Tensor:
    """``x`` multiplied along each of its dims by the transpose of the matching
    matrix (``None``: that dim is left alone): for a matrix ``x``,
    ``M_0^T x M_1``. Contracting dim 0 and appending the result as the last dim,
    once per dim, brings the dims back to their order."""
    for m in matrices:
        x = x.movedim(0, -1) if m is None else torch.tensordot(x, m, dims=([0], [0]))
    return x


def outer(x: Tensor, k: int) -> Tensor:
    """``x_(k) x_(k)^T``: the Gram matrix of dim ``k`` (all other dims summed)."""
    others = [d for d in range(x.dim()) if d != k]
    return torch.tensordot(x, x, dims=(others, others))


# --------------------------------------------------------------------------- inverse roots
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def inverse_root(a: Tensor, exponent, eps, dtype: str, previous: Tensor) -> Tensor:
    """``(A + eps I)^(-exponent)`` of a symmetric PSD matrix by eigendecomposition in
    ``dtype`` (``"fp32"``/``"fp64"``; float64 factors always in float64), eigenvalues first shifted up to be non-negative.
    ``previous`` is returned instead when the decomposition fails or is not finite.

    Inside a compiled step (``exponent``/``eps`` are 0-d tensors) this is one opaque
    operator (``torch.ops.optimkit.inverse_root``): a library call either way."""
    if isinstance(exponent, Tensor) or isinstance(eps, Tensor):
        like = exponent if isinstance(exponent, Tensor) else eps
        exponent = exponent if isinstance(exponent, Tensor) else like.new_tensor(exponent)
        eps = eps if isinstance(eps, Tensor) else like.new_tensor(eps)
        return torch.ops.optimkit.inverse_root(a, exponent, eps, dtype, previous)
    return _inverse_root(a, exponent, eps, dtype, previous)


def _inverse_root(a: Tensor, exponent, eps, dtype: str, previous: Tensor) -> Tensor:
    work = a.to(torch.promote_types(DTYPES[dtype], a.dtype))  # float64 factors stay float64
    try:
        eig, vec = torch.linalg.eigh(work)
    except torch.linalg.LinAlgError:
        return previous.clone()
    eig = eig - torch.clamp_max(eig.min(), 0.0) + eps
    root = (vec * eig.pow(-exponent)) @ vec.mT
    if not bool(torch.isfinite(root).all()):  # keep the last good root
        return previous.clone()
    return root.to(previous.dtype)


@torch.library.custom_op("optimkit::inverse_root", mutates_args=())
def _inverse_root_op(a: Tensor, exponent: Tensor, eps: Tensor, dtype: str, previous: Tensor) -> Tensor:
    return _inverse_root(a, exponent.item(), eps.item(), dtype, previous).contiguous()


@_inverse_root_op.register_fake
def _(a, exponent, eps, dtype, previous):
    return torch.empty_like(previous)
