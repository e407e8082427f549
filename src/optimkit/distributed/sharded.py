"""FSDP2 (``torch.distributed.fsdp.fully_shard``) parameters: DTensors stepped through
their local shards, and state dicts that ``torch.distributed.checkpoint`` can reshard.

Element-wise rules
    An FSDP2 parameter is a DTensor (``Shard(0)`` over the mesh) whose gradient is a
    DTensor with the same placements. For a rule that treats every element on its
    own (Adam, AdamW, SGD, Lion, ...), the step of the global tensor is the step of
    each shard: the facade steps ``p.to_local()`` (a view of the shard, updated in
    place) with ``g.to_local()``, and creates state for the *local* shard shape. So
    quantized state (q8/q4/fp8 blocks) is blocked per local shard: a block never
    straddles a shard boundary. The precision of a state is chosen from the
    parameter's *global* size (``min_quant_size``), so every rank and an unsharded
    run pick the same codec. Compiled steps compile the kernel on the plain local
    tensors.

Rules that need whole tensors (row/column/matrix statistics, per-tensor norms,
trust ratios, orthogonalization, preconditioners, projections, the cautious mask's
per-tensor rescaling) would silently compute per-shard results on local shards;
they raise :class:`ValueError` naming ``sharded_strategy`` instead.

Global estimates (Prodigy, D-Adaptation, DoG, DoWG, AdaGrad-Norm) step local shards:
their sums over every tensor are summed over the local shards, then all-reduced over
the process group (the unsharded sums up to summation order).

Distributed state dicts
    ``state_dict()`` of an optimizer with DTensor parameters presents each state
    tensor as a DTensor laid out like the parameter (what ``torch.optim`` state on
    FSDP2 looks like), so that ``torch.distributed.checkpoint`` saves a global
    tensor and reshards it on load (2 ranks -> 1 -> 2). Encoded (quantized) state:
    parts with the parameter's shape (q8 and fp8 codes) are laid out like the
    parameter; per-block parts (block scales, q4's packed codes, fp8's DRE
    factors) are 1-D DTensors ``Shard(0)`` over the global block sequence, which is
    the unsharded layout exactly when every shard but the last holds whole blocks
    (its element count a multiple of the block size). Then a sharded checkpoint
    equals an unsharded one code for code and loads bit-exactly under any world
    size whose shards also align; otherwise ``state_dict()`` raises ``ValueError``
    naming the parameter (use fp32/bf16 state for it, e.g. via
    ``state_precision_overrides``, or a shape whose shards align). Codec layouts
    record the global shape. ``load_state_dict()`` takes DTensor values (their local
    shard) or full plain tensors (the rank's chunk is cut out) for DTensor
    parameters.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import Tensor

#: registered optimizers whose rule is element-wise: exact on FSDP2 local shards
ELEMENTWISE = frozenset({
    "adabelief", "adadelta", "adagrad", "adam", "adamax", "adamw", "amsgrad", "ademamix", "adopt",
    "diffgrad", "grams", "lion", "nadam", "radam", "rmsprop", "sgd", "yogi",
})
#: registered optimizers whose rule is element-wise but for step sizes estimated from
#: sums over all tensors: the sums over the local shards are all-reduced across ranks (exact)
REDUCED_ESTIMATES = frozenset({"prodigy", "dadapt_adam", "dadapt_lion", "dadapt_sgd", "dog", "dowg",
                               "adagrad_norm"})


def _dtensor_type():
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist yet
        return None
    return sys.modules["torch.distributed.tensor"].DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors) -> bool:
    """Whether any of ``tensors`` is a DTensor."""
    cls = _dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local(t: Any) -> Tensor:
    """The local shard of a DTensor (a view: in-place updates reach the DTensor); ``t`` otherwise."""
    return t.to_local() if is_dtensor(t) else t


def supports_local(opt) -> bool:
    """Whether ``opt``'s rule is exact when stepped on local shards."""
    own = getattr(type(opt), "shard_local", None)
    if own is not None:
        return bool(own)
    return type(opt).name in ELEMENTWISE or type(opt).name in REDUCED_ESTIMATES


