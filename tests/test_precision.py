"""Low-precision optimizer state and bf16 parameters, at the optimizer level.

Quality bars of ``state_precision=`` / ``bf16_compensation=`` (the codecs
themselves are tested in test_codecs.py):

* every non-negative state (second moments, accumulators of squares) is
  declared in its transform's ``nonnegative`` (so low-bit codecs use the
  unsigned map), checked empirically over the whole registry;
* registry-wide, for bf16 / q8 / q4 / fp8 state: a state_dict round trip
  resumes bit for bit and keeps the stored dtypes; compiled q8 steps agree
  with eager ones (slow);
* q8 / q4 AdamW drift from fp32 AdamW no more than bitsandbytes' AdamW8bit /
  torchao's AdamW4bit on the same problem;
* held-out loss on scikit-learn's digits with q8 / q4 state within 2% of fp32;
* measured state bytes per parameter, overrides, per-state precisions and
  memory_report;
* bf16 parameters: Kahan compensation tracks an fp32-master run, stochastic
  rounding is unbiased and resumes bit for bit with the global RNG state.
"""
from __future__ import annotations

import copy
import functools
import io
import math
import re
import warnings

import pytest
import torch

import optimkit as ok
from helpers import as_grad, digits_split, grad_stream, make_params, mlp_problem, train, two_groups
from optimizer_cases import contract_hp, gradient_names
from optimkit.kernels import q8_adamw
from optimkit.state import dynamic_map, get_codec

NAMES = gradient_names()
LOW = ("bf16", "q8", "q4", "fp8")


# --------------------------------------------------------------------------- helpers
def storage_of(state: dict, name: str) -> dict:
    prefix = name + ":"
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def decoded(state: dict) -> dict[str, torch.Tensor]:
    """The fp32 value of every encoded state of one parameter."""
    return {name: get_codec(prec).decode(storage_of(state, name), shape, signed)
            for name, (prec, signed, shape, *_) in state.get("_layout", {}).items()}


