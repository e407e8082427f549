"""Registry of optimizers by name: ``create``, ``available``, ``info``."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .optimizer import Optimizer

_REGISTRY: dict[str, type] = {}


@dataclass(frozen=True)
class OptimizerInfo:
    """What ``optimkit.info(name)`` returns: an optimizer's registry name, class, family,
    paper, reference implementation, fp32 state bytes per parameter and defaults."""

    name: str
    cls: type
    family: str
    paper: str
    reference: str
    state_bytes: float
    defaults: dict[str, Any]
    #: state tensors kept as created (fp32) whatever ``state_precision`` asks for
    #: (preconditioner factors, bases)
    full_precision: tuple[str, ...] = ()

    def __str__(self) -> str:
        kept = (f"; kept in full precision whatever state_precision: {', '.join(self.full_precision)}"
                if self.full_precision else "")
        return (f"{self.name} ({self.cls.__name__}): family={self.family}; paper: {self.paper}; "
                f"reference: {self.reference}; fp32 state bytes/param: {self.state_bytes}{kept}")


def register(cls: type) -> type:
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"optimizer name {name!r} registered twice "
                         f"({_REGISTRY[name].__qualname__} and {cls.__qualname__})")
    _REGISTRY[name] = cls
    return cls


def _lookup(name: str) -> type:
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise KeyError(f"unknown optimizer {name!r}{hint} (see optimkit.available())")


def available() -> list[str]:
    """Sorted names of all registered optimizers."""
    return sorted(_REGISTRY)


def create(name: str, params: Any, **hyperparameters: Any) -> Optimizer:
    """Build the optimizer registered under ``name``."""
    return _lookup(name)(params, **hyperparameters)


def info(name: str) -> OptimizerInfo:
    """Family, paper, reference implementation and fp32 state bytes/param of ``name``."""
    cls = _lookup(name)
    return OptimizerInfo(name=cls.name, cls=cls, family=cls.family, paper=cls.paper,
                         reference=cls.reference, state_bytes=cls.state_bytes,
                         defaults=dict(cls.defaults), full_precision=_full_precision(cls))


def _full_precision(cls: type) -> tuple[str, ...]:
    """Names the optimizer's transforms keep in full precision (``Transform.full_precision``);
    ``build`` needs no constructor state, so a bare instance gives the chain."""
    return tuple(name for t in cls.build(cls.__new__(cls)) for name in getattr(t, "full_precision", ()))
