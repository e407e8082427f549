"""GaLore, APOLLO / APOLLO-Mini and FRUGAL projections (``projection=``).

References: ``galore_torch.GaLoreAdamW`` (pip ``galore-torch``) and
``apollo_torch.APOLLOAdamW`` (pip ``apollo-torch``), plus steps written here
from the papers' equations and the authors' code in plain per-tensor torch.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch

import optimkit as ok
from optimkit.projection import APOLLO, FRUGAL, APOLLOMini, GaLore, Projection
from helpers import grad_stream, make_params, mlp_problem, run_with_grads, train

SHAPES = [(12, 5), (4, 10), (7,)]  # m > n, m < n, a 1-D parameter that stays in full space
STEPS = 22


def _params(seed=0):
    return make_params(SHAPES, seed=seed)


def _stream(steps=STEPS, seed=1):
    return grad_stream(_params(), steps, seed=seed)


def _two_groups(params, lr2):
    """The two matrices, then the 1-D parameter with its own learning rate."""
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr2}]


# ---------------------------------------------------------------- reference packages
def _reference(package: str, module: str):
    """``package.module`` of a reference package.

    galore-torch and apollo-torch import transformers and bitsandbytes in their
    ``__init__`` for classes these tests do not use; when that import fails, the
    needed module is loaded from the installed package's own files with
    transformers' version check replaced by a no-op."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed")
    try:
        return importlib.import_module(f"{package}.{module}")
    except Exception:
        pass
    alias = f"_optimkit_reference_{package}"
    if f"{alias}.{module}" in sys.modules:
        return sys.modules[f"{alias}.{module}"]
    pkg = types.ModuleType(alias)
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules[alias] = pkg
    stubs = {}
    if importlib.util.find_spec("transformers") is None:
        for name in ("transformers", "transformers.utils", "transformers.utils.versions"):
            stubs[name] = types.ModuleType(name)
        stubs["transformers.utils.versions"].require_version = lambda *args, **kwargs: None
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        return importlib.import_module(f"{alias}.{module}")
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


# ---------------------------------------------------------------- hand-written pieces
class RefAdam:
    """torch.optim.AdamW's moment update and direction for one tensor (no decay)."""

    def __init__(self, shape, betas=(0.9, 0.999), eps=1e-8):
        self.m, self.v, self.t = torch.zeros(shape), torch.zeros(shape), 0
        self.b1, self.b2 = betas
        self.eps = eps

    def __call__(self, g):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        return (self.m / bc1) / (self.v.sqrt() / math.sqrt(bc2) + self.eps)


class RefSGDM:
    """torch.optim.SGD's heavy-ball buffer for one tensor."""

    def __init__(self, shape, momentum=0.9):
        self.b, self.mu = None, momentum

    def __call__(self, g):
        self.b = g.clone() if self.b is None else self.mu * self.b + g
        return self.b


def ref_next_seed(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen).tolist()[-1]


def ref_gaussian(shape, seed, rank):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / math.sqrt(rank)


def run_reference(params, stream, lrs, wd, direction):
    """theta <- theta (1 - lr wd) - lr * direction(i, g, t) for each tensor i."""
    ps = [p.detach().clone() for p in params]
    for t, grads in enumerate(stream, start=1):
        for i, g in enumerate(grads):
            ps[i] = ps[i] * (1 - lrs[i] * wd) - lrs[i] * direction(i, g, t)
    return ps