def plain_tensors(state: dict) -> dict[str, torch.Tensor]:
    """State tensors stored as they are (not through a codec)."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and ":" not in k}


def assert_all_encoded(opt, prec: str) -> None:
    """Every state tensor of every parameter is stored with ``prec`` (min_quant_size=0),
    except those a transform keeps at full precision."""
    exact = {n for t in opt._transforms for n in t.full_precision}  # e.g. a subspace basis
    for p, st in opt.state.items():
        layout = st.get("_layout", {})
        tensors = [k for k, v in plain_tensors(st).items() if v.dim() > 0 and k != "step"]
        # every state kept exact (schedule-free SGD's iterate z), or none at all (AdaGrad-Norm's
        # one accumulator is a group value): nothing to encode
        assert layout or set(tensors) <= exact, "no encoded state at all"
        for name, (got, signed, shape, *_) in layout.items():
            assert got == prec, f"state {name} stored as {got}, not {prec}"
            assert signed == (name not in opt._nonnegative), f"state {name}: signed={signed}"
        leftovers = [k for k, v in plain_tensors(st).items() if v.dim() > 0 and k != "step" and k not in exact]
        assert not leftovers, f"states {leftovers} were not encoded"


# --------------------------------------------------------------------------- 1. nonnegative
# Extra settings that create more state (AMSGrad maxima, centred RMSprop, SM3's
# two accumulator rules); each runs with the optimizer's contract settings.
VARIANTS = {"adam": [dict(amsgrad=True)], "adamw": [dict(amsgrad=True)], "adabelief": [dict(amsgrad=True)],
            "rmsprop": [dict(centered=False, momentum=0.0)], "sm3": [dict(beta=0.0)],
            "adafactor": [dict(beta1=None)]}
AUDIT = [pytest.param(n, v, id=f"{n}-{i}") for n in NAMES
         for i, v in enumerate([{}] + VARIANTS.get(n, []))]


@pytest.mark.parametrize("name,extra", AUDIT)
def test_nonnegative_states_are_declared(name, extra):
    """A state tensor that is never negative over 30 steps on the MLP (second
    moments, sums and maxima of squares, factored variances) must be declared
    in its transform's ``nonnegative``: q8/q4/fp8 then use the unsigned map
    (finer for q8, zero-free for q4, which keeps 1/sqrt(v) finite). And a
    declared state must indeed never be negative (the unsigned map clips)."""
    model, loss_fn = mlp_problem()
    hp = {**contract_hp(name), **extra}
    opt = ok.create(name, model.parameters(), **hp)
    lowest: dict[str, float] = {}
    for _ in range(30):
        train(model, loss_fn, opt, 1)
        for st in opt.state.values():
            for key, v in plain_tensors(st).items():
                if key != "step" and v.is_floating_point() and v.dim() > 0 and v.numel():
                    lowest[key] = min(lowest.get(key, math.inf), v.min().item())
    declared = opt._nonnegative
    undeclared = sorted(k for k, m in lowest.items() if m >= 0 and k not in declared)
    wrong = sorted(k for k, m in lowest.items() if m < 0 and k in declared)
    assert not undeclared, f"{name}: never-negative states not declared nonnegative: {undeclared}"
    assert not wrong, f"{name}: states declared nonnegative went negative: {wrong}"


# --------------------------------------------------------------------------- 2a. resume
@pytest.mark.parametrize("prec", LOW)
@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_exact_with_low_precision_state(name, prec):
    """10 steps, state_dict round trip (deepcopy) into a fresh model and
    optimizer, 10 more steps == 20 uninterrupted steps, bit for bit; every
    state (min_quant_size=0: even the smallest) is stored with ``prec`` and the
    stored dtypes survive the round trip."""
    model, loss_fn = mlp_problem()
    start = copy.deepcopy(model)
    hp = dict(contract_hp(name), state_precision=prec, min_quant_size=0)
    if name == "rmsprop" and prec in ("q8", "q4", "fp8"):
        hp["centered"] = False  # centered + quantized variance states is refused (see below)

    straight = copy.deepcopy(start)
    opt = ok.create(name, straight.parameters(), **hp)
    train(straight, loss_fn, opt, 20)
    assert_all_encoded(opt, prec)

    first = copy.deepcopy(start)
    opt1 = ok.create(name, first.parameters(), **hp)
    train(first, loss_fn, opt1, 10)
    saved_model = copy.deepcopy(first.state_dict())
    saved_opt = copy.deepcopy(opt1.state_dict())
    del opt1, first

    resumed, _ = mlp_problem(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = ok.create(name, resumed.parameters(), **hp)
    opt2.load_state_dict(saved_opt)
    for saved, st in zip(saved_opt["state"].values(), opt2.state.values()):
        assert set(saved) == set(st)
        for key, v in saved.items():
            if isinstance(v, torch.Tensor):
                assert st[key].dtype == v.dtype and torch.equal(st[key], v), f"{name}: loaded {key} differs"
        assert st.get("_layout") == saved.get("_layout")
    train(resumed, loss_fn, opt2, 10)

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name}/{prec}: resumed run differs from the uninterrupted one"
    for sa, sb in zip(opt.state.values(), opt2.state.values()):
        assert set(sa) == set(sb) and sa.get("_layout") == sb.get("_layout")
        for key, va in sa.items():
            if isinstance(va, torch.Tensor):
                vb = sb[key]
                assert va.dtype == vb.dtype and torch.equal(va, vb), f"{name}/{prec}: state {key} differs"


# --------------------------------------------------------------------------- 2a'. compiled q8
def _max_gap(signed: bool) -> float:
    t = torch.tensor(dynamic_map(signed, 8))
    return (t[1:] - t[:-1]).max().item()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_compiled_q8_step_agrees_with_eager(name):
    """compile=True with q8 state against eager, 10 steps, two groups, mixed
    shapes, every state quantized (min_quant_size=0). The CPU fast path is
    turned off so that both runs take the transform chain.

    Tolerances: the compiled kernel rounds float32 arithmetic differently
    (fused, reordered; ~1e-7 relative per op), so block scales agree to 1e-3
    relative after 10 steps. A value within that of a decision midpoint can
    land on the neighbouring code: codes may differ by one step, for at most
    1% of the elements; a flipped code moves that element by at most one map
    gap (< 1.5% of its block's absmax), which changes one step's update of one
    element by about that fraction, so parameters stay within 0.2% of how far
    they moved (observed: no flipped code, 1e-4 of the movement at worst)."""
    a, b = make_params(), make_params()
    start = [p.detach().clone() for p in a]
    hp = dict(contract_hp(name), state_precision="q8", min_quant_size=0)
    if name == "rmsprop":
        hp["centered"] = False  # centered + quantized variance states is refused
    with q8_adamw.disabled():
        opt_a = ok.create(name, two_groups(a), **hp)
        opt_b = ok.create(name, two_groups(b), compile=True, **hp)
        for grads in grad_stream(a, 10):
            for p, q, g in zip(a, b, grads):
                p.grad, q.grad = as_grad(opt_a, p, g), as_grad(opt_b, q, g)
            opt_a.step()
            opt_b.step()
    moved = max((p - s).abs().max().item() for p, s in zip(a, start))
    for p, q in zip(a, b):
        assert (p - q).abs().max().item() <= 2e-3 * moved + 1e-6, f"{name}: parameters differ"
    flipped = total = 0
    for p, q in zip(a, b):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.get("_layout") == sb.get("_layout")
        da, db = decoded(sa), decoded(sb)
        for key, (_, signed, *_) in sa.get("_layout", {}).items():
            ca, cb = sa[key + ":codes"].int(), sb[key + ":codes"].int()
            ma, mb = sa[key + ":absmax"], sb[key + ":absmax"]
            torch.testing.assert_close(mb, ma, rtol=1e-3, atol=1e-12)
            if ca.numel():
                assert (ca - cb).abs().max().item() <= 1, f"{name}: {key} codes more than one step apart"
            flipped += (ca != cb).sum().item()
            total += ca.numel()
            if ma.numel():
                tol = (_max_gap(signed) + 1e-3) * ma.max().item()
                assert (da[key] - db[key]).abs().max().item() <= tol, f"{name}: decoded {key} differs"
    assert flipped <= max(2, 0.01 * total), f"{name}: {flipped}/{total} codes differ"


# --------------------------------------------------------------------------- 2b. vs bitsandbytes / torchao
# mean |theta - theta_fp32| after 100 free-running AdamW steps on the
# bitsandbytes test problem (below), measured with bitsandbytes 0.50.2 (CPU
# backend) and torchao 0.18.0 on CPU; used when the package is not installed.
# Our figures on the same protocol: q8 1.823e-4, q4 2.395e-3 (torchao's
# AdamW8bit also gives 1.823e-4: same format, same rounding).
RECORDED = {"bitsandbytes.AdamW8bit": 1.826e-4, "torchao.AdamW4bit": 2.395e-3}
ADAMW_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def adamw_drift(make, shape=(256, 257), steps=100, seed=0) -> float:
    """Mean |theta - theta_fp32| after ``steps`` AdamW steps of the optimizer
    from ``make`` against torch.optim.AdamW (fp32) on identical gradients,
    without re-synchronising: p = 0.1 N(0,1), g = 0.01 N(0,1)."""
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=gen) * 0.1
    ref, q = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    opt_ref = torch.optim.AdamW([ref], **ADAMW_HP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make([q])
        for _ in range(steps):
            g = torch.randn(shape, generator=gen) * 0.01
            ref.grad, q.grad = g.clone(), g.clone()
            opt_ref.step()
            opt.step()
    return (q.detach() - ref.detach()).abs().mean().item()


def _reference_drift(key: str, make) -> float:
    try:
        return adamw_drift(make)
    except ImportError:
        return RECORDED[key]


def _bnb_adamw8bit(ps):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(ps, **ADAMW_HP)


def _torchao_adamw4bit(ps):
    import torchao.optim

    return torchao.optim.AdamW4bit(ps, **ADAMW_HP)


# The reference libraries and we draw the same codes up to rounding ties
# (bitsandbytes' CPU quantizer picks a neighbouring code for ~0.5% of values):
# over seeds and shapes the ratio of the two drifts ranged 0.998-1.002, hence
# the 0.5% allowance.
SAME = 1.005


@pytest.mark.parametrize("fast_path", [True, False], ids=["default", "tensor-ops"])
def test_q8_adamw_drifts_no_more_than_bitsandbytes(fast_path):
    def ours(ps):
        return ok.AdamW(ps, state_precision="q8", **ADAMW_HP)

    if fast_path:
        err = adamw_drift(ours)
    else:
        with q8_adamw.disabled():
            err = adamw_drift(ours)
    ref = _reference_drift("bitsandbytes.AdamW8bit", _bnb_adamw8bit)
    assert err <= SAME * ref, f"q8 AdamW drift {err:.4g} vs bitsandbytes AdamW8bit {ref:.4g}"
    assert err > 0  # the state really was quantized


@pytest.mark.slow
def test_q4_adamw_drifts_no_more_than_torchao():
    err = adamw_drift(lambda ps: ok.AdamW(ps, state_precision="q4", **ADAMW_HP))
    ref = _reference_drift("torchao.AdamW4bit", _torchao_adamw4bit)
    assert err <= SAME * ref, f"q4 AdamW drift {err:.4g} vs torchao AdamW4bit {ref:.4g}"
    assert err > 0


def test_q4_adamw_drift_recorded_figure():
    """The fast companion of the torchao comparison: against torchao's recorded figure."""
    err = adamw_drift(lambda ps: ok.AdamW(ps, state_precision="q4", **ADAMW_HP))
    assert 0 < err <= SAME * RECORDED["torchao.AdamW4bit"]


# --------------------------------------------------------------------------- 2c. digits


# Mini-batch training (batch 64, 500 steps, cosine decay to 0) of a 64-64-10
# MLP: held-out loss goes from 2.3 to about 0.1 (97% accuracy).
DIGITS_HP = {"adamw": dict(lr=3e-3),
             "lion": dict(lr=1e-3, weight_decay=0.1),
             "sgd": dict(lr=0.1, momentum=0.9),
             "adafactor": dict(lr=1e-2, beta1=0.9, relative_step=False, scale_parameter=False)}


def train_digits(name: str, prec: str, steps: int = 500, batch: int = 64, hidden: int = 64,
                 schedule: bool = True, seed: int = 0, **hp):
    """Train on the digits split; returns (held-out loss, accuracy, optimizer)."""
    xtr, ytr, xva, yva = digits_split()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))
    opt = ok.create(name, model.parameters(), state_precision=prec, min_quant_size=0, **hp)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
             if schedule else None)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        if batch:
            idx = torch.randint(0, len(xtr), (batch,), generator=gen)
            xb, yb = xtr[idx], ytr[idx]
        else:
            xb, yb = xtr, ytr
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        if sched is not None:
            sched.step()
    with torch.no_grad():
        out = model(xva)
        return torch.nn.functional.cross_entropy(out, yva).item(), (out.argmax(1) == yva).float().mean().item(), opt


