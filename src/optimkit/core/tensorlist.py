"""Lists of tensors with multi-tensor arithmetic.

A transform writes its rule once, in terms of :class:`TensorList` operations.
When every scalar operand is a Python number, each operation is one
``torch._foreach_*`` call over the whole list (the eager path). When a scalar
operand is a 0-d tensor (the compiled path passes hyperparameters as tensors so
that a new learning rate or step count does not trigger a recompilation), the
operation becomes one ordinary tensor op per element, which ``torch.compile``
traces and fuses into one kernel per tensor.

A scalar operand may also be a per-tensor list of scalars (numbers or 0-d
tensors), e.g. the result of :meth:`TensorList.norm`.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Union

import torch
from torch import Tensor

Scalar = Union[float, int, Tensor]


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fast(x) -> bool:
    """Can ``x`` be passed to a ``torch._foreach_*`` op as the second operand?"""
    if isinstance(x, TensorList):
        return True
    if isinstance(x, (list, tuple)):
        return all(_is_num(o) for o in x)
    return _is_num(x)


def _raw(x):
    return x.ts if isinstance(x, TensorList) else x


def _at(x, i):
    if isinstance(x, TensorList):
        return x.ts[i]
    if isinstance(x, (list, tuple)):
        return x[i]
    return x


class TensorList:
    """A list of tensors supporting elementwise arithmetic on all of them at once."""

    __slots__ = ("ts",)

    def __init__(self, tensors: Iterable[Tensor] = ()):
        self.ts = tensors if isinstance(tensors, list) else list(tensors)

    # ------------------------------------------------------------ container
    def __len__(self) -> int:
        return len(self.ts)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.ts)

    def __getitem__(self, i):
        return TensorList(self.ts[i]) if isinstance(i, slice) else self.ts[i]

    def __repr__(self) -> str:
        return f"TensorList({self.ts!r})"

    # ------------------------------------------------------------ helpers
    def map(self, fn, *others) -> "TensorList":
        """``[fn(t, o1[i], o2[i], ...)]`` with scalars broadcast."""
        return TensorList([fn(t, *[_at(o, i) for o in others]) for i, t in enumerate(self.ts)])

    def each(self, fn, *others) -> "TensorList":
        """Call ``fn(t, o1[i], ...)`` for its side effect on each tensor; return self."""
        for i, t in enumerate(self.ts):
            fn(t, *[_at(o, i) for o in others])
        return self

    def _binary(self, other, op: str, inplace: bool, method: str | None = None):
        method = method or op
        if _fast(other):
            if inplace:
                getattr(torch, f"_foreach_{op}_")(self.ts, _raw(other))
                return self
            return TensorList(getattr(torch, f"_foreach_{op}")(self.ts, _raw(other)))
        if inplace:
            return self.each(lambda t, o: getattr(t, method + "_")(o), other)
        return self.map(lambda t, o: getattr(t, method)(o), other)

    # ------------------------------------------------------------ creation
    def zeros_like(self) -> "TensorList":
        return TensorList([torch.zeros_like(t) for t in self.ts])

    def clone(self) -> "TensorList":
        return TensorList([t.clone() for t in self.ts])

    def copy_(self, other: "TensorList") -> "TensorList":
        torch._foreach_copy_(self.ts, other.ts)
        return self

    def zero_(self) -> "TensorList":
        torch._foreach_zero_(self.ts)
        return self

    def fill_(self, value: Scalar) -> "TensorList":
        return self.each(lambda t, v: t.fill_(v), value)

    # ------------------------------------------------------------ binary
    def add(self, other, alpha: Scalar = 1) -> "TensorList":
        if not (_is_num(alpha) and alpha == 1):
            if isinstance(other, TensorList) and _is_num(alpha):
                return TensorList(torch._foreach_add(self.ts, other.ts, alpha=alpha))
            other = _scaled(other, alpha)
        return self._binary(other, "add", False)

    def add_(self, other, alpha: Scalar = 1) -> "TensorList":
        if not (_is_num(alpha) and alpha == 1):
            if isinstance(other, TensorList) and _is_num(alpha):
                torch._foreach_add_(self.ts, other.ts, alpha=alpha)
                return self
            other = _scaled(other, alpha)
        return self._binary(other, "add", True)

    def sub(self, other, alpha: Scalar = 1) -> "TensorList":
        return self.add(other, alpha=-alpha)

    def sub_(self, other, alpha: Scalar = 1) -> "TensorList":
        return self.add_(other, alpha=-alpha)

    def mul(self, other) -> "TensorList":
        return self._binary(other, "mul", False)

    def mul_(self, other) -> "TensorList":
        return self._binary(other, "mul", True)

    def div(self, other) -> "TensorList":
        return self._binary(other, "div", False)

    def div_(self, other) -> "TensorList":
        return self._binary(other, "div", True)

    def maximum(self, other) -> "TensorList":
        return self._binary(other, "maximum", False,
                            "maximum" if isinstance(other, TensorList) else "clamp_min")

    def maximum_(self, other) -> "TensorList":
        return self._binary(other, "maximum", True,
                            "maximum" if isinstance(other, TensorList) else "clamp_min")

    def minimum(self, other) -> "TensorList":
        return self._binary(other, "minimum", False,
                            "minimum" if isinstance(other, TensorList) else "clamp_max")

    def minimum_(self, other) -> "TensorList":
        return self._binary(other, "minimum", True,
                            "minimum" if isinstance(other, TensorList) else "clamp_max")

    def clamp(self, lo: Scalar, hi: Scalar) -> "TensorList":
        return self.maximum(lo).minimum_(hi)

    def pow(self, exponent) -> "TensorList":
        return self._binary(exponent, "pow", False)

    def lerp_(self, end: "TensorList", weight: Scalar) -> "TensorList":
        """self <- self + weight * (end - self)."""
        if _is_num(weight):
            torch._foreach_lerp_(self.ts, end.ts, weight)
            return self
        return self.each(lambda t, e, w: t.lerp_(e, w), end, weight)

    def addcmul_(self, a: "TensorList", b: "TensorList", value: Scalar = 1) -> "TensorList":
        """self <- self + value * a * b."""
        if _fast(value) and not isinstance(value, TensorList):
            torch._foreach_addcmul_(self.ts, a.ts, b.ts, value)
            return self
        return self.each(lambda t, x, y, v: t.add_(x * y * v), a, b, value)

    def addcdiv_(self, a: "TensorList", b: "TensorList", value: Scalar = 1) -> "TensorList":
        """self <- self + value * a / b."""
        if _fast(value) and not isinstance(value, TensorList):
            torch._foreach_addcdiv_(self.ts, a.ts, b.ts, value)
            return self
        return self.each(lambda t, x, y, v: t.add_(x / y * v), a, b, value)

    # ------------------------------------------------------------ unary
    def _unary(self, op: str, inplace: bool) -> "TensorList":
        if inplace:
            getattr(torch, f"_foreach_{op}_")(self.ts)
            return self
        return TensorList(getattr(torch, f"_foreach_{op}")(self.ts))

    def sqrt(self) -> "TensorList":
        return self._unary("sqrt", False)

    def sqrt_(self) -> "TensorList":
        return self._unary("sqrt", True)

    def abs(self) -> "TensorList":
        return self._unary("abs", False)

    def abs_(self) -> "TensorList":
        return self._unary("abs", True)

    def neg(self) -> "TensorList":
        return self._unary("neg", False)

    def neg_(self) -> "TensorList":
        return self._unary("neg", True)

    def sign(self) -> "TensorList":
        return self._unary("sign", False)

    def sign_(self) -> "TensorList":
        return self._unary("sign", True)

    def sigmoid(self) -> "TensorList":
        return self._unary("sigmoid", False)

    def square(self) -> "TensorList":
        return TensorList(torch._foreach_mul(self.ts, self.ts))

    # ------------------------------------------------------------ elementwise helpers
    def where(self, cond: "TensorList", other) -> "TensorList":
        """Elementwise ``cond ? self : other``."""
        return self.map(lambda t, c, o: torch.where(c, t, o), cond, other)

    def to(self, dtype: torch.dtype) -> "TensorList":
        return TensorList([t.to(dtype) for t in self.ts])

    # ------------------------------------------------------------ reductions (per tensor)
    def norm(self, ord: float = 2) -> list[Tensor]:
        """Norm of each tensor, as a list of 0-d tensors."""
        return list(torch._foreach_norm(self.ts, ord))

    def sum(self) -> list[Tensor]:
        return [t.sum() for t in self.ts]

    def dot(self, other: "TensorList") -> list[Tensor]:
        return [(a * b).sum() for a, b in zip(self.ts, other.ts)]

    # ------------------------------------------------------------ operators
    def __add__(self, other):
        return self.add(other)

    def __sub__(self, other):
        return self.sub(other)

    def __mul__(self, other):
        return self.mul(other)

    def __truediv__(self, other):
        return self.div(other)

    def __neg__(self):
        return self.neg()

    __radd__ = __add__
    __rmul__ = __mul__


def _scaled(other, alpha):
    """``other * alpha`` for any operand kind."""
    if isinstance(other, TensorList):
        return other.mul(alpha)
    if isinstance(other, (list, tuple)):
        return [o * _at(alpha, i) for i, o in enumerate(other)]
    return other * alpha


class Ratio:
    """A lazily divided update ``scale * num / den``.

    Returning a ``Ratio`` from the last transform lets the apply stage fuse the
    division with the parameter update (one ``addcdiv`` instead of a division
    followed by an add), which is what keeps the eager path at the speed of
    ``torch.optim``'s foreach kernels. A transform that needs the update as a
    tensor list calls :func:`dense`.
    """

    __slots__ = ("num", "den", "scale")

    def __init__(self, num: TensorList, den: TensorList, scale: Scalar = 1.0):
        self.num, self.den, self.scale = num, den, scale

    def dense(self) -> TensorList:
        out = self.num.div(self.den)
        if not (_is_num(self.scale) and self.scale == 1):
            out.mul_(self.scale)
        return out


def dense(u) -> TensorList:
    """Materialize an update that may be a lazy :class:`Ratio`."""
    return u.dense() if isinstance(u, Ratio) else u
