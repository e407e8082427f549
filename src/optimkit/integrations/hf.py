"""Hugging Face ``transformers.Trainer`` integration: optimkit optimizers from ``TrainingArguments``.

    from transformers import Trainer, TrainingArguments
    from optimkit.integrations.hf import create_optimizer

    args = TrainingArguments("out", learning_rate=3e-4, weight_decay=0.1, max_steps=1000,
                             warmup_steps=100, lr_scheduler_type="cosine")
    opt, sched = create_optimizer(model, args, name="adamw_q8")
    Trainer(model, args, train_dataset=ds, optimizers=(opt, sched)).train()

The optimizer's hyperparameters come from ``args`` (``learning_rate``,
``weight_decay``, ``adam_beta1``/``adam_beta2``/``adam_epsilon``), its param
groups follow the Trainer's no-decay rule (biases, normalization parameters and
every other parameter with fewer than two dims get ``weight_decay=0``; tied
tensors once; frozen ones left out), and the scheduler is
``transformers.get_scheduler(args.lr_scheduler_type, ...)`` (or the same shape
from :mod:`optimkit.schedules` when transformers is not installed). Names:
:func:`names`; docs/integrations.md.

Nothing here imports ``transformers`` at module level: ``args`` may be any
object with ``TrainingArguments``' attribute names.
"""
from __future__ import annotations

import difflib
import json
import math
import numbers
import re
import warnings
from typing import Any

from torch import nn

from ..core import registry
from ..core import validation as v
from ..projection import APOLLO, FRUGAL, APOLLOMini, GaLore, Projection

__all__ = ["OptimkitTrainer", "build_optimizer", "create_optimizer", "create_scheduler", "param_groups", "decay_parameter_names",
           "resolve_name", "names", "HF_ALIASES"]

#: ``TrainingArguments.optim`` names -> optimkit names (the rest of the grammar: :func:`resolve_name`).
HF_ALIASES: dict[str, str] = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
    "adamw_8bit": "adamw_q8", "adamw_bnb_8bit": "adamw_q8", "adamw_torch_4bit": "adamw_q4",
    "adamw_torch_8bit": "adamw_q8", "lion_32bit": "lion", "lion_8bit": "lion_q8",
    "galore_adamw": "adamw_galore", "galore_adamw_8bit": "adamw_q8_galore",
    "apollo_adamw": "adamw_apollo", "adafactor": "adafactor", "sgd": "sgd", "adagrad": "adagrad",
    "rmsprop": "rmsprop", "schedule_free_adamw": "schedulefree_adamw",
    "schedule_free_radam": "schedulefree_radam", "schedule_free_sgd": "schedulefree_sgd",
}

#: name suffix -> ``state_precision``
_PRECISIONS = {"q8": "q8", "q4": "q4", "bf16": "bf16", "fp8": "fp8"}
#: name suffix -> projection class (applied to the hidden matrices only)
_PROJECTIONS: dict[str, type] = {"galore": GaLore, "apollo_mini": APOLLOMini, "apollo": APOLLO,
                                 "frugal": FRUGAL}

