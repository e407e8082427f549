"""Factored / reduced-state optimizers: Adafactor, CAME, SM3, Adam-mini, AdamWSN, SN-SM.

Each is checked against an independent reference over many steps with two param
groups with different hyperparameters and mixed shapes (0-d, 1-D, 2-D, 3-D):
``torch.optim.Adafactor`` (eager and compiled), the authors' packages
``came_pytorch`` and ``adam_mini``, ``pytorch_optimizer`` (SM3, AdamWSN), and
reference steps written here from the papers' equations in plain per-tensor torch
(Adafactor's paper options, Adam-mini's blocking of tensors with more than two dims).
"""
from __future__ import annotations

import math

import pytest
import torch

import optimkit as ok
from helpers import grad_stream, make_params, run_with_grads

SHAPES = [(5, 3), (7,), (2, 3, 4), (), (6, 6), (1,), (4, 1, 5)]


def _groups(params, second: dict):
    return [{"params": params[:3]}, {"params": params[3:], **second}]


def _compare(mine, ref):
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- Adafactor vs torch.optim.Adafactor

ADAFACTOR_CASES = [
    (dict(), dict(lr=0.05, weight_decay=0.1, d=2.0)),
    (dict(lr=0.5, beta2_decay=-0.5), dict(eps=(1e-12, 1e-2), weight_decay=0.01)),
    (dict(maximize=True, weight_decay=0.05), dict(lr=3e-3, beta2_decay=-0.9)),
]


def _adafactor_params():
    for case, name in zip(ADAFACTOR_CASES, ["defaults", "lr-decay-eps", "maximize"]):
        yield pytest.param(case, False, id=f"{name}-eager")
        # one compiled case in the quick run; the others are compile-heavy
        yield pytest.param(case, True, id=f"{name}-compiled",
                           marks=() if name == "defaults" else pytest.mark.slow)


@pytest.mark.parametrize("case,compiled", list(_adafactor_params()))
def test_adafactor_matches_torch(case, compiled):
    shared, second = case
    a, b = make_params(SHAPES), make_params(SHAPES)
    stream = grad_stream(a, 100)
    mine = ok.create("adafactor", _groups(a, second), compile=compiled, **shared)
    ref = torch.optim.Adafactor(_groups(b, second), **shared)
    run_with_grads(mine, a, stream)
    run_with_grads(ref, b, stream)
    _compare(a, b)


def test_adafactor_defaults_and_signature_match_torch():
    import inspect

    theirs = inspect.signature(torch.optim.Adafactor).parameters
    ours = ok.info("adafactor").defaults
    for key in ("lr", "beta2_decay", "eps", "d", "weight_decay"):
        assert ours[key] == theirs[key].default, key


# ---------------------------------------------------------------- Adafactor's paper options

def _ref_adafactor(groups, stream):
    """Adafactor from the paper's Algorithms 4/5 with transformers' relative_step,
    scale_parameter, clip threshold and beta1 (momentum of the scaled update), and
    torch's eps1 placement and decoupled lr * weight_decay."""
    state = {}
    for t, grads in enumerate(stream, start=1):
        k = 0
        for group in groups:
            lr, wd, d = group["lr"], group["weight_decay"], group["d"]
            eps1, eps2 = group["eps"]
            beta1 = group["beta1"]
            for p in group["params"]:
                g = grads[k]
                k += 1
                e1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
                w = t ** group["beta2_decay"]  # 1 - beta2_hat_t
                rho = min(lr, 1 / math.sqrt(t)) if group["relative_step"] else lr
                scale = max(eps2, (p.norm() / math.sqrt(p.numel())).item()) if group["scale_parameter"] else 1.0
                alpha = rho * scale
                st = state.setdefault(p, {})
                with torch.no_grad():
                    p.mul_(1 - lr * wd)
                    if p.dim() >= 2:
                        r = st.get("r", torch.zeros(p.shape[:-1] + (1,)))
                        c = st.get("c", torch.zeros(p.shape[:-2] + (1, p.shape[-1])))
                        r = (1 - w) * r + w * (g * g).mean(dim=-1, keepdim=True)
                        c = (1 - w) * c + w * (g * g).mean(dim=-2, keepdim=True)
                        st["r"], st["c"] = r, c
                        v = torch.matmul(r, c) / torch.clamp(r.mean(dim=-2, keepdim=True), min=e1)
                    else:
                        v = (1 - w) * st.get("v", torch.zeros_like(p)) + w * g * g
                        st["v"] = v
                    u = g / torch.clamp(torch.sqrt(v), min=e1)
                    u = u / max(1.0, (u.norm() / math.sqrt(u.numel())).item() / d)
                    if beta1 is not None:
                        m = beta1 * st.get("m", torch.zeros_like(p)) + (1 - beta1) * alpha * u
                        st["m"] = m
                        p.sub_(m)
                    else:
                        p.sub_(alpha * u)