@functools.lru_cache(maxsize=None)
def digits_fp32(name: str, **kw) -> float:
    return train_digits(name, "fp32", **kw, **DIGITS_HP[name])[0]


LION_Q4 = pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "q4 Lion momentum stalls: the 4-bit signed map's steps are 0.005-0.23 of the block absmax, "
    "Lion moves its momentum by (1 - beta2) = 1% of (g - m) per step, and round-to-nearest "
    "drops every such increment below half a step; held-out loss +80-90% over fp32 "
    "(stochastic rounding of the codes recovers it)"))
DIGITS_CASES = [pytest.param(n, p, marks=LION_Q4 if (n, p) == ("lion", "q4") else (), id=f"{n}-{p}")
                for n in DIGITS_HP for p in ("q8", "q4")]


@pytest.mark.parametrize("name,prec", DIGITS_CASES)
def test_digits_heldout_loss_close_to_fp32(name, prec):
    """Same seed, same mini-batches, same steps: the held-out loss with every
    state tensor in ``prec`` is at most 2% above fp32's (lower is not a
    failure). Seed 0 (the test), fp32 held-out loss / q8 / q4: adamw 0.148
    -1.3% -0.5%, lion 0.185 +0.8% +88%, sgd 0.112 0.0% +0.9%, adafactor 0.101
    -0.5% +0.1%. Over seeds 0-3, q8: adamw -1.4..-0.9%, lion +0.8..+1.7%,
    sgd -0.1..+0.1%, adafactor -2.0..-0.5%; q4: adamw -2.6..+0.1%,
    sgd +0.5..+3.2% (seeds 1 and 3 miss the bar), adafactor -3.0..+0.1%.
    (AdamW q8 was -3.1..+0.3% while positive second moments could take the
    zero code.)"""
    base = digits_fp32(name)
    loss, acc, opt = train_digits(name, prec, **DIGITS_HP[name])
    assert_all_encoded(opt, prec)
    assert base < 0.15 * math.log(10) and acc > 0.9, "training did not get anywhere"
    assert loss != base  # quantization changed the run
    assert loss <= 1.02 * base, f"{name}/{prec}: held-out loss {loss:.4f} vs fp32 {base:.4f}"


