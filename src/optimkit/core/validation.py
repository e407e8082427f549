"""Hyperparameter validation: every check names the argument and the value."""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch


def _real(name: str, value: Any, allow_inf: bool = False) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have one element, "
                             f"got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"Invalid {name}: {value} (NaN)")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    return value


def nonneg(name: str, value: Any) -> float:
    v = _real(name, value)
    if v < 0:
        raise ValueError(f"Invalid {name}: {v} (must be >= 0)")
    return v


def positive(name: str, value: Any) -> float:
    v = _real(name, value)
    if not v > 0:
        raise ValueError(f"Invalid {name}: {v} (must be > 0)")
    return v


def positive_or_inf(name: str, value: Any) -> float:
    """A number > 0, where ``inf`` means unbounded (e.g. a cap that is off)."""
    v = _real(name, value, allow_inf=True)
    if not v > 0:
        raise ValueError(f"Invalid {name}: {v} (must be > 0; inf: unbounded)")
    return v


def eps_positive(name: str, value: Any) -> float:
    """A denominator's safeguard: > 0, since with 0 a gradient entry that is exactly
    zero (and so its moments) gives 0/0 = NaN."""
    v = _real(name, value)
    if not v > 0:
        raise ValueError(f"Invalid {name}: {v} (must be > 0: with {name}=0 a gradient entry that is "
                         "exactly zero gives 0/0)")
    return v


def real(name: str, value: Any) -> float:
    return _real(name, value)


def unit(name: str, value: Any) -> float:
    """A number in [0, 1)."""
    v = _real(name, value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"Invalid {name}: {v} (must be in [0, 1))")
    return v


def closed_unit(name: str, value: Any) -> float:
    """A number in [0, 1]."""
    v = _real(name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"Invalid {name}: {v} (must be in [0, 1])")
    return v


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"Invalid {name}: {value} (must be >= {minimum})")
    return int(value)


def nonneg_int(name: str, value: Any) -> int:
    return _integer(name, value, 0)


def positive_int(name: str, value: Any) -> int:
    return _integer(name, value, 1)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def betas(n: int | None = None, check: Callable = unit) -> Callable:
    """A tuple of ``n`` coefficients each in [0, 1)."""

    def validate(name: str, value: Any) -> tuple:
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{name} must be a tuple of floats, got {type(value).__name__} {value!r}")
        if n is not None and len(value) != n:
            raise ValueError(f"Invalid {name}: {tuple(value)!r} (expected {n} values)")
        return tuple(check(f"{name}[{i}]", b) for i, b in enumerate(value))

    return validate


def choice(*options) -> Callable:
    def validate(name: str, value: Any):
        if value not in options:
            raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, options))})")
        return value

    return validate


def optional(check: Callable) -> Callable:
    def validate(name: str, value: Any):
        return None if value is None else check(name, value)

    return validate


def cautious_flag(name: str, value: Any):
    if value is False or value is None:
        return False
    if value is True:
        return "kozistr"
    if value in ("kozistr", "timm"):
        return value
    raise ValueError(f"Invalid {name}: {value!r} (expected a bool, 'kozistr' or 'timm')")


#: Rules by hyperparameter name, shared by all optimizers (a class can override).
RULES: dict[str, Callable] = {
    "lr": nonneg,
    "eps": eps_positive,
    "weight_decay": nonneg,
    "betas": betas(),
    "momentum": nonneg,
    "dampening": real,
    "alpha": nonneg,
    "rho": closed_unit,
    "lr_decay": nonneg,
    "initial_accumulator_value": nonneg,
    "momentum_decay": nonneg,
    "maximize": boolean,
    "compile": boolean,
    "cautious": cautious_flag,
}


def _by_type(default: Any) -> Callable:
    if isinstance(default, bool):
        return boolean
    if isinstance(default, numbers.Real):
        return real
    if isinstance(default, tuple):
        return betas(len(default), check=real)
    return lambda name, value: value


#: hyperparameters that may be given as one-element tensors and stay tensors in the
#: param group (as torch.optim keeps them: schedulers write or ``fill_`` them in place)
TENSOR_KEYS = ("lr", "betas")


def _keep_tensors(given: Any, checked: Any) -> Any:
    """The validated value, with the tensors of ``given`` kept in place of their numbers."""
    if isinstance(given, torch.Tensor) and isinstance(checked, float):
        return given
    if (isinstance(given, (tuple, list)) and isinstance(checked, tuple) and len(given) == len(checked)
            and any(isinstance(x, torch.Tensor) for x in given)):
        return tuple(g if isinstance(g, torch.Tensor) and isinstance(c, float) else c
                     for g, c in zip(given, checked))
    return checked


def as_number(value: Any) -> Any:
    """A hyperparameter as the kernels take it: one-element tensors (also inside a
    tuple) become Python floats; anything else is returned as is."""
    if isinstance(value, torch.Tensor):
        return float(value)
    if isinstance(value, tuple) and any(isinstance(x, torch.Tensor) for x in value):
        return tuple(float(x) if isinstance(x, torch.Tensor) else x for x in value)
    return value


def as_numbers(group: dict) -> dict:
    """``group`` with :func:`as_number` applied to every value (``group`` itself if
    nothing needs converting)."""
    if not any(isinstance(v, torch.Tensor) or (isinstance(v, tuple) and any(isinstance(x, torch.Tensor) for x in v))
               for v in group.values()):
        return group
    return {k: (v if k == "params" else as_number(v)) for k, v in group.items()}


def validate_group(group: dict, defaults: dict, rules: dict[str, Callable]) -> dict:
    """Return a validated copy of the hyperparameters in ``group``.

    Every key of ``defaults`` is checked (with the group's value if given,
    else the default). Keys unknown to the optimizer are left alone, as in
    torch.optim, so that users can tag groups (e.g. ``name``). A one-element
    real tensor given for a key of :data:`TENSOR_KEYS` (``lr``, each of
    ``betas``) is checked by its value and kept as that tensor object; other
    tensors are replaced by their value.
    """
    out = {}
    for key, default in defaults.items():
        value = group.get(key, default)
        rule = rules.get(key) or RULES.get(key) or _by_type(default)
        checked = rule(key, value)
        out[key] = _keep_tensors(value, checked) if key in TENSOR_KEYS else checked
    return out