FLAG_CASES = [
    (dict(relative_step=False, scale_parameter=False, beta1=0.9, lr=1e-2),
     dict(lr=3e-3, d=1.5, weight_decay=0.1)),
    (dict(beta1=0.8, lr=0.3), dict(scale_parameter=False, weight_decay=0.05, eps=(1e-20, 1e-3))),
    (dict(relative_step=False, lr=0.05, d=1.2), dict(beta1=0.5, beta2_decay=-0.6)),
]


@pytest.mark.parametrize("case", FLAG_CASES, ids=["absolute-step-momentum", "relative-momentum", "mixed"])
def test_adafactor_paper_options_match_reference(case):
    shared, second = case
    a, b = make_params(SHAPES), make_params(SHAPES)
    stream = grad_stream(a, 40)
    mine = ok.create("adafactor", _groups(a, second), **shared)
    run_with_grads(mine, a, stream)
    _ref_adafactor([{**g, "params": b[:3] if i == 0 else b[3:]} for i, g in enumerate(mine.param_groups)], stream)
    _compare(a, b)


@pytest.mark.slow
def test_adafactor_options_compile_like_eager():
    a, b = make_params(SHAPES), make_params(SHAPES)
    stream = grad_stream(a, 8)
    hp = dict(relative_step=False, lr=0.05, beta1=0.9, weight_decay=0.1, d=1.5)
    run_with_grads(ok.create("adafactor", _groups(a, dict(scale_parameter=False)), **hp), a, stream)
    run_with_grads(ok.create("adafactor", _groups(b, dict(scale_parameter=False)), compile=True, **hp), b, stream)
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- CAME vs the authors' came_pytorch

def test_came_matches_came_pytorch():
    came_pytorch = pytest.importorskip("came_pytorch")
    second = dict(lr=1e-3, betas=(0.8, 0.99, 0.999), clip_threshold=0.5, weight_decay=0.1)
    a, b = make_params(SHAPES), make_params(SHAPES)
    stream = grad_stream(a, 50)
    mine = ok.create("came", _groups(a, second), lr=2e-4, weight_decay=0.01)
    ref = came_pytorch.CAME(_groups(b, second), lr=2e-4, weight_decay=0.01)
    run_with_grads(mine, a, stream)
    run_with_grads(ref, b, stream)
    _compare(a, b)


# ---------------------------------------------------------------- SM3 vs pytorch_optimizer.SM3

@pytest.mark.parametrize("second", [dict(lr=0.05), dict(momentum=0.9, beta=0.5, lr=0.02)],
                         ids=["sm3-ii", "momentum-ema"])
def test_sm3_matches_pytorch_optimizer(second):
    po = pytest.importorskip("pytorch_optimizer")
    # with beta > 0 the reference overwrites a 0-d tensor's accumulator instead of taking the
    # running max it takes for every other rank; optimkit takes the max for all ranks
    shapes = SHAPES if "beta" not in second else [s for s in SHAPES if s != ()]
    a, b = make_params(shapes), make_params(shapes)
    stream = grad_stream(a, 50)
    mine = ok.create("sm3", _groups(a, second), momentum=0.5)
    ref = po.SM3(_groups(b, second), momentum=0.5, foreach=False)
    run_with_grads(mine, a, stream)
    run_with_grads(ref, b, stream)
    _compare(a, b)


# ---------------------------------------------------------------- AdamWSN vs pytorch_optimizer.AdamWSN

