"""State dicts: what ``state_dict()`` writes and what ``load_state_dict()`` accepts.

A state dict holds tensors and plain Python values only, so that
``torch.load(f)`` (``weights_only=True``, torch's default) reads it back:

* a projection in a param group is written as its description,
  ``{"type": "GaLore", "settings": {...}, "counters": {...}}`` (its
  constructor arguments, and the integer counters it keeps between
  parameters), and turned back into a projection on load (the optimizer's
  own object when its settings are equal);
* the step count is a Python int, codec layouts are tuples of str, bool and
  int.

Loading validates the whole dict before anything is changed (the optimizer
and its parameters stay as they were when it raises ``ValueError``):

* the groups match in number and size; each group's hyperparameters pass the
  constructor's rules and cross-checks (a hyperparameter or option the saved
  group lacks, as in a ``torch.optim`` state dict, is taken from the
  optimizer's own group; torch's execution flags ``foreach``, ``fused``,
  ``capturable`` and ``differentiable`` are dropped);
* every parameter state has exactly the keys, shapes and dtypes a fresh state
  of this optimizer would have under the saved settings and codec layouts, a
  step count that is a non-negative integer, and real scalar state.

``torch.optim`` state dicts load into the optimkit optimizer of the same name
and the other way round: tensor steps and 0-d tensor scalars (NAdam's
``mu_product``) become Python numbers, ``None`` entries that torch keeps for
absent buffers (SGD's ``momentum_buffer`` without momentum) and buffers torch
leaves out (Adafactor's ``variance`` of a factored matrix) are accepted, and a state without a step
count (``torch.optim.SGD`` keeps none) loads as step 1 where the optimizer
says its torch counterpart keeps no step.
"""
from __future__ import annotations

import copy
import math
import numbers
import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import layout
from ..projection.base import PREFIX as PROJ_PREFIX, Projection

if TYPE_CHECKING:
    from .optimizer import Optimizer

#: torch.optim's execution flags: no meaning for optimkit's state, dropped on load
TORCH_FLAGS = ("foreach", "fused", "capturable", "differentiable")


class StateDictError(ValueError):
    """An invalid state dict; the message names what is wrong."""


# --------------------------------------------------------------------------- projections
def describe_projection(proj: Projection) -> dict[str, Any]:
    """Plain description of a projection: type, constructor settings, counters."""
    settings, counters = {}, {}
    for key, value in vars(proj).items():
        if key.startswith("_"):
            if isinstance(value, int) and not isinstance(value, bool):
                counters[key] = value
        else:
            settings[key] = value
    return {"type": type(proj).__name__, "settings": settings, "counters": counters}


def _projection_classes() -> dict[str, type]:
    """Every projection class by name (the built-in ones and any user subclass)."""
    from .. import projection  # noqa: F401  (imports the built-in classes)

    out: dict[str, type] = {}
    stack = [Projection]
    while stack:
        cls = stack.pop()
        out.setdefault(cls.__name__, cls)
        stack.extend(cls.__subclasses__())
    return out


def _restore_projection(desc: Any, current: Any, where: str) -> Projection | None:
    """The projection a saved group describes: the optimizer's own object when its
    description matches (counters restored), else a new one built from the settings."""
    if desc is None or isinstance(desc, Projection):
        return desc
    if not isinstance(desc, dict) or not isinstance(desc.get("type"), str) \
            or not isinstance(desc.get("settings", {}), dict) or not isinstance(desc.get("counters", {}), dict):
        raise StateDictError(f"Invalid state dict: {where} projection must be None or a projection "
                             f"description {{'type', 'settings', 'counters'}}, got {desc!r}")
    settings, counters = desc.get("settings", {}), desc.get("counters", {})
    if isinstance(current, Projection):
        mine = describe_projection(current)
        if mine["type"] == desc["type"] and mine["settings"] == settings:
            for key, value in counters.items():
                setattr(current, key, value)
            return current
    cls = _projection_classes().get(desc["type"])
    if cls is None:
        raise StateDictError(f"Invalid state dict: {where} projection type {desc['type']!r} is unknown")
    try:
        proj = cls(**settings)
    except (TypeError, ValueError) as e:
        raise StateDictError(f"Invalid state dict: {where} projection {desc['type']}: {e}") from e
    for key, value in counters.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise StateDictError(f"Invalid state dict: {where} projection counter {key!r} must be an int")
        setattr(proj, key, value)
    return proj


