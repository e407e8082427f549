"""The non-finite guard (``nonfinite="skip" | "raise" | None``, a common setting).

With ``"skip"`` a step whose gradients hold a NaN or an infinity changes nothing
(parameters, state, param groups) and is counted in ``opt.skipped_steps``: a run
with bad gradients injected at random steps must end bit for bit where a run that
simply omitted those steps ends. ``"raise"`` raises before any change; ``None``
(default) checks nothing.
"""
from __future__ import annotations

import copy
import io
import os
import random
import sys

import pytest
import torch

import optimkit
from optimkit.core import registry
from optimkit.core.checkpoint import StateDictError

from helpers import SHAPES, as_grad, grad_stream, make_params
from optimizer_cases import contract_hp

MATRIX_SHAPES = [(5, 3), (6, 6), (4, 8)]  # Muon and SOAP get matrices
CASES = [
    ("adamw", {}),
    ("adamw", {"state_precision": "q8", "min_quant_size": 0}),
    ("sgd", {"momentum": 0.9}),
    ("lion", {}),
    ("adafactor", {}),
    ("prodigy", {}),
    ("soap", {}),
    ("muon", {}),
    ("schedulefree_adamw", {}),
    # these change state in prepare_step, which a skipped step must not reach
    ("dadapt_adam", {}),
    ("sgd_sai", {}),
    ("adahessian", {}),
    ("sophia_h", {}),
    ("shampoo", {}),
    ("psgd_kron", {}),
]
STEPS = 8


def _shapes(name):
    return MATRIX_SHAPES if name in ("muon", "soap") else SHAPES


def _bad_steps(seed: int) -> list[int]:
    rnd = random.Random(seed)
    return sorted(rnd.sample(range(STEPS), 3))


def _poison(grads, step: int):
    """NaN, +inf or -inf in one element of one gradient of this step."""
    out = [g.clone() for g in grads]
    i = step % len(out)
    out[i].view(-1)[0] = (float("nan"), float("inf"), float("-inf"))[step % 3]
    return out


def _run(name, extra, grads_per_step, shapes):
    params = make_params(shapes)
    opt = registry.create(name, params, **{**contract_hp(name), **extra})
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = as_grad(opt, p, g)
        opt.step()
    return params, opt


