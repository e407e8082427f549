"""The subspace axis: run any update rule on projected gradients.

A :class:`Projection` is a small config object given as ``projection=`` to any
optimizer (per param group). For the parameters it ``applies`` to (matrices),
the facade

1. projects the gradient, ``r = project(g)`` (refreshing the projector when due,
   and restarting the rule's state then if the projection asks for it),
2. runs the optimizer's rule on ``r`` with state shaped like ``r``,
3. maps the rule's update back to the parameter's shape,
   ``U = back(u, r, g)``, and applies ``p <- p - lr * U``.

Other parameters of the group run in full space. Projector state (matrices,
seeds, norms) lives in the parameter's optimizer state under ``"proj:<name>"``
keys, so it is checkpointed and resumed with everything else. Projection runs
eagerly around the (possibly compiled) rule: SVDs and QRs do not belong in a
fused elementwise kernel.

Precision: projector bases are kept in fp32, or in the parameter dtype when it
is wider (fp64); see :func:`optimkit.projection.galore.basis_dtype`. For
bf16/fp16 parameters ``project`` computes in fp32 and returns the projected
gradient in the parameter dtype (the rule sees what a full-space gradient
would be); ``back`` computes in fp32 and returns an fp32 update, which the
facade applies to the parameter with a single rounding.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

PREFIX = "proj:"


class Projection:
    """Base class: subclasses implement ``init``, ``subspace_shape``, ``project`` and ``back``.

    A projection whose ``resets_state`` is true has the facade restart the rule
    (its state as first created, step count 0) at every step for which
    ``refreshes(step)`` is true, except the first: the rule's state then never
    mixes two subspaces.
    """

    resets_state: bool = False

    def refreshes(self, step: int) -> bool:
        """Whether the projector is recomputed at ``step`` (counted from 1)."""
        return False

    def applies(self, p: Tensor) -> bool:
        """Whether ``p`` is projected (default: 2-D matrices)."""
        return p.ndim == 2

    def init(self, p: Tensor) -> dict[str, Tensor]:
        """Projector state for ``p`` (stored under ``proj:<key>``)."""
        return {}

    def subspace_shape(self, p: Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def project(self, g: Tensor, pstate: dict[str, Tensor], step: int) -> Tensor:
        """Gradient -> subspace (refresh the projector in ``pstate`` when due)."""
        raise NotImplementedError

    def back(self, u: Tensor, r: Tensor, g: Tensor, pstate: dict[str, Tensor], step: int) -> Tensor:
        """Subspace update ``u`` (from projected gradient ``r``; full gradient ``g``) ->
        full-space update direction."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def projector_state(state: dict) -> dict[str, Tensor]:
    """View of the ``proj:`` entries of a parameter state, without the prefix."""
    return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}


def save_projector_state(state: dict, pstate: dict[str, Tensor]) -> None:
    for k, v in pstate.items():
        state[PREFIX + k] = v


def validate_projection(name: str, value: Any):
    if value is None or isinstance(value, Projection):
        return value
    raise TypeError(f"{name} must be None or a projection (e.g. optimkit.GaLore(rank=128)), "
                    f"got {type(value).__name__} {value!r}")