def check_group(opt, group: dict, params: list[Any], grads: list[Any]) -> None:
    """Refuse what local-shard stepping would get wrong, before anything changes."""
    name = type(opt).__name__
    strategy = group.get("sharded_strategy")
    if gathers(opt, group):
        from ..core.estimate import GlobalEstimate

        if opt.group_coupled or isinstance(opt, GlobalEstimate):
            raise ValueError(f"Invalid sharded_strategy: 'gather' steps each tensor on its owner "
                             f"rank, but {name} couples the tensors of a group")
        if any(is_dtensor(p) and not _shard0(p) for p in params):
            raise ValueError("Invalid sharded_strategy: 'gather' supports FSDP2's one-dimensional "
                             "Shard(0) DTensor parameters only")
    if not supports_local(opt) and strategy is None:
        raise ValueError(
            f"Invalid sharded_strategy: {name} needs whole tensors (its rule reads per-tensor, "
            "row/column or matrix statistics), so stepping FSDP2 (DTensor) shards would silently "
            "compute per-shard results. Pass sharded_strategy='gather' (exact: each rank owns "
            "whole tensors round-robin, steps them gathered and broadcasts the result) or "
            "sharded_strategy='local' (block-local: the rule sees each shard as a tensor, an "
            "approximation), or use an element-wise optimizer "
            f"({', '.join(sorted(ELEMENTWISE))})")
    if group.get("cautious") and strategy not in ("local", "gather"):
        raise ValueError(f"Invalid cautious: {name}'s cautious mask rescales by a per-tensor count, "
                         "which FSDP2 (DTensor) shards do not see whole; use cautious=False, or "
                         "sharded_strategy='gather' (exact: owners step whole tensors)")
    if group.get("projection") is not None and strategy != "gather":
        raise ValueError(f"Invalid projection: {name} with a projection needs whole matrices "
                         "(SVD / random projections of the full gradient); on FSDP2 (DTensor) "
                         "parameters pass sharded_strategy='gather' (each tensor's owner projects "
                         "its full gradient)")
    if group.get("slice_p", 1) != 1:
        raise ValueError(f"Invalid slice_p: {name} slices every slice_p-th element of the whole "
                         "tensor; on FSDP2 (DTensor) shards only slice_p=1 is exact")
    for i, (p, g) in enumerate(zip(params, grads)):
        if is_dtensor(p) != is_dtensor(g):
            raise ValueError(f"{name}: parameter {i} of a group and its gradient must both be "
                             "DTensors or both plain tensors")
        if is_dtensor(p) and (p.placements != g.placements or p.device_mesh != g.device_mesh):
            raise ValueError(f"{name}: parameter {i} of a group has placements {p.placements} but "
                             f"its gradient {g.placements}; the optimizer steps matching shards only")
        if is_dtensor(p) and p.is_complex():
            raise ValueError(f"{name}: complex DTensor parameters are not supported")


def global_numel(p: Any, view: Tensor, value: Tensor) -> int:
    """The element count a state tensor of ``p`` would have unsharded (chooses its precision)."""
    if is_dtensor(p) and value.numel() == view.numel():  # shaped like the shard, or it flattened
        return p.numel()
    return value.numel()


def all_reduce_sums(values: list[float], params) -> list[float]:
    """Sum float64 scalars over the process group when any parameter is a DTensor
    (every rank has summed over its local shards)."""
    dtensors = [p for p in params if is_dtensor(p)]
    if not dtensors:
        return values
    import torch.distributed as dist

    p = dtensors[0]
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() != "gloo":
        t = t.to(p.device)
    dist.all_reduce(t)
    return t.tolist()


def gathers(opt, group: dict) -> bool:
    """Whether ``group`` is stepped with the ``"gather"`` strategy: whole-tensor rules, and
    element-wise rules with a whole-tensor addition (the cautious mask's per-tensor
    count, a projection of the full gradient)."""
    return group.get("sharded_strategy") == "gather" and (
        not supports_local(opt) or bool(group.get("cautious")) or group.get("projection") is not None)


def gather_step(opt, group: dict, params: list[Any], grads: list[Any]) -> None:
    """``sharded_strategy="gather"``: the i-th DTensor parameter of the group is owned by
    rank ``i % world_size`` of its mesh. One tensor at a time (so a rank holds one
    gathered tensor, not the whole group), its parameter and gradient are all-gathered,
    the owner steps the full tensors with the full-shape state it alone keeps, then
    broadcasts the updated parameter and every rank copies its shard back. Exact (the
    unsharded step of each tensor). Per parameter of N elements and step, each rank
    receives about 3N elements (all-gather of parameter and gradient, broadcast of the
    result); the state of each tensor lives on one rank (round-robin)."""
    import torch.distributed as dist

    plain = [(p, g) for p, g in zip(params, grads) if not is_dtensor(p)]
    if plain:  # replicated plain tensors: every rank steps them
        opt._step_views(group, [p for p, _ in plain], [p for p, _ in plain], [g for _, g in plain])
    sharded = [(p, g) for p, g in zip(params, grads) if is_dtensor(p)]
    for j, (p, g) in enumerate(sharded):
        mesh = p.device_mesh
        owner = j % mesh.size()
        full_p = p.full_tensor()
        full_g = g.full_tensor()
        if mesh.get_local_rank() == owner:
            opt._step_views(group, [p], [full_p], [full_g])
        del full_g
        pg = mesh.get_group()
        dist.broadcast(full_p, src=dist.get_global_rank(pg, owner), group=pg)
        shard = p.to_local()
        rows = _chunks(p.shape[0], mesh.size())
        start = sum(rows[:mesh.get_local_rank()])
        shard.copy_(full_p.narrow(0, start, shard.shape[0]))