#: the Trainer's no-decay name patterns (``Trainer.get_decay_parameter_names``), on lower-cased names
_NO_DECAY_PATTERNS = tuple(re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm",
                                                    r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"))

#: ``TrainingArguments`` defaults, used for attributes a plain ``args`` object lacks
_ARG_DEFAULTS: dict[str, Any] = {"weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
                                 "adam_epsilon": 1e-8, "lr_scheduler_type": "linear",
                                 "lr_scheduler_kwargs": None, "warmup_steps": 0, "warmup_ratio": 0.0,
                                 "max_steps": -1}


def names() -> list[str]:
    """Every name :func:`create_optimizer` accepts without a suffix: the registry
    (``optimkit.available()``) and :data:`HF_ALIASES`, sorted. Any registry name
    also takes a precision suffix (``_q8``, ``_q4``, ``_bf16``, ``_fp8``) and/or a
    projection suffix (``_galore``, ``_apollo``, ``_apollo_mini``, ``_frugal``),
    e.g. ``"adamw_q8"``, ``"adamw_galore"``, ``"adamw_q8_galore"``."""
    return sorted(set(registry.available()) | set(HF_ALIASES))


def resolve_name(name: str) -> tuple[str, str | None, type | None]:
    """``name`` -> ``(registry name, state precision or None, projection class or None)``.

    ``"adamw_q8"`` -> ``("adamw", "q8", None)``; ``"adamw_galore"`` ->
    ``("adamw", None, GaLore)``; ``"galore_adamw"`` (a ``TrainingArguments.optim``
    name) -> ``("adamw", None, GaLore)``. Case and ``-`` vs ``_`` do not matter.
    An unknown name raises ``ValueError`` listing the closest accepted names."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (an optimizer name), got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = HF_ALIASES.get(key, key)
    available = set(registry.available())
    precision = projection = None
    rest = key
    while rest not in available:
        for suffix, proj in _PROJECTIONS.items():
            if rest.endswith("_" + suffix) and projection is None:
                projection, rest = proj, rest[: -len(suffix) - 1]
                break
        else:
            for suffix, prec in _PRECISIONS.items():
                if rest.endswith("_" + suffix) and precision is None:
                    precision, rest = prec, rest[: -len(suffix) - 1]
                    break
            else:
                break
    if rest not in available:
        suggestions = [f"{b}_{s}" for b in ("adamw", "lion") for s in (*_PRECISIONS, *_PROJECTIONS)]
        close = difflib.get_close_matches(key, names() + suggestions, n=6, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"Invalid name: unknown optimizer {name!r}{hint} (accepted: "
                         "optimkit.integrations.hf.names(), with optional suffixes "
                         "_q8/_q4/_bf16/_fp8 and _galore/_apollo/_apollo_mini/_frugal)")
    return rest, precision, projection


# --------------------------------------------------------------------------- grouping
def _arg(args: Any, key: str) -> Any:
    if key in _ARG_DEFAULTS:
        return getattr(args, key, _ARG_DEFAULTS[key])
    if not hasattr(args, key):
        raise TypeError(f"args must have a {key!r} attribute (a transformers.TrainingArguments "
                        f"or an object with its attribute names), got {type(args).__name__}")
    return getattr(args, key)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # named_parameters() yields each tensor once (a tied embedding/head under its first name)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that get weight decay (each tied tensor once,
    under its first name in ``model.named_parameters()``).

    As the Trainer's ``get_decay_parameter_names``: no decay for parameters whose
    lower-cased name contains ``bias``, ``layernorm``, ``rmsnorm``, a ``norm`` or
    ``*_norm`` path component, nor for the parameters of normalization modules
    (LayerNorm, RMSNorm, BatchNorm, GroupNorm, InstanceNorm, or a class whose name
    contains "Norm": :func:`optimkit.scaling.param_kinds`). Unlike the Trainer,
    every other parameter with fewer than two dims (scales, gates, positional
    vectors) gets no decay either."""
    from ..scaling import param_kinds

    kinds = param_kinds(model)
    out = []
    for name, p in _trainable(model):
        lowered = name.lower()
        if p.dim() < 2 or kinds.get(name) in ("bias", "norm", "vector"):
            continue
        if any(rx.search(lowered) for rx in _NO_DECAY_PATTERNS):
            continue
        out.append(name)
    return out


def _hidden_ids(model: nn.Module) -> set[int]:
    """Hidden matrices: what :func:`optimkit.muon_param_groups` sends to Muon
    (two or more dims, not an embedding, not the output head)."""
    from ..optimizers.muon import muon_param_groups

    return {id(p) for g in muon_param_groups(model) if g["use_muon"] for p in g["params"]}


def param_groups(model: nn.Module, weight_decay: float, *, projection: Projection | None = None,
                 muon: bool = False, adamw: dict | None = None) -> list[dict]:
    """Param groups for :func:`create_optimizer`; the empty ones are left out.

    * plain: ``{"params": decay, "weight_decay": weight_decay}`` and
      ``{"params": no_decay, "weight_decay": 0.0}`` (:func:`decay_parameter_names`);
    * ``projection``: the hidden matrices (two or more dims, not embeddings, not
      the output head: those :func:`optimkit.muon_param_groups` gives Muon) in a
      first group with ``projection=projection``; the other decayed parameters and
      the no-decay ones as above;
    * ``muon=True``: :func:`optimkit.muon_param_groups`' Muon groups (with
      ``weight_decay``), then the AdamW parameters (``use_muon=False``) split into
      decay / no-decay, each updated with ``adamw`` (e.g. its own ``lr``).
    """
    weight_decay = v.nonneg("weight_decay", weight_decay)
    trainable = _trainable(model)
    decay = set(decay_parameter_names(model))
    groups: list[dict] = []
    if muon:
        from ..optimizers.muon import muon_param_groups

        live = {id(p) for _, p in trainable}
        decay_ids = {id(p) for n, p in trainable if n in decay}
        for g in muon_param_groups(model):
            if not g["use_muon"]:
                continue
            ps = [p for p in g["params"] if id(p) in live and id(p) in decay_ids]
            if ps:
                groups.append({**g, "params": ps, "weight_decay": weight_decay})
        in_muon = {id(p) for g in groups for p in g["params"]}
        aux = dict(adamw or {})
        rest_decay = [p for n, p in trainable if n in decay and id(p) not in in_muon]
        rest_plain = [p for n, p in trainable if n not in decay]
        groups += [{"params": ps, "use_muon": False, "weight_decay": wd, **aux}
                   for ps, wd in ((rest_decay, weight_decay), (rest_plain, 0.0)) if ps]
        return groups
    hidden = _hidden_ids(model) if projection is not None else set()
    projected = [p for n, p in trainable if n in decay and id(p) in hidden]
    rest_decay = [p for n, p in trainable if n in decay and id(p) not in hidden]
    rest_plain = [p for n, p in trainable if n not in decay]
    if projected:
        groups.append({"params": projected, "weight_decay": weight_decay, "projection": projection})
    groups += [{"params": ps, "weight_decay": wd}
               for ps, wd in ((rest_decay, weight_decay), (rest_plain, 0.0)) if ps]
    return groups


# --------------------------------------------------------------------------- optimizer
def create_optimizer(model: nn.Module, args: Any, name: str = "adamw", *,
                     num_training_steps: int | None = None, **overrides: Any):
    """``(optimizer, lr_scheduler)`` for ``Trainer(..., optimizers=(optimizer, lr_scheduler))``:
    :func:`build_optimizer` then :func:`create_scheduler` (whose lengths are checked first).

    Args:
        model: the model the Trainer trains (its trainable parameters, tied ones once).
        args: a ``transformers.TrainingArguments``, or any object with its attribute
            names: ``learning_rate`` (required); ``weight_decay``, ``adam_beta1``,
            ``adam_beta2``, ``adam_epsilon``, ``lr_scheduler_type``,
            ``lr_scheduler_kwargs``, ``warmup_steps`` (a value below 1 is a ratio, as
            in transformers 5), ``warmup_ratio``, ``max_steps`` (defaults: those of
            ``TrainingArguments``).
        name: an optimkit registry name (``optimkit.available()``), a
            ``TrainingArguments.optim`` name (:data:`HF_ALIASES`), optionally with
            a precision suffix (``"adamw_q8"``: ``state_precision="q8"``) and/or a
            projection suffix (``"adamw_galore"``: ``projection=GaLore()`` on the
            hidden matrices). ``"muon"``: Muon on the hidden matrices, AdamW on
            embeddings, head, biases and norms (:func:`optimkit.muon_param_groups`).
        num_training_steps: the scheduler's length; required when
            ``args.max_steps <= 0`` (the Trainer then derives it from the data; pass
            ``len(dataloader) // gradient_accumulation_steps * num_train_epochs``).
        **overrides: constructor keywords that win over those taken from ``args``
            (e.g. ``lr=``, ``betas=``, ``compile=True``). ``projection=`` may be a
            :class:`optimkit.Projection` or a dict of its constructor keywords (for
            the suffix's class, GaLore when there is no suffix). With ``"muon"``:
            ``adamw=dict(...)`` sets the AdamW groups' hyperparameters (e.g. ``lr``).

    Hyperparameters taken from ``args``: ``lr=learning_rate``; ``weight_decay`` for
    the decayed groups (0 for biases, norms and other vectors); when set away from
    ``TrainingArguments``' defaults (0.9, 0.999, 1e-8), ``betas=(adam_beta1,
    adam_beta2)`` for optimizers whose ``betas`` is a pair and ``eps=adam_epsilon``
    for those of them with a float ``eps`` (with the defaults each optimizer keeps
    its own: Adam's are those values, Lion keeps 0.99). Muon: ``lr`` and
    ``weight_decay`` for both rules, with ``adjust_lr_fn="match_rms_adamw"``
    (Moonlight's update-RMS matching, which is what lets Muon share AdamW's
    learning rate), and ``adamw_betas``/``adamw_eps`` under the same rule.

    Optimizers the Trainer cannot drive (``step(closure)``-only ones such as SPS,
    gradient-free MeZO, Hessian methods needing ``backward(create_graph=True)``)
    are refused with ``ValueError``. Bad arguments raise ``ValueError`` /
    ``TypeError`` naming them before anything is built.
    """
    total, warmup = _lengths(args, num_training_steps)  # checked before anything is built
    optimizer = build_optimizer(model, args, name, **overrides)
    return optimizer, create_scheduler(optimizer, args, num_training_steps=total, num_warmup_steps=warmup)


def build_optimizer(model: nn.Module, args: Any, name: str = "adamw", **overrides: Any):
    """The optimizer of :func:`create_optimizer` alone (no scheduler, so no length needed);
    what :class:`OptimkitTrainer` builds in ``Trainer.create_optimizer``."""
    base, precision, proj_cls = resolve_name(name)
    cls: Any = registry._lookup(base)
    why = ("needs step(closure)" if cls.requires_closure else
           "is gradient-free (needs a closure of forward passes)" if getattr(cls, "gradient_free", False) else
           "needs loss.backward(create_graph=True)" if cls.requires_create_graph else None)
    if why is not None:
        raise ValueError(f"Invalid name: {name!r} ({cls.__name__}) {why}, which transformers.Trainer "
                         "does not do (it calls loss.backward() and optimizer.step()); train it with "
                         "your own loop")
    if "params" in overrides:
        raise ValueError("Invalid overrides: 'params' is built by create_optimizer from model")
    overrides = dict(overrides)
    aux = overrides.pop("adamw", None)
    if aux is not None and base != "muon":
        raise TypeError(f"adamw= is for name='muon' (the AdamW groups' hyperparameters), got name={name!r}")
    if aux is not None and not isinstance(aux, dict):
        raise TypeError(f"adamw must be a dict of hyperparameters, got {type(aux).__name__}")
    for key in ("params", "use_muon"):
        if aux is not None and key in aux:
            raise ValueError(f"Invalid adamw: {key!r} is set by create_optimizer")
    projection = _projection(proj_cls, overrides.pop("projection", None))
    if projection is not None and cls.projection_refused:
        raise ValueError(f"Invalid name: {name!r}: {cls.__name__} refuses projections "
                         f"({cls.projection_refused})")
    if precision is not None:
        if "state_precision" in overrides:
            raise ValueError(f"Invalid state_precision: name {name!r} already sets state_precision={precision!r}")
        overrides["state_precision"] = precision

    lr = _arg(args, "learning_rate")
    explicit_decay = "weight_decay" in overrides
    weight_decay = overrides.pop("weight_decay", _arg(args, "weight_decay"))
    v.nonneg("learning_rate", lr)
    v.nonneg("weight_decay", weight_decay)
    if "weight_decay" not in cls.all_defaults() and weight_decay:
        if explicit_decay:
            raise TypeError(f"{cls.__name__} got an unexpected keyword argument 'weight_decay' "
                            "(it has no weight decay)")
        warnings.warn(f"create_optimizer: {cls.__name__} has no weight decay; "
                      f"args.weight_decay={weight_decay} is not applied", stacklevel=3)
    # Adam's betas/eps from args only where set away from TrainingArguments' defaults: with
    # those defaults every optimizer keeps its own (Adam's are the same values; Lion's 0.99,
    # SOAP's 0.95, Muon's AdamW (0.9, 0.95) stay)
    betas = (_arg(args, "adam_beta1"), _arg(args, "adam_beta2"))
    eps = _arg(args, "adam_epsilon")
    set_betas = betas != (_ARG_DEFAULTS["adam_beta1"], _ARG_DEFAULTS["adam_beta2"])
    set_eps = eps != _ARG_DEFAULTS["adam_epsilon"]

    allowed = cls.all_defaults()
    kwargs: dict[str, Any] = {"lr": lr}
    defaults = cls.defaults
    if base == "muon":
        kwargs["adjust_lr_fn"] = "match_rms_adamw"
        if set_betas:
            kwargs["adamw_betas"] = betas
        if set_eps:
            kwargs["adamw_eps"] = eps
    elif isinstance(defaults.get("betas"), tuple) and len(defaults["betas"]) == 2:
        if set_betas:
            kwargs["betas"] = betas
        if set_eps and isinstance(defaults.get("eps"), float):
            kwargs["eps"] = eps
    kwargs.update(overrides)
    has_decay = "weight_decay" in allowed
    if has_decay:
        kwargs["weight_decay"] = weight_decay
    groups = param_groups(model, weight_decay if has_decay else 0.0, projection=projection,
                          muon=base == "muon", adamw=aux)
    if not has_decay:
        for g in groups:
            g.pop("weight_decay", None)
    if not groups:
        raise ValueError("Invalid model: it has no trainable parameters (requires_grad=True)")
    return cls(groups, **kwargs)


def _projection(proj_cls: type | None, value: Any) -> Projection | None:
    if isinstance(value, Projection):
        if proj_cls is not None and not isinstance(value, proj_cls):
            raise ValueError(f"Invalid projection: the name asks for {proj_cls.__name__}, got "
                             f"{type(value).__name__}")
        return value
    if value is None:
        return proj_cls() if proj_cls is not None else None
    if isinstance(value, dict):
        return (proj_cls or GaLore)(**value)
    raise TypeError(f"projection must be an optimkit.Projection or a dict of its keywords, "
                    f"got {type(value).__name__}")


# --------------------------------------------------------------------------- scheduler
def _lengths(args: Any, num_training_steps: Any) -> tuple[int, int]:
    """``(num_training_steps, num_warmup_steps)`` from ``args`` (and the keyword)."""
    max_steps: Any = _arg(args, "max_steps")
    if num_training_steps is None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral):
            raise TypeError(f"args.max_steps must be an int, got {type(max_steps).__name__}")
        if max_steps <= 0:
            raise ValueError(f"Invalid num_training_steps: args.max_steps is {max_steps}, so the Trainer "
                             "derives the number of steps from the data; pass num_training_steps= "
                             "(len(train_dataloader) // gradient_accumulation_steps * num_train_epochs)")
        num_training_steps = max_steps
    total = v.positive_int("num_training_steps", num_training_steps)
    warm: Any = _arg(args, "warmup_steps") or 0
    ratio: Any = _arg(args, "warmup_ratio") or 0.0
    if isinstance(warm, bool) or not isinstance(warm, numbers.Real) or float(warm) < 0:
        raise ValueError(f"Invalid warmup_steps: {warm!r} (must be a number >= 0; below 1 a ratio)")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= float(ratio) <= 1:
        raise ValueError(f"Invalid warmup_ratio: {ratio!r} (must be in [0, 1])")
    warm_f, ratio_f = float(warm), float(ratio)
    if warm_f >= 1:
        steps = int(warm_f)
    elif warm_f > 0:
        steps = math.ceil(total * warm_f)
    else:
        steps = math.ceil(total * ratio_f)
    return total, steps


