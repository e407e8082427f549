"""optimkit.schedules: closed forms at start / end of warmup / middle / end, exact parity with
transformers' schedules, torch habits (LambdaLR state dict, per-group lr, SequentialLR), the
refinement schedule against the paper's formula, bad arguments."""
import io
import math
import warnings

import pytest
import torch

import optimkit as ok
from optimkit import schedules as S

transformers_opt = pytest.importorskip("transformers.optimization")


def _opt(lr=1.0, groups=None):
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    if groups is None:
        return torch.optim.SGD([p], lr=lr)
    return torch.optim.SGD([{"params": [p], "lr": groups[0]}, {"params": [q], "lr": groups[1]}], lr=lr)


def _hf_values(make, steps, lr=1.0):
    """The factors a transformers LambdaLR gives at steps 0..steps-1 (read from its lambda)."""
    sched = make(_opt(lr))
    return [sched.lr_lambdas[0](t) for t in range(steps)]


# --------------------------------------------------------------------------- closed forms
def test_linear_warmup_closed_form():
    s = S.linear_warmup(10)
    assert s(0) == 0.0 and s(5) == 0.5 and s(10) == 1.0 and s(1000) == 1.0


def test_linear_closed_form():
    s = S.linear(num_training_steps=110, num_warmup_steps=10)
    assert s(0) == 0.0 and s(5) == 0.5 and s(10) == 1.0
    assert s(60) == pytest.approx(0.5) and s(110) == 0.0 and s(200) == 0.0
    d = S.linear(100)  # plain linear decay 1 - t/T
    assert [d(t) for t in (0, 25, 50, 100)] == [1.0, 0.75, 0.5, 0.0]
    m = S.linear(100, min_lr_ratio=0.1)
    assert m(0) == 1.0 and m(50) == pytest.approx(0.55) and m(100) == pytest.approx(0.1)


def test_cosine_closed_form():
    s = S.cosine(num_training_steps=110, num_warmup_steps=10, min_lr_ratio=0.2)
    assert s(0) == 0.0 and s(10) == 1.0
    assert s(60) == pytest.approx(0.2 + 0.8 * 0.5)
    assert s(35) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi * 0.25)) / 2)
    assert s(110) == pytest.approx(0.2)
    assert S.cosine(100, clamp=True)(150) == pytest.approx(0.0)


def test_cosine_restarts_closed_form():
    s = S.cosine_restarts(num_training_steps=100, num_warmup_steps=0, num_cycles=2)
    assert s(0) == 1.0 and s(25) == pytest.approx(0.5) and s(50) == 1.0  # restart
    assert s(75) == pytest.approx(0.5) and s(100) == 0.0
    m = S.cosine_restarts(100, num_cycles=2, min_lr_ratio=0.1)
    assert m(25) == pytest.approx(0.55) and m(100) == 0.1


def test_wsd_closed_form():
    s = S.wsd(num_warmup_steps=10, num_decay_steps=20, num_training_steps=100, decay_type="linear",
              min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(5) == pytest.approx(0.55) and s(10) == 1.0
    assert s(50) == 1.0 and s(79) == 1.0 and s(80) == 1.0
    assert s(90) == pytest.approx(0.1 + 0.9 * 0.5) and s(100) == pytest.approx(0.1)
    q = S.wsd(0, 100, num_stable_steps=0, decay_type="1-sqrt")
    assert q(25) == pytest.approx(0.5) and q(100) == 0.0


def test_inverse_sqrt_closed_form():
    s = S.inverse_sqrt(num_warmup_steps=100)
    assert s(0) == 0.0 and s(50) == 0.5 and s(100) == 1.0
    assert s(400) == pytest.approx(0.5) and s(10000) == pytest.approx(0.1)


def test_polynomial_closed_form():
    s = S.polynomial(num_training_steps=110, num_warmup_steps=10, power=2.0, lr_end=0.1)
    assert s(0) == 0.0 and s(10) == 1.0
    assert s(60) == pytest.approx(0.9 * 0.25 + 0.1) and s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)


def test_one_cycle_matches_torch():
    for kw in (dict(), dict(anneal_strategy="linear"), dict(three_phase=True, pct_start=0.25)):
        s = S.one_cycle(total_steps=100, **kw)
        opt = _opt(lr=0.5)
        ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=100, cycle_momentum=False, **kw)
        for t in range(100):
            assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * s(t), rel=1e-12, abs=1e-15), (kw, t)
            opt.step()
            ref.step() if t < 99 else None
    s = S.one_cycle(100)
    assert s(0) == pytest.approx(1 / 25) and s(29) == pytest.approx(1.0)
    assert s(99) == pytest.approx(1 / 25 / 1e4) and s(1000) == s(99)


