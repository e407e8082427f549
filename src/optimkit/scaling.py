"""Scaling rules (batch size, EMA momentum, width) and ``param_groups`` by module type.

    import optimkit as ok
    lr = ok.scaling.batch_lr(3e-4, batch_size=1024, base_batch_size=256, rule="sqrt")   # Adam: x2
    groups = ok.param_groups(model, weight_decay=0.1, embedding=dict(lr=1e-3),
                             overrides={"head.*": dict(lr=1e-4)})
    opt = ok.AdamW(groups, lr=3e-4)

Formulas and sources: docs/schedules.md.
"""
from __future__ import annotations

import fnmatch
import math
import re
from typing import Any, Iterable

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .core import validation as v
from .optimizers.muon import _EMBEDDINGS

__all__ = ["batch_lr", "surge_lr", "ema_momentum", "scale_batch", "width_lr", "width_weight_decay",
           "param_groups", "param_kinds", "NORMS", "EMBEDDINGS"]

EMBEDDINGS = _EMBEDDINGS
NORMS: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, _NormBase) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_SGD_LIKE = {"sgd"}


def _rule_for(rule: str, optimizer: Any) -> str:
    if rule != "auto":
        if rule not in ("linear", "sqrt"):
            raise ValueError(f"Invalid rule: {rule!r} (expected 'linear', 'sqrt' or 'auto')")
        return rule
    if optimizer is None:
        raise ValueError("Invalid rule: 'auto' needs optimizer= (a registry name or optimizer class/instance)")
    name = optimizer if isinstance(optimizer, str) else getattr(optimizer, "name", None)
    if name is None and isinstance(optimizer, type):
        name = optimizer.__name__
    if name is None:
        name = type(optimizer).__name__
    return "linear" if str(name).lower() in _SGD_LIKE else "sqrt"


def batch_lr(lr: float, batch_size: int, base_batch_size: int, rule: str = "auto", optimizer: Any = None) -> float:
    """The learning rate for ``batch_size`` given a tuned ``lr`` at ``base_batch_size``:
    ``rule="linear"``: ``lr * B / B0`` (SGD; "Accurate, Large Minibatch SGD");
    ``rule="sqrt"``: ``lr * sqrt(B / B0)`` (Adam family; "How to Scale Your EMA",
    random-matrix analysis in "Learning Rates as a Function of Batch Size");
    ``rule="auto"``: linear for ``optimizer`` SGD (registry name ``"sgd"``,
    ``torch.optim.SGD``), square root for every other optimizer.
    Both hold below the critical batch size only; see :func:`surge_lr`."""
    lr = v.nonneg("lr", lr)
    b = v.positive_int("batch_size", batch_size)
    b0 = v.positive_int("base_batch_size", base_batch_size)
    rule = _rule_for(rule, optimizer)
    kappa = b / b0
    return lr * kappa if rule == "linear" else lr * math.sqrt(kappa)


def surge_lr(max_lr: float, batch_size: float, noise_batch_size: float) -> float:
    """Adam-like optimal lr vs batch size with a surge ("Surge Phenomenon in Optimal
    Learning Rate and Batch Size Scaling"): ``max_lr / (0.5 (sqrt(B_noise/B) + sqrt(B/B_noise)))``,
    rising as ``sqrt(B)`` below ``B_noise``, peaking at ``max_lr`` there, then falling."""
    max_lr = v.nonneg("max_lr", max_lr)
    b = v.positive("batch_size", batch_size)
    bn = v.positive("noise_batch_size", noise_batch_size)
    return max_lr / (0.5 * (math.sqrt(bn / b) + math.sqrt(b / bn)))


def ema_momentum(rho: float, kappa: float) -> float:
    """EMA momentum after scaling the batch by ``kappa`` ("How to Scale Your EMA"): ``rho ** kappa``."""
    rho = v.closed_unit("rho", rho)
    kappa = v.positive("kappa", kappa)
    return rho ** kappa


def scale_batch(kappa: float, *, lr: float, rule: str = "sqrt", betas: Iterable[float] | None = None,
                ema: float | None = None) -> dict:
    """Hyperparameters after scaling the batch by ``kappa`` ("How to Scale Your EMA"):
    ``rule="linear"`` (SGD): ``lr * kappa``; ``rule="sqrt"`` (Adam): ``lr * sqrt(kappa)`` and
    each of ``betas`` to ``max(0, 1 - kappa (1 - beta))``; a model EMA ``ema`` (e.g. a teacher
    or weight average) to ``ema ** kappa`` for both rules. Returns a dict with the keys given."""
    kappa = v.positive("kappa", kappa)
    lr = v.nonneg("lr", lr)
    if rule not in ("linear", "sqrt"):
        raise ValueError(f"Invalid rule: {rule!r} (expected 'linear' or 'sqrt')")
    out: dict[str, Any] = {"lr": lr * kappa if rule == "linear" else lr * math.sqrt(kappa)}
    if betas is not None:
        bs = [v.unit(f"betas[{i}]", b) for i, b in enumerate(betas)]
        out["betas"] = tuple(max(0.0, 1.0 - kappa * (1.0 - b)) for b in bs) if rule == "sqrt" else tuple(bs)
    if ema is not None:
        out["ema"] = ema_momentum(ema, kappa)
    return out