# ---------------------------------------------------------------- (a) GaLore
def test_galore_adamw_matches_handwritten_reference():
    """Adam of torch's form on R = G Q^T (m >= n) or P^T G (m < n), SVD refreshed at
    steps 1, 6, 11, ...; update scale * (U Q or P U); decay on the full matrix;
    the 1-D parameter runs full-space Adam. Two groups, 22 steps."""
    rank, interval, scale, lr, lr2, wd = 3, 5, 0.25, 1e-2, 3e-3, 0.1
    params, stream = _params(), _stream()
    opt = ok.AdamW(_two_groups(params, lr2), lr=lr, weight_decay=wd,
                   projection=GaLore(rank=rank, interval=interval, scale=scale))
    run_with_grads(opt, params, stream)

    adams = [RefAdam((12, rank)), RefAdam((rank, 10)), RefAdam((7,))]
    basis = [None, None]

    def direction(i, g, t):
        if i == 2:
            return adams[2](g)
        if (t - 1) % interval == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            basis[i] = vh[:rank] if i == 0 else u[:, :rank]
        b = basis[i]
        if i == 0:
            return scale * (adams[0](g @ b.T) @ b)
        return scale * (b @ adams[1](b.T @ g))

    expected = run_reference(_params(), stream, [lr, lr, lr2], wd, direction)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e)
    assert opt.state[params[0]]["exp_avg"].shape == (12, rank)
    assert opt.state[params[1]]["exp_avg"].shape == (rank, 10)
    assert opt.state[params[2]]["exp_avg"].shape == (7,)
    assert not any(k.startswith("proj:") for k in opt.state[params[2]])


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_galore_adamw_matches_galore_torch(proj_type, monkeypatch):
    """galore_torch.GaLoreAdamW over 22 steps with refreshes every 5 steps.

    The reference's Adam computes ``m / (sqrt(v) + eps) * sqrt(bc2) / bc1`` (eps
    outside the bias correction) and decays after the update; with eps = 1e-12
    (< 1e-9 of sqrt(v) here) the eps placement changes each update by < 1e-9
    relative and with weight_decay = 0 the order of decay is moot, so the
    comparison holds to float32 rounding (default assert_close tolerances).

    ``full`` projects a refresh step's gradient onto its own singular vectors:
    ``R = U_k^T G V_k`` is ``diag(s)`` plus off-diagonal rounding noise (~1e-7),
    which Adam's first step turns into +-1. The noise depends on the memory layout
    of the bases (the reference keeps strided views of the SVD's factors, optimkit
    contiguous copies) and on the CPU's BLAS kernels, so the reference is given
    contiguous bases too: both then round alike and the comparison checks the rest."""
    module = _reference("galore_torch", "adamw")
    ref_adamw = module.AdamW
    if proj_type == "full":
        original = module.GaLoreProjector.get_orthogonal_matrix

        def contiguous_bases(self, weights, rank, type):
            out = original(self, weights, rank, type)
            return [b.contiguous() for b in out] if isinstance(out, list) else out.contiguous()

        monkeypatch.setattr(module.GaLoreProjector, "get_orthogonal_matrix", contiguous_bases)
    rank, interval, scale, lr, lr2 = 3, 5, 0.25, 1e-2, 3e-3
    stream = _stream()
    ours, theirs = _params(), _params()
    opt = ok.AdamW(_two_groups(ours, lr2), lr=lr, eps=1e-12, weight_decay=0.0,
                   projection=GaLore(rank=rank, interval=interval, scale=scale, proj_type=proj_type))
    ref = ref_adamw([{"params": theirs[:2], "rank": rank, "update_proj_gap": interval, "scale": scale,
                      "proj_type": proj_type},
                     {"params": theirs[2:], "lr": lr2}], lr=lr, eps=1e-12, weight_decay=0.0,
                    no_deprecation_warning=True)
    run_with_grads(opt, ours, stream)
    run_with_grads(ref, theirs, stream)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach())


# ---------------------------------------------------------------- (b) APOLLO
def _apollo_reference_direction(rank, interval, scale, mode, scale_front, limiter, rule, shapes, seeds,
                                engaged):
    """APOLLO from the paper's equations: Gaussian N(0, 1/r) projection from a
    seeded generator (seed advances at each refresh), the rule on R, channel- or
    tensor-wise scaling of G, norm-growth limiter, sqrt(scale)."""
    state = [{"seed": s, "prev": None} for s in seeds]
    rules = [rule(((m, rank) if m >= n else (rank, n))) for (m, n) in shapes]

    def direction(i, g, t):
        st = state[i]
        m, n = g.shape
        if t > 1 and (t - 1) % interval == 0:
            st["seed"] = ref_next_seed(st["seed"])
        if m >= n:
            proj = ref_gaussian((rank, n), st["seed"], rank)
            r = g @ proj.T
        else:
            proj = ref_gaussian((m, rank), st["seed"], rank)
            r = proj.T @ g
        u = rules[i](r)
        if mode == "channel":
            dim = 1 if m >= n else 0
            s = u.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)
        else:
            s = u.norm() / (r.norm() + 1e-8)
        out = g * s
        if scale_front:
            out = out * math.sqrt(scale)
        if limiter is not None:
            norm = out.norm()
            if st["prev"] is not None and norm / (st["prev"] + 1e-8) > limiter:
                shrink = norm / (st["prev"] + 1e-8) / limiter
                out, norm = out / shrink, norm / shrink
                engaged.append((i, t))
            st["prev"] = norm
        if not scale_front:
            out = out * math.sqrt(scale)
        return out

    return direction