# --------------------------------------------------------------------------- parity with transformers
WSD_CASES = [
    dict(num_warmup_steps=10, num_decay_steps=30, num_training_steps=100),
    dict(num_warmup_steps=7, num_decay_steps=13, num_stable_steps=20, warmup_type="cosine",
         decay_type="linear", min_lr_ratio=0.05),
    dict(num_warmup_steps=5, num_decay_steps=25, num_training_steps=60, warmup_type="1-sqrt",
         decay_type="1-sqrt", min_lr_ratio=0.1),
    dict(num_warmup_steps=0, num_decay_steps=40, num_training_steps=50, decay_type="cosine", num_cycles=1.0),
    dict(num_warmup_steps=3, num_decay_steps=0, num_training_steps=10),
]


@pytest.mark.parametrize("kw", WSD_CASES)
def test_wsd_equals_transformers_exactly(kw):
    ours = S.wsd(**kw).values(130)
    ref = _hf_values(lambda o: transformers_opt.get_wsd_schedule(o, **kw), 130)
    assert ours == ref


@pytest.mark.parametrize("decay_type", ["linear", "1-sqrt", "1-square"])
def test_wsd_matches_pytorch_optimizer(decay_type):
    """pytorch_optimizer's get_wsd_schedule: warmup from 0 and min_lr_ratio used by its cosine
    cooldown only, so the two agree with min_lr_ratio=0 and a linear warmup (its formulas
    differ in rounding: approx)."""
    lrs = pytest.importorskip("pytorch_optimizer.lr_scheduler")
    ref = lrs.get_wsd_schedule(_opt(), 10, 60, 30, cooldown_type=decay_type)
    ours = S.wsd(10, 30, num_stable_steps=60, decay_type=decay_type)
    assert ours.values(120) == pytest.approx([ref.lr_lambdas[0](t) for t in range(120)], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("w,T", [(0, 50), (10, 100), (1, 3)])
def test_other_schedules_equal_transformers_exactly(w, T):
    n = T + 20
    assert S.linear(T, w).values(n) == _hf_values(
        lambda o: transformers_opt.get_linear_schedule_with_warmup(o, w, T), n)
    for c in (0.5, 1.5):
        for r in (0.0, 0.1):
            assert S.cosine(T, w, num_cycles=c, min_lr_ratio=r).values(n) == _hf_values(
                (lambda o: transformers_opt.get_cosine_with_min_lr_schedule_with_warmup(
                    o, w, T, num_cycles=c, min_lr_rate=r)) if r else
                (lambda o: transformers_opt.get_cosine_schedule_with_warmup(o, w, T, num_cycles=c)), n)
    for c in (1, 3):
        assert S.cosine_restarts(T, w, num_cycles=c).values(n) == _hf_values(
            lambda o: transformers_opt.get_cosine_with_hard_restarts_schedule_with_warmup(o, w, T, c), n)
    for ts in (None, 7):
        assert S.inverse_sqrt(w, timescale=ts).values(n) == _hf_values(
            lambda o: transformers_opt.get_inverse_sqrt_schedule(o, w, timescale=ts), n)
    if w < T:
        for power in (1.0, 2.0):
            assert S.polynomial(T, w, lr_end=1e-7, power=power, lr_init=3e-4).values(n) == _hf_values(
                lambda o: transformers_opt.get_polynomial_decay_schedule_with_warmup(o, w, T, power=power),
                n, lr=3e-4)
    assert S.constant(w).values(n) == _hf_values(
        lambda o: transformers_opt.get_constant_schedule_with_warmup(o, w), n)


# --------------------------------------------------------------------------- torch habits
def test_scheduler_per_group_lr_state_dict_and_resume():
    sched = S.wsd(num_warmup_steps=4, num_decay_steps=6, num_training_steps=20, decay_type="linear")
    opt = _opt(groups=(1.0, 0.1))
    lr = sched.scheduler(opt)
    seen = []
    for t in range(12):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        lr.step()
    for t, (a, b) in enumerate(seen):
        assert a == pytest.approx(sched(t)) and b == pytest.approx(0.1 * sched(t))
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "lr": lr.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = _opt(groups=(1.0, 0.1))
    lr2 = S.wsd(num_warmup_steps=1, num_decay_steps=1, num_training_steps=5).scheduler(opt2)
    opt2.load_state_dict(state["opt"])
    lr2.load_state_dict(state["lr"])  # restores last_epoch and the schedule's arguments
    assert lr2.lr_lambdas[0].num_stable_steps == 10
    for _ in range(8):
        opt.step(), lr.step(), opt2.step(), lr2.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]


def test_scheduler_with_optimkit_optimizer_and_sequential():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ok.AdamW([p], lr=1e-2)
    warm = S.linear_warmup(5).scheduler(opt)
    decay = S.linear(10).scheduler(opt)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[5])
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        seq.step()
    assert lrs[:5] == pytest.approx([1e-2 * t / 5 for t in range(5)])
    assert lrs[5:] == pytest.approx([1e-2 * (1 - t / 10) for t in range(10)])


