"""ScheduleFreeWrapper: parity with the authors' wrapper around torch and optimkit
optimizers, exact train/eval round trips and resume, the eval-mode guard."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import optimkit as ok
from helpers import lockstep
from test_schedule_free import _same_eval_point

schedulefree = pytest.importorskip("schedulefree")

BASES = {
    "torch_sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "torch_sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9),
    "torch_adam": lambda ps: torch.optim.Adam(ps, lr=0.02),
    "optimkit_adamw": lambda ps: ok.AdamW(ps, lr=0.02, weight_decay=0.01),
    "optimkit_q8_adam": lambda ps: ok.Adam(ps, lr=0.02, state_precision="q8", min_quant_size=0),
}


def _start():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(6, 4, generator=gen), torch.randn(5, generator=gen)]


def _grads(params, gen):
    return [(x.detach() - 3.0) + 0.3 * torch.randn(x.shape, generator=gen) for x in params]


@pytest.mark.parametrize("base", ["torch_sgd", "torch_sgd_momentum"])
@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.8, weight_decay_at_y=0.05, r=0.5, weight_lr_power=1.0)])
def test_matches_the_authors_wrapper(base, kw):
    """Train points every step, eval points every 5 (the authors' train() recomputes
    y by a lerp, ours restores it: float32 tolerances). Only bases whose state the
    authors' wrapper does not break: it keeps z inside the base's state, so a base
    that initializes its state when the state is empty (torch.optim.Adam, every
    optimkit optimizer) finds it non-empty and fails (KeyError 'exp_avg'); those
    bases are checked against the equations below."""
    start = _start()
    a = [torch.nn.Parameter(w.clone()) for w in start]
    b = [torch.nn.Parameter(w.clone()) for w in start]
    ours = ok.ScheduleFreeWrapper(BASES[base](a), **kw)
    peer = schedulefree.ScheduleFreeWrapper(BASES[base](b), **kw)
    peer.train()
    lockstep(ours, peer, a, b, _grads, 30, after=lambda t: _same_eval_point(ours, peer, a, b, t),
             label=f"{base} train point")
    assert float((a[0].detach() - start[0]).abs().mean()) > 0.3


@pytest.mark.parametrize("base", list(BASES))
def test_matches_the_equations_around_any_base(base):
    """z stepped by its own copy of the base optimizer on the gradients at y;
    x <- lerp(x, z, c), y = lerp(x, z, 1 - beta), c = lr_max^2 / sum lr_max^2."""
    beta = 0.9
    start = _start()
    a = [torch.nn.Parameter(w.clone()) for w in start]
    z = [torch.nn.Parameter(w.clone()) for w in start]
    xs = [w.clone() for w in start]
    ours = ok.ScheduleFreeWrapper(BASES[base](a), momentum=beta)
    ref_base = BASES[base](z)
    weight_sum = 0.0
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 21):
        grads = _grads(a, gen)
        for p, zz, g in zip(a, z, grads):
            p.grad, zz.grad = g.clone(), g.clone()
        ours.step()
        ref_base.step()
        lr = ref_base.param_groups[0]["lr"]
        weight_sum += lr ** 2
        c = lr ** 2 / weight_sum
        with torch.no_grad():
            for i, zz in enumerate(z):
                xs[i] = torch.lerp(xs[i], zz, c)
                want = torch.lerp(xs[i], zz, 1 - beta)
                torch.testing.assert_close(a[i].detach(), want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{base}, step {t}: {m}")


def test_round_trip_exact_and_eval_mode_guard():
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = ok.ScheduleFreeWrapper(torch.optim.SGD([w], lr=0.1))
    for _ in range(4):
        w.grad = torch.randn(5, 3)
        opt.step()
    y = w.detach().clone()
    opt.eval()
    x = w.detach().clone()
    assert not torch.equal(x, y)
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    assert torch.equal(w.detach(), x)
    opt.train()
    assert torch.equal(w.detach(), y)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_state_dict_resumes_exactly_from_either_mode(mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    loss_fn = lambda m: torch.nn.functional.mse_loss(m(x), y)  # noqa: E731
    twin = copy.deepcopy(model)
    opt = ok.ScheduleFreeWrapper(ok.AdamW(model.parameters(), lr=0.01, state_precision="q8", min_quant_size=0))

    def run(m, o, n):
        for _ in range(n):
            o.zero_grad()
            loss_fn(m).backward()
            o.step()

    run(model, opt, 8)
    if mode == "eval":
        opt.eval()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only
    twin.load_state_dict(saved["model"])
    opt2 = ok.ScheduleFreeWrapper(ok.AdamW(twin.parameters(), lr=0.01, state_precision="q8", min_quant_size=0))
    opt2.load_state_dict(saved["opt"])
    opt.eval()
    opt.train()
    opt2.train()
    run(model, opt, 8)
    run(twin, opt2, 8)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_prodigy_base_weights_by_d():
    """A base group's d (Prodigy) scales its lr in the averaging weights."""
    w = torch.nn.Parameter(torch.randn(4))
    opt = ok.ScheduleFreeWrapper(ok.Prodigy([w]))
    for _ in range(3):
        w.grad = w.detach() - 2.0
        opt.step()
    d = opt.param_groups[0]["d"]
    assert d > 1e-6 and opt._groups[0]["lr_max"] > 1e-6  # d grew, and lr_max = lr d with it


@pytest.mark.parametrize("kwargs,err", [
    (dict(momentum=0.0), ValueError), (dict(momentum=1.0), ValueError), (dict(weight_decay_at_y=-1.0), ValueError),
    (dict(r=-1.0), ValueError), (dict(weight_lr_power="2"), TypeError),
])
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        ok.ScheduleFreeWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), **kwargs)
    with pytest.raises(TypeError, match="base"):
        ok.ScheduleFreeWrapper([torch.nn.Parameter(torch.zeros(2))])


def test_is_a_torch_optimizer_with_hooks_schedulers_and_copies():
    """A torch.optim.Optimizer (what LR schedulers, Lightning and accelerate check for):
    step pre/post hooks and state-dict hooks fire, a LambdaLR schedules the base's lr,
    and a deep copy continues exactly as the original."""
    params = [torch.nn.Parameter(t) for t in _start()]
    opt = ok.ScheduleFreeWrapper(torch.optim.SGD(params, lr=0.05))
    assert isinstance(opt, torch.optim.Optimizer) and opt.defaults is opt.base.defaults
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd_pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o is opt)))
    sched = ok.schedules.cosine(10).scheduler(opt)
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(6)]

    def step(o, ps, g):
        for p, gi in zip(ps, g):
            p.grad = gi.clone()
        o.step()

    for g in grads[:3]:
        step(opt, params, g)
        sched.step()
    assert calls == [("pre", True), ("post", True)] * 3
    sd = opt.state_dict()
    assert sd["extra"] == 1 and ("sd_pre", True) in calls
    opt.load_state_dict(sd)      # the pre-hook removes "extra", which the loader would refuse
    assert calls[-1] == ("load_post", True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * ok.schedules.cosine(10)(3))
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for g in grads[3:]:
        step(opt, params, g)
        step(twin, twin_params, g)
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
