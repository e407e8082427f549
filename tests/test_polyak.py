"""SPS / SPSmax and AdaGrad-Norm against their equations, on real training,
with resume and the closure rule."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import optimkit as ok
from helpers import digits_problem


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = x @ torch.randn(6, 1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)
    x, y = x.to(dtype), y.to(dtype)
    return model, lambda m: torch.nn.functional.mse_loss(m(x), y)


def _closure(model, loss_fn, opt):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("cls,hp", [(ok.SPS, dict(lr=0.5)), (ok.SPSmax, dict(lr=2.0, max_lr=0.05, f_star=0.01)),
                                    (ok.SPS, dict(eps=1e-3))])
def test_sps_matches_the_equations(cls, hp):
    model, loss_fn = _model()
    ref = copy.deepcopy(model)
    opt = cls(model.parameters(), **hp)
    full = {**cls.defaults, **hp}
    for _ in range(15):
        ref.zero_grad()
        loss = loss_fn(ref)
        loss.backward()
        params = list(ref.parameters())
        sq = sum(float(p.grad.double().pow(2).sum()) for p in params)
        gamma = min((float(loss.detach()) - full["f_star"]) / (sq + full["eps"]), full["max_lr"])
        with torch.no_grad():
            for p in params:
                p.sub_(full["lr"] * gamma * p.grad)
        opt.step(_closure(model, loss_fn, opt))
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hp", [dict(preconditioner="adagrad"), dict(preconditioner="adam", beta2=0.9, lr=0.5),
                                dict(preconditioner="none", max_lr=0.1), dict(preconditioner="adagrad", f_star=0.02)])
def test_psps_matches_the_equations(hp):
    # float64: the step size divides by a sum over all gradients, so float32 rounding
    # differences between two correct orders of operations grow step by step
    model, loss_fn = _model(torch.float64)
    ref = copy.deepcopy(model)
    opt = ok.PSPS(model.parameters(), **hp)
    full = {**ok.PSPS.defaults, **hp}
    accs = [torch.zeros_like(p) for p in ref.parameters()]
    for t in range(1, 16):
        ref.zero_grad()
        loss = loss_fn(ref)
        loss.backward()
        params = list(ref.parameters())
        scaled = []
        for p, acc in zip(params, accs):
            if full["preconditioner"] == "adagrad":
                acc += p.grad ** 2
                scaled.append(p.grad / (acc.sqrt() + full["precond_eps"]))
            elif full["preconditioner"] == "adam":
                acc.mul_(full["beta2"]).add_((1 - full["beta2"]) * p.grad ** 2)
                scaled.append(p.grad / ((acc / (1 - full["beta2"] ** t)).sqrt() + full["precond_eps"]))
            else:
                scaled.append(p.grad.clone())
        weighted = sum(float((p.grad * d).double().sum()) for p, d in zip(params, scaled))
        gamma = min((float(loss.detach()) - full["f_star"]) / (weighted + full["eps"]), full["max_lr"])
        with torch.no_grad():
            for p, d in zip(params, scaled):
                p.sub_(full["lr"] * gamma * d)
        opt.step(_closure(model, loss_fn, opt))
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"step {t}: {m}")


@pytest.mark.parametrize("hp", [dict(), dict(beta=0.5, c=0.5, gamma_max=0.05, f_star=0.01)])
def test_momsps_matches_the_equations(hp):
    model, loss_fn = _model()
    ref = copy.deepcopy(model)
    opt = ok.MomSPS(model.parameters(), **hp)
    full = {**ok.MomSPS.defaults, **hp}
    prev = [p.detach().clone() for p in ref.parameters()]
    for t in range(1, 16):
        ref.zero_grad()
        loss = loss_fn(ref)
        loss.backward()
        params = list(ref.parameters())
        sq = sum(float(p.grad.double().pow(2).sum()) for p in params)
        gamma = (1 - full["beta"]) * min((float(loss.detach()) - full["f_star"]) / (full["c"] * sq),
                                         full["gamma_max"])
        with torch.no_grad():
            for i, p in enumerate(params):
                new = p - gamma * p.grad + full["beta"] * (p - prev[i])
                prev[i] = p.detach().clone()
                p.copy_(new)
        opt.step(_closure(model, loss_fn, opt))
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}: {m}")


def test_sps_trains_digits_and_needs_a_closure():
    model, loss_fn = digits_problem()
    opt = ok.SPSmax(model.parameters(), max_lr=1.0)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    losses = [float(opt.step(_closure(model, loss_fn, opt))) for _ in range(60)]
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_adagrad_norm_matches_the_equations_and_resumes():
    model, loss_fn = _model()
    ref = copy.deepcopy(model)
    opt = ok.AdaGradNorm(model.parameters(), lr=0.5, b0=0.1)
    b2 = 0.1 ** 2
    for t in range(20):
        ref.zero_grad()
        loss_fn(ref).backward()
        b2 += sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters())
        with torch.no_grad():
            for p in ref.parameters():
                p.sub_(0.5 * p.grad / math.sqrt(b2))
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}: {m}")
    assert opt.param_groups[0]["sum_sq"] == pytest.approx(b2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin = copy.deepcopy(model)
    opt2 = ok.AdaGradNorm(twin.parameters(), lr=0.5, b0=0.1)
    opt2.load_state_dict(torch.load(buf))
    for m, o in ((model, opt), (twin, opt2)):
        for _ in range(5):
            o.zero_grad()
            loss_fn(m).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls,kwargs,needle", [
    (ok.SPS, dict(max_lr=0.0), "max_lr"), (ok.SPS, dict(eps=-1.0), "eps"), (ok.AdaGradNorm, dict(b0=0.0), "b0"),
    (ok.PSPS, dict(preconditioner="hutch"), "preconditioner"), (ok.PSPS, dict(beta2=1.0), "beta2"),
])
def test_bad_arguments(cls, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        cls([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_psps_resumes_exactly_and_keeps_its_accumulator_exact():
    model, loss_fn = _model()
    opt = ok.PSPS(model.parameters(), preconditioner="adam", state_precision="q8", min_quant_size=0)
    for _ in range(4):
        opt.step(_closure(model, loss_fn, opt))
    st = next(iter(opt.state.values()))
    assert st["precond_acc"].dtype == torch.float32  # full precision whatever state_precision says
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin = copy.deepcopy(model)
    opt2 = ok.PSPS(twin.parameters(), preconditioner="adam", state_precision="q8", min_quant_size=0)
    opt2.load_state_dict(torch.load(buf))
    for m, o in ((model, opt), (twin, opt2)):
        for _ in range(4):
            o.step(_closure(m, loss_fn, o))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_bench_gives_closure_rules_their_loss_and_refuses_zeroth_order():
    from optimkit.bench.runner import run_trial
    from test_bench_workloads import _spec

    for name in ("sps_max", "psps"):
        spec = _spec("mlp_digits", seed=0, optimizer=name, steps=20)
        spec.hparams.clear()
        result = run_trial(spec)
        assert result["status"] == "ok", result["error"]
        assert result["series"][-1][3] < result["series"][0][3]  # the metric improved
    spec = _spec("mlp_digits", seed=0, optimizer="mezo", steps=5)
    spec.hparams.clear()
    result = run_trial(spec)
    assert result["status"] != "ok" and "zeroth-order" in result["error"]


@pytest.mark.slow  # compiles four kernels
@pytest.mark.parametrize("name", ["sps_max", "psps", "momsps"])
def test_closure_rules_agree_across_compile_placement_and_precision(name):
    """The registry-wide contract tests step without a closure, so these options are
    checked here: compiled within float32 rounding, cpu placement and q8 requested
    (every state of these rules is kept exact) bit for bit."""
    base, loss_fn = _model()
    runs = []
    for kw in (dict(), dict(compile=True), dict(state_placement="cpu"),
               dict(state_precision="q8", min_quant_size=0)):
        model = copy.deepcopy(base)
        opt = ok.create(name, model.parameters(), **kw)
        for _ in range(6):
            opt.step(_closure(model, loss_fn, opt))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(runs[0], runs[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for other in runs[2:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