def test_scheduler_resumes_with_last_epoch():
    s = S.cosine(50, 5)
    opt = _opt()
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    lr = s.scheduler(opt, last_epoch=19)
    assert opt.param_groups[0]["lr"] == pytest.approx(s(20))
    assert s(torch.tensor(20)) == s(20)


# --------------------------------------------------------------------------- refinement
def _reference_refined(norms, width):
    """Algorithm 1 of Defazio et al. 2023 written out: median filter (nearest padding),
    w_t = G_t^-2 sum_{p>t} G_p^-2, divided by the max."""
    T, half = len(norms), (width | 1) // 2
    pad = [norms[0]] * half + list(norms) + [norms[-1]] * half
    g = [sorted(pad[i:i + 2 * half + 1])[half] for i in range(T)]
    w = [g[t] ** -2 * sum(g[p] ** -2 for p in range(t + 1, T)) for t in range(T)]
    return [x / max(w) for x in w]


def test_refined_matches_formula_and_shape():
    gen = torch.Generator().manual_seed(0)
    T = 200
    t = torch.arange(T, dtype=torch.float64)
    norms = (2.0 * torch.exp(-t / 30) + 0.5 + 0.3 * t / T) * (1 + 0.2 * torch.rand(T, generator=gen,
                                                                                   dtype=torch.float64))
    for smoothing in (0.0, 0.05, 0.2):
        width = max(1, round(smoothing * T))
        ref = _reference_refined(norms.tolist(), width)
        ours = S.refined_weights(norms, smoothing=smoothing)
        assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)
        s = S.refined(norms, smoothing=smoothing)
        assert s.values(T) == pytest.approx(ref, rel=1e-12, abs=1e-15)
        assert max(ours) == 1.0 and ours[-1] == 0.0 and s(T - 1) == 0.0 and s(10 * T) == 0.0
    # large early gradient norms give a warmup: the peak is not at step 0
    w = S.refined_weights(norms, smoothing=0.05)
    assert w.index(1.0) > 0 and w[0] < 1.0


def test_refined_constant_norms_is_linear_decay():
    s = S.refined([3.0] * 101)
    assert s.values(101) == pytest.approx([1 - t / 100 for t in range(101)], rel=1e-12, abs=1e-14)
    stretched = S.refined([3.0] * 11, num_training_steps=1001)  # interpolated onto a longer run
    assert [stretched(t) for t in (0, 250, 500, 1000)] == pytest.approx([1.0, 0.75, 0.5, 0.0])
    warm = S.refined([1.0] * 101, num_warmup_steps=10)
    assert warm(0) == 0.0 and warm(5) == pytest.approx(0.5 * 0.95) and warm(50) == pytest.approx(0.5)


def test_refined_state_dict_weights_only():
    opt = _opt()
    lr = S.refined([1.0, 2.0, 1.5, 1.0, 0.5], smoothing=0.2).scheduler(opt)
    buf = io.BytesIO()
    torch.save(lr.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert tuple(state["lr_lambdas"][0]["weights"]) == lr.lr_lambdas[0].weights


def test_preconditioned_norm():
    gen = torch.Generator().manual_seed(3)
    g = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    vv = [torch.rand(3, 4, generator=gen), torch.rand(5, generator=gen)]
    want = math.sqrt(sum((a.double() ** 2 / ((b.double() / 0.1).sqrt() + 1e-8)).sum().item() for a, b in zip(g, vv)))
    assert S.preconditioned_norm(g, vv, bias_correction=0.1) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="second_moments"):
        S.preconditioned_norm(g, vv[:1])
    with pytest.raises(ValueError, match=r"second_moments\[1\]"):
        S.preconditioned_norm(g, [vv[0], torch.ones(4)])


