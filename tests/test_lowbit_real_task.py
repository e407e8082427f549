"""Low-bit AdamW state on a real task with rarely lit inputs: scikit-learn's digits.

Several of the 64 pixels are zero in all but one or two training images (the
corners of the 8x8 frame), so the first-layer weights behind them get a tiny
gradient when such an image is in the batch and exact zeros otherwise. Their
second moment ``v`` is then many decades below its block's absmax. Rounded to
nearest, it used to land on the code of zero (q8's unsigned map, FP8's zero)
while the first moment kept a non-zero code, and the next step was
``m / eps``: weights ended up ~100 away from an fp32 run. The codecs now keep
the zero code for exact zeros (``codecs._keep_positive``).

Teacher forcing: one fp32 AdamW run computes the gradients; every low-bit
optimizer steps its own copy of the parameters with those same gradients, so
their first-layer weights can be compared with the fp32 run's element by
element. Measured on the 3 batch orders of the tests (max over them of max
|w1 - w1_fp32|, mean of the means), before -> after the fix:

* q8:  97.6 / 0.45 -> 0.221 / 0.0064 (stochastic rounding: 39 / 0.20 -> 0.116 / 0.0034)
* fp8: 216 / 2.9 -> 0.125 / 0.0075
* q4:  0.254 / 0.036, unchanged: its unsigned map has no zero; what remains is
  the 4-bit linear v map's resolution (torchao's AdamW4bit is the same)
* bitsandbytes AdamW8bit: 0.240 / 0.0067

Per batch order, q8's largest deviation is below bitsandbytes' on seed 0 only
(0.221 vs 0.240; seeds 1 and 2: 0.207 vs 0.181, 0.179 vs 0.147), always on a
weight of a pixel lit in one training image: its v sits on the lowest codes,
where one hit adds less than half a code step, so round-to-nearest drops it
and v stays below its fp32 value. bitsandbytes' CPU quantizer happens to
decode every v below ~3e-5 absmax (zeros included) as 1.6e-5 absmax, which
errs the safe way there. Stochastic rounding removes the stall (0.116).
"""
from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import optimkit as ok
from optimkit.kernels import q8_adamw

from helpers import digits_split

SEEDS = (0, 1, 2)
STEPS, BATCH = 300, 128
HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
#: the 128x64 first-layer weight (8192 elements) is quantized, the other tensors keep
#: fp32 state, in both libraries (bitsandbytes: min_8bit_size)
MIN_QUANT = 4096
#: without bitsandbytes: its deviation measured here (max 0.24, mean 0.0066) plus ~20%
BNB_FALLBACK = (0.3, 0.008)


digits = digits_split  # the shared split of tests/helpers.py


