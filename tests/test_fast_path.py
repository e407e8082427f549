"""The CPU q8 AdamW kernel against the tensor-op reference path it replaces."""
from __future__ import annotations

import copy

import pytest
import torch

import optimkit as ok
from optimkit.kernels import q8_adamw
from optimkit.state import get_codec

pytestmark = pytest.mark.skipif(not q8_adamw.available(), reason="no C compiler with OpenMP")

SHAPES = [(256, 257), (64, 80), (5000,), (7,)]  # multi-block, a partial last block, an fp32-state tensor


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(0.1 * torch.randn(s, generator=g)) for s in SHAPES]


def _grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[0.01 * torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]


def _decoded(opt, p, name):
    meta = opt.state[p]["_layout"][name]
    storage = {k.split(":")[1]: v for k, v in opt.state[p].items() if k.startswith(name + ":")}
    return get_codec(meta[0]).decode(storage, meta[2], meta[1])


STEP_CASES = [(ok.AdamW, dict(lr=1e-3, weight_decay=0.01), "nearest"),
              (ok.Adam, dict(lr=3e-3, betas=(0.3, 0.99)), "nearest"),   # lerp weight >= 0.5
              (ok.Adam, dict(lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True), "nearest"),
              (ok.AdamW, dict(lr=1e-3, weight_decay=0.01), "stochastic"),
              (ok.Adam, dict(lr=3e-3, betas=(0.3, 0.99)), "stochastic")]


@pytest.mark.parametrize("cls,hp,rounding", STEP_CASES)
def test_each_step_agrees_with_the_reference_path(cls, hp, rounding):
    """From identical states (encode counters included), one fused step and one
    reference step give the same parameters (float32 tolerances) and the same
    codes, except for rare rounding ties (torch's CPU kernels round a few
    operations differently: its sqrt, for one, is not correctly rounded), which
    move a code to its neighbour. With stochastic rounding both advance each
    state's encode counter by one."""
    stochastic = rounding == "stochastic"
    fast_p, ref_p = _params(), _params()
    fast = cls(fast_p, state_precision="q8", state_rounding=rounding, **hp)
    ref = cls(ref_p, state_precision="q8", state_rounding=rounding, **hp)
    flipped = total = 0
    for step, grads in enumerate(_grads(30)):
        for a, b, g in zip(fast_p, ref_p, grads):
            a.grad, b.grad = g.clone(), g.clone()
            b.data.copy_(a.data)
        for a, b in zip(fast_p, ref_p):
            for k, v in fast.state.get(a, {}).items():
                if isinstance(v, torch.Tensor):
                    ref.state[b][k].copy_(v)
        seeds = {(a, name): int(fast.state[a][name + ":seed"]) for a in fast_p if a in fast.state
                 for name in ("exp_avg", "exp_avg_sq") if name + ":seed" in fast.state[a]}
        fast.step()
        with q8_adamw.disabled():
            ref.step()
        for a, b in zip(fast_p, ref_p):
            torch.testing.assert_close(a, b)
            for name in ("exp_avg", "exp_avg_sq"):
                if name not in fast.state[a].get("_layout", {}):
                    continue
                assert fast.state[a]["_layout"][name][3] is stochastic
                if stochastic:
                    seed = int(fast.state[a][name + ":seed"])
                    assert seed == int(ref.state[b][name + ":seed"])
                    if (a, name) in seeds:  # (the first step also counts the initial encode)
                        assert seed == seeds[a, name] + 1
                ca, cb = fast.state[a][name + ":codes"], ref.state[b][name + ":codes"]
                diff = (ca.int() - cb.int()).abs()
                assert int(diff.max()) <= 1
                flipped += int((diff > 0).sum())
                total += diff.numel()
                torch.testing.assert_close(fast.state[a][name + ":absmax"], ref.state[b][name + ":absmax"])
        assert seeds or not stochastic or step == 0
    assert flipped <= 1e-4 * total, f"{flipped} of {total} codes differ"


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("simd", [True, False])
def test_stochastic_encoder_matches_the_reference_rule(signed, simd):
    """The kernel's stochastic encoder against the reference's formula (the last map
    entry <= y, up with probability (y - lo) / (hi - lo) against the dither; on the
    unsigned map a positive y never gets the zero code), exactly, on adversarial
    values, at several encode counters and element offsets."""
    from optimkit.state import maps
    from optimkit.state.codecs import _dither

    edges = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, 2.0, -1.0, -2.0, 0.0, -0.0, 0.99999994])
    edges = edges if signed else edges.abs()
    values = torch.tensor(maps.dynamic_map(signed, 8), dtype=torch.float32)
    # the edge values repeated to fill the 64-, 16- and 1-wide loops
    for y in (_adversarial(signed), edges.repeat(9)[:85]):
        lower = (torch.bucketize(y, values, right=True) - 1).clamp(0, values.numel() - 2)
        lo, hi = values[lower], values[lower + 1]
        p_up = ((y - lo) / (hi - lo)).clamp(0.0, 1.0)
        for seed, index0 in ((0, 0), (7, 256), (2**24 + 3, 1000)):
            u = _dither(index0 + y.numel(), torch.tensor(seed), "cpu")[index0:]
            expected = _positive_keeps_a_positive_code(lower + (u < p_up).long(), y, signed)
            got = q8_adamw.encode_codes_stochastic(y, signed, seed, index0=index0, simd=simd).long()
            wrong = (got != expected).nonzero().view(-1)
            assert wrong.numel() == 0, (y[wrong[:5]].tolist(), got[wrong[:5]].tolist(),
                                        expected[wrong[:5]].tolist())