_KINDS = ("matrix", "vector", "embedding", "bias", "norm")


def _kind(name: str, value: Any) -> str:
    if value not in _KINDS:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, _KINDS))})")
    return value


def width_lr(lr: float, width: float, base_width: float, kind: str = "matrix") -> float:
    """AdamW learning rate at ``width`` from ``lr`` tuned at ``base_width`` ("Robust Layerwise
    Scaling Rules by Proper Weight Decay Tuning"; μP for Adam): hidden matrices
    ``lr * base_width / width`` (η ∝ 1/d); vectors, biases, norms and embeddings keep ``lr``."""
    lr = v.nonneg("lr", lr)
    m = v.positive("width", width) / v.positive("base_width", base_width)
    return lr / m if _kind("kind", kind) == "matrix" else lr


def width_weight_decay(weight_decay: float, width: float, base_width: float, kind: str = "matrix") -> float:
    """AdamW weight decay at ``width`` (same source): matrices ``weight_decay * width / base_width``
    (λ ∝ d, so ``lr * weight_decay`` stays fixed); every other kind 0."""
    wd = v.nonneg("weight_decay", weight_decay)
    m = v.positive("width", width) / v.positive("base_width", base_width)
    return wd * m if _kind("kind", kind) == "matrix" else 0.0


# --------------------------------------------------------------------------- param groups
def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, NORMS) or "norm" in type(m).__name__.lower()


