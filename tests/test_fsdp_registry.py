"""Every registered gradient optimizer on FSDP2 (``fully_shard``, DTensor parameters),
2 gloo ranks, one process group for all cases (``dist_helpers.run_ranks``).

Each case trains the FSDP2-sharded MLP of the FSDP2 tests for a few steps with every
rank on the *whole* global batch: FSDP2's averaged reduce-scatter then hands every
rank the unsharded gradient's shard bit for bit ((g + g) / 2 = g), so the sharded run
must equal the single-process run bit for bit. Element-wise rules (and global
estimates whose sums are all-reduced) step local shards (``sharded_strategy=None``);
the others use ``sharded_strategy="gather"`` (round-robin owners step whole tensors).

Element-wise rules with a whole-tensor addition (``cautious=True``'s per-tensor count,
GaLore/APOLLO/FRUGAL projections of the full gradient) use ``"gather"`` too (``EXTRA``).

Rules that cannot run on FSDP2 are listed in ``REFUSED`` with the reason; they must
raise a clear ValueError/RuntimeError on both ranks and change nothing.
"""
from __future__ import annotations

import pytest
import torch

import fsdp_worker
import optimkit as ok
from dist_helpers import one_thread, run_ranks
from fsdp_helpers import batches, mlp
from optimizer_cases import contract_hp, gradient_names
from optimkit.distributed import sharded

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")]

STEPS = 4

#: name -> (a fragment of the error both ranks raise, why)
REFUSED = {
    # FSDP2's reduce-scatter returns gradients without autograd graph: no Hessian-vector products
    "adahessian": ("carries its graph", "Hessian-vector products need create_graph gradients; FSDP2 reduces "
                   "gradients without their graph"),
    "sophia_h": ("carries its graph", "as AdaHessian"),
    # layer-wise DoG reads per-tensor norms inside a global estimate: neither local nor gather is exact
    "ldog": ("Invalid sharded_strategy", "per-tensor distances inside a global step-size estimate"),
    # the first step's per-tensor SNR is computed in prepare_step, outside the gather path
    "sgd_sai": ("SGDSaI's signal-to-noise ratio", "per-tensor SNR at the first step is not gathered yet"),
}
#: name -> why it is not run on FSDP2 (kept out of the shared process group)
BROKEN: dict[str, str] = {}
#: name -> (atol, why) where the sharded run is not bit-exact
APPROX = {
    # random preconditioner updates drawn from torch's global RNG per tensor: under 'gather'
    # each owner draws for its own tensors only, so the draws (not the rule) differ
    "psgd_kron": (1e-4, "per-tensor random draws from the global RNG happen on the owner rank only"),
}


def _cls(name):
    return ok.info(name).cls


def strategy(name: str):
    """The strategy a name needs on FSDP2: None (local shards, exact) or 'gather'."""
    c = _cls(name)
    return None if sharded.supports_local(c.__new__(c)) else "gather"


def _cases():
    out = []
    for name in gradient_names():
        if name in BROKEN:
            continue
        hp = contract_hp(name)
        if strategy(name):
            hp["sharded_strategy"] = strategy(name)
        out.append((name, name, hp, bool(getattr(_cls(name), "requires_create_graph", False))))
    return out


#: element-wise rules with a whole-tensor addition: 'gather' steps them on owners (exact)
EXTRA = [
    ("adamw-cautious", "adamw", dict(lr=1e-2, cautious=True, sharded_strategy="gather"), False),
    ("lion-cautious", "lion", dict(lr=1e-3, cautious=True, sharded_strategy="gather"), False),
    ("adamw-galore", "adamw", dict(lr=1e-2, projection=ok.GaLore(rank=4, interval=2),
                                   sharded_strategy="gather"), False),
    ("adamw-apollo", "adamw", dict(lr=1e-2, projection=ok.APOLLO(rank=4, interval=2),
                                   sharded_strategy="gather"), False),
    ("adamw-frugal", "adamw", dict(lr=1e-2, projection=ok.FRUGAL(density=0.25, interval=2),
                                   sharded_strategy="gather"), False),
]
CASES = _cases() + EXTRA


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(fsdp_worker.on_mesh, 2, "registry_cases", CASES, STEPS, timeout=150)


def _reference(name, hp, graph, split=False):
    """The single-process run; ``split``: one param group per tensor (buckets of one
    tensor, as a 'gather' owner steps them)."""
    with one_thread():  # as the ranks (matrix products block by thread count)
        model = mlp()
        params = [{"params": [p]} for p in model.parameters()] if split else model.parameters()
        opt = ok.create(name, params, **{k: v for k, v in hp.items() if k != "sharded_strategy"})
        for x, y in batches(STEPS):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward(create_graph=graph)
            opt.step()
        return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("key,name,hp,graph", CASES, ids=[c[0] for c in CASES])
def test_every_optimizer_on_fsdp2(ranks, key, name, hp, graph):
    got0, got1 = ranks[0][key], ranks[1][key]
    if name in REFUSED:
        fragment, _ = REFUSED[name]
        assert isinstance(got0, str) and fragment in got0, got0
        assert isinstance(got1, str) and fragment in got1, got1
        return
    assert not isinstance(got0, str), got0
    ref = _reference(name, hp, graph)
    # (APOLLO's random projections differ in a run with one group per tensor, so only the
    # tolerance check applies to it)
    split = _reference(name, hp, graph, split=True) if "projection" in hp and key != "adamw-apollo" else None
    start = [p.detach() for p in mlp().parameters()]
    assert any(not torch.equal(r, s) for r, s in zip(ref, start))  # the rule moved something
    for i, (a, b, r) in enumerate(zip(got0, got1, ref)):
        assert torch.equal(a, b)  # both ranks hold the same parameter
        if "projection" in hp:
            # the projected step depends on the bucket's composition in its last bits even
            # unsharded (one tensor per group vs all in one: <= 1e-7 after 4 steps); owners
            # step one tensor per bucket, so they equal the split run bit for bit
            torch.testing.assert_close(a, r, rtol=0, atol=5e-6)
            if split is not None:
                torch.testing.assert_close(a, split[i], rtol=0, atol=0)
        elif name in sharded.REDUCED_ESTIMATES:
            # the global sums add per-shard partial sums (all-reduced): another summation
            # order than the unsharded sum, so the step size differs in its last bits
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(a, r, rtol=0, atol=APPROX.get(name, (0,))[0])