def saveable(state_dict: dict) -> dict:
    """``torch.optim.Optimizer.state_dict()``'s output with projections described."""
    for group in state_dict["param_groups"]:
        if isinstance(group.get("projection"), Projection):
            group["projection"] = describe_projection(group["projection"])
    return state_dict


# --------------------------------------------------------------------------- validation
def _fail(msg: str):
    raise StateDictError(f"Invalid state dict: {msg}")


def _groups(opt: Optimizer, state_dict: Any) -> list[dict]:
    """Validated copies of the saved groups (params kept as saved)."""
    from .validation import as_numbers, validate_group

    if not isinstance(state_dict, dict):
        _fail(f"expected a dict, got {type(state_dict).__name__}")
    for key in ("state", "param_groups"):
        if key not in state_dict:
            _fail(f"missing {key!r}")
    saved = state_dict["param_groups"]
    if not isinstance(saved, (list, tuple)) or not all(isinstance(g, dict) for g in saved):
        _fail("'param_groups' must be a list of dicts")
    if not isinstance(state_dict["state"], dict):
        _fail("'state' must be a dict {param index: state}")
    if len(saved) != len(opt.param_groups):
        _fail(f"{len(saved)} param groups, the optimizer has {len(opt.param_groups)}")
    allowed = opt.all_defaults()
    out = []
    for i, (g, mine) in enumerate(zip(saved, opt.param_groups)):
        where = f"param_groups[{i}]"
        params = g.get("params")
        if not isinstance(params, (list, tuple)):
            _fail(f"{where} has no 'params' list")
        if len(params) != len(mine["params"]):
            _fail(f"{where} has {len(params)} params, the optimizer's group has {len(mine['params'])}")
        merged = {k: v for k, v in g.items() if k != "params" and k not in TORCH_FLAGS}
        for key in allowed:
            if key not in merged:
                merged[key] = mine[key]
        merged["projection"] = _restore_projection(merged.get("projection"), mine.get("projection"), where)
        try:
            validated = validate_group(merged, allowed, opt.rules)
            opt.check(as_numbers(validated))
            opt._check_projection(as_numbers(validated))
        except (TypeError, ValueError) as e:
            raise StateDictError(f"Invalid state dict: {where}: {e}") from e
        if validated.get("state_placement") == "disk" and opt._placement.root is None:
            _fail(f"{where} has state_placement='disk' but the optimizer has no state_dir")
        merged.update(validated)
        merged["params"] = list(params)
        out.append(merged)
    return out