def create_scheduler(optimizer, args: Any, *, num_training_steps: int | None = None,
                     num_warmup_steps: int | None = None):
    """The learning-rate scheduler ``args.lr_scheduler_type`` names, for ``optimizer``.

    ``transformers.get_scheduler`` when transformers is importable (with
    ``args.lr_scheduler_kwargs``), else the same shape from
    :mod:`optimkit.schedules` (``linear``, ``cosine``, ``cosine_with_restarts``,
    ``cosine_with_min_lr``, ``polynomial``, ``constant``, ``constant_with_warmup``,
    ``inverse_sqrt``, ``warmup_stable_decay``; their values equal transformers').
    Lengths come from ``args`` (``max_steps``, ``warmup_steps``/``warmup_ratio``)
    unless given."""
    total, warm = _lengths(args, num_training_steps)
    if num_warmup_steps is not None:
        warm = v.nonneg_int("num_warmup_steps", num_warmup_steps)
    kind = _arg(args, "lr_scheduler_type")
    kind = getattr(kind, "value", kind)  # transformers.SchedulerType
    if not isinstance(kind, str):
        raise TypeError(f"args.lr_scheduler_type must be a str, got {type(kind).__name__}")
    extra = _arg(args, "lr_scheduler_kwargs") or {}
    if isinstance(extra, str):
        extra = json.loads(extra)
    if not isinstance(extra, dict):
        raise TypeError(f"args.lr_scheduler_kwargs must be a dict, got {type(extra).__name__}")
    try:
        from transformers import get_scheduler
    except ImportError:
        return _optimkit_scheduler(kind, optimizer, total, warm, dict(extra))
    return get_scheduler(kind, optimizer, num_warmup_steps=warm, num_training_steps=total,
                         scheduler_specific_kwargs=dict(extra))


