"""Prodigy: step-for-step parity with prodigyopt while d grows, d in the state
dict, per-group d, groups with their own lr, bad arguments."""
from __future__ import annotations


import pytest
import torch

import optimkit as ok
from helpers import digits_problem, lockstep, resume_on_digits, train

prodigyopt = pytest.importorskip("prodigyopt")

CASES = {
    "defaults": {},
    "decoupled_decay": dict(weight_decay=0.1),
    "l2_bias_correction": dict(weight_decay=0.1, decouple=False, use_bias_correction=True),
    "safeguard_sliced_no_momentum": dict(safeguard_warmup=True, slice_p=3, betas=(0.0, 0.99)),
    "coef_growth_beta3": dict(d_coef=0.5, growth_rate=1.5, beta3=0.9, eps=1e-6),
}


def _start():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(6, 4, generator=gen), torch.randn(5, generator=gen), torch.zeros(3, 2)]


def _grads(params, gen):
    """A pull toward a point 3 units away plus noise: the parameters must travel far
    from d0 = 1e-6's scale, so d has to grow by six orders of magnitude."""
    return [(x.detach() - 3.0) + 0.1 * torch.randn(x.shape, generator=gen) for x in params]


@pytest.mark.parametrize("case", list(CASES))
def test_matches_prodigyopt_step_for_step_while_d_grows(case):
    hp = CASES[case]
    start = _start()
    a = [torch.nn.Parameter(w.clone()) for w in start]
    b = [torch.nn.Parameter(w.clone()) for w in start]
    ours, peer = ok.Prodigy(a, **hp), prodigyopt.Prodigy(b, **hp)

    def same_d(t):
        for key in ("d", "d_max", "d_hat"):
            assert ours.param_groups[0][key] == pytest.approx(peer.param_groups[0][key], rel=1e-4), (t, key)

    lockstep(ours, peer, a, b, _grads, 50, after=same_d, label=case)
    assert ours.param_groups[0]["d"] > 1e3 * ours.param_groups[0]["d0"], "d did not grow"
    assert float((a[0].detach() - start[0]).abs().mean()) > 1.0, "the parameters did not travel"


def test_d_lives_in_the_state_dict_and_resume_is_exact():
    opt, opt2, sd = resume_on_digits(lambda ps: ok.Prodigy(ps, weight_decay=0.01))
    assert opt2.param_groups[0]["d"] == opt.param_groups[0]["d"] and sd["param_groups"][0]["d"] > 1e-6


def test_independent_d_equals_one_optimizer_per_group():
    start = _start()
    a = [torch.nn.Parameter(w.clone()) for w in start]
    b = [torch.nn.Parameter(w.clone()) for w in start]
    together = ok.Prodigy([{"params": a[:1]}, {"params": a[1:], "lr": 0.5}], independent_d=True)
    apart = [ok.Prodigy(b[:1]), ok.Prodigy(b[1:], lr=0.5)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        for x, y, g in zip(a, b, _grads(a, gen)):
            x.grad, y.grad = g.clone(), g.clone()
        together.step()
        for o in apart:
            o.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert together.param_groups[0]["d"] != together.param_groups[1]["d"]


def test_shared_d_with_two_learning_rates_scales_each_group():
    """prodigyopt refuses groups with different lrs; here each moves with d lr_group
    while d is shared: halving one group's lr halves that group's first step."""
    start = _start()
    a = [torch.nn.Parameter(w.clone()) for w in start]
    opt = ok.Prodigy([{"params": a[:1]}, {"params": a[1:2], "lr": 0.5}])
    a[0].grad, a[1].grad = torch.ones(6, 4), torch.ones(5)
    opt.step()
    step0 = (start[0] - a[0].detach()).abs().max()
    step1 = (start[1] - a[1].detach()).abs().max()
    torch.testing.assert_close(step1, 0.5 * step0)
    assert opt.param_groups[0]["d"] == opt.param_groups[1]["d"]


def test_zero_gradients_leave_everything_as_prodigyopt_does():
    """sum |s| = 0 (all gradients zero so far): no update and no change of d."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    before = w.detach().clone()
    opt = ok.Prodigy([w])
    w.grad = torch.zeros(4, 3)
    opt.step()
    assert torch.equal(w.detach(), before)
    assert opt.param_groups[0]["d"] == 1e-6 and opt.param_groups[0]["k"] == 0


def test_default_lr_trains_digits():
    model, loss_fn = digits_problem()
    opt = ok.Prodigy(model.parameters())
    losses = train(model, loss_fn, opt, 60)
    assert losses[-1] < 0.05 * losses[0], losses[::10]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(d0=0.0), "d0"), (dict(growth_rate=0.5), "growth_rate"), (dict(eps=0.0), "eps"),
    (dict(slice_p=0), "slice_p"), (dict(betas=(1.0, 0.9)), "betas"), (dict(beta3=1.0), "beta3"),
    (dict(d_coef=-1.0), "d_coef"), (dict(projection=ok.GaLore(rank=2)), "projection"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ok.Prodigy([torch.nn.Parameter(torch.zeros(8, 8))], **kwargs)


def test_s_and_p0_stay_full_precision():
    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = ok.Prodigy([w], state_precision="q8", min_quant_size=0, slice_p=11)
    w.grad = torch.randn(64, 64)
    opt.step()
    st = opt.state[w]
    assert st["s"].dtype == torch.float32 and st["p0"].numel() == len(range(0, 64 * 64, 11))
    assert "exp_avg:codes" in st and "exp_avg_sq:codes" in st