def test_adamw_sn_matches_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    shapes = SHAPES + [(16, 12)]
    first = dict(lr=1e-2, weight_decay=0.1)
    second = dict(lr=3e-3, betas=(0.8, 0.95), subset_size=4, eps=1e-6, weight_decay=0.0)
    a, b = make_params(shapes), make_params(shapes)
    stream = grad_stream(a, 50)
    mine = ok.create("adamw_sn", [{"params": a[:3], **first}, {"params": a[3:], **second}])
    # the reference turns subset-norm on per group: matrices and higher in sn=True groups
    ref_groups = []
    for params, hp in ((b[:3], first), (b[3:], second)):
        ref_groups.append({"params": [p for p in params if p.dim() >= 2], "sn": True, **hp})
        ref_groups.append({"params": [p for p in params if p.dim() < 2], "sn": False, **hp})
    ref = po.AdamWSN(ref_groups, foreach=False)
    run_with_grads(mine, a, stream)
    run_with_grads(ref, b, stream)
    _compare(a, b)


def test_adamw_sn_state_is_sqrt_sized():
    p = torch.nn.Parameter(torch.zeros(256, 512))
    opt = ok.create("adamw_sn", [p])
    p.grad = torch.ones_like(p)
    opt.step()
    v = opt.state[p]["exp_avg_sq"]
    k = p.numel() // v.shape[0]
    assert p.numel() % k == 0 and k <= math.isqrt(p.numel()) and v.numel() == p.numel() // k
    assert v.numel() < 2 * math.isqrt(p.numel())  # 256*512 = 131072 -> k = 256 (largest divisor <= 362)


# ---------------------------------------------------------------- SN + subspace momentum vs equations

def _ref_sn_sm(groups, stream):
    """Subset-norm + subspace momentum written from the paper's equations, per tensor in
    float64: an SVD basis of the smaller side of each matrix whose min side exceeds the
    rank, refreshed at step 1 and every multiple of ``interval`` (momentum restarts);
    plain EMA momentum elsewhere; subsets of k elements, k the largest divisor of numel
    not above sqrt(numel) (matrices and higher), one per element otherwise."""
    state = {}
    for t, grads in enumerate(stream, start=1):
        k_ = 0
        for group in groups:
            b1, b2 = group["betas"]
            r = group["rank"]
            for p in group["params"]:
                g = grads[k_].double()
                k_ += 1
                st = state.setdefault(p, {"m": None, "v": None, "basis": None})
                projected = p.dim() == 2 and min(p.shape) > r
                if projected:
                    right = p.shape[0] >= p.shape[1]
                    if t == 1 or t % group["interval"] == 0:
                        u, _, vh = torch.linalg.svd(g, full_matrices=False)
                        st["basis"] = vh[:r] if right else u[:, :r]
                        st["m"] = None
                    basis = st["basis"]
                    down = (g @ basis.T) if right else (basis.T @ g)
                    st["m"] = (1 - b1) * down if st["m"] is None else b1 * st["m"] + (1 - b1) * down
                    up_m = (st["m"] @ basis) if right else (basis @ st["m"])
                    up_r = (down @ basis) if right else (basis @ down)
                    num = up_m + g - up_r
                else:
                    st["m"] = (1 - b1) * g if st["m"] is None else b1 * st["m"] + (1 - b1) * g
                    num = st["m"]
                n = g.numel()
                k = max(i for i in range(1, max(1, math.isqrt(n)) + 1) if n % i == 0) if p.dim() >= 2 else 1
                sq = (g.reshape(-1, k) ** 2).sum(dim=1, keepdim=True)
                st["v"] = (1 - b2) * sq if st["v"] is None else b2 * st["v"] + (1 - b2) * sq
                den = st["v"].sqrt() + group["eps"]
                step = group["lr"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                upd = (num.reshape(-1, k) / den).reshape(p.shape)
                with torch.no_grad():
                    new = p.double() - step * upd
                    new = new * (1 - group["lr"] * group["weight_decay"])
                    p.copy_(new)


SN_SM_SHAPES = [(24, 10), (7,), (6, 20), (5, 3), (16, 12), (2, 3, 4)]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sn_sm_matches_equations(compiled):
    first = dict(lr=1e-2, weight_decay=0.1, rank=3, interval=7)
    second = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-8, rank=4, interval=5)
    a, b = make_params(SN_SM_SHAPES), make_params(SN_SM_SHAPES)
    stream = grad_stream(a, 30)
    groups = [{"params": a[:3], **first}, {"params": a[3:], **second}]
    mine = ok.create("sn_sm", groups, compile=compiled)
    run_with_grads(mine, a, stream)
    _ref_sn_sm([{**g, "params": b[:3] if i == 0 else b[3:]} for i, g in enumerate(mine.param_groups)], stream)
    _compare(a, b)