def _number(value: Any, key: str, where: str):
    """A saved scalar as a Python number (a one-element real tensor is unwrapped)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            _fail(f"{where} {key!r} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(f"{where} {key!r} must be a real number, got {type(value).__name__} {value!r}")
    return value


def _as_int_step(value: Any, where: str) -> int:
    value = _number(value, "step", where)
    if not math.isfinite(value) or value != int(value) or value < 0:
        _fail(f"{where} 'step' must be a non-negative integer, got {value!r}")
    return int(value)


def _as_float(value: Any, key: str, where: str) -> float:
    return float(_number(value, key, where))


def _dry_init(fn, like: Tensor):
    """``fn(like)`` on a meta-device copy of ``like`` (no memory), else on a real one."""
    try:
        return fn(torch.empty(like.shape, dtype=like.dtype, device="meta"))
    except Exception:  # an init that needs real data (noqa: BLE001)
        return fn(torch.zeros(like.shape, dtype=like.dtype, device=like.device))


def _fresh_spec(opt: Optimizer, p: Tensor, group: dict) -> tuple[dict, dict, set]:
    """What a fresh state of ``p`` holds under ``group``: ({key: tensor spec},
    {key: kind of Python value}, set of state names the rule creates)."""
    view = torch.view_as_real(p) if p.is_complex() else p
    if "torch.distributed.tensor" in sys.modules:  # FSDP2: state is that of the local shard
        from ..distributed.sharded import gathers, local

        if not gathers(opt, group):  # sharded_strategy="gather" keeps whole-tensor state
            view = local(view)
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, str] = {"step": "int"}
    proj = group.get("projection")
    like = view if layout.state_dtype(view.dtype) == view.dtype else torch.empty(
        view.shape, dtype=layout.state_dtype(view.dtype), device="meta")
    if proj is not None and proj.applies(view):
        pinit = _dry_init(lambda v: copy.copy(proj).init(v), view)  # a copy: init may count
        for key, value in pinit.items():
            tensors[PROJ_PREFIX + key] = value
        like = torch.empty(proj.subspace_shape(view), dtype=layout.state_dtype(view.dtype), device="meta")
    names = set()
    for t in opt._transforms:
        for key in getattr(t, "scalar_state", {}):
            scalars[key] = "float"
        for key, value in _dry_init(lambda v: t.init(v, group), like).items():
            tensors[key] = value
            names.add(key)
    if group["bf16_compensation"] == "kahan" and view.dtype == torch.bfloat16:
        tensors["kahan_comp"] = torch.empty(view.shape, dtype=view.dtype, device="meta")
    return tensors, scalars, names


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    """Plain states may keep another floating dtype (the saved precision is kept)."""
    return a == b or (a.is_floating_point and b.is_floating_point)


def _check_layout(saved_layout: Any, names: set, tensors: dict, nonneg: frozenset, where: str) -> dict:
    if saved_layout is None:
        return {}
    if not isinstance(saved_layout, dict):
        _fail(f"{where} '{layout.LAYOUT_KEY}' must be a dict, got {type(saved_layout).__name__}")
    out = {}
    for name, meta in saved_layout.items():
        if name not in names:
            _fail(f"{where} codec layout for {name!r}, which is not a state of this optimizer")
        if not isinstance(meta, (tuple, list)) or len(meta) not in (3, 4):
            _fail(f"{where} layout of {name!r} must be (precision, signed, shape[, stochastic]), got {meta!r}")
        prec, signed, shape = meta[0], meta[1], meta[2]
        stochastic = meta[3] if len(meta) == 4 else False
        if prec not in layout.PRECISIONS or prec == "fp32":
            _fail(f"{where} layout of {name!r} has precision {prec!r} (expected one of "
                  f"{', '.join(p for p in layout.PRECISIONS if p != 'fp32')})")
        if not isinstance(signed, bool) or not isinstance(stochastic, bool):
            _fail(f"{where} layout of {name!r}: signed and stochastic must be bools, got {meta!r}")
        if signed != (name not in nonneg):
            _fail(f"{where} layout of {name!r} says signed={signed}, this optimizer stores it "
                  f"{'signed' if name not in nonneg else 'unsigned'}")
        if stochastic and prec not in layout.STOCHASTIC:
            _fail(f"{where} layout of {name!r}: stochastic rounding needs one of {layout.STOCHASTIC}")
        if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) for s in shape):
            _fail(f"{where} layout of {name!r} has shape {shape!r}")
        expected = tuple(tensors[name].shape)
        if tuple(shape) != expected:
            _fail(f"{where} state {name!r} has shape {tuple(shape)}, expected {expected}")
        out[name] = (prec, signed, tuple(shape), stochastic)
    return out


def _check_state(opt: Optimizer, pid: Any, values: Any, p: Tensor, group: dict) -> dict:
    """A validated, normalized copy of one parameter's saved state."""
    where = f"state[{pid!r}]"
    if not isinstance(values, dict):
        _fail(f"{where} must be a dict, got {type(values).__name__}")
    if all(v is None for v in values.values()):  # e.g. torch SGD's {"momentum_buffer": None}
        return {}
    tensors, scalars, names = _fresh_spec(opt, p, group)
    lay = _check_layout(values.get(layout.LAYOUT_KEY), names, tensors, opt._nonnegative, where)
    expected: dict[str, Tensor] = {}
    for key, spec in tensors.items():
        meta = lay.get(key)
        if meta is None:
            expected[key] = spec
        else:
            storage = layout.codec(meta[0], meta[3]).empty(meta[2], "meta", meta[1])
            for part, t in storage.items():
                expected[f"{key}:{part}"] = t
    out: dict[str, Any] = {}
    if lay:
        out[layout.LAYOUT_KEY] = lay
    for key, value in values.items():
        if key == layout.LAYOUT_KEY:
            continue
        if key in scalars:
            out[key] = (_as_int_step(value, where) if scalars[key] == "int"
                        else _as_float(value, key, where))
        elif key in expected:
            spec = expected[key]
            if value is None and spec.numel() == 0:  # torch's None for an absent buffer
                continue
            if not isinstance(value, Tensor):
                _fail(f"{where} {key!r} must be a tensor, got {type(value).__name__} {value!r}")
            if tuple(value.shape) != tuple(spec.shape):
                _fail(f"{where} {key!r} has shape {tuple(value.shape)}, expected {tuple(spec.shape)}")
            if not _same_kind(value.dtype, spec.dtype):
                _fail(f"{where} {key!r} has dtype {value.dtype}, expected {spec.dtype}")
            out[key] = value
        elif value is None:  # torch keeps e.g. momentum_buffer=None for an unused buffer
            continue
        elif key in opt.extra_state_keys:  # a tensor of the parameter's shape some modes keep
            view = torch.view_as_real(p) if p.is_complex() else p
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(view.shape):
                _fail(f"{where} {key!r} must be a tensor of shape {tuple(view.shape)}, got {value!r:.80}")
            out[key] = value
        else:
            hint = (" (a state dict of another optimizer, or saved with other settings?)"
                    if isinstance(value, Tensor) else "")
            _fail(f"{where} has unexpected key {key!r}{hint}")
    for key, spec in expected.items():  # torch leaves absent buffers out of its state
        if key not in out and spec.numel() == 0:
            out[key] = torch.zeros(spec.shape, dtype=spec.dtype, device=p.device)
    if "step" not in out and not opt.torch_state_has_step and any(k in out for k in expected):
        out["step"] = 1
    missing = [k for k in [*scalars, *expected] if k not in out]
    if missing:
        _fail(f"{where} is missing {', '.join(map(repr, missing))}")
    return out


