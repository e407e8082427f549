"""torch.distributed.checkpoint with optimkit optimizers on FSDP2: save on 2 ranks, load
on 1 (and the other way round), continue, equal to an uninterrupted run.

The 1-rank side runs in this process (no process group: DCP's single-process mode);
the 2-rank side in one spawned gloo process group for the whole module. Gradients
are identical bits for every sharding (``set_synthetic_grads``), so for element-wise
rules every run, whatever the world size it was saved or resumed on, equals the
uninterrupted single-process run bit for bit; Prodigy's ``d`` comes from sums
all-reduced over the ranks (another summation order than one process), so across
world sizes it agrees to fp32 rounding and bit for bit on the same world size.
``sharded_strategy="gather"`` (LAMB, Muon) keeps each tensor's full state on its
owner rank and resumes bit for bit across world sizes too.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import optimkit as ok
import fsdp_worker
from dist_helpers import run_ranks
from fsdp_helpers import DCP_SHAPES, Params, set_synthetic_grads

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

CASES = [
    ("adamw", "adamw", dict(lr=1e-2, weight_decay=0.1)),
    ("adamw-bf16", "adamw", dict(lr=1e-2, state_precision="bf16")),
    ("sgd", "sgd", dict(lr=0.05, momentum=0.9)),
    # q8 on the (128, 64) parameter, whose 2-rank shards hold whole blocks
    ("adamw-q8", "adamw", dict(lr=1e-2, state_precision="q8", min_quant_size=4096)),
    ("lion-q4", "lion", dict(lr=1e-3, state_precision="q4", min_quant_size=4096)),
    ("prodigy", "prodigy", dict(lr=1.0, weight_decay=0.01)),
    # whole-tensor rules, each tensor's full-shape state on its owner rank
    ("lamb-gather", "lamb", dict(lr=1e-2, weight_decay=1e-4, sharded_strategy="gather")),
    ("muon-gather", "muon", dict(ns_dtype="fp32", sharded_strategy="gather")),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """As the ranks (one thread each): matrix products and reductions block by thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
BEFORE, AFTER = 5, 20


def _one_rank():
    import fsdp_worker

    return fsdp_worker


def _run(module, opt, start, steps):
    for s in range(start, start + steps):
        set_synthetic_grads(module, s)
        opt.step()


def _state(opt):
    return {pid: dict(st) for pid, st in opt.state_dict()["state"].items()}


def _groups(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, _one_thread):
    """1-rank checkpoints and uninterrupted runs here, then every 2-rank run in one group."""
    root = str(tmp_path_factory.mktemp("dcp"))
    w = _one_rank()
    local = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's "no process group: single-process mode"
        for key, name, hp in CASES:
            module = Params(DCP_SHAPES)
            opt = ok.create(name, module.parameters(), **hp)
            _run(module, opt, 0, BEFORE)
            w.save(module, opt, os.path.join(root, f"{key}-1"))
            _run(module, opt, BEFORE, AFTER)
            local[key] = ([p.detach().clone() for p in module.parameters()], _state(opt), _groups(opt))
    two = run_ranks(fsdp_worker.on_mesh, 2, "dcp_cases", CASES, root, BEFORE, AFTER, timeout=300)[0]
    return root, local, two


def _same(a, b, exact=True, owned=False):
    """``owned``: ``a`` is rank 0's state under ``sharded_strategy="gather"``, which holds
    the tensors rank 0 owns (0 and 2 of 3) only."""
    params_a, state_a, groups_a = a
    params_b, state_b, groups_b = b
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    for x, y in zip(params_a, params_b):
        torch.testing.assert_close(x, y, **tol)
    if owned:
        assert sorted(state_a) == [0, 2] and sorted(state_b) == [0, 1, 2]
    else:
        assert state_a.keys() == state_b.keys()
    for pid in state_a:
        assert state_a[pid].keys() == state_b[pid].keys()
        for k, v in state_a[pid].items():
            if isinstance(v, torch.Tensor):
                if exact or v.is_floating_point():
                    # Prodigy across world sizes: s accumulates d-scaled gradients with
                    # cancellation; compared at fp32 rounding of its own scale
                    vt = tol if exact else dict(rtol=1e-5, atol=1e-5 * max(1.0, v.abs().max().item()))
                    torch.testing.assert_close(state_b[pid][k], v, **(vt if v.is_floating_point() else {}),
                                               msg=lambda m, pid=pid, k=k: f"state {pid} {k}: {m}")
            else:
                assert state_b[pid][k] == v, (pid, k)
    for ga, gb in zip(groups_a, groups_b):
        assert ga.keys() == gb.keys()
        for k in ga:
            if exact or not isinstance(ga[k], float):
                assert ga[k] == gb[k], k
            else:
                assert ga[k] == pytest.approx(gb[k], rel=1e-5)


@pytest.mark.parametrize("key,name,hp", CASES, ids=[c[0] for c in CASES])
def test_resume_on_two_ranks(runs, key, name, hp):
    """2 ranks: save, load into a fresh model and optimizer, continue: the uninterrupted 2-rank run."""
    _, _, two = runs
    _same(two[key]["resumed"], two[key]["uninterrupted"])


@pytest.mark.parametrize("key,name,hp", CASES, ids=[c[0] for c in CASES])
def test_reshard_two_to_one(runs, key, name, hp):
    """Saved on 2 ranks, loaded in one process, continued: the uninterrupted 1-process run."""
    root, local, two = runs
    w = _one_rank()
    module = Params(DCP_SHAPES, seed=99)
    opt = ok.create(name, module.parameters(), **hp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w.load(module, opt, os.path.join(root, f"{key}-2"))
    _run(module, opt, BEFORE, AFTER)
    exact = name != "prodigy"
    _same(([p.detach() for p in module.parameters()], _state(opt), _groups(opt)), local[key], exact)
    _same(two[key]["uninterrupted"], local[key], exact, owned="gather" in key)  # the 2-rank run itself


@pytest.mark.parametrize("key,name,hp", CASES, ids=[c[0] for c in CASES])
def test_reshard_one_to_two(runs, key, name, hp):
    """Saved in one process, loaded on 2 ranks, continued: the uninterrupted 1-process run."""
    _, local, two = runs
    _same(two[key]["from_1"], local[key], exact=name != "prodigy", owned="gather" in key)
