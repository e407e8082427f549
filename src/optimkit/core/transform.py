"""The transform protocol: one small step of an update rule over a param group.

A transform sees the whole group at once as :class:`TensorList` objects and
turns the incoming update ``u`` (initially the gradient) into a new one. It
may own per-parameter state tensors (created by :meth:`Transform.init`) and
per-step scalars computed in Python (:meth:`Transform.scalars`), such as bias
corrections. Keeping scalar math in Python and tensor math in ``__call__`` is
what lets the same code run eagerly with ``torch._foreach_*`` kernels and
compiled with hyperparameters passed as tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .tensorlist import TensorList


@dataclass
class Context:
    """What a transform can see during one group step.

    Attributes:
        params: the parameters (real views of complex ones).
        grads: the gradients (negated when ``maximize``).
        state: per-parameter state tensors by name, each a TensorList aligned with params.
        hp: hyperparameters and per-step scalars. Floats are Python numbers in
            eager mode and 0-d tensors in compiled mode; use them only in
            arithmetic.
        static: structural settings (bools, strings, ints; for float
            hyperparameters, whether they are non-zero). Branch on these.
        extra: values one transform leaves for a later one in the same step
            (e.g. AdamP's per-tensor weight-decay factor).

    The step number is not here on purpose: a Python int would be baked into a
    compiled kernel. Step-dependent values come from ``Transform.scalars``.
    """

    params: TensorList
    grads: TensorList
    state: dict[str, TensorList]
    hp: dict[str, Any]
    static: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class Transform:
    """Base class of update-rule building blocks.

    Class attributes:
        scalar_state: {name: initial value} of per-step scalars kept in the state
            (as Python floats, like the step count).
        nonnegative: names of state tensors that are never negative (second
            moments); low-bit precisions store them with an unsigned map.
        full_precision: names of state tensors kept as created (e.g. an
            orthonormal basis), whatever ``state_precision`` asks for.
    """

    scalar_state: dict[str, float] = {}
    nonnegative: tuple[str, ...] = ()
    full_precision: tuple[str, ...] = ()

    def init(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        """Per-parameter state tensors for ``p`` (called once, on first use)."""
        return {}

    def scalars(self, group: dict, step: int, sstate: dict[str, float]) -> dict[str, Any]:
        """Per-step scalars computed in Python for step number ``step``.

        Return floats (passed as tensors when compiled) and bools (static:
        changing one selects another compiled kernel). ``sstate`` holds
        scalar state that persists across steps (e.g. NAdam's momentum
        product); mutate it in place.
        """
        return {}

    def __call__(self, u, ctx: Context):
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__