def prepare(opt: Optimizer, state_dict: Any) -> dict:
    """A validated, normalized copy of ``state_dict`` for ``torch.optim``'s loader;
    raises :class:`StateDictError` (a ``ValueError``) naming the problem before
    anything is changed. Tensors are not copied here."""
    groups = _groups(opt, state_dict)
    owner: dict[Any, tuple[Tensor, dict]] = {}
    for g, mine in zip(groups, opt.param_groups):
        for pid, p in zip(g["params"], mine["params"]):
            owner[pid] = (p, g)
    state = {}
    for pid, values in state_dict["state"].items():
        if pid not in owner:
            _fail(f"state for parameter {pid!r}, which no param group lists")
        p, g = owner[pid]
        checked = _check_state(opt, pid, values, p, g)
        if checked:
            state[pid] = checked
    skipped = state_dict.get("skipped_steps", 0)  # the non-finite guard's counter (optimkit only)
    if isinstance(skipped, Tensor) and skipped.numel() == 1 and not skipped.is_floating_point():
        skipped = int(skipped)
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        _fail(f"'skipped_steps' must be a non-negative int, got {skipped!r}")
    return {**{k: v for k, v in state_dict.items() if k not in ("state", "param_groups")},
            "state": state, "param_groups": groups, "skipped_steps": skipped}
