"""Property-based fuzzing of every registered optimizer (hypothesis).

Each example draws hyperparameters (defaults, moderate rescalings, and values
outside their domain: negative, zero, NaN, infinity, wrong types), parameter
shapes (0-d, empty, non-contiguous, channels_last, large enough to quantize),
dtypes (float32/64, bfloat16, float16, complex64), memory settings and
gradients with exact zeros and missing gradients. The optimizer must either
refuse at construction with a ``ValueError``/``TypeError`` that names the bad
argument, or refuse at its first step with one of those errors and nothing
changed, or take finite steps. Never another exception, a hang or a silent
non-finite value.

The example budget is small for CI (``OPTIMKIT_FUZZ_EXAMPLES``, default 8 per
optimizer, derandomized so that CI runs are reproducible); raise it locally to
search harder, e.g. ``OPTIMKIT_FUZZ_EXAMPLES=300 OPTIMKIT_FUZZ_RANDOM=1``.
"""
from __future__ import annotations

import faulthandler
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optimkit as ok
from optimizer_cases import contract_hp

EXAMPLES = int(os.environ.get("OPTIMKIT_FUZZ_EXAMPLES", "8"))
RANDOM = bool(os.environ.get("OPTIMKIT_FUZZ_RANDOM"))
STEPS = 3
#: a step that does not end within this many seconds is a hang: dump every thread and fail the run
HANG_SECONDS = 120

NAMES = ok.available()
#: group entries that are modes switched by methods, not hyperparameters (schedule-free's
#: ``train_mode``: ``opt.train()`` / ``opt.eval()``)
MODE_KEYS = ("train_mode",)

SHAPES = [(), (0,), (0, 3), (1,), (5,), (3, 4), (4, 3, 2), (2, 3, 4, 4), (40, 48)]
LAYOUTS = ["contiguous", "transposed", "channels_last", "strided"]
DTYPES = [torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]
PRECISIONS = ["fp32", "bf16", "q8", "q4", "fp8"]

#: values outside every numeric hyperparameter's domain (or of the wrong type)
BAD_NUMBERS = [-1.0, -1e-3, math.nan, math.inf, -math.inf, "0.1", [0.1], True]


def _numeric_value(default):
    """A strategy for a float hyperparameter whose default is ``default``."""
    good = st.sampled_from([default]) if default == 0 else st.sampled_from(
        [default, default * 0.1, default * 0.5, default * 2.0, default * 10.0])
    edge = st.sampled_from([0.0, 1.0, 1e-12])
    return st.one_of(good, good, edge, st.sampled_from(BAD_NUMBERS))


def _int_value(default):
    return st.one_of(st.sampled_from([default, max(default, 1) * 2, 1]),
                     st.sampled_from([0, -1, 2.5, "3", None]))


def _tuple_value(default):
    floats = [x for x in default if isinstance(x, float)]
    if len(floats) != len(default):  # e.g. Adafactor's eps (None, 1e-3): rescale the floats only
        return st.sampled_from([default, tuple(x if x is None else x * 10 for x in default),
                                tuple(x if x is None else -x for x in default), (1e-3,)])
    entry = st.sampled_from([0.0, 0.5, 0.9, 0.99, 0.999, 1.0, 1.5, -0.1, math.nan])
    return st.one_of(st.just(default),
                     st.tuples(*[st.one_of(st.just(x), entry) for x in default]),
                     st.sampled_from([default[:-1] or (0.5, 0.5, 0.5), (0.9,) * (len(default) + 1), 0.9, "0.9"]))


def hyperparameter_strategy(default):
    """What to try for one hyperparameter, by the type of its default."""
    if isinstance(default, bool):
        return st.sampled_from([default, not default, 1, "yes", None])
    if isinstance(default, int):
        return _int_value(default)
    if isinstance(default, float):
        if math.isinf(default):
            return st.sampled_from([default, 1.0, 1.02, 0.0, -1.0, math.nan])
        return _numeric_value(default)
    if isinstance(default, tuple):
        return _tuple_value(default)
    if isinstance(default, str):
        return st.sampled_from([default, default.upper(), "no-such-option", 3])
    if default is None:
        return st.sampled_from([None, None, 0.5, 10, 1e-3, -1.0, math.nan, "x"])
    return st.just(default)


def _make_param(shape, layout, dtype, gen):
    """A leaf parameter of ``shape`` stored with ``layout``."""
    real = torch.float32 if dtype == torch.complex64 else dtype
    if layout == "transposed" and len(shape) >= 2:
        base = torch.randn(tuple(reversed(shape)), generator=gen).to(real)
        data = base.permute(*reversed(range(len(shape))))
    elif layout == "channels_last" and len(shape) == 4:
        data = torch.randn(shape, generator=gen).to(real).contiguous(memory_format=torch.channels_last)
    elif layout == "strided" and len(shape) >= 1 and shape[-1] > 0:
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(real)
        data = base[..., ::2]
    else:
        data = torch.randn(shape, generator=gen).to(real)
    if dtype == torch.complex64:
        imag = torch.randn(data.shape, generator=gen)
        data = torch.complex(data.float(), imag)
    return torch.nn.Parameter(data)