def initial_params(seed: int) -> list[torch.Tensor]:
    """A 64-128-10 ReLU MLP's initial (w1, b1, w2, b2)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return [p.detach().clone() for p in net.parameters()]


def forward(params, x):
    w1, b1, w2, b2 = params
    return F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2)


def heldout_loss(params) -> float:
    _, _, xva, yva = digits()
    with torch.no_grad():
        return F.cross_entropy(forward(params, xva), yva).item()


def batches(seed: int):
    xtr, ytr, _, _ = digits()
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(STEPS):
        idx = torch.randint(0, len(xtr), (BATCH,), generator=gen)
        yield xtr[idx], ytr[idx]


def _bnb():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
        return bitsandbytes
    except Exception:  # not installed, or no usable backend
        return None


# kind -> (state_precision, state_rounding, fast path allowed)
KINDS = {"q8": ("q8", "nearest", True), "q8-tensor-ops": ("q8", "nearest", False),
         "q4": ("q4", "nearest", True), "fp8": ("fp8", "nearest", True),
         "q8-stochastic": ("q8", "stochastic", True), "q4-stochastic": ("q4", "stochastic", True)}


def make(kind: str, params):
    if kind == "bnb":
        return _bnb().optim.AdamW8bit(params, min_8bit_size=MIN_QUANT, **HP)
    if kind == "fp32":
        return ok.AdamW(params, **HP)
    prec, rounding, _ = KINDS[kind]
    return ok.AdamW(params, state_precision=prec, state_rounding=rounding, min_quant_size=MIN_QUANT, **HP)


def _step(kind: str, opt) -> None:
    if kind in KINDS and not KINDS[kind][2]:
        with q8_adamw.disabled():
            opt.step()
    else:
        opt.step()


@functools.lru_cache(maxsize=None)
def teacher_forced(seed: int) -> dict[str, tuple[float, float, float]]:
    """kind -> (max, mean |w1 - w1_fp32|, held-out loss / fp32's - 1) after STEPS steps
    on the fp32 run's gradients."""
    kinds = list(KINDS) + (["bnb"] if _bnb() is not None else [])
    ref = [p.clone().requires_grad_() for p in initial_params(seed)]
    copies = {k: [p.detach().clone().requires_grad_() for p in ref] for k in kinds}
    opt_ref = make("fp32", ref)
    opts = {k: make(k, copies[k]) for k in kinds}
    for xb, yb in batches(seed):
        grads = torch.autograd.grad(F.cross_entropy(forward(ref, xb), yb), ref)
        for k in kinds:
            for p, g in zip(copies[k], grads):
                p.grad = g.clone()
            _step(k, opts[k])
        for p, g in zip(ref, grads):
            p.grad = g
        opt_ref.step()
    base = heldout_loss(ref)
    out = {}
    for k in kinds:
        d = (copies[k][0] - ref[0]).detach().abs()
        out[k] = (float(d.max()), float(d.mean()), heldout_loss(copies[k]) / base - 1)
    return out


def over_seeds(kind: str) -> tuple[float, float]:
    """(max over the seeds of the max deviation, mean over the seeds of the mean deviation)."""
    rows = [teacher_forced(s)[kind] for s in SEEDS]
    return max(r[0] for r in rows), sum(r[1] for r in rows) / len(rows)


def bnb_deviation() -> tuple[float, float]:
    return over_seeds("bnb") if _bnb() is not None else BNB_FALLBACK


def test_task_has_rarely_lit_pixels():
    """The premise: some pixels are lit in at most two training images, and their
    first-layer weights get exact-zero gradients in most steps."""
    xtr = digits()[0]
    lit = (xtr > 0).sum(0)
    assert int(((lit >= 1) & (lit <= 2)).sum()) >= 2


@pytest.mark.parametrize("kind", ["q8", "q8-tensor-ops", "q8-stochastic"])
def test_q8_teacher_forced_deviation_at_most_bitsandbytes(kind):
    """q8 AdamW (the C fast path, the tensor-op path, stochastic rounding) on the fp32
    run's gradients: first-layer weights no farther from fp32 than bitsandbytes'
    AdamW8bit on the same gradients, the largest element over the batch orders and
    the mean deviation in every batch order (measured: 0.221 vs 0.240, means 4-5%
    below; stochastic 0.116 and half bitsandbytes' mean). Before the zero code was
    reserved for exact zeros: max 98 (stochastic 39), mean 0.45."""
    bnb_max, bnb_mean = bnb_deviation()
    dmax, dmean = over_seeds(kind)
    assert dmax <= bnb_max, (dmax, bnb_max)
    assert dmean <= bnb_mean, (dmean, bnb_mean)
    if _bnb() is not None:
        for s in SEEDS:
            assert teacher_forced(s)[kind][1] <= teacher_forced(s)["bnb"][1], s


def test_fp8_teacher_forced_deviation():
    """fp8 AdamW on the same gradients: the largest deviation below bitsandbytes' in
    every batch order (measured 0.11-0.125 vs 0.15-0.24; before the fix 178-216).
    The mean is 11% above bitsandbytes' (0.0075 vs 0.0067), from the commonly lit
    pixels' weights: E4M3 keeps 3 mantissa bits, so their second moments are
    coarser than on q8's map (fp8 v with fp32 m gives the same mean, fp8 m with
    fp32 v about a fifth of it); the budget is 1.25x."""
    bnb_max, bnb_mean = bnb_deviation()
    for s in SEEDS:
        row = teacher_forced(s)
        assert row["fp8"][0] <= (row["bnb"][0] if "bnb" in row else bnb_max), s
    dmax, dmean = over_seeds("fp8")
    assert dmean <= 1.25 * bnb_mean, (dmean, bnb_mean)


@pytest.mark.parametrize("kind", ["q4", "q4-stochastic"])
def test_q4_teacher_forced_deviation(kind):
    """q4 AdamW on the same gradients. Its unsigned (v) map is the zero-free linear
    {1/16, ..., 1}, so no weight blows up (before and after the fix alike); what
    remains is that map's resolution, which holds every v below absmax/32 at
    absmax/16: max 1.06x bitsandbytes' (0.254 vs 0.240), mean 5.3x (0.036 vs
    0.0067), held-out loss +18% (torchao's AdamW4bit is identical); stochastic
    rounding 0.235 and 4.2x. Budgets: 1.5x and 7x. (v is most of it: q4 v with
    fp32 m gives a mean of 0.030.)"""
    bnb_max, bnb_mean = bnb_deviation()
    dmax, dmean = over_seeds(kind)
    assert dmax <= 1.5 * bnb_max, (dmax, bnb_max)
    assert dmean <= 7 * bnb_mean, (dmean, bnb_mean)


def test_fast_path_and_tensor_ops_agree_on_the_task():
    """The C kernel and the tensor-op path implement the same codes (the zero code
    kept for exact zeros included): their parameters stay close over the run."""
    for s in SEEDS[:2]:
        fast, ref = teacher_forced(s)["q8"], teacher_forced(s)["q8-tensor-ops"]
        assert math.isclose(fast[1], ref[1], rel_tol=0.05), (fast, ref)
        assert math.isclose(fast[0], ref[0], rel_tol=0.1), (fast, ref)


def _free_run(prec: str, seed: int) -> tuple[float, float]:
    """(held-out loss, max |w1|) after STEPS steps on the run's own gradients."""
    params = [p.clone().requires_grad_() for p in initial_params(seed)]
    opt = (ok.AdamW(params, **HP) if prec == "fp32"
           else ok.AdamW(params, state_precision=prec, min_quant_size=MIN_QUANT, **HP))
    for xb, yb in batches(seed):
        opt.zero_grad()
        F.cross_entropy(forward(params, xb), yb).backward()
        opt.step()
    return heldout_loss(params), float(params[0].detach().abs().max())


@pytest.mark.parametrize("prec", ["q8", "fp8"])
def test_untouched_training_tracks_fp32(prec):
    """Untouched runs (each optimizer on its own gradients): the held-out loss,
    averaged over the batch orders, at most 2% above fp32's (measured q8 -0.8%,
    fp8 -3.4%), and no first-layer weight beyond 1.5x fp32's largest (measured
    1.08-1.20x). Before the fix the loss passed this bar (q8 0.0%, fp8 -1.6%: the
    wrecked weights sit behind pixels that are dark in nearly every held-out image
    too) but the weights behind the rarely lit pixels reached 40-66, against 0.35
    for fp32."""
    rel, grown = [], []
    for s in SEEDS:
        (loss, wmax), (base, base_wmax) = _free_run(prec, s), _free_run("fp32", s)
        rel.append(loss / base - 1)
        grown.append(wmax / base_wmax)
    assert sum(rel) / len(rel) <= 0.02, rel
    assert max(grown) <= 1.5, grown