# --------------------------------------------------------------------------- state dicts
def _shard0(p: Any) -> bool:
    from torch.distributed.tensor import Shard

    return p.device_mesh.ndim == 1 and len(p.placements) == 1 and isinstance(p.placements[0], Shard) \
        and p.placements[0].dim == 0


def _chunks(n: int, ws: int) -> list[int]:
    """Sizes of ``torch.chunk``-style dim-0 shards (as DTensor ``Shard`` lays them out)."""
    c = -(-n // ws) if n else 0
    return [max(0, min(c, n - r * c)) for r in range(ws)]


def _flat_parts(p: Any, meta: tuple) -> dict[str, tuple[int, list[int]]]:
    """For an encoded state of ``p`` (codec layout ``meta``): {part: (global length,
    per-rank lengths)} of its 1-D parts, or raise ValueError if they cannot be laid
    out as the unsharded parts (shards not holding whole blocks)."""
    from ..core import layout

    codec = layout._codec_of(meta)
    shape = tuple(p.shape)
    ws = p.device_mesh.size()
    inner = math.prod(shape[1:])
    rows = _chunks(shape[0], ws) if shape else [1]
    glob = codec.empty(shape, "meta", meta[1])
    per_rank = [codec.empty((r, *shape[1:]), "meta", meta[1]) for r in rows]
    block = getattr(codec, "block", 0) or 1  # bf16/fp32 codecs: element-wise
    counts = [r * inner for r in rows]
    nonempty = [r for r, c in enumerate(counts) if c]
    aligned = all(counts[r] % block == 0 for r in nonempty[:-1])
    out = {}
    for part, t in glob.items():
        if t.dim() != 1 or t.shape == torch.Size(shape):
            continue
        lengths = [st[part].numel() for st in per_rank]
        if not aligned or sum(lengths) != t.numel() or _chunks(t.numel(), ws) != lengths:
            raise ValueError(
                f"state of a DTensor parameter of shape {shape} with {meta[0]} precision: its local "
                f"shards ({counts} elements per rank) do not hold whole {block}-element blocks, so the "
                "block scales cannot be laid out like an unsharded parameter's for "
                "torch.distributed.checkpoint; give this parameter fp32 or bf16 state "
                "(state_precision_overrides) or a shape whose shards hold whole blocks")
        out[part] = (t.numel(), lengths)
    return out


def _flat_chunks_match(p: Any) -> bool:
    """Whether the flattened shards of ``p`` are the ``Shard(0)`` chunks of the flattened
    parameter (so a state of the flattened shard can be a 1-D DTensor)."""
    ws = p.device_mesh.size()
    inner = math.prod(p.shape[1:])
    return [r * inner for r in _chunks(p.shape[0], ws)] == _chunks(p.numel(), ws)


def _gathered_params(opt) -> set[int]:
    """ids of the parameters of ``sharded_strategy="gather"`` groups (whole-tensor state)."""
    return {id(p) for g in opt.param_groups if gathers(opt, g) for p in g["params"]}


def wrap_state_dict(opt, out: dict) -> dict:
    """``state_dict()`` output with the state of DTensor parameters as DTensors laid
    out like the parameter (so that torch.distributed.checkpoint reshards it)."""
    from torch.distributed.tensor import DTensor, Shard

    from ..core import layout

    params = [p for g in opt.param_groups for p in g["params"]]
    ids = [i for g in out["param_groups"] for i in g["params"]]
    gathered = _gathered_params(opt)
    for pid, p in zip(ids, params):
        st = out["state"].get(pid)
        if st is None or not is_dtensor(p) or id(p) in gathered:
            continue  # 'gather' groups: full-shape state on the owner rank, plain tensors
        lshape = p.to_local().shape
        lay = dict(st.get(layout.LAYOUT_KEY, {}))
        flat: dict[str, tuple[int, list[int]]] = {}
        for name, meta in lay.items():
            if meta[0] in layout.QUANTIZED and not _shard0(p):
                raise ValueError(f"{meta[0]} state on a DTensor parameter with placements "
                                 f"{p.placements}: only FSDP2's one-dimensional Shard(0) is supported "
                                 "for quantized state in distributed state dicts")
            for part, spec in (_flat_parts(p, meta).items() if _shard0(p) else ()):
                flat[f"{name}:{part}"] = spec
            lay[name] = (meta[0], meta[1], tuple(p.shape), *meta[3:])
        new: dict[str, Any] = {}
        for key, value in st.items():
            if key == layout.LAYOUT_KEY:
                new[key] = lay
            elif isinstance(value, Tensor) and key != "step" and value.dim() > 0:
                if value.shape == lshape:
                    new[key] = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False,
                                                  shape=p.shape, stride=p.stride())
                elif key in flat:
                    n, _ = flat[key]
                    new[key] = DTensor.from_local(value, p.device_mesh, [Shard(0)], run_check=False,
                                                  shape=torch.Size((n,)), stride=(1,))
                elif value.dim() == 1 and value.numel() == lshape.numel() and _shard0(p) \
                        and _flat_chunks_match(p):
                    # the flattened shard (Prodigy's s and p0): the flattened parameter's chunk
                    new[key] = DTensor.from_local(value, p.device_mesh, [Shard(0)], run_check=False,
                                                  shape=torch.Size((p.numel(),)), stride=(1,))
                else:
                    raise ValueError(f"state {key!r} of a DTensor parameter of shape {tuple(p.shape)}: "
                                     f"its shape {tuple(value.shape)} is neither the local shard's "
                                     f"{tuple(lshape)} nor a block sequence (nor the flattened shard of a parameter whose "
                                     "flattened shards are even chunks); it cannot be resharded")
            else:
                new[key] = value
        out["state"][pid] = new
    return out