@st.composite
def problems(draw, name):
    """(hyperparameters, perturbed names, options, params spec, seed) for ``name``."""
    cls = ok.info(name).cls
    hp = contract_hp(name)
    keys = sorted(k for k in cls.defaults if k not in MODE_KEYS)
    perturbed = draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)) if keys else []
    for key in perturbed:
        hp[key] = draw(hyperparameter_strategy(cls.defaults[key]))
    options = {}
    if draw(st.booleans()):
        options["state_precision"] = draw(st.sampled_from(PRECISIONS))
        options["min_quant_size"] = draw(st.sampled_from([0, 16, 4096]))
    if draw(st.integers(0, 4)) == 0:
        options["maximize"] = True
    if cls.has_momentum and draw(st.integers(0, 3)) == 0:
        options["cautious"] = draw(st.sampled_from([True, "timm"]))
    if draw(st.integers(0, 5)) == 0:
        options["state_placement"] = "cpu"
    if draw(st.integers(0, 4)) == 0:
        options["nonfinite"] = draw(st.sampled_from(["skip", "raise"]))
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 3))
    spec = [(draw(st.sampled_from(SHAPES)), draw(st.sampled_from(LAYOUTS))) for _ in range(n)]
    zeros = draw(st.sampled_from(["none", "some", "all"]))
    missing = draw(st.booleans()) and n > 1
    seed = draw(st.integers(0, 2 ** 16))
    return hp, perturbed, options, dtype, spec, zeros, missing, seed


def _loss_fn(params, targets, weights):
    total = 0.0
    for p, t, w in zip(params, targets, weights):
        d = p - t
        sq = (d.conj() * d).real if d.is_complex() else d * d
        total = total + 0.5 * (w * sq.float()).sum()  # curvature <= 1: moderate step sizes stay stable
    return total


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(torch.view_as_real(t) if t.is_complex() else t).all())


def check_one(name, hp, perturbed, options, dtype, spec, zeros, missing, seed):
    cls = ok.info(name).cls
    gen = torch.Generator().manual_seed(seed)
    params = [_make_param(shape, layout, dtype, gen) for shape, layout in spec]
    targets = [torch.randn(p.shape, generator=gen).to(p.dtype) if not p.is_complex()
               else torch.randn(p.shape, generator=gen, dtype=torch.complex64) for p in params]
    weights = []
    for p in params:
        w = torch.rand(p.shape, generator=gen)
        if zeros == "some":
            w = w * (torch.rand(p.shape, generator=gen) < 0.5)
        elif zeros == "all":
            w = torch.zeros(p.shape)
        weights.append(w)
    stepped = params[1:] if missing else params  # the first one never gets a gradient
    try:
        opt = cls(params, **hp, **options)
    except (ValueError, TypeError) as err:
        if perturbed and not any(k in str(err) for k in perturbed) and not _names_an_option(err, options):
            raise AssertionError(f"{name}: the error does not name the argument "
                                 f"(perturbed {perturbed}): {err}") from err
        return "refused"
    before = [p.detach().clone() for p in params]

    def closure():
        opt.zero_grad()
        loss = _loss_fn(stepped, targets[len(params) - len(stepped):], weights[len(params) - len(stepped):])
        if not cls.gradient_free and isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward(create_graph=cls.requires_create_graph)
        return loss

    for step in range(STEPS):
        try:
            loss = opt.step(closure)
        except (ValueError, TypeError) as err:
            if step == 0:  # refused at the first step: nothing may have changed
                for p, b in zip(params, before):
                    assert torch.equal(p.detach(), b), f"{name}: refused ({err}) after changing a parameter"
                return f"refused at step: {type(err).__name__}: {err}"
            raise
        except RuntimeError as err:
            if options.get("nonfinite") == "raise" and "non-finite" in str(err):
                return "raised non-finite"
            raise
        for i, p in enumerate(params):
            assert _finite(p.detach()), (f"{name}: parameter {i} (shape {tuple(p.shape)}, {p.dtype}) is not "
                                         f"finite after step {step + 1}; hp={hp} options={options}")
        if missing and not cls.gradient_free:  # zeroth-order rules perturb every parameter
            assert torch.equal(params[0].detach(), before[0]), f"{name}: a parameter without gradient moved"
        if isinstance(loss, torch.Tensor):
            assert bool(torch.isfinite(loss)), f"{name}: loss {loss} not finite"
    return "stepped"


def _names_an_option(err, options) -> bool:
    text = str(err)
    return any(k in text for k in options) or "param" in text or "dtype" in text or "complex" in text


def _settings():
    return settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.mark.parametrize("name", NAMES)
def test_fuzz(name):
    @_settings()
    @given(problems(name))
    def run(problem):
        faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
        try:
            check_one(name, *problem)
        finally:
            faulthandler.cancel_dump_traceback_later()

    torch.manual_seed(0)
    run()