def test_sn_sm_state_is_subspace_sized():
    p = torch.nn.Parameter(torch.zeros(256, 64))
    q = torch.nn.Parameter(torch.zeros(32, 512))
    opt = ok.create("sn_sm", [p, q], rank=8, state_precision="q8", min_quant_size=0)
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.step()
    sp, sq = opt.state[p], opt.state[q]
    assert sp["sm_basis"].shape == (8, 64) and sp["sm_basis"].dtype == torch.float32  # never quantized
    assert sq["sm_basis"].shape == (32, 8)
    assert sp["_layout"]["exp_avg"][2] == (256, 8) and sq["_layout"]["exp_avg"][2] == (8, 512)
    basis = sp["sm_basis"]
    torch.testing.assert_close(basis @ basis.T, torch.eye(8), atol=1e-5, rtol=0)
    # fp32: momentum k (m + n) + subset norm, versus m n for a full momentum
    opt = ok.create("sn_sm", [p], rank=8)
    p.grad = torch.randn_like(p)
    opt.step()
    assert _state_numel(opt) == 8 * (256 + 64) + opt.state[p]["exp_avg_sq"].numel()


# ---------------------------------------------------------------- Adam-mini vs the authors' adam_mini

def _adam_mini_names(params):
    # matrices -> the authors' neuron-wise blocks ("mlp"), vectors -> their one-block "other" rule
    return [(f"mlp.{i}.weight" if p.dim() == 2 else f"gain{i}", p) for i, p in enumerate(params)]


def test_adam_mini_matches_authors_package():
    adam_mini = pytest.importorskip("adam_mini")
    shapes = [(5, 3), (7,), (6, 6), (1,), (8, 4), (3,)]
    first = dict(lr=1e-2, weight_decay=0.1)
    second = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0)
    a, b = make_params(shapes), make_params(shapes)
    stream = grad_stream(a, 50)
    mine = ok.create("adam_mini", [{"params": a[:3], **first}, {"params": a[3:], **second}])
    ref = adam_mini.Adam_mini(_adam_mini_names(b), verbose=False, **first)
    for group in ref.param_groups:  # the authors' class keeps one group per tensor
        idx = next(i for i, q in enumerate(b) if q is group["params"][0])
        if idx >= 3:
            group.update(lr=second["lr"], beta1=second["betas"][0], beta2=second["betas"][1],
                         eps=second["eps"], weight_decay=second["weight_decay"])
    run_with_grads(mine, a, stream)
    run_with_grads(ref, b, stream)
    _compare(a, b)