def param_kinds(model: nn.Module) -> dict[str, str]:
    """``{parameter name: kind}`` for the trainable parameters (each tied tensor once, under its
    first name): ``"embedding"`` (weights of ``nn.Embedding``/``nn.EmbeddingBag``, also when tied
    to a head), ``"norm"`` (parameters of LayerNorm, RMSNorm, BatchNorm, GroupNorm, InstanceNorm,
    or a module whose class name contains "Norm"), ``"bias"`` (named ``bias`` or ``*_bias`` on
    their module), ``"matrix"`` (two or more dims), ``"vector"`` (the rest)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    emb, norm, bias = set(), set(), set()
    for m in model.modules():
        if isinstance(m, EMBEDDINGS):
            emb.update(id(p) for p in m.parameters(recurse=False))
        if _is_norm(m):
            norm.update(id(p) for p in m.parameters(recurse=False))
        for local, p in m.named_parameters(recurse=False):
            if local == "bias" or local.endswith("_bias"):
                bias.add(id(p))
    kinds = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pid = id(p)
        if pid in emb:
            kinds[name] = "embedding"
        elif pid in norm:
            kinds[name] = "norm"
        elif pid in bias:
            kinds[name] = "bias"
        else:
            kinds[name] = "matrix" if p.dim() >= 2 else "vector"
    return kinds


def _hp(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of hyperparameters, got {type(value).__name__}")
    if "params" in value:
        raise ValueError(f"Invalid {name}: 'params' is set by param_groups")
    return dict(value)


def _matcher(pattern: str):
    if not isinstance(pattern, str):
        raise TypeError(f"overrides keys must be str patterns, got {type(pattern).__name__}")
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise ValueError(f"Invalid overrides: pattern {pattern!r} is not a regular expression ({e})") from None
        return lambda n: rx.search(n) is not None
    return lambda n: fnmatch.fnmatchcase(n, pattern)


def param_groups(model: nn.Module, *, lr: float | None = None, weight_decay: float | None = None,
                 no_decay: Iterable[str] = ("bias", "norm"), embedding: dict | None = None,
                 split: bool = False, matrix: dict | None = None, vector: dict | None = None,
                 overrides: dict[str, dict] | None = None, width: float | None = None,
                 base_width: float | None = None) -> list[dict]:
    """Param groups by module type, each with a ``"name"`` key (torch keeps extra keys).

    Parameters are classified by :func:`param_kinds` (frozen ones skipped, tied ones once).
    Groups, in this order, the empty ones left out:

    - ``"decay"``: matrices and vectors (with ``split=True``: ``"matrix"`` and ``"vector"``,
      with the extra hyperparameters ``matrix=`` / ``vector=``), and embeddings (with the
      matrices) unless ``embedding`` or ``width`` is given;
    - ``"embedding"``: embedding weights, when ``embedding=dict(...)`` is given (e.g. its own lr)
      or under the width rule (lr kept, no weight decay);
    - ``"no_decay"``: the kinds in ``no_decay`` (default biases and norm parameters; add
      ``"embedding"`` or ``"vector"``) with ``weight_decay=0.0``;
    - ``"override:<pattern>"``: for ``overrides={pattern: hp}``, parameters whose name matches
      (``fnmatch``, or a regular expression searched when the pattern starts with ``re:``;
      the first matching pattern wins), with their kind's hyperparameters updated by ``hp``.
      A pattern that matches nothing raises ``ValueError`` (a typo otherwise goes unnoticed).

    ``lr`` and ``weight_decay`` are written into the groups when given (else the optimizer's
    defaults apply). ``width`` and ``base_width`` (with ``lr``) apply the AdamW width rule of
    :func:`width_lr` / :func:`width_weight_decay` to matrices: lr ``* base_width / width``,
    weight decay ``* width / base_width``; the other kinds keep ``lr`` and get no weight decay
    (vectors then form their own group, as with ``split=True``).
    """
    kinds = param_kinds(model)
    no_decay = (no_decay,) if isinstance(no_decay, str) else tuple(no_decay)
    for k in no_decay:
        _kind("no_decay", k)
    if "matrix" in no_decay:
        raise ValueError("Invalid no_decay: 'matrix' (matrices are what weight decay is for)")
    base: dict[str, Any] = {}
    if lr is not None:
        base["lr"] = v.nonneg("lr", lr)
    if weight_decay is not None:
        base["weight_decay"] = v.nonneg("weight_decay", weight_decay)
    emb_hp = None if embedding is None else _hp("embedding", embedding)
    matrix_hp, vector_hp = _hp("matrix", matrix), _hp("vector", vector)
    split = v.boolean("split", split)
    if (matrix_hp or vector_hp) and not split:
        raise ValueError("Invalid matrix/vector: per-kind hyperparameters need split=True")
    if (width is None) != (base_width is None):
        raise ValueError("Invalid width: give both width and base_width, or neither")
    mult = None
    if width is not None:
        if lr is None:
            raise ValueError("Invalid lr: the width rule needs lr")
        mult = v.positive("width", width) / v.positive("base_width", base_width)

    def group_of(kind: str) -> tuple[str, dict]:
        if kind in no_decay:
            return "no_decay", {**base, "weight_decay": 0.0}
        if kind == "embedding" and emb_hp is not None:
            return "embedding", {**base, **emb_hp}
        if kind == "embedding" and mult is not None:  # the width rule: embeddings keep lr, no decay
            return "embedding", {**base, **({"weight_decay": 0.0} if "weight_decay" in base else {})}
        if kind in ("matrix", "embedding"):
            hp = dict(base)
            if mult is not None:
                hp["lr"] = base["lr"] / mult
                if "weight_decay" in hp:
                    hp["weight_decay"] = hp["weight_decay"] * mult
            return ("matrix", {**hp, **matrix_hp}) if split or mult is not None else ("decay", hp)
        if mult is not None:  # the width rule: vectors keep lr and get no weight decay
            return "vector", {**base, **({"weight_decay": 0.0} if "weight_decay" in base else {}), **vector_hp}
        return ("vector", {**base, **vector_hp}) if split else ("decay", dict(base))

    matchers = [(pat, _matcher(pat), _hp(f"overrides[{pat!r}]", hp)) for pat, hp in (overrides or {}).items()] \
        if overrides is not None and isinstance(overrides, dict) else None
    if overrides is not None and matchers is None:
        raise TypeError(f"overrides must be a dict {{pattern: hyperparameters}}, got {type(overrides).__name__}")
    order = ["decay", "matrix", "vector", "embedding", "no_decay"]
    pats = [pat for pat, _, _ in matchers or ()]
    groups: dict[tuple, dict] = {}
    params = dict(model.named_parameters())
    for name, kind in kinds.items():
        gname, hp = group_of(kind)
        key: tuple = (order.index(gname), "", gname)
        for pat, match, ohp in matchers or ():
            if match(name):
                key, hp = (len(order) + pats.index(pat), pat, gname), {**hp, **ohp}
                break
        if key not in groups:
            groups[key] = {"params": [], **hp}
        groups[key]["params"].append(params[name])
    for pat in pats:
        spans = [k for k in groups if k[1] == pat]
        if not spans:
            raise ValueError(f"Invalid overrides: pattern {pat!r} matches no trainable parameter name")
        for k in spans:
            groups[k]["name"] = f"override:{pat}" if len(spans) == 1 else f"override:{pat}:{k[2]}"
    for k, g in groups.items():
        g.setdefault("name", k[2])
    return [groups[k] for k in sorted(groups)]