@pytest.mark.parametrize("mode,scale,scale_front", [("channel", 1.0, False), ("tensor", 16.0, True),
                                                     ("tensor", 128.0, False)])
def test_apollo_matches_handwritten_reference_with_limiter(mode, scale, scale_front):
    """AdamW (bias-corrected, as the paper's algorithm) on a random rank-3
    projection; the limiter engages on several steps. Two groups, 22 steps,
    refresh every 5 steps, decoupled decay."""
    rank, interval, lr, lr2, wd = 3, 5, 1e-2, 3e-3, 0.1
    params, stream = _params(), _stream()
    opt = ok.AdamW(_two_groups(params, lr2), lr=lr, weight_decay=wd,
                   projection=APOLLO(rank=rank, interval=interval, scale=scale, mode=mode,
                                     scale_front=scale_front, seed=10))
    run_with_grads(opt, params, stream)

    engaged = []
    matrix = _apollo_reference_direction(rank, interval, scale, mode, scale_front, 1.01, RefAdam,
                                         SHAPES[:2], [11, 12], engaged)
    full = RefAdam((7,))
    expected = run_reference(_params(), stream, [lr, lr, lr2], wd,
                             lambda i, g, t: full(g) if i == 2 else matrix(i, g, t))
    assert len(engaged) >= 4, "the limiter should engage on this stream"
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e)


def test_apollo_mini_with_sgd_momentum_matches_handwritten_reference():
    rank, interval, lr = 1, 4, 1e-2
    params, stream = _params(), _stream(12)
    opt = ok.SGD(params, lr=lr, momentum=0.9, projection=APOLLOMini(interval=interval))
    run_with_grads(opt, params, stream)
    engaged = []
    matrix = _apollo_reference_direction(rank, interval, 128.0, "tensor", False, 1.01, RefSGDM,
                                         SHAPES[:2], [1, 2], engaged)
    full = RefSGDM((7,))
    expected = run_reference(_params(), stream, [lr] * 3, 0.0,
                             lambda i, g, t: full(g) if i == 2 else matrix(i, g, t))
    assert engaged
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e)


@pytest.mark.parametrize("mode", ["channel", "tensor"])
@pytest.mark.parametrize("scale_front", [False, True])
@pytest.mark.parametrize("limited", [False, True])
def test_apollo_matches_apollo_torch(mode, scale_front, limited):
    """apollo_torch.APOLLOAdamW: same seeds (parameter i gets seed i), projections,
    refreshes (every 5 steps) and scaling, 22 steps.

    The reference scales with Adam's uncorrected m / (sqrt(v) + eps) and applies
    the bias correction after its limiter (optimkit: the rule's bias-corrected
    update, as the paper). Without the limiter (``disable_nl``) the two agree up
    to eps placement (eps = 1e-12, see the GaLore test). With the limiter,
    betas = (0, 0) makes both bias corrections 1 and both forms
    ``R / (|R| + eps)``, so the limiter is compared exactly."""
    ref_cls = _reference("apollo_torch", "apollo").AdamW
    rank, interval, scale, lr, lr2 = 3, 5, 4.0, 1e-2, 3e-3
    betas, eps = ((0.0, 0.0), 1e-6) if limited else ((0.9, 0.999), 1e-12)
    stream = _stream()
    ours, theirs = _params(), _params()
    opt = ok.AdamW(_two_groups(ours, lr2), lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                   projection=APOLLO(rank=rank, interval=interval, scale=scale, mode=mode,
                                     scale_front=scale_front, limiter=1.01 if limited else None))
    ref = ref_cls([{"params": theirs[:2], "rank": rank, "update_proj_gap": interval, "scale": scale,
                    "proj_type": "std", "proj": "random", "scale_type": mode},
                   {"params": theirs[2:], "lr": lr2}], lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                  scale_front=scale_front, disable_nl=not limited)
    run_with_grads(opt, ours, stream)
    run_with_grads(ref, theirs, stream)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach())
    if limited:  # the limiter did act: the same run without it ends elsewhere
        free = _params()
        run_with_grads(ok.AdamW(_two_groups(free, lr2), lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                                projection=APOLLO(rank=rank, interval=interval, scale=scale, mode=mode,
                                                  scale_front=scale_front, limiter=None)), free, stream)
        assert not torch.allclose(free[0], ours[0]) and not torch.allclose(free[1], ours[1])