def test_adam_mini_heads_and_biases_match_authors_package():
    """Per-head blocks for query/key (grouped-query keys: 2 of 4 heads), plain Adam
    for biases, the authors' weight_decay=0 for biases and norms, as param groups."""
    adam_mini = pytest.importorskip("adam_mini")
    dim, heads, kv_heads = 8, 4, 2
    named = [("attn.q_proj.weight", (dim, dim)), ("attn.k_proj.weight", (dim * kv_heads // heads, dim)),
             ("mlp.0.weight", (6, dim)), ("mlp.0.bias", (6,)), ("ln.weight", (dim,))]
    shapes = [s for _, s in named]
    a, b = make_params(shapes), make_params(shapes)
    stream = grad_stream(a, 40)
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    mine = ok.create("adam_mini", [{"params": [a[0]], "blocks": heads}, {"params": [a[1]], "blocks": kv_heads},
                                   {"params": [a[2]]},
                                   {"params": [a[3]], "blocks": "elements", "weight_decay": 0.0},
                                   {"params": [a[4]], "weight_decay": 0.0}], **hp)
    ref = adam_mini.Adam_mini([(n, p) for (n, _), p in zip(named, b)], dim=dim, n_heads=heads,
                              n_kv_heads=kv_heads, verbose=False, **hp)
    run_with_grads(mine, a, stream)
    run_with_grads(ref, b, stream)
    _compare(a, b)
    assert [mine.state[p]["vmean"].numel() for p in a] == [heads, kv_heads, 6, 6, 1]


def _ref_adam_mini(groups, stream):
    """Adam-mini (paper Algorithm 1) with one block per leading index (3-D+: trailing dims
    flattened) and one block per vector/scalar."""
    state = {}
    for t, grads in enumerate(stream, start=1):
        k = 0
        for group in groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                g = grads[k]
                k += 1
                st = state.setdefault(p, {"m": torch.zeros_like(p), "v": None})
                rows = p.shape[0] if p.dim() >= 2 else 1
                block_mean = (g.reshape(rows, -1) ** 2).mean(dim=1)
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = (1 - b2) * block_mean if st["v"] is None else b2 * st["v"] + (1 - b2) * block_mean
                mhat = st["m"] / (1 - b1 ** t)
                vhat = st["v"] / (1 - b2 ** t)
                denom = vhat.sqrt() + group["eps"]  # one number per block
                denom = denom.reshape([rows] + [1] * (p.dim() - 1)) if p.dim() >= 2 else denom.reshape(())
                with torch.no_grad():
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.sub_(group["lr"] * mhat / denom)


def test_adam_mini_blocking_matches_equations():
    shapes = SHAPES + [(3, 2, 2, 2)]
    second = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0)
    a, b = make_params(shapes), make_params(shapes)
    stream = grad_stream(a, 40)
    mine = ok.create("adam_mini", _groups(a, second), lr=1e-2, weight_decay=0.1)
    run_with_grads(mine, a, stream)
    _ref_adam_mini([{**g, "params": b[:3] if i == 0 else b[3:]} for i, g in enumerate(mine.param_groups)], stream)
    _compare(a, b)


# ---------------------------------------------------------------- sublinear state

def _state_numel(opt) -> int:
    return sum(v.numel() for s in opt.state.values() for k, v in s.items()
               if isinstance(v, torch.Tensor) and k != "step")


@pytest.mark.parametrize("name", ["adafactor", "sm3"])
def test_state_is_rows_plus_cols(name):
    p = torch.nn.Parameter(torch.randn(256, 512))
    opt = ok.create(name, [p])
    p.grad = torch.randn(256, 512)
    opt.step()
    assert _state_numel(opt) == 256 + 512
    q = torch.nn.Parameter(torch.randn(2, 3, 4))  # higher rank: adafactor 2*(3+4), sm3 2+3+4
    opt = ok.create(name, [q])
    q.grad = torch.randn(2, 3, 4)
    opt.step()
    assert _state_numel(opt) == (2 * (3 + 4) if name == "adafactor" else 2 + 3 + 4)


def test_came_and_adam_mini_state_sizes():
    p = torch.nn.Parameter(torch.randn(256, 512))
    for name, expected in [("came", p.numel() + 2 * (256 + 512)), ("adam_mini", p.numel() + 256)]:
        opt = ok.create(name, [p])
        p.grad = torch.randn(256, 512)
        opt.step()
        assert _state_numel(opt) == expected, name


# ---------------------------------------------------------------- metadata and validation

@pytest.mark.parametrize("name", ["adafactor", "came", "sm3", "adam_mini", "adamw_sn", "sn_sm"])
def test_family_is_memory(name):
    assert ok.info(name).family == "memory"


@pytest.mark.parametrize("name,key,value,exc", [
    ("adafactor", "beta2_decay", 0.5, ValueError),
    ("adafactor", "d", 0.5, ValueError),
    ("adafactor", "eps", (None, -1.0), ValueError),
    ("adafactor", "eps", (-1.0, 1e-3), ValueError),
    ("adafactor", "eps", 1e-3, TypeError),
    ("adafactor", "beta1", 1.0, ValueError),
    ("adafactor", "relative_step", "yes", TypeError),
    ("came", "betas", (0.9, 0.999), ValueError),
    ("came", "eps", (1e-30, -1.0), ValueError),
    ("came", "clip_threshold", 0.0, ValueError),
    ("sm3", "beta", 1.5, ValueError),
    ("sm3", "momentum", 1.0, ValueError),
    ("adamw_sn", "subset_size", 0, ValueError),
    ("adamw_sn", "subset_size", 2.5, TypeError),
    ("sn_sm", "rank", 0, ValueError),
    ("adam_mini", "blocks", "heads", ValueError),
    ("adam_mini", "blocks", 0, ValueError),
    ("adam_mini", "blocks", 3, ValueError),      # a (7,) parameter does not split into 3 heads
    ("adam_mini", "blocks", 2.0, TypeError),
    ("sn_sm", "interval", 1.5, TypeError),
])
def test_invalid_hyperparameters(name, key, value, exc):
    with pytest.raises(exc, match=key):
        ok.create(name, make_params(), **{key: value})