def _local_chunk(p: Any, value: Tensor) -> Tensor:
    """This rank's part of a full (unsharded) tensor for DTensor parameter ``p``: its
    dim-0 chunk (of the parameter's shape, or of a 1-D block sequence)."""
    rank = p.device_mesh.get_local_rank()
    ws = p.device_mesh.size()
    sizes = _chunks(value.shape[0], ws)
    start = sum(sizes[:rank])
    return value.narrow(0, start, sizes[rank])


def unwrap_state_dict(opt, state_dict: dict) -> dict:
    """The inverse of :func:`wrap_state_dict` for this optimizer's parameters: DTensor
    values become their local shard, full plain tensors of DTensor parameters are cut
    to this rank's chunk, codec layouts get the local shape. Returns a new dict."""
    from ..core import layout

    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), list):
        return state_dict  # checkpoint.prepare says what is wrong
    params = [p for g in opt.param_groups for p in g["params"]]
    if not any_dtensor(params) and not any(is_dtensor(v) for st in state_dict.get("state", {}).values()
                                           if isinstance(st, dict) for v in st.values()):
        return state_dict
    groups = state_dict.get("param_groups", [])
    ids = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])]
    by_id = dict(zip(ids, params))
    gathered = _gathered_params(opt)
    out = dict(state_dict)
    out["state"] = {}
    for pid, st in state_dict.get("state", {}).items():
        p: Any = by_id.get(pid)
        if not isinstance(st, dict):
            out["state"][pid] = st
            continue
        new = {}
        dt = p is not None and is_dtensor(p) and id(p) not in gathered
        lshape: Any = p.to_local().shape if dt else None
        for key, value in st.items():
            if is_dtensor(value):
                value = value.to_local() if dt else value.full_tensor()
            elif dt and isinstance(value, Tensor) and key != "step" and value.dim() > 0:
                if value.shape == p.shape:
                    value = _local_chunk(p, value)
                elif value.dim() == 1 and _shard0(p):
                    value = _local_chunk(p, value)
            new[key] = value
        if dt and isinstance(new.get(layout.LAYOUT_KEY), dict):
            new[layout.LAYOUT_KEY] = {
                name: ((meta[0], meta[1], tuple(lshape), *meta[3:])
                       if isinstance(meta, (tuple, list)) and len(meta) >= 3 else meta)
                for name, meta in new[layout.LAYOUT_KEY].items()}
        out["state"][pid] = new
    return out