# ---------------------------------------------------------------- (c) FRUGAL
def _frugal_reference_direction(k_of, interval, residual, residual_lr_scale, rule, shapes, basis_fn,
                                reset=True):
    """FRUGAL as the authors' GaloreOptimizer: up(rule(down(G))) + scale * h(G - up(down(G))),
    the rule started afresh (moments and step count) at every refresh when ``reset``."""
    bases = [None] * len(shapes)

    def fresh(m, n):
        return rule(((m, k_of(m, n)) if m >= n else (k_of(m, n), n)))

    rules = [fresh(m, n) for (m, n) in shapes]

    def direction(i, g, t):
        m, n = g.shape
        if (t - 1) % interval == 0:
            bases[i] = basis_fn(i, g, k_of(m, n))
            if reset:
                rules[i] = fresh(m, n)
        b = bases[i]
        if m >= n:
            r = g @ b.T
            up, rest = rules[i](r) @ b, g - r @ b
        else:
            r = b.T @ g
            up, rest = b @ rules[i](r), g - b @ r
        if residual is None:
            return up
        return up + residual_lr_scale * (rest.sign() if residual == "signsgd" else rest)

    return direction


def _svd_basis(i, g, k):
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return vh[:k] if g.shape[0] >= g.shape[1] else u[:, :k]


@pytest.mark.parametrize("residual,residual_lr_scale,reset", [("signsgd", 1.0, True), ("sgd", 0.5, False),
                                                              (None, 1.0, True)])
def test_frugal_adamw_matches_handwritten_reference(residual, residual_lr_scale, reset):
    """SVD basis, k = round(density * projected dim) (density 0.4: 2 and 2), two groups;
    Adam restarted at each refresh (the reference's default) or kept."""
    interval, lr, lr2, wd = 5, 1e-2, 3e-3, 0.1
    params, stream = _params(), _stream()
    opt = ok.AdamW(_two_groups(params, lr2), lr=lr, weight_decay=wd,
                   projection=FRUGAL(density=0.4, interval=interval, residual=residual,
                                     residual_lr_scale=residual_lr_scale, reset_state=reset))
    run_with_grads(opt, params, stream)

    def k_of(m, n):
        return round(0.4 * (n if m >= n else m))

    matrix = _frugal_reference_direction(k_of, interval, residual, residual_lr_scale, RefAdam, SHAPES[:2],
                                         _svd_basis, reset)
    full = RefAdam((7,))
    expected = run_reference(_params(), stream, [lr, lr, lr2], wd,
                             lambda i, g, t: full(g) if i == 2 else matrix(i, g, t))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e)
    assert opt.state[params[0]]["exp_avg"].shape == (12, 2)
    assert opt.state[params[1]]["exp_avg"].shape == (2, 10)


