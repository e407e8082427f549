"""Muon: momentum orthogonalized by Newton-Schulz, with AdamW for what is not a hidden matrix."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..core import validation as v
from ..core.optimizer import TORCH_SWITCHES, Optimizer
from ..transforms.decay import WeightDecay
from ..transforms.orthogonalize import (KELLER_COEFFICIENTS, NAMED_SCHEDULES, NS_DTYPES, AuxAdamW,
                                        OrthogonalizedMomentum, matrix_shape, schedule, takes_muon)

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def _ns_dtype(name: str, value: Any) -> str:
    """``torch.bfloat16/float32/float64`` or ``"bf16"/"fp32"/"fp64"``, kept as the short
    string (a plain value: static in the compiled kernel, plain in the state dict)."""
    if isinstance(value, str) and value in NS_DTYPES:
        return value
    if isinstance(value, (str, torch.dtype)) and value in _DTYPE_NAMES:
        return _DTYPE_NAMES[value]
    if isinstance(value, (str, torch.dtype)):
        raise ValueError(f"Invalid {name}: {value!r} (expected torch.bfloat16, torch.float32, torch.float64 "
                         "or 'bf16', 'fp32', 'fp64')")
    raise TypeError(f"{name} must be a torch.dtype or a string, got {type(value).__name__} {value!r}")


def _coefficient(name: str, value: Any) -> float:
    x = v.real(name, value)
    if not math.isfinite(x):
        raise ValueError(f"Invalid {name}: {x} (must be finite)")
    return x


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"Invalid {name}: {value!r} (expected three coefficients (a, b, c))")
    return tuple(_coefficient(f"{name}[{i}]", x) for i, x in enumerate(value))


def _ns_coefficients(name: str, value: Any):
    """One ``(a, b, c)`` for every iteration, a per-iteration schedule (a non-empty
    sequence of triples), or the name of a schedule (``"polar_express"``)."""
    if isinstance(value, str):
        if value not in NAMED_SCHEDULES:
            raise ValueError(f"Invalid {name}: {value!r} (expected (a, b, c), a sequence of (a, b, c) "
                             f"or one of {', '.join(map(repr, NAMED_SCHEDULES))})")
        return value
    if not isinstance(value, (tuple, list)) or not value:
        raise TypeError(f"{name} must be (a, b, c), a sequence of (a, b, c) or a schedule name, "
                        f"got {type(value).__name__} {value!r}")
    if all(isinstance(x, (tuple, list)) for x in value):
        return tuple(_triple(f"{name}[{i}]", t) for i, t in enumerate(value))
    return _triple(name, value)


#: largest singular value the Newton-Schulz iteration may produce from [0, 1]
NS_BOUND = 100.0


def _check_iteration_bounded(coefficients, steps: int) -> None:
    """Singular values enter the iteration in [0, 1] (the matrix is normalized by its
    Frobenius norm); each step maps s to a s + b s^3 + c s^5. Coefficients under which
    that map carries some s in [0, 1] beyond ``NS_BOUND`` overflow within a few
    iterations (non-finite weights): refuse them."""
    xs = [i / 1024 for i in range(1025)]
    for a, b, c in schedule(coefficients, steps):
        xs = [a * x + b * x ** 3 + c * x ** 5 for x in xs]
        top = max(abs(x) for x in xs)
        if not math.isfinite(top) or top > NS_BOUND:
            raise ValueError(f"Invalid ns_coefficients: {coefficients!r} with ns_steps={steps} carry singular "
                             f"values in [0, 1] up to {top:.3g} (more than {NS_BOUND:g}): the iteration "
                             "diverges; use the default, 'polar_express' or a convergent (a, b, c)")


class Muon(Optimizer):
    r"""Muon: heavy-ball / Nesterov momentum orthogonalized by a Newton-Schulz iteration,
    with an auxiliary AdamW rule in the same optimizer for everything else.

    Update of a matrix ``W`` in a ``use_muon`` group (as ``torch.optim.Muon``)::

        B <- B + (1 - mu) (G - B)                          (B.lerp_(G, 1 - mu))
        D <- G + mu (B - G)  if nesterov,  else B
        O <- NS(D)       X = D / max(||D||_F, eps); per iteration (a, b, c):
                         A = X X^T;  X <- a X + (b A + c A^2) X     (in ns_dtype)
        W <- W (1 - lr wd)                                 (decoupled, unadjusted lr)
        W <- W - lr * ratio(A, B) * O     ratio = sqrt(max(1, A/B))         (adjust_lr_fn None/"original")
                                                  0.2 sqrt(max(A, B))       ("match_rms_adamw")

    Parameters that are not matrices (``ndim < 2``: biases, norm gains) take the
    AdamW rule even in a Muon group; every parameter of a ``use_muon=False``
    group does (embeddings, the output head: use :func:`muon_param_groups`)::

        W <- W (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2
        W <- W - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + adamw_eps)          (b1, b2) = adamw_betas

    ``lr`` and ``weight_decay`` are the group's for either rule (one learning rate
    per group, so schedulers and per-group settings act as usual; give AdamW
    parameters their own group for another learning rate).

    Options beyond ``torch.optim.Muon`` (per group):

    * ``ns_dtype``: ``torch.bfloat16`` (default, as torch), ``torch.float32`` or
      ``torch.float64`` (or ``"bf16"``/``"fp32"``/``"fp64"``; stored as the string).
    * ``ns_coefficients``: ``(a, b, c)`` for every iteration (default Keller
      Jordan's ``(3.4445, -4.7750, 2.0315)``), a sequence of triples (one per
      iteration; the last repeats if ``ns_steps`` is longer, extra ones are
      unused), or ``"polar_express"``: the per-iteration schedule of Amsel et al.,
      "The Polar Express" (arXiv:2505.16932, Algorithm 1, with its safety factor
      1.01 and its ``1.01 ||X||_F`` normalization folded into the first triple).
    * ``reshape``: how tensors with more than two dims become matrices:
      ``"auto"`` (3-D: a stack of matrices along dim 0, e.g. MoE experts,
      orthogonalized each in one batched product; 4-D and more: conv filters
      flattened to ``(out, in * kh * kw)``), ``"flatten"`` (every such tensor to
      ``(shape[0], -1)``: Conv1d filters, which are 3-D) or ``"batch"`` (stacks
      over all leading dims).
    * ``split``: cut each matrix into this many equal blocks of rows (dim 0 of a
      2-D weight), orthogonalized and lr-adjusted as separate matrices: ``split=3``
      for a fused QKV projection, ``3 * n_heads`` per head.
    * ``use_muon``, ``adamw_betas`` (default ``(0.9, 0.95)``, as Keller Jordan's
      ``MuonWithAuxAdam``), ``adamw_eps`` (default ``1e-8``, as torch's AdamW).

    Complex parameters are refused in Muon groups (``TypeError``, as torch's
    Muon refuses them); in ``use_muon=False`` groups they take AdamW on their real
    view like in every optimkit optimizer. Projections (GaLore, ...) are refused.

    Paper: Jordan et al., "Muon: An optimizer for hidden layers in neural networks"
    (2024, kellerjordan.github.io/posts/muon); Liu et al., "Muon is Scalable for LLM
    Training" (Moonlight, arXiv:2502.16982) for ``match_rms_adamw``. Checked
    against ``torch.optim.Muon`` (Newton-Schulz run in float64 and in its own
    bf16) and the AdamW rule against ``torch.optim.AdamW``. See docs/muon.md.
    """

    projection_refused = "orthogonalizes the full matrix update"
    name = "muon"
    family = "orthogonalized"
    paper = "Muon: An optimizer for hidden layers in neural networks"
    reference = "torch.optim.Muon"
    state_bytes = 4  # momentum buffer of matrices; AdamW parameters keep 8
    has_momentum = True
    torch_state_has_step = False  # torch.optim.Muon keeps only momentum_buffer
    #: complex parameters are refused in Muon groups (see the docstring)
    supports_complex = False
    defaults = dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                    ns_coefficients=KELLER_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None,
                    ns_dtype="bf16", reshape="auto", split=1,
                    use_muon=True, adamw_betas=(0.9, 0.95), adamw_eps=1e-8)
    rules = {"momentum": v.unit, "ns_coefficients": _ns_coefficients, "ns_steps": v.nonneg_int,
             "adjust_lr_fn": v.optional(v.choice("original", "match_rms_adamw")), "ns_dtype": _ns_dtype,
             "reshape": v.choice("auto", "flatten", "batch"), "split": v.positive_int,
             "use_muon": v.boolean, "adamw_betas": v.betas(2), "adamw_eps": v.eps_positive, "nesterov": v.boolean}

    #: :meth:`param_groups_for`: the AdamW group's learning rate is this times the Muon lr
    aux_lr_ratio: float = 0.3

    def build(self):
        return [WeightDecay(decoupled=True), OrthogonalizedMomentum(), AuxAdamW()]

    def check(self, group: dict) -> None:
        _check_iteration_bounded(group["ns_coefficients"], group["ns_steps"])

    @classmethod
    def param_groups_for(cls, model: nn.Module, hyperparameters: dict) -> list[dict]:
        """:func:`muon_param_groups` of ``model``, the AdamW group at ``aux_lr_ratio``
        times the Muon learning rate (``hyperparameters["lr"]``, else the default)."""
        lr = float(hyperparameters.get("lr", cls.defaults["lr"]))
        return muon_param_groups(model, adamw=dict(lr=lr * cls.aux_lr_ratio))

    def add_param_group(self, param_group: dict) -> None:
        """Also checks, before the group is added, that its parameters suit its
        settings: no complex parameter in a Muon group, ``split`` divides the rows."""
        if isinstance(param_group, dict) and "params" in param_group:
            params = param_group["params"]
            if not isinstance(params, set):  # torch's own error for sets
                params = [params] if isinstance(params, Tensor) else list(params)
                param_group = {**param_group, "params": params}
                allowed = self.all_defaults()
                merged = {**self.defaults, **{k: val for k, val in param_group.items() if k in allowed}}
                group = v.validate_group(merged, allowed, self.rules)
                if group["use_muon"]:
                    for i, p in enumerate(params):
                        if isinstance(p, Tensor):
                            self._check_param(i, p, group)
        super().add_param_group(param_group)

    @staticmethod
    def _check_param(i: int, p: Tensor, group: dict) -> None:
        if p.is_complex():
            raise TypeError(f"Muon: params[{i}] (shape {tuple(p.shape)}) is complex; Newton-Schulz "
                            "orthogonalization is for real matrices: put complex parameters in a "
                            "use_muon=False group (AdamW on their real view)")
        if takes_muon(p, group):
            try:
                matrix_shape(p.shape, group["reshape"], group["split"])
            except ValueError as e:
                raise ValueError(f"{e} (params[{i}])") from None

    def _step_group(self, group, params, grads):
        # Each call of the chain sees one rule: the group's matrices (use_muon) and
        # the rest (as a use_muon=False view of the same group).
        if not group["use_muon"]:
            return super()._step_group(group, params, grads)
        muon = [takes_muon(p, group) for p in params]
        if all(muon):
            return super()._step_group(group, params, grads)
        if any(muon):
            super()._step_group(group, [p for p, m in zip(params, muon) if m],
                                [g for g, m in zip(grads, muon) if m])
        super()._step_group({**group, "use_muon": False}, [p for p, m in zip(params, muon) if not m],
                            [g for g, m in zip(grads, muon) if not m])


# --------------------------------------------------------------------------- param groups
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_CONV1D = (nn.Conv1d, nn.ConvTranspose1d)


def _names_to_ids(model: nn.Module, names: Iterable[str], arg: str) -> dict[int, str]:
    """Parameter ids selected by parameter names or module names (a module selects all its parameters)."""
    if isinstance(names, str):
        names = [names]
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules(remove_duplicate=False))
    out: dict[int, str] = {}
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{arg} must hold parameter or module names (str), got {type(name).__name__}")
        if name in params:
            out[id(params[name])] = name
        elif name in modules and name != "":
            for p in modules[name].parameters():
                out.setdefault(id(p), name)
        else:
            raise ValueError(f"Invalid {arg}: {name!r} is neither a parameter nor a module of the model")
    return out


def _auto_heads(model: nn.Module) -> list[nn.Module]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    vocab = {m.num_embeddings for m in model.modules() if isinstance(m, _EMBEDDINGS)}
    heads = [m for m in linears if m.out_features in vocab]
    if heads:
        return heads
    return linears[-1:]


def _hp(arg: str, value: dict | None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{arg} must be a dict of hyperparameters, got {type(value).__name__}")
    allowed = Muon.all_defaults()
    for key in value:
        if key in ("params", "use_muon"):
            raise ValueError(f"Invalid {arg}: {key!r} is set by muon_param_groups")
        if key not in allowed and key not in TORCH_SWITCHES:  # foreach=/fused= map per group
            raise TypeError(f"{arg} got an unexpected hyperparameter {key!r}")
    return dict(value)


def muon_param_groups(model: nn.Module, *, muon: dict | None = None, adamw: dict | None = None,
                      head: str | Iterable[str] | None = "auto", adamw_names: Iterable[str] = (),
                      muon_names: Iterable[str] = (), split: dict[str, int] | None = None) -> list[dict]:
    """Param groups for :class:`Muon`, split by module type (not just by ``ndim``).

    To the AdamW group (``use_muon=False``): parameters with fewer than two dims
    (biases, norm gains), the weights of ``nn.Embedding``/``nn.EmbeddingBag``,
    and the output head's parameters. To Muon groups (``use_muon=True``): every
    other parameter with two or more dims (linear and conv weights, expert stacks);
    ``nn.Conv1d``/``nn.ConvTranspose1d`` weights (3-D) go to a group with
    ``reshape="flatten"``. A tied head (a Linear whose weight is an embedding's)
    is one parameter and follows the embedding.

    Args:
        model: the module whose parameters are split (each parameter once).
        muon: hyperparameters for the Muon groups, e.g. ``muon=dict(lr=0.02)``.
        adamw: hyperparameters for the AdamW group, e.g.
            ``adamw=dict(lr=3e-4, weight_decay=0.0)``.
        head: ``"auto"``: the ``nn.Linear`` modules whose ``out_features`` equals an
            embedding's ``num_embeddings`` (a language-model head, tied or not); in a
            model without such a layer, its last ``nn.Linear`` (a classifier head).
            A model that computes its logits as ``F.linear(x, emb.weight)`` has no
            head module: pass ``head=None``. Or module names, or ``None`` for none.
        adamw_names: parameter or module names sent to AdamW whatever the rules
            above say (explicit choices win).
        muon_names: parameter or module names sent to Muon whatever the rules
            above say; each must be a tensor with two or more dims.
        split: ``{parameter or module name: k}``: those matrices are orthogonalized
            as ``k`` blocks of rows (fused QKV: 3), in a Muon group with ``split=k``.

    Returns the non-empty groups: Muon groups first (the plain one, then one per
    other ``reshape``/``split`` in model order), then the AdamW group. Pass them
    to ``Muon(...)`` (constructor keywords are the defaults the groups override).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    muon_hp, adamw_hp = _hp("muon", muon), _hp("adamw", adamw)
    to_adamw = _names_to_ids(model, adamw_names, "adamw_names")
    to_muon = _names_to_ids(model, muon_names, "muon_names")
    both = set(to_adamw) & set(to_muon)
    if both:
        raise ValueError(f"Invalid muon_names: {to_muon[next(iter(both))]!r} is also in adamw_names")
    splits: dict[int, int] = {}
    for name, k in (split or {}).items():
        k = v.positive_int(f"split[{name!r}]", k)
        for pid in _names_to_ids(model, [name], "split"):
            splits[pid] = k
    if head == "auto":
        heads = _auto_heads(model)
    elif head is None:
        heads = []
    else:
        modules = dict(model.named_modules())
        names = [head] if isinstance(head, str) else list(head)
        for n in names:
            if n not in modules:
                raise ValueError(f"Invalid head: {n!r} is not a module of the model")
        heads = [modules[n] for n in names]
    adamw_ids = {id(p) for m in model.modules() if isinstance(m, _EMBEDDINGS) for p in m.parameters()}
    adamw_ids |= {id(p) for m in heads for p in m.parameters()}
    conv1d_ids = {id(m.weight) for m in model.modules() if isinstance(m, _CONV1D)}

    muon_groups: dict[tuple, list] = {}
    aux: list[Tensor] = []
    for name, p in model.named_parameters():
        pid = id(p)
        if pid in to_muon:
            if p.dim() < 2:
                raise ValueError(f"Invalid muon_names: {name!r} has shape {tuple(p.shape)}; "
                                 "Muon needs two or more dims")
            to_muon_rule = True
        elif pid in to_adamw:
            to_muon_rule = False
        else:
            to_muon_rule = p.dim() >= 2 and pid not in adamw_ids
        if pid in splits and not to_muon_rule:
            raise ValueError(f"Invalid split: {name!r} goes to AdamW, split applies to Muon matrices")
        if not to_muon_rule:
            aux.append(p)
            continue
        key = ("flatten" if pid in conv1d_ids and p.dim() == 3 else None, splits.get(pid, 1))
        muon_groups.setdefault(key, []).append(p)
    groups = []
    keys = sorted(muon_groups, key=lambda key: key != (None, 1))  # the plain group first (stable)
    for reshape, k in keys:
        params = muon_groups[(reshape, k)]
        group = {"params": params, "use_muon": True, **muon_hp}
        if reshape is not None:
            group["reshape"] = reshape
        if k != 1:
            group["split"] = k
        groups.append(group)
    if aux:
        groups.append({"params": aux, "use_muon": False, **adamw_hp})
    return groups