def test_median_filter():
    assert S.median_filter([1, 9, 2, 8, 3], 3) == [1, 2, 8, 3, 3]
    assert S.median_filter([5, 1, 4], 1) == [5, 1, 4]
    assert S.median_filter([5, 1, 4], 2) == [5, 4, 4]  # width made odd


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("make,match", [
    (lambda: S.linear(0), "num_training_steps"),
    (lambda: S.linear(10, 11), "num_warmup_steps"),
    (lambda: S.linear(10, min_lr_ratio=1.5), "min_lr_ratio"),
    (lambda: S.cosine(10, num_cycles=0), "num_cycles"),
    (lambda: S.cosine_restarts(10, num_cycles=0), "num_cycles"),
    (lambda: S.wsd(5, 5), "num_training_steps"),
    (lambda: S.wsd(5, 5, num_training_steps=8), "num_training_steps"),
    (lambda: S.wsd(5, 5, 20, decay_type="exp"), "decay_type"),
    (lambda: S.wsd(5, 5, 20, warmup_type="exp"), "warmup_type"),
    (lambda: S.inverse_sqrt(-1), "num_warmup_steps"),
    (lambda: S.polynomial(10, lr_end=2.0), "lr_end"),
    (lambda: S.polynomial(10, 10), "num_warmup_steps"),
    (lambda: S.one_cycle(100, pct_start=1.5), "pct_start"),
    (lambda: S.one_cycle(100, anneal_strategy="exp"), "anneal_strategy"),
    (lambda: S.refined([1.0]), "grad_norms"),
    (lambda: S.refined([1.0, 0.0]), r"grad_norms\[1\]"),
    (lambda: S.refined([1.0, float("nan")]), r"grad_norms\[1\]"),
    (lambda: S.refined([1.0, 2.0], smoothing=2.0), "smoothing"),
    (lambda: S.linear(10)(-1), "step"),
])
def test_bad_arguments_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make,match", [
    (lambda: S.linear(10.5), "num_training_steps"),
    (lambda: S.wsd(5, 5, 20, decay_type=1), "decay_type"),
    (lambda: S.refined("abc"), "grad_norms"),
    (lambda: S.refined([1.0, "x"]), r"grad_norms\[1\]"),
    (lambda: S.linear(10)(1.5), "step"),
    (lambda: S.linear(10).scheduler("opt"), "optimizer"),
])
def test_bad_arguments_type_error(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_wsd_both_lengths_warns():
    with pytest.warns(UserWarning, match="num_stable_steps"):
        s = S.wsd(2, 2, num_training_steps=100, num_stable_steps=3)
    assert s.num_stable_steps == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.wsd(2, 2, num_training_steps=100)


_C = math.cos
CLOSED_FORMS = [  # (schedule, {step: closed form}) at start, end of warmup, middle, end
    (S.constant(20), {0: 0.0, 20: 1.0, 60: 1.0, 100: 1.0}),
    (S.linear_warmup(20), {0: 0.0, 10: 0.5, 20: 1.0, 100: 1.0}),
    (S.linear(100, 20), {0: 0.0, 20: 1.0, 60: 0.5, 100: 0.0}),
    (S.cosine(100, 20, min_lr_ratio=0.1), {0: 0.0, 20: 1.0, 60: 0.55, 80: 0.1 + 0.9 * (1 + _C(0.75 * math.pi)) / 2,
                                           100: 0.1}),
    (S.cosine_restarts(100, 20, num_cycles=2), {0: 0.0, 20: 1.0, 40: 0.5, 60: 1.0, 80: 0.5, 100: 0.0}),
    (S.wsd(20, 40, 100, decay_type="cosine", min_lr_ratio=0.2), {0: 0.2, 20: 1.0, 50: 1.0, 80: 0.6, 100: 0.2}),
    (S.wsd(20, 40, 100, warmup_type="cosine", decay_type="1-sqrt"), {10: 0.5, 20: 1.0, 70: 1 - 0.25 ** 0.5,
                                                                      100: 0.0}),
    (S.wsd(20, 40, 100, warmup_type="1-sqrt", decay_type="1-square"), {0: 0.0, 15: 0.5, 20: 1.0, 80: 0.75,
                                                                       100: 0.0}),
    (S.inverse_sqrt(25), {0: 0.0, 25: 1.0, 100: 0.5, 2500: 0.1}),
    (S.polynomial(120, 20, power=3.0), {0: 0.0, 20: 1.0, 70: 0.125, 120: 0.0}),
    (S.one_cycle(100, pct_start=0.1, div_factor=10, final_div_factor=100),  # up over steps 0..9, down to 99
     {0: 0.1, 9: 1.0, 54: (1 + 1e-3) / 2, 99: 1e-3}),
    (S.refined([2.0] * 51), {0: 1.0, 25: 0.5, 50: 0.0}),
]


@pytest.mark.parametrize("sched,points", CLOSED_FORMS, ids=lambda x: type(x).__name__ if isinstance(x, S.Schedule)
                         else "")
def test_every_schedule_closed_forms(sched, points):
    for t, want in points.items():
        assert sched(t) == pytest.approx(want, rel=1e-9, abs=1e-12), (sched, t)


@pytest.mark.parametrize("sched,points", CLOSED_FORMS[:4], ids=lambda x: type(x).__name__
                         if isinstance(x, S.Schedule) else "")
def test_every_schedule_scales_each_group_lr(sched, points):
    opt = _opt(groups=(0.3, 0.02))
    lr = sched.scheduler(opt)
    for t in range(max(points) + 1):
        if t in points:
            assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3 * points[t], 0.02 * points[t]])
        opt.step()
        lr.step()