def test_frugal_random_basis_sgd_momentum_matches_handwritten_reference():
    """Random orthonormal bases (orthogonal_ from a generator seeded 1 + i, the
    seed advancing at each refresh), SGD momentum on the subspace (the paper's
    SGDM + signSGD setting), rank 3."""
    interval, lr, rank = 4, 1e-2, 3
    params, stream = _params(), _stream(13)
    opt = ok.SGD(params, lr=lr, momentum=0.9, projection=FRUGAL(rank=rank, interval=interval,
                                                               proj_type="random"))
    run_with_grads(opt, params, stream)
    seeds = [1, 2]

    def random_basis(i, g, k):
        m, n = g.shape
        basis = torch.empty((k, n) if m >= n else (m, k))
        torch.nn.init.orthogonal_(basis, generator=torch.Generator().manual_seed(seeds[i]))
        seeds[i] = ref_next_seed(seeds[i])
        return basis

    matrix = _frugal_reference_direction(lambda m, n: rank, interval, "signsgd", 1.0, RefSGDM, SHAPES[:2],
                                         random_basis)
    full = RefSGDM((7,))
    expected = run_reference(_params(), stream, [lr] * 3, 0.0,
                             lambda i, g, t: full(g) if i == 2 else matrix(i, g, t))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e)
    q = opt.state[params[0]]["proj:Q"]
    torch.testing.assert_close(q @ q.T, torch.eye(rank), atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision,placement", [("fp32", "device"), ("q8", "cpu"), ("q4", "disk")])
def test_frugal_reset_equals_a_fresh_optimizer(precision, placement, tmp_path):
    """At a refresh (step 4 with interval 3) the rule restarts: the step equals the first
    step of a fresh optimizer started from the same parameters, whatever the state's
    precision and placement (the reset writes into the existing storage)."""
    interval, lr = 3, 1e-2
    stream = _stream(4)
    kw = dict(lr=lr, weight_decay=0.1, state_precision=precision, min_quant_size=0,
              state_placement=placement, state_dir=str(tmp_path) if placement == "disk" else None)
    a = _params()
    opt = ok.AdamW(a[:2], projection=FRUGAL(rank=2, interval=interval), **kw)
    run_with_grads(opt, a, stream[:3])
    b = [p.detach().clone().requires_grad_() for p in a[:2]]
    run_with_grads(opt, a, stream[3:])
    fresh = ok.AdamW(b, projection=FRUGAL(rank=2, interval=interval), **kw)
    run_with_grads(fresh, b, stream[3:])
    for p, q in zip(a[:2], b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        sa, sb = opt.state[p], fresh.state[q]
        assert sa["step"] == sb["step"] == 1
        for k, v in sb.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(sa[k], v, rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------- (d) memory
def _state_numel(opt, p):
    return sum(v.numel() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and k != "step")


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_galore_state_is_the_formula(shape):
    m, n, r = *shape, 8
    p = torch.nn.Parameter(torch.randn(shape))
    opt = ok.AdamW([p], projection=GaLore(rank=r))
    p.grad = torch.randn(shape)
    opt.step()
    # two moments of the subspace shape plus the projector
    expected = 2 * m * r + r * n if m >= n else 2 * r * n + m * r
    assert _state_numel(opt, p) == expected
    assert ok.state_bytes(opt) == 4 * expected  # fp32 tensors (the step counter is a Python int)


def test_apollo_state_bytes():
    p = torch.nn.Parameter(torch.randn(512, 512))
    opt = ok.AdamW([p], projection=APOLLOMini())
    p.grad = torch.randn(512, 512)
    opt.step()
    assert ok.state_bytes(opt) / p.numel() <= 0.05
    q = torch.nn.Parameter(torch.randn(512, 256))
    opt = ok.AdamW([q], projection=APOLLO(rank=16))
    q.grad = torch.randn(512, 256)
    opt.step()
    assert _state_numel(opt, q) == 2 * 512 * 16 + 2  # moments m x r, seed, last norm
    assert ok.state_bytes(opt) / q.numel() == pytest.approx(8 * 16 / 256, rel=1e-3)


def test_frugal_state():
    p = torch.nn.Parameter(torch.randn(64, 32))
    opt = ok.AdamW([p], projection=FRUGAL())  # density 0.25 of 32
    p.grad = torch.randn(64, 32)
    opt.step()
    assert _state_numel(opt, p) == 2 * 64 * 8 + 8 * 32


# ---------------------------------------------------------------- (e) every rule, compile, resume
PROJECTIONS = {
    "galore": lambda: GaLore(rank=2, interval=4),
    "apollo": lambda: APOLLO(rank=2, interval=4),
    "apollo_mini": lambda: APOLLOMini(interval=4),
    "frugal": lambda: FRUGAL(rank=2, interval=4),
    "frugal_random": lambda: FRUGAL(rank=2, interval=4, proj_type="random"),
}
RULES = {"adamw": dict(lr=1e-2), "sgd": dict(lr=1e-2, momentum=0.9), "lion": dict(lr=1e-3)}


def _hp(proj, rule):
    hp = dict(RULES[rule])
    if proj == "apollo_mini":  # its default scale makes steps sqrt(128) ~ 11x larger
        hp["lr"] = hp["lr"] / 10
    return hp


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("proj", list(PROJECTIONS))
def test_every_rule_trains_with_every_projection(proj, rule):
    model, loss_fn = mlp_problem()
    hp = _hp(proj, rule)
    projection = PROJECTIONS[proj]()
    opt = ok.create(rule, model.parameters(), projection=projection, **hp)
    losses = train(model, loss_fn, opt, 40)
    assert losses[-1] < 0.95 * losses[0], f"{proj} + {rule}: {losses[0]:.4f} -> {losses[-1]:.4f}"
    w = model[0].weight
    # a rule restarted at each refresh (interval 4: steps 1, 5, ..., 37) counts from there
    assert int(opt.state[w]["step"]) == (4 if projection.resets_state else 40)
    assert any(k.startswith("proj:") for k in opt.state[w])


COMPILED = [("galore", "adamw"), ("apollo", "lion"), ("apollo_mini", "adamw"), ("frugal", "sgd"),
            ("frugal_random", "lion")]


@pytest.mark.parametrize("proj,rule", COMPILED)
def test_compiled_equals_eager(proj, rule):
    stream = _stream(9)
    a, b = _params(), _params()
    hp = _hp(proj, rule)
    opt_a = ok.create(rule, a, projection=PROJECTIONS[proj](), **hp)
    opt_b = ok.create(rule, b, projection=PROJECTIONS[proj](), compile=True, **hp)
    run_with_grads(opt_a, a, stream)
    run_with_grads(opt_b, b, stream)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ["adamw", "lion"])
@pytest.mark.parametrize("proj", list(PROJECTIONS))
def test_resume_across_a_refresh_is_bit_exact(proj, rule):
    """10 steps straight vs 6 steps, state_dict round trip into a fresh optimizer
    (and a fresh projection object), 4 more steps: the projector refreshes at step 9."""
    stream = _stream(10)
    hp = _hp(proj, rule)
    a = _params()
    opt_a = ok.create(rule, a, projection=PROJECTIONS[proj](), **hp)
    run_with_grads(opt_a, a, stream)

    b = _params()
    opt_b = ok.create(rule, b, projection=PROJECTIONS[proj](), **hp)
    run_with_grads(opt_b, b, stream[:6])
    saved = copy.deepcopy(opt_b.state_dict())
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    del opt_b, b
    opt_c = ok.create(rule, c, projection=PROJECTIONS[proj](), **hp)
    opt_c.load_state_dict(saved)
    run_with_grads(opt_c, c, stream[6:])
    for p, q in zip(a, c):
        assert torch.equal(p, q)
    for p, q in zip(a, c):
        sa, sc = opt_a.state[p], opt_c.state[q]
        assert sa.keys() == sc.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert sa[key].dtype == sc[key].dtype and torch.equal(sa[key], sc[key]), key
            else:
                assert sa[key] == sc[key], key


@pytest.mark.parametrize("proj", list(PROJECTIONS))
def test_maximize_is_descent_on_the_negated_gradient(proj):
    stream = _stream(6)
    a, b = _params(), _params()
    opt_a = ok.AdamW(a, lr=1e-2, projection=PROJECTIONS[proj]())
    opt_b = ok.AdamW(b, lr=1e-2, maximize=True, projection=PROJECTIONS[proj]())
    run_with_grads(opt_a, a, stream)
    run_with_grads(opt_b, b, [[-g for g in grads] for grads in stream])
    for p, q in zip(a, b):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- configuration
def test_projection_arguments_are_validated():
    assert isinstance(GaLore(), Projection)
    with pytest.raises(ValueError, match="rank"):
        GaLore(rank=0)
    with pytest.raises(TypeError, match="interval"):
        GaLore(interval=2.5)
    with pytest.raises(ValueError, match="proj_type"):
        GaLore(proj_type="diagonal")
    with pytest.raises(ValueError, match="mode"):
        APOLLO(mode="row")
    with pytest.raises(ValueError, match="limiter"):
        APOLLO(limiter=0.0)
    with pytest.raises(ValueError, match="density"):
        FRUGAL(density=1.5)
    with pytest.raises(ValueError, match="residual"):
        FRUGAL(residual="adam")
    with pytest.raises(ValueError, match="proj_type"):
        FRUGAL(proj_type="randk")
    assert repr(APOLLOMini()).startswith("APOLLOMini(rank=1, interval=200, scale=128.0, mode='tensor'")
    assert "_count" not in repr(FRUGAL())
    d = APOLLO()
    assert (d.rank, d.interval, d.scale, d.mode) == (256, 200, 1.0, "channel")
    g = GaLore()
    assert (g.rank, g.interval, g.scale, g.proj_type) == (128, 200, 0.25, "std")