FULL_BATCH = pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "round-to-nearest state codecs stall slow EMAs under smooth (full-batch) gradients: an "
    "increment (1 - beta) (x - s) smaller than half a code step is dropped at every encode, so "
    "Lion's m (beta2 = 0.99) and the q4 moments lag behind; bitsandbytes' Lion8bit stalls "
    "alike (+24%)"))
FULL_BATCH_CASES = [pytest.param(n, hp, p, id=f"{n}-{p}", marks=() if (n, p) == ("adamw", "q8") else FULL_BATCH)
                    for n, hp in (("adamw", dict(lr=3e-3)), ("lion", dict(lr=1e-3, weight_decay=0.1)))
                    for p in ("q8", "q4")]


@pytest.mark.parametrize("name,hp,prec", FULL_BATCH_CASES)
def test_digits_full_batch_heldout_loss_close_to_fp32(name, hp, prec):
    """Full-batch gradients (deterministic, slowly varying), 300 steps, constant
    lr, 64-128-10 MLP: the same 2% bar. Measured: adamw q8 -0.1%, q4 +26.9%
    (bf16 +0.3%); lion q8 +23.3%, q4 +44.9% (bf16 -0.3%). Stochastic rounding
    of the codes brings adamw q4 to +0.7% and lion q8 to +1.2% (experiment
    outside the suite). AdamW q8 was +21.6% (as torchao's AdamW8bit, whose codes it equalled)
    while positive second moments could encode to the zero code: the rarely
    lit pixels' weights then stepped by m / eps (see test_lowbit_real_task.py).
    bitsandbytes' CPU AdamW8bit ends at -1.1%: its CPU quantizer decodes small
    second-moment values far too large (see docs/state_precision.md, pitfalls)."""
    kw = dict(steps=300, batch=0, hidden=128, schedule=False)
    base = train_digits(name, "fp32", **kw, **hp)[0]
    loss = train_digits(name, prec, **kw, **hp)[0]
    assert loss <= 1.02 * base, f"{name}/{prec}: held-out loss {loss:.4f} vs fp32 {base:.4f}"


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "q8 encodes with round-to-nearest: an EMA increment (1 - beta) (x - s) below half a code "
    "step (0.35-3.5% of the value in the unsigned map's top decade) is "
    "dropped at every encode, so a q8 EMA with beta2 = 0.999 (or 0.99) does not move at all "
    "towards a constant new target"))