def _same(a, b, where="") -> None:
    """Bitwise equality of nested state-dict values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                           b.view(-1).view(torch.uint8) if b.numel() else b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def _same_opt(opt, ref) -> None:
    sa, sb = opt.state_dict(), ref.state_dict()
    _same(sa["state"], sb["state"], "state")
    ga = [{k: v for k, v in g.items() if k != "nonfinite"} for g in sa["param_groups"]]
    gb = [{k: v for k, v in g.items() if k != "nonfinite"} for g in sb["param_groups"]]
    _same(ga, gb, "param_groups")


@pytest.mark.parametrize("name,extra", CASES, ids=[n + ("_" + "_".join(f"{k}" for k in e) if e else "")
                                                   for n, e in CASES])
def test_skip_equals_a_run_without_those_steps(name, extra):
    shapes = _shapes(name)
    clean = grad_stream(make_params(shapes), STEPS, seed=3)
    bad = _bad_steps(len(name) + len(extra))
    injected = [_poison(g, s) if s in bad else g for s, g in enumerate(clean)]
    omitted = [g for s, g in enumerate(clean) if s not in bad]
    params, opt = _run(name, {**extra, "nonfinite": "skip"}, injected, shapes)
    ref_params, ref = _run(name, extra, omitted, shapes)
    assert opt.skipped_steps == len(bad) and ref.skipped_steps == 0
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    _same_opt(opt, ref)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.slow
def test_skip_compiled():
    shapes = SHAPES
    clean = grad_stream(make_params(shapes), 6, seed=4)
    bad = [1, 4]
    injected = [_poison(g, s) if s in bad else g for s, g in enumerate(clean)]
    omitted = [g for s, g in enumerate(clean) if s not in bad]
    params, opt = _run("adamw", {"compile": True, "nonfinite": "skip"}, injected, shapes)
    ref_params, ref = _run("adamw", {"compile": True}, omitted, shapes)
    assert opt.skipped_steps == 2
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    _same_opt(opt, ref)


@pytest.mark.parametrize("name", ["adamw", "prodigy", "sgd"])
def test_raise_changes_nothing(name):
    params = make_params()
    opt = registry.create(name, params, nonfinite="raise", **contract_hp(name))
    for grads in grad_stream(params, 2, seed=5):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    before_params = [p.detach().clone() for p in params]
    before = copy.deepcopy(opt.state_dict())
    for p, g in zip(params, _poison(grad_stream(params, 1, seed=6)[0], 2)):
        p.grad = g
    with pytest.raises(RuntimeError, match=r"non-finite gradient in parameter 2 .* param group 0"):
        opt.step()
    for p, q in zip(params, before_params):
        assert torch.equal(p, q)
    _same(opt.state_dict(), before)
    assert opt.skipped_steps == 0


def test_none_keeps_old_behaviour():
    params = make_params()
    opt = optimkit.AdamW(params, lr=0.1)
    assert opt.defaults["nonfinite"] is None
    for p, g in zip(params, _poison(grad_stream(params, 1)[0], 0)):
        p.grad = g
    opt.step()
    assert not torch.isfinite(params[0]).all()  # the NaN went through, as before
    assert opt.skipped_steps == 0


def test_groups_decide_for_the_whole_step():
    params = make_params()
    opt = optimkit.AdamW([{"params": params[:2]}, {"params": params[2:], "nonfinite": "skip"}], lr=0.1)
    grads = grad_stream(params, 1)[0]
    start = [p.detach().clone() for p in params]
    # a bad gradient in the checked group skips the step for every group
    grads_bad = [g.clone() for g in grads]
    grads_bad[3].view(-1)[0] = float("inf")
    for p, g in zip(params, grads_bad):
        p.grad = g
    opt.step()
    assert opt.skipped_steps == 1 and not opt.state
    assert all(torch.equal(p, q) for p, q in zip(params, start))
    # one in an unchecked group is not looked at
    grads_bad = [g.clone() for g in grads]
    grads_bad[0].view(-1)[0] = float("nan")
    for p, g in zip(params, grads_bad):
        p.grad = g
    opt.step()
    assert opt.skipped_steps == 1 and torch.isnan(params[0]).any()


def test_raise_wins_over_skip_and_names_the_group():
    params = make_params()
    opt = optimkit.SGD([{"params": params[:2], "nonfinite": "skip"},
                        {"params": params[2:], "nonfinite": "raise"}], lr=0.1)
    for p, g in zip(params, grad_stream(params, 1)[0]):
        p.grad = g
    params[0].grad[0, 0] = float("nan")
    opt.step()  # only the "skip" group is bad
    assert opt.skipped_steps == 1
    params[4].grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"parameter 2 \(shape \(6, 6\)\) of param group 1"):
        opt.step()


@pytest.mark.parametrize("value", ["ignore", True, 1, "Skip"])
def test_bad_argument(value):
    with pytest.raises(ValueError, match="Invalid nonfinite"):
        optimkit.AdamW(make_params(), nonfinite=value)
    opt = optimkit.AdamW(make_params())
    with pytest.raises(ValueError, match="Invalid nonfinite"):
        opt.add_param_group({"params": make_params(seed=1), "nonfinite": value})


def test_skipped_steps_in_the_state_dict():
    params = make_params()
    opt = optimkit.AdamW(params, nonfinite="skip")
    for s, grads in enumerate(grad_stream(params, 4)):
        for p, g in zip(params, _poison(grads, s) if s in (0, 2) else grads):
            p.grad = g
        opt.step()
    sd = opt.state_dict()
    assert sd["skipped_steps"] == 2 and type(sd["skipped_steps"]) is int
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf)  # weights_only default
    fresh = optimkit.AdamW(make_params(), nonfinite="skip")
    fresh.load_state_dict(loaded)
    assert fresh.skipped_steps == 2
    _same(fresh.state_dict(), sd)
    old = {k: v for k, v in sd.items() if k != "skipped_steps"}  # a dict from before the guard
    fresh.load_state_dict(old)
    assert fresh.skipped_steps == 0
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(StateDictError, match="skipped_steps"):
            fresh.load_state_dict({**sd, "skipped_steps": bad})
        assert fresh.skipped_steps == 0
    # a torch.optim state dict (no counter, no nonfinite in its groups) still loads
    tparams = make_params()
    topt = torch.optim.AdamW(tparams)
    for p, g in zip(tparams, grad_stream(tparams, 1)[0]):
        p.grad = g
    topt.step()
    fresh.load_state_dict(topt.state_dict())
    assert fresh.skipped_steps == 0 and fresh.param_groups[0]["nonfinite"] == "skip"


def _gradscaler_run(nonfinite, inject_at):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = optimkit.AdamW(model.parameters(), lr=1e-2, nonfinite=nonfinite)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(16, 4, generator=gen)
        y = torch.randn(16, 1, generator=gen)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if step in inject_at:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return model, opt, scaler


def test_gradscaler():
    """GradScaler checks the unscaled gradients itself and does not call step() on an
    inf; the guard then sees only finite gradients (no double skip, no extra effect)."""
    plain = _gradscaler_run(None, {2})
    guarded = _gradscaler_run("skip", {2})
    for p, q in zip(plain[0].parameters(), guarded[0].parameters()):
        assert torch.equal(p, q)
    assert guarded[1].skipped_steps == 0
    assert guarded[2].get_scale() < 2.0 ** 8  # the scaler saw the inf and backed off
    _same_opt(guarded[1], plain[1])


# ---------------------------------------------------------------- two ranks
def _two_rank_main(rank: int, world_size: int):
    """Rank side (``dist_helpers.run_ranks``): AdamW with ``nonfinite="skip"``, a NaN
    on rank 1 only at step 2; parameters, skipped count and state after 5 steps."""
    params = make_params()
    opt = optimkit.AdamW(params, lr=1e-2, nonfinite="skip")
    for s, grads in enumerate(grad_stream(params, 5, seed=7)):
        if rank == 1 and s == 2:
            grads[1][0] = float("nan")  # on rank 1 only
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return {"params": [p.detach() for p in params], "skipped": opt.skipped_steps,
            "state": opt.state_dict()["state"]}


@pytest.mark.slow
def test_two_ranks_agree():
    from dist_helpers import run_ranks

    r0, r1 = run_ranks(_two_rank_main, 2, timeout=120)
    assert r0["skipped"] == r1["skipped"] == 1
    params = make_params()
    ref = optimkit.AdamW(params, lr=1e-2)
    for s, grads in enumerate(grad_stream(params, 5, seed=7)):
        if s == 2:
            continue
        for p, g in zip(params, grads):
            p.grad = g
        ref.step()
    for a, b, c in zip(r0["params"], r1["params"], params):
        assert torch.equal(a, b) and torch.equal(a, c)
    _same(r0["state"], r1["state"])
    _same(r0["state"], ref.state_dict()["state"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64])
def test_every_dtype_is_checked(dtype):
    p = torch.nn.Parameter(torch.ones(4, 3, dtype=dtype))
    big = torch.nn.Parameter(torch.ones(70000, dtype=dtype))  # its L1 norm overflows float16
    opt = optimkit.SGD([p, big], lr=0.1, nonfinite="skip")
    for value in (float("nan"), float("inf"), -float("inf")):
        p.grad = torch.ones_like(p)
        p.grad[1, 2] = value
        big.grad = torch.ones_like(big)
        opt.step()
    assert opt.skipped_steps == 3 and torch.equal(p, torch.ones_like(p))
    p.grad = torch.ones_like(p)
    opt.step()  # finite: a step, even where the norm would overflow the gradient's own dtype
    assert opt.skipped_steps == 3 and not torch.equal(big, torch.ones_like(big))


def test_sparse_gradients():
    emb = torch.nn.Embedding(6, 3, sparse=True)
    opt = optimkit.SGD(emb.parameters(), lr=0.1, nonfinite="skip")
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 4])).sum().backward()
    emb.weight.grad = torch.sparse_coo_tensor(emb.weight.grad._indices(),
                                              emb.weight.grad._values() * float("nan"), (6, 3),
                                              check_invariants=True)
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(emb.weight, before)


def test_schedule_free_wrapper_skips_cleanly():
    """The wrapper moves the parameters before its base steps: it asks the base's
    guard first, so a skipped step leaves the wrapper's z and counters alone too."""
    clean = grad_stream(make_params(), 6, seed=8)
    bad = [1, 3]

    def run(grads_per_step, nonfinite):
        params = make_params()
        opt = optimkit.ScheduleFreeWrapper(optimkit.AdamW(params, lr=1e-2, nonfinite=nonfinite))
        for grads in grads_per_step:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        return params, opt

    params, opt = run([_poison(g, s) if s in bad else g for s, g in enumerate(clean)], "skip")
    ref_params, ref = run([g for s, g in enumerate(clean) if s not in bad], None)
    assert opt.base.skipped_steps == 2
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    sa, sb = opt.state_dict(), ref.state_dict()
    _same(sa["schedulefree"], sb["schedulefree"])
    _same(sa["base"]["state"], sb["base"]["state"])


def test_mezo_guards_its_loss_difference():
    model = torch.nn.Linear(3, 1)
    opt = optimkit.MeZO(model.parameters(), lr=1e-3, nonfinite="skip")
    x = torch.randn(4, 3)
    opt.step(lambda: model(x).pow(2).sum() * float("inf"))
    assert opt.skipped_steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    opt = optimkit.MeZO(model.parameters(), lr=1e-3, nonfinite="raise")
    with pytest.raises(RuntimeError, match="non-finite loss"):
        opt.step(lambda: model(x).sum() * float("nan"))