def test_long_run_tracks_the_reference_path():
    fast_p, ref_p = _params(), _params()
    fast = ok.AdamW(fast_p, lr=1e-3, state_precision="q8")
    ref = ok.AdamW(ref_p, lr=1e-3, state_precision="q8")
    for grads in _grads(100):
        for a, b, g in zip(fast_p, ref_p, grads):
            a.grad, b.grad = g.clone(), g.clone()
        fast.step()
        with q8_adamw.disabled():
            ref.step()
    # a code moved by a rounding tie shifts later updates of that element a little:
    # allow a handful of elements to drift by a few lr-sized steps, no more
    for a, b in zip(fast_p, ref_p):
        far = ~torch.isclose(a, b, rtol=1e-4, atol=1e-5)
        assert int(far.sum()) <= max(3, a.numel() // 10000)
        assert float((a - b).detach().abs().max()) < 5e-3 * 1e-1
        for name in ("exp_avg", "exp_avg_sq"):
            if name in fast.state[a].get("_layout", {}):
                da, db = _decoded(fast, a, name), _decoded(ref, b, name)
                assert int((~torch.isclose(da, db, rtol=0.05, atol=1e-7)).sum()) <= max(3, a.numel() // 10000)


def test_fast_path_is_used_only_where_it_applies():
    p = torch.nn.Parameter(torch.randn(300, 300))
    p.grad = torch.randn(300, 300)
    calls = []
    original = q8_adamw.step
    try:
        q8_adamw.step = lambda *a, **k: (calls.append(len(a[0])), original(*a, **k))
        ok.AdamW([p], state_precision="q8").step()
        assert calls == [1]
        calls.clear()
        ok.AdamW([p], state_precision="q8", state_rounding="stochastic").step()
        assert calls == [1]
        for hp in (dict(amsgrad=True), dict(maximize=True), dict(cautious=True), dict(state_precision="q4"),
                   dict(state_precision="q4", state_rounding="stochastic")):
            calls.clear()
            ok.AdamW([p], **{"state_precision": "q8", **hp}).step()
            assert calls == [], hp
        calls.clear()
        ok.Adam([p], state_precision="q8", weight_decay=0.1).step()  # L2 decay: reference path
        assert calls == []
    finally:
        q8_adamw.step = original


def test_small_fp32_state_tensors_ride_along_with_the_q8_kernel():
    """Tensors under min_quant_size keep fp32 state; next to q8 tensors they take the
    fp32 kernel, while an eager group with fp32 state only keeps torch's foreach ops."""
    big, small = torch.nn.Parameter(torch.randn(300, 300)), torch.nn.Parameter(torch.randn(10))
    big.grad, small.grad = torch.randn(300, 300), torch.randn(10)
    calls = []
    original = q8_adamw.step_fp32
    try:
        q8_adamw.step_fp32 = lambda *a, **k: (calls.append(len(a[0])), original(*a, **k))
        ok.AdamW([big, small], state_precision="q8").step()
        assert calls == [1]
        calls.clear()
        ok.AdamW([big, small]).step()
        assert calls == []
        ok.AdamW([big, small], compile=True).step()
        assert calls == [2]
    finally:
        q8_adamw.step_fp32 = original


@pytest.mark.parametrize("cls,torch_cls", [(ok.AdamW, torch.optim.AdamW), (ok.Adam, torch.optim.Adam)])
def test_fp32_kernel_and_inductor_path_both_match_torch(cls, torch_cls):
    """compile=True on CPU uses the C kernel for float32 moments; with it disabled the
    same setting goes through torch.compile. Both match torch.optim over 50 steps."""
    results = []
    for use_kernel in (True, False):
        params = _params()
        opt = cls(params, lr=1e-2, weight_decay=0.1 if cls is ok.AdamW else 0.0, compile=True)
        ctx = q8_adamw.disabled() if not use_kernel else torch.no_grad()
        with ctx:
            for grads in _grads(50):
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                opt.step()
        results.append(params)
    ref = _params()
    opt = torch_cls(ref, lr=1e-2, weight_decay=0.1 if cls is ok.AdamW else 0.0)
    for grads in _grads(50):
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
    for params in results:
        for a, b in zip(params, ref):
            torch.testing.assert_close(a, b)


def _positive_keeps_a_positive_code(codes: torch.Tensor, y: torch.Tensor, signed: bool) -> torch.Tensor:
    """The unsigned map's rule: code 0 (the value 0) only for y that is not > 0;
    a positive y that rounds to it takes code 1 (the smallest positive entry)."""
    if signed:
        return codes
    return torch.where((codes == 0) & (y > 0), torch.ones_like(codes), codes)


def _adversarial(signed: bool) -> torch.Tensor:
    """Values where a nearest-code encoder can go wrong: every map value and
    midpoint and the floats right next to them, binade edges, tiny and
    subnormal values, 0 and +-1, values a rounding step past 1, plus a sweep
    of random magnitudes over all the decades."""
    from optimkit.state import maps

    values = torch.tensor(maps.dynamic_map(signed, 8), dtype=torch.float32)
    mids = torch.tensor(maps.midpoints(maps.dynamic_map(signed, 8)), dtype=torch.float32)
    binades = 2.0 ** torch.arange(-40, 2, dtype=torch.float32)
    special = torch.tensor([0.0, 1.0, 1e-45, 1e-38, 1.1754944e-38, 1e-30, 1e-9, 2.0, 3.0])
    g = torch.Generator().manual_seed(0)
    sweep = torch.cat([10.0 ** (-9 * torch.rand(200_000, generator=g)), torch.rand(50_000, generator=g)])
    base = torch.cat([values.abs(), mids.abs(), binades, special, sweep])
    near = [base]
    for k in range(1, 4):  # k floats above and below each value
        bits = base.view(torch.int32)
        near += [(bits + k).view(torch.float32), (bits - k).clamp_min(0).view(torch.float32)]
    pos = torch.cat(near)
    return torch.cat([pos, -pos]) if signed else pos


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("simd", [True, False])
def test_encoder_gives_the_nearest_code(signed, simd):
    """The kernel's encoder against the reference rule (the number of map
    midpoints <= y; unsigned: at least 1 for y > 0) on adversarial values,
    exactly, ties included."""
    from optimkit.state import maps

    y = _adversarial(signed)
    mids = torch.tensor(maps.midpoints(maps.dynamic_map(signed, 8)), dtype=torch.float32)
    expected = _positive_keeps_a_positive_code(torch.bucketize(y, mids, right=True), y, signed)
    assert signed or int(((expected == 1) & (y < mids[0])).sum()) > 1000  # the rule is exercised
    got = q8_adamw.encode_codes(y, signed, simd=simd).long()
    wrong = (got != expected).nonzero().view(-1)
    assert wrong.numel() == 0, (y[wrong[:5]].tolist(), got[wrong[:5]].tolist(), expected[wrong[:5]].tolist())
    # the same through a block scale (the kernel multiplies by 1 / scale)
    scale = 0.37
    z = (y * scale).clamp(-scale, scale)
    got = q8_adamw.encode_codes(z, signed, scale=scale, simd=simd).long()
    inv = torch.tensor(1.0) / torch.tensor(scale)  # float32, as the kernel computes it
    expected = _positive_keeps_a_positive_code(torch.bucketize(z * inv, mids, right=True), z * inv, signed)
    assert torch.equal(got, expected)


def test_fast_path_plan_follows_a_state_dict_loaded_into_the_same_optimizer():
    """The fast path keeps packed state pointers between steps; loading a state dict
    into the same optimizer replaces the state, and the next steps must use it."""
    params = _params()
    opt = ok.AdamW(params, lr=1e-3, state_precision="q8")
    grads = _grads(6)
    for step_grads in grads[:3]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    saved = {"params": [p.detach().clone() for p in params], "opt": copy.deepcopy(opt.state_dict())}
    for step_grads in grads[3:5]:  # wander off
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    with torch.no_grad():
        for p, s in zip(params, saved["params"]):
            p.copy_(s)
    opt.load_state_dict(saved["opt"])
    fresh_params = [torch.nn.Parameter(s.clone()) for s in saved["params"]]
    fresh = ok.AdamW(fresh_params, lr=1e-3, state_precision="q8")
    fresh.load_state_dict(saved["opt"])
    for o, ps in ((opt, params), (fresh, fresh_params)):
        for p, g in zip(ps, grads[5]):
            p.grad = g.clone()
        o.step()
    for a, b in zip(params, fresh_params):
        assert torch.equal(a, b)
