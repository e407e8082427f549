"""Schedule-free SGD/AdamW: parity with the authors' package at the train and the
eval point, exact train/eval round trips, resume from either mode, the eval-mode
guard, BatchNorm statistics at the evaluation point, the bench's eval point."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import optimkit as ok
from helpers import digits_problem, lockstep

schedulefree = pytest.importorskip("schedulefree")

PAIRS = {
    "adamw": (ok.ScheduleFreeAdamW, "AdamWScheduleFree", dict(lr=0.05, weight_decay=0.01, warmup_steps=5)),
    "adamw_r": (ok.ScheduleFreeAdamW, "AdamWScheduleFree",
                dict(lr=0.02, betas=(0.8, 0.99), r=0.5, weight_lr_power=1.0, eps=1e-6)),
    "radam": (ok.ScheduleFreeRAdam, "RAdamScheduleFree", dict(lr=0.2, weight_decay=0.01)),
    "radam_loud": (ok.ScheduleFreeRAdam, "RAdamScheduleFree",
                   dict(lr=0.1, betas=(0.9, 0.99), silent_sgd_phase=False, r=0.5)),
    "sgd": (ok.ScheduleFreeSGD, "SGDScheduleFree", dict(lr=0.1, weight_decay=0.01, warmup_steps=5)),
    "sgd_r": (ok.ScheduleFreeSGD, "SGDScheduleFree", dict(lr=0.05, momentum=0.5, r=1.0)),
}


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=gen), torch.randn(5, generator=gen)]


def _grads(params, gen):
    """A pull toward a fixed point 3 units away, plus noise: the parameters travel."""
    return [(x.detach() - 3.0) + 0.3 * torch.randn(x.shape, generator=gen) for x in params]


@pytest.mark.parametrize("case", list(PAIRS))
def test_matches_the_authors_package_at_train_and_eval_points(case):
    """50 steps, every train point and an eval point every 5 steps compared. The
    authors' train() recomputes y from x and z (a lerp), ours restores the kept y:
    the same values up to rounding, hence float32 tolerances, not bit equality."""
    cls, peer_name, hp = PAIRS[case]
    start = _params()
    a = [torch.nn.Parameter(w.clone()) for w in start]
    b = [torch.nn.Parameter(w.clone()) for w in start]
    ours, peer = cls(a, **hp), getattr(schedulefree, peer_name)(b, **hp)
    ours.train()
    peer.train()
    lockstep(ours, peer, a, b, _grads, 50, after=lambda t: _same_eval_point(ours, peer, a, b, t),
             label=f"{case} train point")
    assert float((a[0].detach() - start[0]).abs().mean()) > 0.3  # the parameters travelled


def _same_eval_point(ours, peer, a, b, t, every=5):
    """Every ``every`` steps: both in eval mode, the same evaluation point, back to train."""
    if t % every:
        return
    ours.eval()
    peer.eval()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=lambda m: f"eval point, step {t}: {m}")
    ours.train()
    peer.train()


def test_train_eval_round_trip_is_bit_exact():
    w = torch.nn.Parameter(torch.randn(7, 3))
    opt = ok.ScheduleFreeAdamW([w], lr=0.1)
    for _ in range(5):
        w.grad = torch.randn(7, 3)
        opt.step()
    y = w.detach().clone()
    for _ in range(3):
        opt.eval()
        assert not torch.equal(w.detach(), y)  # x differs from y
        opt.eval()  # idempotent
        opt.train()
        assert torch.equal(w.detach(), y)
        opt.train()  # idempotent
        assert torch.equal(w.detach(), y)
    assert "sf_y" not in opt.state[w]


def test_step_in_eval_mode_raises_and_changes_nothing():
    w = torch.nn.Parameter(torch.randn(4))
    opt = ok.ScheduleFreeSGD([w], lr=0.1)
    w.grad = torch.randn(4)
    opt.step()
    opt.eval()
    before = w.detach().clone()
    z = opt.state[w]["z"].clone()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    assert torch.equal(w.detach(), before) and torch.equal(opt.state[w]["z"], z)
    assert opt.state[w]["step"] == 1


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only, torch's default


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["schedulefree_adamw", "schedulefree_sgd", "schedulefree_radam"])
def test_state_dict_from_either_mode_resumes_exactly(name, mode):
    """Uninterrupted: 15 steps, eval (evaluate), train, 15 steps. Resumed: the same
    first half, model and optimizer saved in `mode` and loaded into fresh objects
    (torch.load defaults), train(), the second half: bit-identical weights and state."""
    model, loss_fn = digits_problem(n=64)
    fresh = copy.deepcopy(model)
    hp = dict(lr=0.2) if name == "schedulefree_sgd" else dict(lr=0.05)
    opt = ok.create(name, model.parameters(), **hp)

    def steps(m, o, n):
        for _ in range(n):
            o.zero_grad()
            loss_fn(m).backward()
            o.step()

    steps(model, opt, 15)
    other, other_opt = copy.deepcopy(fresh), ok.create(name, fresh.parameters(), **hp)
    if mode == "eval":
        opt.eval()
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    other.load_state_dict(saved["model"])
    other_opt = ok.create(name, other.parameters(), **hp)
    other_opt.load_state_dict(saved["opt"])
    opt.eval()
    opt.train()
    other_opt.train()
    steps(model, opt, 15)
    steps(other, other_opt, 15)
    for x, y in zip(model.parameters(), other.parameters()):
        assert torch.equal(x, y)
    for x, y in zip(opt.state.values(), other_opt.state.values()):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])), k


def test_eval_point_loss_decreases_on_a_convex_problem():
    """Least squares: the loss at the evaluation point x falls at every check."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 10, generator=gen)
    b = a @ torch.randn(10, generator=gen) + 0.1 * torch.randn(64, generator=gen)
    w = torch.nn.Parameter(torch.zeros(10))
    opt = ok.ScheduleFreeSGD([w], lr=0.02)

    def loss():
        return 0.5 * ((a @ w - b) ** 2).mean()

    evals = []
    for t in range(1, 201):
        opt.zero_grad()
        loss().backward()
        opt.step()
        if t % 20 == 0:
            opt.eval()
            with torch.no_grad():
                evals.append(float(loss()))
            opt.train()
    assert all(later < earlier for earlier, later in zip(evals, evals[1:])), evals
    assert evals[-1] < 0.05 * evals[0], evals  # measured: 1.65 -> 0.040