@pytest.mark.parametrize("signed,beta", [(False, 0.999), (True, 0.99)], ids=["v-0.999", "m-0.99"])
def test_q8_ema_follows_a_steady_target(signed, beta):
    """The stall behind the full-batch results, in isolation: s <- beta s +
    (1 - beta) x with x = s0 / 2 (the block maxima held fixed), 500 steps,
    decode -> update -> encode each step. fp32 moves s by a mean 0.11
    (0.999) / 0.27 (0.99); q8 moves it by 0.0 / 3e-5."""
    codec = get_codec("q8")
    gen = torch.Generator().manual_seed(0)
    s0 = torch.rand(4096, generator=gen) * 0.9 + 0.1
    s0[::256] = 1.0
    x = s0 * 0.5
    x[::256] = 1.0
    ref, storage = s0.clone(), codec.encode(s0, signed)
    for _ in range(500):
        ref = beta * ref + (1 - beta) * x
        codec.encode_(beta * codec.decode(storage, s0.shape, signed) + (1 - beta) * x, storage, signed)
    moved = (codec.decode(storage, s0.shape, signed) - codec.roundtrip(s0, signed)).abs().mean()
    assert moved >= 0.5 * (ref - s0).abs().mean(), f"q8 EMA moved {moved:.3g}"


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_centered_rmsprop_stays_finite_with_low_precision_state(prec):
    """Gradients of one sign per element (magnitudes spread over decades, 1%
    noise): 100 centred RMSprop steps stay finite."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = ok.RMSprop([p], lr=1e-3, centered=True, state_precision=prec, min_quant_size=0)
    scale = torch.exp(2 * torch.randn(4096, generator=gen))
    for _ in range(100):
        p.grad = scale * (1 + 0.01 * torch.randn(4096, generator=gen))
        opt.step()
    bad = (~torch.isfinite(p)).sum().item()
    assert bad == 0, f"{prec}: {bad} non-finite parameters"


@pytest.mark.parametrize("prec", ["q8", "q4", "fp8"])
def test_centered_rmsprop_rejects_quantized_variance_states(prec):
    """sqrt(v - gbar^2) of two independently quantized states goes negative when
    the variance is small next to the mean (measured on the problem above: q8
    left 650-960 of 4096 parameters NaN, fp8 1100-1650), so the combination is
    refused up front; the other states may still be quantized."""
    p = [torch.nn.Parameter(torch.zeros(4096))]
    with pytest.raises(ValueError, match="state_precision"):
        ok.RMSprop(p, centered=True, state_precision=prec)
    with pytest.raises(ValueError, match="square_avg"):
        ok.RMSprop(p, centered=True, momentum=0.9, state_precision={"grad_avg": "bf16", "default": prec})
    opt = ok.RMSprop(p, centered=True, momentum=0.9, min_quant_size=0,
                     state_precision={"square_avg": "bf16", "grad_avg": "bf16", "default": prec})
    p[0].grad = torch.ones(4096)
    opt.step()
    assert opt.state[p[0]]["_layout"]["momentum_buffer"][0] == prec
    ok.RMSprop(p, centered=False, state_precision=prec)  # not centered: fine


# --------------------------------------------------------------------------- 2d. bytes
def realistic_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512))


def one_step(model, opt):
    model(torch.randn(8, 512)).square().mean().backward()
    opt.step()


def tensor_bytes(state: dict, skip=()) -> int:
    return sum(v.numel() * v.element_size() for k, v in state.items()
               if isinstance(v, torch.Tensor) and k not in skip)


@pytest.mark.parametrize("prec,bar", [("q8", 2.1), ("q4", 1.1), ("fp32", 8.0 + 1e-9)])
def test_adamw_state_bytes_per_param(prec, bar):
    """Measured after one step on 512x512 matrices and 512 biases (biases are
    below min_quant_size and stay fp32): q8 2.04, q4 1.08 bytes/param."""
    model = realistic_model()
    opt = ok.AdamW(model.parameters(), state_precision=prec)
    one_step(model, opt)
    n = sum(p.numel() for p in model.parameters())
    per_param = ok.state_bytes(opt) / n
    assert per_param <= bar, f"{prec}: {per_param:.3f} bytes/param"
    assert ok.state_bytes(opt) == sum(tensor_bytes(st) for st in opt.state.values())
    assert ok.state_bytes(opt, by_placement=True) == {"cpu": ok.state_bytes(opt)}
    if prec != "fp32":
        codec = get_codec(prec)
        w = model[0].weight
        expected = codec.nbytes(tuple(w.shape), True) + codec.nbytes(tuple(w.shape), False)
        assert tensor_bytes(opt.state[w], skip=("step",)) == expected
        assert per_param > 2 * codec.bytes_per_element  # not below what the format needs


def test_precision_override_keeps_a_param_fp32():
    model = realistic_model()
    emb = model[0].weight
    opt = ok.AdamW(model.parameters(), state_precision="q8", state_precision_overrides={emb: "fp32"})
    one_step(model, opt)
    st = opt.state[emb]
    assert "_layout" not in st
    assert {k for k, v in plain_tensors(st).items() if v.dim() > 0} == {"exp_avg", "exp_avg_sq"}
    assert all(st[k].dtype == torch.float32 and st[k].shape == emb.shape for k in ("exp_avg", "exp_avg_sq"))
    other = opt.state[model[2].weight]
    assert other["_layout"] == {"exp_avg": ("q8", True, (512, 512), False),
                                "exp_avg_sq": ("q8", False, (512, 512), False)}
    assert other["exp_avg:codes"].dtype == torch.uint8
    # an override also picks a lower precision; bf16 has no size threshold
    bias = model[0].bias
    opt2 = ok.AdamW([bias], state_precision_overrides={bias: "bf16"})
    bias.grad = torch.ones_like(bias)
    opt2.step()
    assert opt2.state[bias]["exp_avg:value"].dtype == torch.bfloat16


def test_per_state_precision_dict():
    model = realistic_model()
    opt = ok.AdamW(model.parameters(), state_precision={"exp_avg": "q8", "exp_avg_sq": "bf16"})
    one_step(model, opt)
    w, b = model[0].weight, model[0].bias
    st = opt.state[w]
    assert st["_layout"] == {"exp_avg": ("q8", True, (512, 512), False),
                             "exp_avg_sq": ("bf16", False, (512, 512), False)}
    assert st["exp_avg:codes"].dtype == torch.uint8 and st["exp_avg:codes"].shape == w.shape
    assert st["exp_avg:absmax"].dtype == torch.float32 and st["exp_avg:absmax"].numel() == 512 * 512 // 256
    assert st["exp_avg_sq:value"].dtype == torch.bfloat16 and st["exp_avg_sq:value"].shape == w.shape
    # the bias is below min_quant_size: q8 falls back to fp32, bf16 still applies
    sb = opt.state[b]
    assert sb["exp_avg"].dtype == torch.float32 and sb["_layout"] == {"exp_avg_sq": ("bf16", False, (512,), False)}
    n = sum(p.numel() for p in model.parameters())
    expected = 2 * ((1 + 4 / 256) * 512 * 512 + 2 * 512 * 512) + 2 * (4 * 512 + 2 * 512)
    steps = sum(tensor_bytes(st) - tensor_bytes(st, skip=("step",)) for st in opt.state.values())
    assert ok.state_bytes(opt) == expected + steps, ok.state_bytes(opt) / n
    # a "default" entry covers the other states
    opt3 = ok.Adam(model.parameters(), amsgrad=True, state_precision={"default": "q4", "exp_avg_sq": "bf16"})
    one_step(model, opt3)
    lay = opt3.state[w]["_layout"]
    assert lay["exp_avg"][0] == "q4" and lay["max_exp_avg_sq"][0] == "q4" and lay["exp_avg_sq"][0] == "bf16"


def test_memory_report_one_row_per_group():
    model = realistic_model()
    groups = [{"params": model[0].parameters()},
              {"params": model[2].parameters(), "state_precision": "q4"}]
    opt = ok.AdamW(groups, state_precision="q8", state_precision_overrides={model[0].bias: "fp32"})
    one_step(model, opt)
    buf = io.StringIO()
    text = ok.memory_report(opt, file=buf)
    assert buf.getvalue().rstrip("\n") == text
    rows = [line.split() for line in text.splitlines() if re.match(r"\s*\d+\s", line)]
    assert len(rows) == 2, text
    total = 0
    for row, group in zip(rows, opt.param_groups):
        params = sum(p.numel() for p in group["params"])
        nbytes = sum(tensor_bytes(opt.state[p]) for p in group["params"])
        total += nbytes
        assert int(row[1].replace(",", "")) == params
        assert row[2] == group["state_precision"]
        assert float(row[4]) == pytest.approx(nbytes / 2**20, abs=6e-4)
        assert float(row[5]) == pytest.approx(nbytes / params, abs=6e-4)
    last = [line.split() for line in text.splitlines() if line.split()[:1] == ["all"]]
    assert len(last) == 1 and float(last[0][2]) == pytest.approx(total / 2**20, abs=6e-4)
    assert total == ok.state_bytes(opt)
    q8_row, q4_row = float(rows[0][5]), float(rows[1][5])
    assert q8_row < 2.1 and q4_row < 1.1


# --------------------------------------------------------------------------- 2e. bf16 params
BF16_SHAPES = [(64, 64), (64,), (10, 64)]
BF16_HP = {"adamw": dict(lr=1e-3, weight_decay=1e-2), "sgd": dict(lr=1e-3, momentum=0.9)}


def bf16_run(name, dtype, comp, steps, **hp):
    """Params N(0,1) rounded to bf16 (so all runs start equal), a fixed stream of
    bf16 gradients N(0,1) (identical for every run: only the parameter
    arithmetic differs); returns the final params as fp32."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16().to(dtype)) for s in BF16_SHAPES]
    opt = ok.create(name, params, bf16_compensation=comp, **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16().to(dtype)
        opt.step()
    return [p.detach().float() for p in params], opt


def mean_abs_diff(xs, ys) -> float:
    return (sum((x - y).abs().sum() for x, y in zip(xs, ys)) / sum(x.numel() for x in xs)).item()


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_bf16_kahan_tracks_fp32_master(name):
    """Updates (~1e-3) much smaller than bf16's spacing (2^-8..2^-7 near 1):
    plain bf16 loses nearly all of them; with Kahan compensation the bf16
    params stay close to the fp32-master trajectory. Mean |theta - theta_fp32|
    after 300 steps, measured: adamw 1.28e-2 (plain) vs 1.21e-3 (Kahan), sgd
    3.42e-2 vs 2.58e-3, where merely rounding the fp32 trajectory to bf16 costs
    1.1e-3. (The moments of bf16 params are bf16 tensors, as in torch.optim,
    which accounts for the rest: fp32 params with bf16 state land as far.)"""
    steps = 300
    ref, _ = bf16_run(name, torch.float32, None, steps, **BF16_HP[name])
    start, _ = bf16_run(name, torch.float32, None, 0, **BF16_HP[name])
    plain, _ = bf16_run(name, torch.bfloat16, None, steps, **BF16_HP[name])
    kahan, opt = bf16_run(name, torch.bfloat16, "kahan", steps, **BF16_HP[name])
    err_plain, err_kahan = mean_abs_diff(plain, ref), mean_abs_diff(kahan, ref)
    assert err_kahan * 5 <= err_plain, f"{name}: kahan {err_kahan:.3g} vs plain bf16 {err_plain:.3g}"
    floor = mean_abs_diff([r.bfloat16().float() for r in ref], ref)
    assert err_kahan <= 3 * floor, f"{name}: kahan {err_kahan:.3g}, bf16 rounding alone {floor:.3g}"
    assert err_kahan < 0.1 * mean_abs_diff(ref, start)
    assert all(st["kahan_comp"].dtype == torch.bfloat16 for st in opt.state.values())


@pytest.mark.parametrize("name", ["adamw", "lion"])
@pytest.mark.parametrize("prec", ["q8", "q4", "bf16"])
@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_params_with_encoded_state_step_in_fp32(name, prec, compiled):
    """bf16 parameters with encoded state: each step is the fp32 step (fp32 copies of
    the parameters and gradients, the decoded state) rounded to bf16 once, exactly."""
    shapes = [(40, 30), (30,)]
    hp = dict(contract_hp(name), state_precision=prec, min_quant_size=0)
    low = make_params(shapes, dtype=torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    stream = grad_stream(low, 5, scale=0.1)
    opt_low = ok.create(name, low, compile=compiled, **hp)
    opt_ref = ok.create(name, ref, **hp)
    for grads in stream:
        for p, q, g in zip(low, ref, grads):
            p.grad, q.grad = g.clone(), g.float()
        opt_low.step()
        with q8_adamw.disabled():
            opt_ref.step()
        with torch.no_grad():
            for q in ref:
                q.copy_(q.bfloat16().float())
        for p, q in zip(low, ref):
            assert p.dtype == torch.bfloat16
            torch.testing.assert_close(p.float(), q, rtol=0, atol=0 if not compiled else 1e-2)
    if not compiled:
        for p, q in zip(low, ref):
            for key, v in opt_ref.state[q].items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    assert torch.equal(opt_low.state[p][key], v), key


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_trains_bf16_params_with_q8_state(name):
    """bf16 parameters, q8 state for the large tensors and state as created (bf16)
    for the small ones, in one bucket: every optimizer steps and the loss goes down."""
    model, _ = mlp_problem()
    model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen).bfloat16()
    y = torch.randn(64, 2, generator=gen).bfloat16()

    def loss_fn(m):
        return torch.nn.functional.mse_loss(m(x).float(), y.float())

    hp = contract_hp(name)
    try:
        opt = ok.create(name, model.parameters(), state_precision="q8", min_quant_size=100, **hp)
    except ValueError:  # optimizers that refuse q8 for some state (centred RMSprop)
        pytest.skip(f"{name} refuses q8 state with these settings")
    losses = train(model, loss_fn, opt, 30, create_graph=ok.info(name).cls.requires_create_graph)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < losses[0], f"{name}: {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_bf16_stochastic_rounding_is_unbiased():
    """10000 bf16 params at 1.5 (spacing 2^-7), 100 SGD steps of 2^-7/10 each:
    round-to-nearest never moves them; stochastic rounding lands, on average,
    where the exact sum of the updates does (within 5 standard errors: each
    step adds at most spacing^2/4 of variance), Kahan within an ulp."""
    n, steps = 10000, 100
    delta = torch.tensor(2.0 ** -7 / 10).bfloat16()
    expected = 1.5 - steps * delta.float().item()

    def run(comp):
        p = torch.nn.Parameter(torch.full((n,), 1.5, dtype=torch.bfloat16))
        opt = ok.SGD([p], lr=1.0, bf16_compensation=comp)
        for _ in range(steps):
            p.grad = torch.full_like(p, delta)
            opt.step()
        return p.detach().float()

    torch.manual_seed(0)
    sr = run("stochastic_rounding")
    sem = math.sqrt(steps * (2.0 ** -7) ** 2 / 4 / n)
    assert abs(sr.mean().item() - expected) <= 5 * sem, (sr.mean().item(), expected, sem)
    assert sr.unique().numel() > 5  # it really is random
    assert torch.equal(run(None), torch.full((n,), 1.5))  # nearest: every update lost
    assert (run("kahan") - expected).abs().max().item() <= 2.0 ** -7


@pytest.mark.parametrize("comp", ["stochastic_rounding", "kahan"])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_bf16_compensation_resumes_bit_exactly(name, comp):
    """10 steps, state_dict + global RNG state saved, 10 more == 20 straight
    steps, bit for bit (stochastic rounding draws from torch's global generator,
    so its state is part of the checkpoint; without it the run differs)."""
    hp = BF16_HP[name]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).bfloat16() for s in BF16_SHAPES]
    stream = [[torch.randn(s, generator=gen).bfloat16() for s in BF16_SHAPES] for _ in range(20)]

    def fresh():
        params = [torch.nn.Parameter(t.clone()) for t in init]
        return params, ok.create(name, params, bf16_compensation=comp, **hp)

    def steps(params, opt, grads):
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    torch.manual_seed(1)
    straight, opt = fresh()
    steps(straight, opt, stream)

    torch.manual_seed(1)
    first, opt1 = fresh()
    steps(first, opt1, stream[:10])
    saved = copy.deepcopy(opt1.state_dict())
    saved_params = [p.detach().clone() for p in first]
    rng = torch.get_rng_state()
    del opt1, first

    def resume(restore_rng: bool):
        params, opt2 = fresh()
        with torch.no_grad():
            for p, s in zip(params, saved_params):
                p.copy_(s)
        opt2.load_state_dict(saved)
        if restore_rng:
            torch.set_rng_state(rng)
        else:
            torch.manual_seed(12345)
        steps(params, opt2, stream[10:])
        return params, opt2

    resumed, opt2 = resume(True)
    for a, b in zip(straight, resumed):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    for sa, sb in zip(opt.state.values(), opt2.state.values()):
        for key, va in plain_tensors(sa).items():
            assert va.dtype == sb[key].dtype and torch.equal(va, sb[key]), key
    if comp == "stochastic_rounding":
        other, _ = resume(False)
        assert any(not torch.equal(a, b) for a, b in zip(straight, other))


