"""MeZO: the SPSA step against the equations, training with forward passes only
(no gradient is ever populated), reproducibility and resume, the closure rule."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import optimkit as ok
from optimkit.optimizers.mezo import MeZO, _seed


def _problem(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(128, 10)
    w_true = torch.randn(10, 1)
    y = x @ w_true
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model, lambda m: torch.nn.functional.mse_loss(m(x), y)


def test_step_matches_the_equations():
    """One step by hand: z from the documented seeds, the two losses at theta +- eps z,
    theta - lr (g z + wd theta)."""
    model, loss_fn = _problem()
    ref = copy.deepcopy(model)
    lr, eps, wd, seed = 0.01, 1e-3, 0.1, 7
    opt = ok.MeZO(model.parameters(), lr=lr, eps=eps, weight_decay=wd, seed=seed)
    opt.step(lambda: loss_fn(model))
    params = list(ref.parameters())
    zs = [MeZO._direction(p.detach(), _seed(seed, 1, i)) for i, p in enumerate(params)]
    with torch.no_grad():
        plus_model, minus_model = copy.deepcopy(ref), copy.deepcopy(ref)
        for p, q, z in zip(plus_model.parameters(), minus_model.parameters(), zs):
            p.add_(eps * z)
            q.sub_(eps * z)
        g = float((loss_fn(plus_model) - loss_fn(minus_model)) / (2 * eps))
        for p, z, got in zip(params, zs, model.parameters()):
            want = p - lr * (g * z + wd * p)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_trains_with_forward_passes_only():
    model, loss_fn = _problem()
    opt = ok.MeZO(model.parameters(), lr=3e-3, eps=1e-3)
    with torch.no_grad():
        start = float(loss_fn(model))
    for _ in range(400):
        opt.step(lambda: loss_fn(model))
        assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        end = float(loss_fn(model))
    assert end < 0.5 * start, (start, end)  # measured: 3.38 -> 0.9


def test_reproducible_and_resumes_exactly():
    model, loss_fn = _problem()
    twin = copy.deepcopy(model)
    opt = ok.MeZO(model.parameters(), lr=1e-3, seed=3)
    for _ in range(5):
        opt.step(lambda: loss_fn(model))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed_model = copy.deepcopy(model)
    resumed = ok.MeZO(resumed_model.parameters(), lr=1e-3, seed=3)
    resumed.load_state_dict(torch.load(buf))
    for _ in range(5):
        opt.step(lambda: loss_fn(model))
        resumed.step(lambda: loss_fn(resumed_model))
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    again = ok.MeZO(twin.parameters(), lr=1e-3, seed=3)
    for _ in range(10):
        again.step(lambda: loss_fn(twin))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_needs_a_closure_and_checks_arguments():
    model, _ = _problem()
    opt = ok.MeZO(model.parameters())
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    for kwargs, needle in [(dict(eps=0.0), "eps"), (dict(lr=-1.0), "lr"), (dict(seed=-1), "seed"),
                           (dict(weight_decay=-1.0), "weight_decay")]:
        with pytest.raises(ValueError, match=needle):
            ok.MeZO(model.parameters(), **kwargs)


def test_frozen_parameters_are_left_alone():
    model, loss_fn = _problem()
    model[0].weight.requires_grad_(False)
    before = model[0].weight.detach().clone()
    opt = ok.MeZO(model.parameters(), lr=1e-2)
    opt.step(lambda: loss_fn(model))
    assert torch.equal(model[0].weight, before)


def test_a_gradient_style_closure_works_with_a_warning_and_resumes():
    """A closure written for gradient optimizers (zero_grad, loss, backward) is rerun
    with autograd on; the step is the same as with a forward-only closure."""
    model, loss_fn = _problem()
    twin = copy.deepcopy(model)
    opt = ok.MeZO(model.parameters(), lr=1e-3)
    opt2 = ok.MeZO(twin.parameters(), lr=1e-3)

    def backprop_closure():
        opt2.zero_grad()
        loss = loss_fn(twin)
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="backward"):
        for _ in range(3):
            opt.step(lambda: loss_fn(model))
            opt2.step(backprop_closure)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
