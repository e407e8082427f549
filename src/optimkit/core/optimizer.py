"""The ``Optimizer`` facade: torch.optim's contract around a chain of transforms.

Data path of one ``step()`` for one param group::

    params with a gradient -> real views (complex) -> lazily created state
      -> bucket by step count (normally one bucket)
      -> Python: per-step scalars of every transform (bias corrections, ...)
      -> kernel (eager foreach, or torch.compile'd with scalars as tensors):
           g (negated if maximize) -> transform 1 -> ... -> transform n
           -> cautious mask (if asked) -> apply: p <- p - lr * u
      -> Python: write back step count and scalar state

Optimizers subclass :class:`Optimizer`, set ``name``/``defaults``/metadata and
return their transforms from :meth:`Optimizer.build`.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import itertools
import sys
import types
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor

from . import checkpoint, layout, placement, registry
from ..projection.base import projector_state, save_projector_state, validate_projection
from .tensorlist import Ratio, TensorList, dense
from .transform import Context, Transform
from .validation import RULES, as_numbers, choice, nonneg_int, optional, validate_group

#: Options every optimizer accepts, besides its own hyperparameters.
COMMON_DEFAULTS: dict[str, Any] = {"maximize": False, "compile": False,
                                   "state_precision": "fp32", "min_quant_size": 4096, "projection": None,
                                   "bf16_compensation": None, "state_placement": "device",
                                   "state_rounding": "nearest", "nonfinite": None,
                                   "sharded_strategy": None}
RULES.setdefault("projection", validate_projection)
RULES.setdefault("state_precision", layout.validate_precision)
RULES.setdefault("min_quant_size", nonneg_int)
RULES.setdefault("bf16_compensation", optional(choice("kahan", "stochastic_rounding")))
RULES.setdefault("state_placement", choice("device", "cpu", "disk"))
RULES.setdefault("state_rounding", choice("nearest", "stochastic"))
RULES.setdefault("nonfinite", optional(choice("skip", "raise")))
RULES.setdefault("sharded_strategy", optional(choice("gather", "local")))
KAHAN_KEY = "kahan_comp"

#: torch.optim's implementation switches, accepted by habit (constructor and group dicts)
#: and mapped onto optimkit's modes; they are not kept in param groups or state dicts.
#: ``foreach``: any value runs optimkit's eager multi-tensor kernels (there is no
#: per-tensor loop mode); ``fused=True`` means ``compile=True``; ``differentiable`` and
#: ``capturable`` must be False (no autograd through the step, no CUDA-graph capture).
TORCH_SWITCHES: dict[str, Any] = {k: None if k in ("foreach", "fused") else False for k in checkpoint.TORCH_FLAGS}


def map_torch_switches(kwargs: dict, where: str = "") -> dict:
    """Remove torch.optim's ``foreach``/``fused``/``differentiable``/``capturable`` from
    ``kwargs`` (a constructor's keywords or a param group dict) and return it with their
    optimkit meaning applied: ``fused=True`` sets ``compile=True``."""
    out = {k: v for k, v in kwargs.items() if k not in TORCH_SWITCHES}
    for key in TORCH_SWITCHES:
        if key not in kwargs:
            continue
        value = kwargs[key]
        if key in ("foreach", "fused"):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{where}{key} must be a bool or None, got {type(value).__name__}")
        elif not isinstance(value, bool):
            raise TypeError(f"{where}{key} must be a bool, got {type(value).__name__}")
        elif value:
            what = ("autograd through the optimizer step" if key == "differentiable"
                    else "CUDA graph capture of the step")
            raise ValueError(f"{where}{key}=True is not supported: optimkit optimizers do not offer "
                             f"{what}; pass {key}=False or leave it out")
    if kwargs.get("fused"):
        if "compile" in kwargs and kwargs["compile"] is False:
            raise ValueError(f"{where}fused=True asks for optimkit's compiled (torch.compile) step, "
                             "but compile=False was given; pass one of them")
        out["compile"] = True
    return out


class Optimizer(torch.optim.Optimizer):
    """Base class of all optimkit optimizers (a ``torch.optim.Optimizer``).

    Every optimizer accepts, besides its hyperparameters:

    * ``maximize`` (bool): ascend instead of descend.
    * ``compile`` (bool): run the group step through ``torch.compile``
      (one kernel per group; hyperparameters are passed as tensors so that
      schedulers do not cause recompilation).
    * ``state_precision``: how state tensors are stored: ``"fp32"`` (default),
      ``"bf16"``, ``"q8"`` (block-wise dynamic 8-bit), ``"q4"``, ``"fp8"``, or a
      dict by state name with an optional ``"default"`` (e.g.
      ``{"exp_avg": "q8", "exp_avg_sq": "bf16"}``). Quantized precisions apply
      to state tensors of at least ``min_quant_size`` elements (default 4096);
      smaller ones stay fp32. ``state_precision_overrides={param: "fp32"}``
      (constructor only) pins chosen parameters, e.g. embeddings.
      ``state_rounding="stochastic"`` rounds q8/q4 codes stochastically
      (unbiased, deterministic low-discrepancy dither): slow moving averages no longer stall
      when their increments are below half a code step.
    * ``projection``: ``None`` (full space) or a projection such as
      ``optimkit.GaLore(rank=128)``: the rule runs on projected gradients of
      matrix parameters, with state of the projected shape (see
      :mod:`optimkit.projection`).
    * ``bf16_compensation``: for bfloat16 parameters trained without fp32
      master weights: ``None`` (the rule runs in bf16 and rounds to nearest),
      ``"kahan"`` (the step is computed in fp32 and the rounding error is
      carried in a bf16 compensation buffer, state ``kahan_comp``) or
      ``"stochastic_rounding"`` (fp32 step, unbiased stochastic rounding to
      bf16; draws from torch's global generator).
    * ``state_placement``: ``"device"`` (default: next to the parameters),
      ``"cpu"`` (host memory; moved to the device for the step) or ``"disk"``
      (memory-mapped files under ``state_dir``, a constructor argument: state
      larger than RAM still trains; the group is stepped one parameter at a
      time while a background thread pages in the next parameter's state).
    * ``cautious`` (bool or ``"kozistr"``/``"timm"``), on optimizers with
      momentum: zero update components whose sign disagrees with the
      gradient, rescaling the rest ("Cautious Optimizers", Liang et al. 2024).
      ``True``/``"kozistr"`` rescales by ``numel / (kept + 1)``, ``"timm"``
      by ``1 / max(mean(mask), 1e-3)``.
    * torch.optim's switches, accepted by habit (in the constructor or a group dict,
      not kept in groups): ``foreach`` (``None``/``True``/``False``: all run optimkit's
      eager multi-tensor kernels, there is no per-tensor loop mode), ``fused``
      (``True`` means ``compile=True``; with an explicit ``compile=False`` it is a
      ``ValueError``), ``differentiable`` and ``capturable`` (``False`` only).
    * ``nonfinite``: ``None`` (default: nothing checked, no cost), ``"skip"``
      or ``"raise"``. Checked right after the closure, before anything else:
      if a gradient of a group with ``nonfinite`` set holds a NaN or an
      infinity, ``"skip"`` skips the whole step (every group: parameters and
      state untouched) and counts it in ``skipped_steps`` (saved in the state
      dict); ``"raise"`` raises ``RuntimeError`` naming the parameter and group,
      before any change. Under ``torch.distributed`` the flags are all-reduced
      so that every rank takes the same decision (see docs/robustness.md).

    All hyperparameters live in each param group and are read at every step.
    """

    # ---- metadata, set by each optimizer
    name: ClassVar[str | None] = None
    family: ClassVar[str] = "first-order"
    paper: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    state_bytes: ClassVar[float] = 0.0
    defaults: ClassVar[dict[str, Any]] = {}
    rules: ClassVar[dict[str, Callable]] = {}
    #: momentum optimizers accept ``cautious=``
    has_momentum: ClassVar[bool] = False
    #: sparse gradients are densified instead of rejected
    supports_sparse: ClassVar[bool] = False
    #: the step reads second-order information from the gradient's graph (Hessian-vector
    #: products): the loss must be backpropagated with ``backward(create_graph=True)``
    requires_create_graph: ClassVar[bool] = False
    #: why the rule cannot run on projected (low-rank) gradients, or None if it can
    projection_refused: ClassVar[str | None] = None
    #: the rule never reads gradients (zeroth-order: a closure returning the loss drives it)
    gradient_free: ClassVar[bool] = False
    #: ``step`` needs a closure returning the loss (Polyak step sizes)
    requires_closure: ClassVar[bool] = False
    #: state keys that only some modes hold (a schedule-free optimizer's kept iterate in
    #: eval mode): loaded when present, never passed to the update rule
    extra_state_keys: ClassVar[tuple[str, ...]] = ()
    #: the rule couples the tensors of a group (e.g. a group-wide norm), so the
    #: group cannot be stepped one tensor at a time
    group_coupled: ClassVar[bool] = False
    #: the torch.optim counterpart keeps a step count in its state (SGD keeps none:
    #: its state dicts load as step 1, which is all a heavy-ball buffer needs)
    torch_state_has_step: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            registry.register(cls)
        # A real signature for help() and IDEs: params plus every hyperparameter.
        sig_params = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        for key, value in cls.all_defaults().items():
            sig_params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY
                                                if key in COMMON_DEFAULTS or key == "cautious"
                                                else inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                default=value))
        for key, value in TORCH_SWITCHES.items():  # accepted for torch.optim habits
            sig_params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=value))
        cls.__signature__ = inspect.Signature(sig_params)

    @classmethod
    def param_groups_for(cls, model: torch.nn.Module, hyperparameters: dict) -> list[dict] | None:
        """The param groups this optimizer should get for ``model``, or ``None``
        for ``model.parameters()`` as one group (the default).

        Tools that build optimizers for a model they did not write (``optimkit
        bench``) call it with the constructor ``hyperparameters`` they will pass,
        so an optimizer that needs a split by module type (Muon: hidden matrices
        vs embeddings, head and gains) can make it. The groups hold every
        parameter of ``model`` once.
        """
        return None

    @classmethod
    def all_defaults(cls) -> dict[str, Any]:
        out = dict(cls.defaults)
        out.update(COMMON_DEFAULTS)
        if cls.has_momentum:
            out["cautious"] = False
        return out

    # ------------------------------------------------------------------ construction
    def __init__(self, params, *args, state_precision_overrides: dict | None = None,
                 state_dir: str | None = None, **hyperparameters):
        allowed = self.all_defaults()
        if args:  # positional hyperparameters follow the order of ``defaults``
            names = list(self.defaults)
            if len(args) > len(names):
                raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional "
                                f"hyperparameters ({', '.join(names)}), got {len(args)}")
            for key, value in zip(names, args):
                if key in hyperparameters:
                    raise TypeError(f"{type(self).__name__} got multiple values for argument {key!r}")
                hyperparameters[key] = value
        hyperparameters = map_torch_switches(hyperparameters)
        for key in hyperparameters:
            if key not in allowed:
                close = difflib.get_close_matches(key, list(allowed), n=3)
                hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
                raise TypeError(f"{type(self).__name__} got an unexpected keyword argument {key!r}{hint}")
        if isinstance(params, Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            f"Tensors or dicts, but got {torch.typename(params)}")
        defaults = validate_group({**allowed, **hyperparameters}, allowed, self.rules)
        self.check(as_numbers(defaults))
        placement.check_state_dir(defaults, state_dir)
        self._transforms: list[Transform] = list(self.build())
        self._check_projection(as_numbers(defaults))
        if self.has_momentum:
            from ..transforms.cautious import Cautious
            self._transforms.append(Cautious())
        self._kernels: dict[Any, Callable] = {}
        #: scratch of fast_step implementations (e.g. packed pointers), dropped on load and copy
        self._fast_cache: dict[Any, Any] = {}
        self._nonnegative = frozenset(n for t in self._transforms for n in getattr(t, "nonnegative", ()))
        self._precision_overrides = self._check_overrides(state_precision_overrides)
        self._placement = placement.Placement(state_dir)
        #: steps skipped by ``nonfinite="skip"`` (saved in the state dict)
        self.skipped_steps = 0
        super().__init__(params, defaults)

    #: per-step caches (compiled kernels, fast_step's scratch): never copied or pickled
    _CACHES = ("_kernels", "_fast_cache")

    def __getstate__(self) -> dict:
        """torch.optim keeps only defaults, state and param groups; an optimkit
        optimizer also needs its transforms and settings (``copy.deepcopy`` and
        pickling work). Compiled kernels and fast-path plans are rebuilt on use. A
        ``step`` in the instance (an LR scheduler's wrapper around the bound method,
        which still calls the original optimizer) is left out, as torch.optim does."""
        return {k: v for k, v in self.__dict__.items() if k not in self._CACHES and k != "step"}

    def __setstate__(self, state: dict) -> None:  # also the last step of load_state_dict
        super().__setstate__(state)
        self._kernels = {}
        self._fast_cache = {}  # it may hold the replaced state

    @staticmethod
    def _check_overrides(overrides) -> dict[int, str]:
        if overrides is None:
            return {}
        if not isinstance(overrides, dict):
            raise TypeError("state_precision_overrides must be a dict {parameter: precision}, "
                            f"got {type(overrides).__name__}")
        out = {}
        for p, prec in overrides.items():
            if not isinstance(p, Tensor):
                raise TypeError(f"state_precision_overrides keys must be parameters, got {type(p).__name__}")
            if not isinstance(prec, str):
                raise TypeError("state_precision_overrides values must be precision names, "
                                f"got {type(prec).__name__}")
            out[id(p)] = layout.validate_precision("state_precision_overrides", prec)
        return out

    def build(self) -> Iterable[Transform]:
        """The chain of transforms that turns a gradient into an update."""
        raise NotImplementedError

    def check(self, group: dict) -> None:
        """Cross-hyperparameter checks of a validated group (raise ValueError)."""

    def _check_projection(self, group: dict) -> None:
        if group.get("projection") is None:
            return
        if self.projection_refused:
            raise ValueError(f"Invalid projection: {type(self).__name__} {self.projection_refused}; "
                             "projections (GaLore, APOLLO, FRUGAL) are not supported")
        for t in self._transforms:
            couples = getattr(t, "couples_params", None)
            if couples is not None and couples(group):
                raise ValueError(f"Invalid projection: {type(self).__name__} with these settings adds "
                                 "weight_decay * param to the gradient (L2), which has no projected form "
                                 "here; use decoupled weight decay or weight_decay=0")

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {torch.typename(param_group)}")
        allowed = self.all_defaults()
        param_group = map_torch_switches(param_group, "param group: ")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k in allowed}}
        validated = validate_group(merged, allowed, self.rules)
        self.check(as_numbers(validated))
        self._check_projection(as_numbers(validated))
        placement.check_state_dir(validated, self._placement.root)
        param_group = dict(param_group)
        param_group.update(validated)
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._nonfinite_skip():  # before prepare_step: some optimizers change state there
            return loss
        self.prepare_step()
        work = [self._collect(group) for group in self.param_groups]  # validates before any change
        for group, (params, grads) in zip(self.param_groups, work):
            if params:
                self._step_group(group, params, grads)
        return loss

    def _nonfinite_skip(self) -> bool:
        """The non-finite guard: ``True`` if this step must be skipped.

        Groups with ``nonfinite`` set are checked (one flag per group, one
        device-to-host sync); under ``torch.distributed`` the flags are
        all-reduced (MAX) so that every rank takes the same decision. A bad
        gradient in a ``"raise"`` group raises ``RuntimeError``; in a ``"skip"``
        group, the whole step is skipped and ``skipped_steps`` counted.
        Nothing is checked (no sync) when no group sets ``nonfinite``."""
        checked = [(i, g) for i, g in enumerate(self.param_groups) if g.get("nonfinite")]
        if not checked:
            return False
        bad = _nonfinite_flags([g for _, g in checked], self.param_groups)
        if not bad.any():
            return False
        for (i, group), flag in zip(checked, bad.tolist()):
            if flag and group["nonfinite"] == "raise":
                raise RuntimeError(f"{type(self).__name__}: non-finite gradient "
                                   f"{_where_nonfinite(group, i)} (nonfinite='raise'); "
                                   "nothing was changed by this step")
        self.skipped_steps = getattr(self, "skipped_steps", 0) + 1
        return True

    def prepare_step(self) -> None:
        """Called once per step, after the closure and before any group is updated
        (e.g. for a norm over all gradients of all groups). Default: nothing."""

    def _collect(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        compiled = group["compile"]
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if p.numel() == 0:  # nothing to update (and no state to keep): as if without gradient
                continue
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"{type(self).__name__} cannot update parameter {i} of a group "
                                f"(shape {tuple(p.shape)}): its dtype {p.dtype} is not floating point; "
                                "only floating-point and complex parameters can be optimized")
            if compiled and p.device.type == "meta":
                raise ValueError(f"Invalid compile: compile=True cannot step meta-device parameters "
                                 f"(parameter {i} of a group, shape {tuple(p.shape)}): torch.compile "
                                 "generates no kernel for the meta device; use compile=False")
            if g.is_sparse:
                if not self.supports_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if group.get("weight_decay", 0) != 0:  # L2 decay would touch every row (torch refuses too)
                    raise RuntimeError(f"{type(self).__name__}: weight_decay is not compatible with sparse "
                                       "gradients (as in torch.optim); use weight_decay=0")
                g = g.to_dense()
            params.append(p)
            grads.append(g)
        if _sharded_in(params):
            from ..distributed import sharded

            sharded.check_group(self, group, params, grads)
        return params, grads

    def _state_for(self, p: Tensor, view: Tensor, group: dict) -> dict:
        state = self.state[p]
        proj = group.get("projection")
        if not state:
            state["step"] = 0  # a Python int: no per-parameter tensor op on every step
            override = self._precision_overrides.get(id(p))
            like = view if layout.state_dtype(view.dtype) == view.dtype else view.to(layout.state_dtype(view.dtype))
            if proj is not None and proj.applies(view):
                save_projector_state(state, proj.init(view))
                like = like.new_zeros(proj.subspace_shape(view))
            for t in self._transforms:
                for key, value in getattr(t, "scalar_state", {}).items():
                    state[key] = float(value)
                exact = getattr(t, "full_precision", ())
                for key, value in t.init(like, group).items():
                    numel = value.numel() if p is view else _global_numel(p, view, value)
                    prec = "fp32" if key in exact else layout.choose(
                        group["state_precision"], key, numel, group["min_quant_size"], override)
                    layout.store(state, key, value, prec, signed=key not in self._nonnegative,
                                 rounding=group["state_rounding"])
            if group["bf16_compensation"] == "kahan" and view.dtype == torch.bfloat16:
                state[KAHAN_KEY] = torch.zeros_like(view)
            self._placement.place(state, group["state_placement"])
        elif (proj is not None and proj.resets_state and state["step"] and proj.applies(view)
              and proj.refreshes(state["step"] + 1)):
            self._reset_rule_state(state, view.new_zeros(proj.subspace_shape(view),
                                                         dtype=layout.state_dtype(view.dtype)), group)
        return state

    def _reset_rule_state(self, state: dict, like: Tensor, group: dict) -> None:
        """Start the rule afresh (state as first created, step count 0), writing in
        place so that precision and placement are kept; projector state is not touched."""
        state["step"] = 0
        stored = state.get(layout.LAYOUT_KEY, {})
        for t in self._transforms:
            for key, value in getattr(t, "scalar_state", {}).items():
                state[key] = float(value)
            for key, value in t.init(like, group).items():
                if key in stored:
                    layout.rewrite(state, key, value)
                else:
                    state[key].copy_(value)

    def _step_group(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        if _sharded_in(params):  # FSDP2: element-wise rules step the local shards (in place)
            from ..distributed import sharded

            if sharded.gathers(self, group):  # whole-tensor rules: owners step gathered tensors
                sharded.gather_step(self, group, params, grads)
                return
            views, gviews = [_local(p) for p in params], [_local(g) for g in grads]
        else:
            views = [torch.view_as_real(p) if p.is_complex() else p for p in params]
            gviews = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
        self._step_views(group, params, views, gviews)

    def _step_views(self, group: dict, params: list[Tensor], views: list[Tensor], gviews: list[Tensor]) -> None:
        """Step the tensors ``views`` (of ``params``, which key the state) with ``gviews``."""
        states = [self._state_for(p, v, group) for p, v in zip(params, views)]
        # Bucket by step count (params that missed steps keep their own count) and dtype.
        buckets: dict[tuple, list[int]] = {}
        for i, (s, v) in enumerate(zip(states, views)):
            buckets.setdefault((int(s["step"]), v.dtype), []).append(i)
        where = group["state_placement"]
        streamed = placement.streams(where, views[0].device) and not self.group_coupled
        for (count, _), idx in buckets.items():
            if streamed:  # one parameter at a time, paging in the next one's state meanwhile
                for j, i in enumerate(idx):
                    ahead = (placement.prefetch(states[idx[j + 1]]) if where == "disk" and j + 1 < len(idx)
                             else None)
                    self._run_bucket(group, count + 1, [views[i]], [gviews[i]], [states[i]])
                    if ahead is not None:
                        ahead.join()
                continue
            if len(buckets) == 1:
                bp, bg, bs = views, gviews, states
            else:
                bp, bg, bs = [views[i] for i in idx], [gviews[i] for i in idx], [states[i] for i in idx]
            self._run_bucket(group, count + 1, bp, bg, bs)

    def fast_step(self, group: dict, hp: dict, params: list[Tensor], grads: list[Tensor],
                  states: list[dict]) -> list[int]:
        """Hook for hand-written fused kernels: update the parameters it can and
        return their indices; the rest take the transform chain. Default: none."""
        return []

    def _run_bucket(self, group, step, params, grads, states) -> None:
        s0 = states[0]
        sstate_keys = [k for t in self._transforms for k in getattr(t, "scalar_state", {})]
        sstate = {k: float(s0[k]) for k in sstate_keys}
        # tensor hyperparameters (lr, betas: schedulers may write tensors) are read as
        # Python floats once per step: the same kernels and results as float values
        numbers = as_numbers(group)
        hp: dict[str, Any] = {k: v for k, v in numbers.items() if k != "params"}
        for t in self._transforms:
            hp.update(t.scalars(numbers, step, sstate))
        all_states = states
        done = self.fast_step(group, hp, params, grads, states) if group.get("projection") is None else []
        if len(done) == len(params):
            params = []
        elif done:
            finished = set(done)
            rest = [i for i in range(len(params)) if i not in finished]
            params, grads, states = [params[i] for i in rest], [grads[i] for i in rest], [states[i] for i in rest]
        if params:
            self._run_chain(group, step, params, grads, states, hp, sstate_keys)
        # write back step count and scalar state
        for s in all_states:
            s["step"] = step
            for k in sstate_keys:
                s[k] = sstate[k]

    def _run_chain(self, group, step, params, grads, states, hp, sstate_keys) -> None:
        s0 = states[0]
        names = layout.state_names(s0, exclude={"step", KAHAN_KEY, *sstate_keys})
        entries, signature = layout.gather(states, names)
        static, dyn_names, dyn_values = _split(hp)
        proj = group.get("projection")
        projected = [proj is not None and proj.applies(p) for p in params]
        if any(projected):
            # negate before projecting: the projection also sees the full gradient
            if static.get("maximize"):
                grads = [-g for g in grads]
            static = {**static, "maximize": False, "_projected": True}
            full_grads = grads
            pstates = [projector_state(s) if f else None for s, f in zip(states, projected)]
            grads = [proj.project(g, ps, step) if f else g for g, ps, f in zip(grads, pstates, projected)]
        comp = TensorList([s[KAHAN_KEY] for s in states]) if KAHAN_KEY in s0 else None
        home = None
        device = params[0].device
        if group["state_placement"] != "device" and placement.needs_transfer(entries, device):
            home, entries = entries, placement.to_device(entries, device)
        out = self._launch(group, params, grads, entries, signature, static, dyn_names, dyn_values, comp)
        if home is not None:
            placement.copy_back(entries, home)
        if any(projected):
            u, work = out
            full = [proj.back(ui, r, g, ps, step) if f else ui
                    for ui, r, g, ps, f in zip(u, grads, full_grads, pstates, projected)]
            for s, ps, f in zip(states, pstates, projected):
                if f:
                    save_projector_state(s, ps)
            hp_eager = _merge(static, dyn_names, dyn_values)
            ctx = Context(params=TensorList(work), grads=TensorList(full_grads), state={},
                          hp=hp_eager, static=static)
            self.apply(TensorList(full), ctx)
            if work[0] is not params[0]:
                _write_back(params, work, static["bf16_compensation"], comp)

    def _launch(self, group, params, grads, entries, signature, static, dyn_names, dyn_values, comp):
        """Run the kernel, eagerly or compiled; returns the update if it was not applied."""
        if group["compile"]:
            family = (tuple(sorted(static.items(), key=lambda kv: kv[0])), tuple(dyn_names), signature)
            # One kernel per bucket composition (dtype and shape of every tensor): a bucket
            # that differs (a parameter that missed a step, another dtype, a streamed
            # parameter) gets its own kernel instead of recompiling a shared one, which
            # varying buckets did at every step until torch.compile's recompile limit.
            key = (family, tuple((p.dtype, p.shape, g.dtype) for p, g in zip(params, grads)))
            kernel = self._kernels.get(key)
            if kernel is None:
                # at most recompile_limit compositions per family are compiled, the rest run eagerly
                limit = torch._dynamo.config.recompile_limit
                if sum(1 for k in self._kernels if k[0] == family) >= limit:
                    kernel = "eager"
                    _warn_eager(f"{type(self).__name__}: more than {limit} different buckets (parameter "
                                "shapes/dtypes stepped together) for one compiled kernel "
                                "(torch._dynamo.config.recompile_limit); the others run eagerly")
                else:
                    kernel = self._compiled_kernel(static, dyn_names, signature)
                self._kernels[key] = kernel
            if kernel != "eager":
                device = params[0].device
                # float64 parameters get their hyperparameters in float64 (as eager's Python
                # floats); every other dtype computes in at least float32
                packed = torch.float64 if params[0].dtype == torch.float64 else torch.float32
                scalars = torch.tensor(dyn_values, dtype=packed, device=device)
                try:
                    return kernel(TensorList(params), TensorList(grads), entries, scalars, comp)
                except torch._dynamo.exc.FailOnRecompileLimitHit as err:  # raised before the graph runs
                    self._kernels[key] = "eager"
                    _warn_eager(f"{type(self).__name__}: a compiled kernel hit torch.compile's recompile "
                                f"limit ({err.__class__.__name__}); it runs eagerly from now on")
        hp_eager = _merge(static, dyn_names, dyn_values)
        return self._kernel(TensorList(params), TensorList(grads), entries, signature, hp_eager, static, comp)

    def _kernel(self, params: TensorList, grads: TensorList, entries: dict, signature: tuple,
                hp: dict, static: dict, comp):
        """decode state -> rule -> apply -> encode state (one graph when compiled).

        With a projection (``static["_projected"]``) the update is returned
        instead of applied (with the working params): the facade maps it back
        to full space first."""
        if static.get("maximize"):
            grads = grads.neg()
        # Low-precision (bf16/fp16) parameters with encoded state (which decodes to
        # fp32), float16 parameters (their state is fp32: layout.state_dtype) and
        # bf16 ones with bf16_compensation: the whole step runs in fp32 (gradients,
        # parameters and the states kept as created) and each stored tensor is
        # rounded back once at the end (the parameters with their compensation).
        mixed = params[0].dtype != torch.float32 and layout.is_encoded(signature)
        low = (mixed or params[0].dtype == torch.float16
               or (bool(static.get("bf16_compensation")) and params[0].dtype == torch.bfloat16))
        state = layout.decode(entries, signature, upcast=low)
        work = TensorList([p.float() for p in params]) if low else params
        if low:
            grads = TensorList([g.float() for g in grads])
        ctx = Context(params=work, grads=grads, state=state, hp=hp, static=static)
        u = grads
        for t in self._transforms:
            u = t(u, ctx)
        layout.encode(state, entries, signature)
        if static.get("_projected"):
            return list(dense(u)), list(work)
        self.apply(u, ctx)
        if low:
            _write_back(params, work, static["bf16_compensation"], comp)
        return None

    def _compiled_kernel(self, static: dict, dyn_names: list, signature: tuple) -> Callable:
        kernel_method = self._kernel

        def optimkit_group_step(params, grads, entries, scalars, comp):
            values = scalars.unbind(0)
            hp = _merge(static, dyn_names, values)
            return kernel_method(params, grads, entries, signature, hp, static, comp)

        # A fresh code object per kernel gives each its own compilation cache,
        # so that groups and optimizers do not share torch.compile's recompile limit.
        code = optimkit_group_step.__code__.replace(co_name=f"optimkit_step_{id(self)}_{len(self._kernels)}")
        fn = types.FunctionType(code, optimkit_group_step.__globals__, code.co_name,
                                None, optimkit_group_step.__closure__)
        return torch.compile(fn, dynamic=False, fullgraph=True)

    def apply(self, u, ctx: Context) -> None:
        """Apply the final update: ``p <- p - lr * u``."""
        lr = ctx.hp["lr"]
        if isinstance(u, Ratio):
            ctx.params.addcdiv_(u.num, u.den, -lr * u.scale)
        else:
            ctx.params.sub_(u, alpha=lr)

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict:
        """torch.optim's state dict, with plain values only (projections described
        by their settings), so that ``torch.load(f)``'s default reads it back."""
        out = checkpoint.saveable(super().state_dict())
        out["skipped_steps"] = int(getattr(self, "skipped_steps", 0))
        if _sharded_in(p for g in self.param_groups for p in g["params"]):
            from ..distributed import sharded  # state of DTensor parameters as DTensors

            out = sharded.wrap_state_dict(self, out)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict; tensors are copied and keep their saved dtype.

        The whole dict is validated first (group sizes and hyperparameters by the
        constructor's rules; every state's keys, shapes, dtypes, codec layouts and
        step counts against a fresh state of this optimizer): a bad dict raises
        ``ValueError`` naming the problem and changes nothing. ``torch.optim``
        state dicts of the same algorithm load too (see :mod:`optimkit.core.checkpoint`).
        (torch.optim casts floating state to the parameter dtype; optimkit
        keeps the stored precision, which is part of the optimizer state.)
        """
        if "torch.distributed.tensor" in sys.modules:  # DTensor state (torch.distributed.checkpoint)
            from ..distributed import sharded

            state_dict = sharded.unwrap_state_dict(self, state_dict)
        state_dict = checkpoint.prepare(self, state_dict)
        skipped = state_dict.pop("skipped_steps", 0)
        saved_state = {k: {kk: (vv.clone() if isinstance(vv, Tensor) else copy.deepcopy(vv))
                           for kk, vv in v.items()}
                       for k, v in state_dict["state"].items()}
        state_dict["state"] = saved_state
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        for group, saved in zip(self.param_groups, saved_groups):  # torch deep-copies the groups
            group["projection"] = saved["projection"]
        id_map = dict(zip(itertools.chain.from_iterable(g["params"] for g in saved_groups),
                          itertools.chain.from_iterable(g["params"] for g in self.param_groups)))
        for pid, values in saved_state.items():
            p = id_map.get(pid)
            if p is None:
                continue
            st = self.state[p]
            if layout.LAYOUT_KEY in values:  # torch's loader mangles strings inside state
                st[layout.LAYOUT_KEY] = copy.deepcopy(values[layout.LAYOUT_KEY])
            for key, value in values.items():
                if isinstance(value, Tensor) and key in st and st[key].dtype != value.dtype:
                    st[key] = value.to(device=p.device if key != "step" else value.device)
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    self._placement.place(self.state[p], group["state_placement"])
        self.skipped_steps = skipped
        self._kernels.clear()


def _nonfinite_flags(groups: list[dict], all_groups: list[dict]) -> Tensor:
    """One bool per group of ``groups``: does a gradient hold a NaN or an infinity?
    All-reduced (MAX) across ranks when ``torch.distributed`` is initialized."""
    device = None
    for g in all_groups:
        for p in g["params"]:
            if p.device.type != "meta":
                device = p.device
                break
        if device is not None:
            break
    if device is None:
        device = torch.device("cpu")
    flags = []
    for group in groups:
        buckets: dict[tuple, list[Tensor]] = {}
        for p in group["params"]:
            g = p.grad
            if g is None or g.device.type == "meta":
                continue
            if g.is_sparse:
                g = g.coalesce().values()
            g = _local(g)  # a DTensor's shard: the flags are all-reduced below
            buckets.setdefault((g.device, g.dtype), []).append(g)
        per = [_nonfinite_bucket(grads).to(device) for grads in buckets.values()]
        flags.append(torch.stack(per).any() if per else torch.zeros((), dtype=torch.bool, device=device))
    bad = torch.stack(flags).to(torch.int32)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "gloo" and bad.device.type != "cpu":
            bad = bad.cpu()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.cpu().bool()


def _nonfinite_bucket(grads: list[Tensor]) -> Tensor:
    """Does any of ``grads`` (one device and dtype) hold a NaN or an infinity?

    The L1 norms (one fused multi-tensor pass; NaN and infinities propagate) are
    checked, about five times faster than ``isfinite`` per tensor; half-precision
    gradients are summed in float32. A finite gradient whose L1 norm overflows
    its accumulation dtype (above ~3.4e38 in float32) counts as non-finite."""
    dtype = grads[0].dtype
    try:
        norms = torch._foreach_norm(grads, 1, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16)
                                    else None)
        return ~torch.isfinite(torch.stack(norms)).all()
    except (RuntimeError, TypeError, NotImplementedError):  # a device or dtype foreach does not cover
        return ~torch.stack([torch.isfinite(g).all() for g in grads]).all()


def _where_nonfinite(group: dict, index: int) -> str:
    """Which parameter of a group has a non-finite gradient (error messages only)."""
    for j, p in enumerate(group["params"]):
        g = p.grad
        if g is None or g.device.type == "meta":
            continue
        if g.is_sparse:
            g = g.coalesce().values()
        if not bool(torch.isfinite(g).all()):
            return f"in parameter {j} (shape {tuple(p.shape)}) of param group {index}"
    return f"on another rank, in param group {index}"


def _warn_eager(message: str) -> None:
    """A compiled step falls back to eager mode (same results, slower): say so once per kernel."""
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=6)


def _write_back(params, work, mode: str | None, comp) -> None:
    """Write fp32 working params back to low-precision params: Kahan-compensated or
    stochastically rounded (bf16 with ``bf16_compensation``), else to nearest."""
    if params[0].dtype != torch.bfloat16 or not mode:
        for p, w in zip(params, work):
            p.copy_(w)
    elif mode == "kahan":
        for p, w, c in zip(params, work, comp):
            target = w + c.float()           # new value plus the carried rounding error
            rounded = _round_nearest_bf16(target)
            p.copy_(rounded)                 # exact: rounded is representable in bf16
            c.copy_(target - rounded)        # what rounding lost, carried to the next step
    else:
        from ..state.codecs import stochastic_round_bf16

        for p, w in zip(params, work):
            p.copy_(stochastic_round_bf16(w))


def _round_nearest_bf16(x: Tensor) -> Tensor:
    """float32 -> nearest bfloat16 value (ties to even), kept in float32.

    Done on the bit pattern so that a compiler cannot fold a
    float32 -> bfloat16 -> float32 round trip away."""
    bits = x.view(torch.int32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.view(torch.float32)


def _split(hp: dict) -> tuple[dict, list, list]:
    """Split hyperparameters into static settings and dynamic floats."""
    static: dict[str, Any] = {}
    names: list = []
    values: list[float] = []
    for k, v in hp.items():
        if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
            static[k] = v
        elif isinstance(v, float):
            static[k] = v != 0.0
            names.append(k)
            values.append(v)
        elif isinstance(v, tuple) and v and all(isinstance(x, float) for x in v):
            static[k] = tuple(x != 0.0 for x in v)
            names.extend((k, i) for i in range(len(v)))
            values.extend(v)
    return static, names, values


def _merge(static: dict, names: list, values) -> dict:
    hp = dict(static)
    tuples: dict[str, list] = {}
    for name, value in zip(names, values):
        if isinstance(name, tuple):
            tuples.setdefault(name[0], []).append(value)
        else:
            hp[name] = value
    for k, vs in tuples.items():
        hp[k] = tuple(vs)
    return hp


def _sharded_in(tensors) -> bool:
    """Whether any of ``tensors`` is a DTensor (FSDP2); no import of torch.distributed."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from ..distributed import sharded

    return sharded.any_dtensor(tensors)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view), else ``t``."""
    if "torch.distributed.tensor" not in sys.modules:
        return t
    from ..distributed import sharded

    return sharded.local(t)


def _global_numel(p: Tensor, view: Tensor, value: Tensor) -> int:
    """Elements of a state tensor of ``p`` unsharded (FSDP2 shards choose precision as a whole)."""
    if "torch.distributed.tensor" not in sys.modules:
        return value.numel()
    from ..distributed import sharded

    return sharded.global_numel(p, view, value)