def _optimkit_scheduler(kind: str, optimizer, total: int, warm: int, kw: dict):
    """transformers' named schedules, built from :mod:`optimkit.schedules`."""
    from .. import schedules as s

    sched: s.Schedule
    if kind == "linear":
        sched = s.linear(total, warm, **kw)
    elif kind == "cosine":
        sched = s.cosine(total, warm, **kw)
    elif kind == "cosine_with_restarts":
        sched = s.cosine_restarts(total, warm, **kw)
    elif kind == "cosine_with_min_lr":
        if "min_lr" in kw:
            kw["min_lr_rate"] = kw.pop("min_lr") / optimizer.defaults["lr"]
        sched = s.cosine(total, warm, num_cycles=kw.pop("num_cycles", 0.5),
                         min_lr_ratio=kw.pop("min_lr_rate", 0.0), **kw)
    elif kind == "polynomial":
        sched = s.polynomial(total, warm, lr_end=kw.pop("lr_end", 1e-7), power=kw.pop("power", 1.0),
                             lr_init=optimizer.defaults["lr"], **kw)
    elif kind == "constant":
        sched = s.constant(0, **kw)
    elif kind == "constant_with_warmup":
        sched = s.constant(warm, **kw)
    elif kind == "inverse_sqrt":
        sched = s.inverse_sqrt(warm, **kw)
    elif kind == "warmup_stable_decay":
        sched = s.wsd(warm, num_training_steps=total, **kw)
    else:
        raise ValueError(f"Invalid lr_scheduler_type: {kind!r} needs transformers (not importable); "
                         "without it: linear, cosine, cosine_with_restarts, cosine_with_min_lr, "
                         "polynomial, constant, constant_with_warmup, inverse_sqrt, warmup_stable_decay")
    return sched.scheduler(optimizer)


