"""The projection hook of the facade, checked with projections whose result is known."""
from __future__ import annotations

import pytest
import torch

import optimkit as ok
from optimkit.projection import Projection
from helpers import grad_stream, make_params, run_with_grads


class Identity(Projection):
    def subspace_shape(self, p):
        return tuple(p.shape)

    def project(self, g, pstate, step):
        return g

    def back(self, u, r, g, pstate, step):
        return u


class FixedBasis(Projection):
    """Project on the first ``rank`` columns of a fixed orthonormal basis: the
    rule then runs on r = Q^T g and the update is Q u."""

    def __init__(self, rank):
        self.rank = rank

    def init(self, p):
        q, _ = torch.linalg.qr(torch.randn(p.shape[0], p.shape[0], generator=torch.Generator().manual_seed(3)))
        return {"Q": q[:, : self.rank].contiguous()}

    def subspace_shape(self, p):
        return (self.rank, p.shape[1])

    def project(self, g, pstate, step):
        return pstate["Q"].T @ g

    def back(self, u, r, g, pstate, step):
        return pstate["Q"] @ u


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
def test_identity_projection_equals_full_space(name, compiled):
    if name not in ok.available():
        pytest.skip(f"{name} not registered")
    a, b = make_params(), make_params()
    hp = dict(lr=1e-2, momentum=0.9) if name == "sgd" else dict(lr=1e-2)
    opt_a = ok.create(name, a, compile=compiled, **hp)
    opt_b = ok.create(name, b, compile=compiled, projection=Identity(), **hp)
    stream = grad_stream(a, 5)
    run_with_grads(opt_a, a, stream)
    run_with_grads(opt_b, b, stream)
    # compiled AdamW on CPU runs a C kernel in full space and Inductor under a
    # projection: both match torch.optim; between them, float32 rounding only
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fixed_basis_projection_matches_manual_adam_in_subspace():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    proj = FixedBasis(rank=2)
    opt = ok.AdamW([w], lr=1e-2, weight_decay=0.1, projection=proj)
    q = proj.init(w)["Q"]
    ref = w.detach().clone()
    m = torch.zeros(2, 5)
    v = torch.zeros(2, 5)
    for t in range(1, 8):
        g = torch.randn(6, 5)
        w.grad = g.clone()
        opt.step()
        r = q.T @ g
        m = 0.9 * m + 0.1 * r
        v = 0.999 * v + 0.001 * r * r
        u = (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        ref = ref * (1 - 1e-2 * 0.1) - 1e-2 * (q @ u)
    torch.testing.assert_close(w.detach(), ref)
    assert opt.state[w]["exp_avg"].shape == (2, 5)
    assert torch.equal(opt.state[w]["proj:Q"], q)


def test_projection_rejects_l2_weight_decay():
    with pytest.raises(ValueError, match="projection"):
        ok.Adam(make_params(), weight_decay=0.1, projection=Identity())
    with pytest.raises(TypeError, match="projection"):
        ok.AdamW(make_params(), projection="galore")


def test_projection_resumes_bit_exactly():
    import copy
    stream = grad_stream(make_params(), 10)
    a = make_params()
    opt = ok.AdamW(a, lr=1e-2, projection=FixedBasis(2))
    run_with_grads(opt, a, stream)
    b = make_params()
    opt_b = ok.AdamW(b, lr=1e-2, projection=FixedBasis(2))
    run_with_grads(opt_b, b, stream[:5])
    sd = copy.deepcopy(opt_b.state_dict())
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    opt_c = ok.AdamW(c, lr=1e-2, projection=FixedBasis(2))
    opt_c.load_state_dict(sd)
    run_with_grads(opt_c, c, stream[5:])
    for p, q in zip(a, c):
        assert torch.equal(p, q)
