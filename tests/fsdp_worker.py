"""Rank-side code of tests/test_fsdp.py and tests/test_fsdp_dcp.py (run by dist_helpers.run_ranks through on_mesh).

Every function takes the device mesh first, runs on every rank (collectives inside)
and returns plain tensors (full, gathered) and values for the parent to check."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

import optimkit as ok
from fsdp_helpers import DCP_SHAPES, Params, batches, full, mlp, set_synthetic_grads


def _shard_mlp(mesh):
    model = mlp()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _hp(hp: dict, tmp: str) -> dict:
    hp = dict(hp)
    if hp.get("state_placement") == "disk":
        hp["state_dir"] = tmp
    return hp


def train_cases(mesh, cases, steps: int, tmp: str):
    """FSDP2-sharded MLP, each rank on its half of every global batch (gradients are
    averaged by FSDP2's reduce-scatter): full parameters after ``steps`` steps per case."""
    rank, ws = dist.get_rank(), dist.get_world_size()
    out = {}
    data = batches(steps)
    for key, name, hp in cases:
        model = _shard_mlp(mesh)
        opt = ok.create(name, model.parameters(), **_hp(hp, tmp))
        for x, y in data:
            n = x.shape[0] // ws
            xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()
        out[key] = [full(p.detach()).clone() for p in model.parameters()]
    return out


def _gathered_state(opt):
    sd = opt.state_dict()
    return {pid: {k: (full(v).clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
            for pid, st in sd["state"].items()}


def exact_cases(mesh, cases, steps: int):
    """Synthetic element-wise gradients on FSDP2 parameters (identical bits for every
    sharding): full parameters, and the gathered state dict (or the error it raised)."""
    out = {}
    for key, name, hp in cases:
        module = Params()
        fully_shard(module, mesh=mesh)
        opt = ok.create(name, module.parameters(), **hp)
        for s in range(steps):
            set_synthetic_grads(module, s)
            opt.step()
        params = [full(p.detach()).clone() for p in module.parameters()]
        try:
            state = _gathered_state(opt)
        except ValueError as e:
            state = str(e)
        out[key] = (params, state)
    return out


def refusals(mesh, cases):
    """Whole-tensor rules on DTensor parameters: the error message, and whether the
    parameters were left unchanged."""
    out = {}
    for key, name, hp in cases:
        module = Params()
        fully_shard(module, mesh=mesh)
        before = [p.to_local().clone() for p in module.parameters()]
        try:
            opt = ok.create(name, module.parameters(), **hp)
            set_synthetic_grads(module, 0)
            opt.step()
            msg = None
        except ValueError as e:
            msg = str(e)
        same = all(torch.equal(b, p.to_local()) for b, p in zip(before, module.parameters()))
        out[key] = (msg, same)
    return out


# ------------------------------------------------------------------ checkpoints
def _run(module, opt, start: int, steps: int) -> None:
    for s in range(start, start + steps):
        set_synthetic_grads(module, s)
        opt.step()


def save(module, opt, path: str) -> None:
    """A DCP checkpoint of model and optimizer (torch's distributed state dict API)."""
    dcp.save({"model": get_model_state_dict(module), "optim": get_optimizer_state_dict(module, opt)},
             checkpoint_id=path)


def load(module, opt, path: str) -> None:
    """Load a DCP checkpoint (any world size) into ``module`` and ``opt`` in place.
    With ``sharded_strategy="gather"`` a rank holds state for the tensors it owns only:
    ``strict=False`` lets torch accept the others' absence."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    sd = {"model": get_model_state_dict(module), "optim": get_optimizer_state_dict(module, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(module, sd["model"])
    gather = any(g.get("sharded_strategy") == "gather" for g in opt.param_groups)
    set_optimizer_state_dict(module, opt, sd["optim"], options=StateDictOptions(strict=not gather))


def dcp_cases(mesh, cases, root: str, before: int, after: int):
    """Per case: (a) ``before`` steps, save to ``root/<key>-2``, ``after`` more steps
    (uninterrupted); (b) a fresh model/optimizer loads that checkpoint and runs the
    same ``after`` steps; (c) a fresh one loads the 1-rank checkpoint ``root/<key>-1``
    (written by the parent) and runs them. Full parameters and state of each."""
    out = {}
    for key, name, hp in cases:
        res = {}
        module = Params(DCP_SHAPES)
        fully_shard(module, mesh=mesh)
        opt = ok.create(name, module.parameters(), **hp)
        _run(module, opt, 0, before)
        save(module, opt, os.path.join(root, f"{key}-2"))
        _run(module, opt, before, after)
        res["uninterrupted"] = ([full(p.detach()).clone() for p in module.parameters()], _gathered_state(opt),
                                [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups])
        for tag, src in (("resumed", f"{key}-2"), ("from_1", f"{key}-1")):
            module = Params(DCP_SHAPES, seed=99)  # other values: the checkpoint must overwrite them
            fully_shard(module, mesh=mesh)
            opt = ok.create(name, module.parameters(), **hp)
            load(module, opt, os.path.join(root, src))
            _run(module, opt, before, after)
            res[tag] = ([full(p.detach()).clone() for p in module.parameters()], _gathered_state(opt),
                        [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups])
        out[key] = res
    return out


def all_cases(mesh, train, train_steps, exact, exact_steps, refused, tmp, strategies, shapes):
    """Every case of tests/test_fsdp.py in one process group."""
    return {"strategies": strategy_cases(mesh, strategies, shapes, exact_steps),
            "train": train_cases(mesh, train, train_steps, tmp),
            "exact": exact_cases(mesh, exact, exact_steps),
            "refused": refusals(mesh, refused)}


def strategy_cases(mesh, cases, shapes, steps: int):
    """Whole-tensor rules with ``sharded_strategy``: full parameters after ``steps``
    synthetic-gradient steps, and how many parameters each rank keeps state for."""
    out = {}
    for key, name, hp in cases:
        module = Params(shapes)
        fully_shard(module, mesh=mesh)
        opt = ok.create(name, module.parameters(), **hp)
        for s in range(steps):
            set_synthetic_grads(module, s)
            opt.step()
        held = [None] * dist.get_world_size()
        dist.all_gather_object(held, len(opt.state))
        # a state dict round trip (same world size) continues as the optimizer itself
        twin = Params(shapes, seed=99)
        fully_shard(twin, mesh=mesh)
        with torch.no_grad():
            for a, b in zip(twin.parameters(), module.parameters()):
                a.to_local().copy_(b.to_local())
        twin_opt = ok.create(name, twin.parameters(), **hp)
        try:
            twin_opt.load_state_dict(opt.state_dict())
        except ValueError as e:  # state that is not shaped like the shard (block-local factors)
            twin_opt = str(e)
        for m, o in ((module, opt), (twin, twin_opt)):
            if not isinstance(twin_opt, str):
                set_synthetic_grads(m, steps)
                o.step()
        resumed = twin_opt if isinstance(twin_opt, str) else \
            all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(twin.parameters(), module.parameters()))
        out[key] = ([full(p.detach()).clone() for p in module.parameters()], held, resumed)
    return out


# ------------------------------------------------------------------ one launcher
def on_mesh(rank: int, world_size: int, func: str, *args):
    """Entry point for ``dist_helpers.run_ranks``: a CPU device mesh over the process
    group, then ``<func>(mesh, *args)`` of this module (its result goes back)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    return globals()[func](mesh, *args)


# ------------------------------------------------------------------ the registry
def registry_cases(mesh, cases, steps: int):
    """Every case ``(key, name, hp, create_graph)``: the FSDP2-sharded MLP trained for
    ``steps`` steps, every rank on the *whole* global batch, so that FSDP2's averaged
    reduce-scatter gives the unsharded gradient bit for bit ((g + g) / 2 = g). Full
    parameters after the run, or the error it raised (type and message)."""
    out = {}
    data = batches(steps)
    for key, name, hp, graph in cases:
        print("case", key, flush=True)  # the log names the case a hung rank is in
        model = _shard_mlp(mesh)
        try:
            opt = ok.create(name, model.parameters(), **hp)
            for x, y in data:
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward(create_graph=graph)
                opt.step()
            out[key] = [full(p.detach()).clone() for p in model.parameters()]
        except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
            out[key] = f"{type(e).__name__}: {e}"
    return out