# --------------------------------------------------------------------------- Trainer subclass
def _trainer_class() -> type:
    from transformers import Trainer

    class OptimkitTrainer(Trainer):
        """A ``transformers.Trainer`` that builds an optimkit optimizer (:func:`build_optimizer`)
        in ``create_optimizer``; the Trainer then makes its own scheduler from ``args``
        (with the number of steps it derives from the data when ``max_steps <= 0``).

            trainer = OptimkitTrainer(model, args, train_dataset=ds, optimizer_name="muon")

        Args (besides the Trainer's): ``optimizer_name`` (any :func:`create_optimizer`
        name) and ``optimizer_kwargs`` (its ``**overrides``)."""

        def __init__(self, *args: Any, optimizer_name: str = "adamw", optimizer_kwargs: dict | None = None,
                     **kwargs: Any):
            resolve_name(optimizer_name)  # a bad name fails here, not at train()
            if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
                raise TypeError(f"optimizer_kwargs must be a dict, got {type(optimizer_kwargs).__name__}")
            super().__init__(*args, **kwargs)
            self.optimizer_name = optimizer_name
            self.optimizer_kwargs = dict(optimizer_kwargs or {})

        def create_optimizer(self, model: nn.Module | None = None):
            """Build the optimkit optimizer once (``self.optimizer``), from ``self.args``."""
            if self.optimizer is None:
                target: Any = self.model if model is None else model
                self.optimizer = build_optimizer(target, self.args, self.optimizer_name, **self.optimizer_kwargs)
            return self.optimizer

    OptimkitTrainer.__module__ = __name__
    return OptimkitTrainer


def __getattr__(name: str) -> Any:
    """``OptimkitTrainer`` is defined on first access (it imports transformers)."""
    if name == "OptimkitTrainer":
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