# --------------------------------------------------------------------------- stochastic rounding
@pytest.mark.parametrize("prec", ["q8", "q4"])
@pytest.mark.parametrize("signed,beta", [(False, 0.999), (True, 0.99)], ids=["v-0.999", "m-0.99"])
def test_stochastic_rounding_ema_follows_a_steady_target(prec, signed, beta):
    """The EMA that stalls with nearest rounding (above) moves with
    state_rounding="stochastic": within 10% of the fp32 EMA's movement."""
    codec = get_codec(prec, stochastic=True)
    gen = torch.Generator().manual_seed(0)
    s0 = torch.rand(4096, generator=gen) * 0.9 + 0.1
    s0[::256] = 1.0
    x = s0 * 0.5
    x[::256] = 1.0
    ref, storage = s0.clone(), codec.empty(s0.shape, signed=signed)
    codec.encode_(s0, storage, signed)
    for _ in range(500):
        ref = beta * ref + (1 - beta) * x
        codec.encode_(beta * codec.decode(storage, s0.shape, signed) + (1 - beta) * x, storage, signed)
    moved = (codec.decode(storage, s0.shape, signed) - s0).abs().mean()
    target = (ref - s0).abs().mean()
    assert abs(moved - target) <= 0.1 * target, f"{prec} SR EMA moved {moved:.3g}, fp32 {target:.3g}"


