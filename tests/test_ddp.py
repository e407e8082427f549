"""torch.nn.parallel.DistributedDataParallel with optimkit optimizers, 2 gloo ranks.

DDP averages the ranks' gradients, so each rank's optimizer sees the gradient of the
mean loss over the global batch: every registered gradient optimizer must then step
as it does in one process on the global batch (fp32 tolerances: the two gradients
differ by rounding), equal bit for bit the same optimizer in one process fed DDP's
arithmetic (each half-batch gradient / world size, summed), and the ranks must agree
with each other bit for bit (parameters and optimizer state).

One process group for the module's default tests (all optimizers run inside one
launch); the compiled variants run in a second, slow, launch.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import optimkit as ok
from dist_helpers import one_thread, run_ranks
from optimizer_cases import contract_hp, gradient_names

WORLD = 2
STEPS = 4
N = 64  # global batch


def _skip_reason(name: str) -> str | None:
    cls = ok.info(name).cls
    if getattr(cls, "requires_create_graph", False):
        return "reads Hessian-vector products (loss.backward(create_graph=True)), which DDP's reducer does not support"
    return None


# gradient-free (MeZO) and closure-driven (Polyak step sizes) optimizers are left out by
# gradient_names(): they do not step on the gradient DDP averages
NAMES = [n for n in gradient_names() if _skip_reason(n) is None]
SKIPPED = {n: _skip_reason(n) for n in gradient_names() if _skip_reason(n) is not None}
#: compared bit for bit with DDP's own arithmetic replayed in one process only: a
#: rounding-level change of the gradient changes the step far beyond fp32 tolerances
ROUNDING_SENSITIVE = {
    # eigenbasis of rank-deficient Kronecker factors (16x16 from a 16x8 gradient): the basis
    # of the null space is arbitrary, and Adam runs in it
    "soap": "eigh of rank-deficient factors",
}
#: (case id, registry name, extra constructor keywords)
CASES = ([(n, n, {}) for n in NAMES]
         + [(f"{n}-q8", n, dict(state_precision="q8", min_quant_size=0)) for n in ("adamw", "lion", "adafactor")])
COMPILED = [(f"{n}-compiled", n, dict(compile=True)) for n in ("adamw", "sgd")]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    teacher = torch.randn(8, 2, generator=g)
    return x, torch.tanh(x @ teacher)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def _kwargs(name, extra):
    return {**contract_hp(name), **extra}


def _state_tensors(opt):
    out = []
    for s in opt.state_dict()["state"].values():
        out.extend(v for _, v in sorted(s.items()) if isinstance(v, torch.Tensor))
    return out


def _ddp_runs(rank, world, cases):
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = _data()
    n = N // world
    xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    out = {}
    for case, name, extra in cases:
        model = DDP(_model())
        opt = ok.create(name, model.parameters(), **_kwargs(name, extra))
        for _ in range(STEPS):
            opt.zero_grad()
            nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()
        out[case] = ([p.detach().clone() for p in model.parameters()], _state_tensors(opt))
    return out


def _single(name, extra, replica=False):
    """One process: the gradient of the mean loss on the global batch; or (``replica``)
    DDP's arithmetic: each rank's half-batch gradient divided by the world size, summed."""
    x, y = _data()
    model = _model()
    params = list(model.parameters())
    opt = ok.create(name, params, **_kwargs(name, extra))
    n = N // WORLD
    for _ in range(STEPS):
        opt.zero_grad()
        if not replica:
            nn.functional.mse_loss(model(x), y).backward()
        else:
            parts = [torch.autograd.grad(nn.functional.mse_loss(model(x[r * n:(r + 1) * n]), y[r * n:(r + 1) * n]),
                                         params) for r in range(WORLD)]
            for i, p in enumerate(params):
                total = parts[0][i] / WORLD
                for r in range(1, WORLD):
                    total = total + parts[r][i] / WORLD
                p.grad = total
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_ddp_runs, WORLD, CASES, timeout=240)


def _check(results, case, name, extra):
    (p0, s0), (p1, s1) = results[0][case], results[1][case]
    for a, b in zip(p0 + s0, p1 + s1):
        assert torch.equal(a, b), f"{case}: ranks disagree"
    with one_thread():
        replica = _single(name, extra, replica=True)
        ref = _single(name, extra)
    for a, b in zip(p0, replica):
        assert torch.equal(a, b), f"{case}: DDP differs from its arithmetic replayed in one process"
    if name in ROUNDING_SENSITIVE:
        return
    for a, b in zip(p0, ref):
        torch.testing.assert_close(a, b, msg=lambda m: f"{case}: DDP vs one process on the global batch: {m}")


@pytest.mark.parametrize("case,name,extra", CASES, ids=[c[0] for c in CASES])
def test_ddp_equals_global_batch(ranks, case, name, extra):
    _check(ranks, case, name, extra)


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_skipped_with_reason(name):
    pytest.skip(SKIPPED[name])


@pytest.mark.slow
def test_ddp_compiled():
    results = run_ranks(_ddp_runs, WORLD, COMPILED, timeout=300)
    for case, name, extra in COMPILED:
        _check(results, case, name, extra)
