"""DoG / L-DoG: step-for-step parity with dog-optimizer while the step size grows;
DoWG against optax.contrib.dowg's form written out here; PolynomialDecayAverager
against dog.PolynomialDecayAverager; state dict, bad arguments."""
from __future__ import annotations

import math

import pytest
import torch

import optimkit as ok
from helpers import digits_problem, lockstep, resume_on_digits, train

dog = pytest.importorskip("dog")

CASES = [("DoG", {}), ("DoG", dict(weight_decay=0.01, reps_rel=1e-4)), ("DoG", dict(init_eta=1e-3)),
         ("LDoG", {}), ("LDoG", dict(weight_decay=0.01, eps=1e-6)), ("LDoG", dict(init_eta=1e-4))]


def _start():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(6, 4, generator=gen), torch.randn(5, generator=gen), torch.zeros(3, 2)]


def _grads(params, gen):
    """A pull toward a point 3 units away plus noise: from rbar = 1e-6 (1 + |x0|) the
    step size has to grow by orders of magnitude for the parameters to get there."""
    return [(x.detach() - 3.0) + 0.1 * torch.randn(x.shape, generator=gen) for x in params]


@pytest.mark.parametrize("cls,hp", CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_matches_dog_optimizer_step_for_step_while_the_step_grows(cls, hp):
    start = _start()
    a = [torch.nn.Parameter(w.clone()) for w in start]
    b = [torch.nn.Parameter(w.clone()) for w in start]
    ours, peer = getattr(ok, cls)(a, **hp), getattr(dog, cls)(b, **hp)
    travelled = []
    lockstep(ours, peer, a, b, _grads, 50, label=f"{cls} {hp}",
             after=lambda t: travelled.append(_travel(a, start)) if t == 1 else None)
    first = travelled[0]
    if cls == "DoG":
        assert ours.param_groups[0]["rbar"] == pytest.approx(float(peer.param_groups[0]["rbar"]), rel=1e-5)
        assert ours.param_groups[0]["G"] == pytest.approx(float(peer.param_groups[0]["G"]), rel=1e-5)
    else:
        for x, eta in zip(a, peer.param_groups[0]["eta"]):
            assert float(ours.state[x]["eta"]) == pytest.approx(float(eta), rel=1e-5)
    assert _travel(a, start) > 30 * first, "the step size did not grow"


def _travel(params, start) -> float:
    return math.sqrt(sum(float((p.detach() - s).square().sum()) for p, s in zip(params, start)))


def _dowg_reference(start, grads_of, steps, lr=1.0, init_estim_sq_dist=None, eps=1e-4, weight_decay=0.0):
    """optax.contrib.dowg (optax 0.2.x) written out (float32 tensors, as optax on float32
    parameters; the scalars in float64): chain(add_decayed_weights,
    scale_by_dowg, scale_by_learning_rate) over the whole list of tensors:
    r2 = max(r2, |x - x0|^2); v = r2 |g|^2 + v; x -= lr r2 / (sqrt(v) + eps) g."""
    x = [w.clone() for w in start]
    x0 = [w.clone() for w in x]
    r2 = eps if init_estim_sq_dist is None else init_estim_sq_dist
    v = 0.0
    out = []
    for t in range(steps):
        g = [gi + weight_decay * xi for gi, xi in zip(grads_of(t, x), x)]
        r2 = max(r2, sum(float(((xi - ai) ** 2).sum()) for xi, ai in zip(x, x0)))
        v = r2 * sum(float((gi ** 2).sum()) for gi in g) + v
        eta = lr * r2 / (math.sqrt(v) + eps)
        x = [xi - eta * gi for xi, gi in zip(x, g)]
        out.append([xi.clone() for xi in x])
    return out


@pytest.mark.parametrize("hp", [{}, dict(weight_decay=0.01), dict(init_estim_sq_dist=1e-2, eps=1e-6, lr=0.5)])
def test_dowg_matches_the_optax_form_step_for_step(hp):
    start = _start()
    gen = torch.Generator().manual_seed(1)
    stream = [[0.1 * torch.randn(w.shape, generator=gen) for w in start] for _ in range(50)]

    def grads_of(t, x):
        return [(xi - 3.0) + n.to(xi.dtype) for xi, n in zip(x, stream[t])]

    ref = _dowg_reference(start, grads_of, 50, **hp)
    a = [torch.nn.Parameter(w.clone()) for w in start]
    opt = ok.DoWG(a, **hp)
    for t in range(50):
        for x, g in zip(a, grads_of(t, [p.detach() for p in a])):
            x.grad = g
        opt.step()
        for x, y in zip(a, ref[t]):
            torch.testing.assert_close(x.detach(), y, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {t}: {m}")
    assert float((a[0].detach() - start[0]).abs().mean()) > 1.0, "the parameters did not travel"


def test_averager_matches_dog_package():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ours, peer = ok.PolynomialDecayAverager(model, gamma=8.0), dog.PolynomialDecayAverager(model, gamma=8.0)
    opt = ok.DoG(model.parameters())
    for _ in range(7):
        model(torch.randn(16, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ours.step()
        peer.step()
    for (k, x), (_, y) in zip(ours.averaged_model.state_dict().items(), peer.averaged_model.state_dict().items()):
        assert torch.equal(x, y), k
    sd = ours.state_dict()
    again = ok.PolynomialDecayAverager(model)
    again.load_state_dict(sd)
    assert again.t == ours.t == 8
    assert ours.base_model is model


def test_averager_first_step_copies_then_averages():
    w = torch.nn.Linear(2, 1, bias=False)
    avg = ok.PolynomialDecayAverager(w, gamma=0.0)  # c = 1/t: the running mean
    values = []
    for t in range(1, 5):
        with torch.no_grad():
            w.weight.fill_(float(t))
        values.append(float(t))
        avg.step()
    assert torch.allclose(avg.averaged_model.weight, torch.full((1, 2), sum(values) / 4))
    with pytest.raises(TypeError):
        ok.PolynomialDecayAverager([torch.zeros(2)])


@pytest.mark.parametrize("cls", ["DoG", "LDoG", "DoWG"])
def test_state_dict_resume_is_exact(cls):
    resume_on_digits(getattr(ok, cls))


@pytest.mark.parametrize("cls", ["DoG", "LDoG", "DoWG"])
def test_default_lr_trains_digits(cls):
    """Full batch, defaults: DoG and L-DoG start with tiny steps (rbar = 1e-6 (1 + |x0|))
    and take ~70 steps to grow into the problem (2.34 -> 0.11 / 0.10 at step 100);
    DoWG overshoots to 12 by step 20 and recovers, but how fast depends on rounding
    (at step 100: 0.18 in float64 and on one CPU in float32, 0.32 on another), so it
    gets 150 steps (0.10 in float64, 0.13 in float32 on the slower CPU)."""
    model, loss_fn = digits_problem()
    losses = train(model, loss_fn, getattr(ok, cls)(model.parameters()), 150 if cls == "DoWG" else 100)
    assert losses[-1] < 0.1 * losses[0], losses[::10]


@pytest.mark.parametrize("cls,kwargs,needle", [
    ("DoG", dict(reps_rel=0.0), "reps_rel"), ("DoG", dict(init_eta=0.0), "init_eta"),
    ("LDoG", dict(weight_decay=-1.0), "weight_decay"), ("DoWG", dict(eps=-1.0), "eps"),
    ("DoWG", dict(init_estim_sq_dist=-1.0), "init_estim_sq_dist"),
    ("DoG", dict(projection=ok.GaLore(rank=2)), "projection"),
])
def test_bad_arguments(cls, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        getattr(ok, cls)([torch.nn.Parameter(torch.zeros(8, 8))], **kwargs)


def test_reps_rel_may_be_zero_with_init_eta():
    w = torch.nn.Parameter(torch.ones(3))
    opt = ok.DoG([w], reps_rel=0.0, init_eta=0.5)
    w.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.5))


@pytest.mark.parametrize("cls", ["DoG", "LDoG"])
def test_two_groups_keep_their_own_norms_as_in_the_package(cls):
    start = _start()
    a = [torch.nn.Parameter(w.clone()) for w in start]
    b = [torch.nn.Parameter(w.clone()) for w in start]
    ours = getattr(ok, cls)([{"params": a[:1]}, {"params": a[1:], "reps_rel": 1e-4}])
    peer = getattr(dog, cls)([{"params": b[:1]}, {"params": b[1:], "reps_rel": 1e-4}])
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        for x, y, g in zip(a, b, _grads(a, gen)):
            x.grad, y.grad = g.clone(), g.clone()
        ours.step()
        peer.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