def test_batchnorm_statistics_recomputed_at_the_eval_point():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    opt = ok.ScheduleFreeAdamW(model.parameters(), lr=0.1)
    data = [torch.randn(16, 5) for _ in range(4)]
    for x in data:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    opt.eval()
    model.eval()
    ok.schedulefree_bn_update(model, data)
    assert not model.training  # flag restored
    with torch.no_grad():
        h = torch.cat([model[0](x) for x in data])
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1


def test_bench_evaluates_at_the_eval_point(monkeypatch):
    from optimkit.bench.runner import run_trial
    from test_bench_workloads import _spec

    calls = []
    original_eval = ok.ScheduleFreeAdamW.eval
    monkeypatch.setattr(ok.ScheduleFreeAdamW, "eval", lambda self: (calls.append("eval"), original_eval(self)))
    r = run_trial(_spec("mlp_digits", seed=0, steps=3, optimizer="schedulefree_adamw"))
    assert r["status"] == "ok", r["error"]
    assert calls and len(calls) == len(r["series"])


@pytest.mark.parametrize("cls,kwargs,needle", [
    (ok.ScheduleFreeAdamW, dict(betas=(0.0, 0.999)), "betas"),
    (ok.ScheduleFreeAdamW, dict(warmup_steps=-1), "warmup_steps"),
    (ok.ScheduleFreeAdamW, dict(weight_lr_power=-1.0), "weight_lr_power"),
    (ok.ScheduleFreeSGD, dict(momentum=0.0), "momentum"),
    (ok.ScheduleFreeSGD, dict(momentum=1.0), "momentum"),
    (ok.ScheduleFreeSGD, dict(projection=ok.GaLore(rank=2)), "projection"),
])
def test_bad_arguments(cls, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        cls([torch.nn.Parameter(torch.zeros(8, 8))], **kwargs)


def test_z_stays_full_precision_with_q8_state():
    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = ok.ScheduleFreeAdamW([w], state_precision="q8", min_quant_size=0)
    w.grad = torch.randn(64, 64)
    opt.step()
    st = opt.state[w]
    assert st["z"].dtype == torch.float32 and "exp_avg_sq:codes" in st
    assert "z" in str(ok.info("schedulefree_adamw"))