SR_SHORT = pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "stochastic rounding removes most of the q4 Lion stall but not all of it: +2.1% on seed 0 "
    "(+4.1%, +3.0% on seeds 1, 2; nearest: +88%; independent per-step noise instead of the "
    "low-discrepancy dither: +7.1%), against the 2% bar"))


@pytest.mark.parametrize("name,prec,kw", [
    pytest.param("lion", "q4", {}, marks=SR_SHORT),                           # mini-batch, the q4 Lion stall
    ("adamw", "q4", dict(steps=300, batch=0, hidden=128, schedule=False)),   # full batch: +27% -> +1.6%
    ("lion", "q8", dict(steps=300, batch=0, hidden=128, schedule=False)),    # full batch: +23% -> +0.3%
], ids=["lion-q4", "adamw-q4-full-batch", "lion-q8-full-batch"])
def test_stochastic_rounding_closes_the_stalled_cases(name, prec, kw):
    """The cases that miss the 2% bar with nearest rounding (xfails above), with
    state_rounding="stochastic"."""
    hp = DIGITS_HP[name] if not kw else (dict(lr=3e-3) if name == "adamw" else dict(lr=1e-3, weight_decay=0.1))
    base = train_digits(name, "fp32", **kw, **hp)[0]
    loss, _, opt = train_digits(name, prec, state_rounding="stochastic", **kw, **hp)
    assert all(meta[3] for st in opt.state.values() for meta in st["_layout"].values())
    assert loss <= 1.02 * base, f"{name}/{prec} stochastic: held-out loss {loss:.4f} vs fp32 {base:.4f}"


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd"])
@pytest.mark.parametrize("prec", ["q8", "q4"])
def test_stochastic_rounding_resumes_bit_exactly(name, prec):
    """The rounding dither is a function of the element index and a counter kept
    in the state, so a resumed run equals an uninterrupted one without touching
    torch's global RNG."""
    model, loss_fn = mlp_problem()
    start = copy.deepcopy(model)
    hp = dict(contract_hp(name), state_precision=prec, min_quant_size=0, state_rounding="stochastic")
    straight = copy.deepcopy(start)
    train(straight, loss_fn, ok.create(name, straight.parameters(), **hp), 12)
    first = copy.deepcopy(start)
    opt1 = ok.create(name, first.parameters(), **hp)
    train(first, loss_fn, opt1, 6)
    saved = copy.deepcopy(opt1.state_dict())
    torch.manual_seed(1234)  # the global RNG plays no part
    resumed = copy.deepcopy(first)
    opt2 = ok.create(name, resumed.parameters(), **hp)
    opt2.load_state_dict(saved)
    train(resumed, loss_fn, opt2, 6)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
