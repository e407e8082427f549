"""Muon: parity with torch.optim.Muon and torch.optim.AdamW, the matrix views
(stacks, conv flattening, row splits), the Newton-Schulz schedules, the
param-group split by module type, compile, low-precision state, checkpoints
and bad input.

References:

* ``torch.optim.Muon`` runs its Newton-Schulz iteration in bfloat16 (the cast
  is ``grad.bfloat16()`` inside ``torch.optim._muon._zeropower_via_newtonschulz``).
  For the float64 comparisons torch's own step runs with ``Tensor.bfloat16``
  monkeypatched to ``Tensor.double`` for the duration of ``step()`` (the only
  call of it there), so the reference is torch's code path with only that dtype
  changed. The default bf16 mode is compared with torch's unpatched bf16 Muon.
* The auxiliary AdamW rule against ``torch.optim.AdamW``.
* Orthogonalization itself against the SVD polar factor ``U V^T``, and the
  Polar Express schedule against Algorithm 1 of the paper written out here.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import optimkit as ok
from helpers import mlp_problem, train
from optimkit.transforms.orthogonalize import (POLAR_EXPRESS, lr_ratio, matrix_shape, newton_schulz,
                                               schedule)

SHAPES = {"tall": (12, 5), "wide": (5, 12), "square": (8, 8)}
ADJUST = [None, "original", "match_rms_adamw"]


def _torch_ns_in(dtype):
    """Context in which torch.optim.Muon's ``grad.bfloat16()`` gives ``dtype`` instead."""
    mp = pytest.MonkeyPatch()
    # a copy, as the real cast makes one: torch's iteration divides it in place, and
    # with nesterov=False its input is the momentum buffer itself
    mp.setattr(torch.Tensor, "bfloat16", lambda self: self.to(dtype, copy=True))
    return mp


def _torch_step(opt, ns_dtype=None):
    if ns_dtype is None:
        opt.step()
        return
    mp = _torch_ns_in(ns_dtype)
    try:
        opt.step()
    finally:
        mp.undo()


def _grads(shapes, steps, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(steps)]


def _params(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _clone(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def _rel_displacement(p, ref, start):
    """||p - ref|| / ||ref - start||: the error relative to how far the reference moved."""
    return ((p - ref).norm() / (ref - start).norm()).item()


def _run_pair(ours, theirs, params_a, params_b, grads, torch_ns=None):
    for step in grads:
        for p, q, g in zip(params_a, params_b, step):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        _torch_step(theirs, torch_ns)


# --------------------------------------------------------------------------- torch.optim.Muon
@pytest.mark.parametrize("adjust", ADJUST, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_equals_torch_muon_with_float64_newton_schulz(shape, adjust):
    """10 steps, two groups (the second: plain momentum, other coefficients and
    steps, no decay), float64 parameters: within 1e-6 of torch's step (NS in float64
    on both sides) relative to the displacement."""
    s = SHAPES[shape]
    a = _params([s, s], dtype=torch.float64)
    b, start = _clone(a), _clone(a)
    hp = dict(lr=0.05, weight_decay=0.1, momentum=0.95, adjust_lr_fn=adjust)
    second = dict(lr=0.02, momentum=0.8, nesterov=False, ns_coefficients=(3.0, -3.2, 1.2), ns_steps=3,
                  weight_decay=0.0)
    ours = ok.Muon([{"params": a[:1]}, {"params": a[1:], **second}], ns_dtype=torch.float64, **hp)
    theirs = torch.optim.Muon([{"params": b[:1]}, {"params": b[1:], **second}], **hp)
    _run_pair(ours, theirs, a, b, _grads([s, s], 10, dtype=torch.float64), torch_ns=torch.float64)
    for p, q, p0 in zip(a, b, start):
        assert _rel_displacement(p, q, p0) < 1e-6


def test_equals_torch_muon_with_float32_newton_schulz():
    s = SHAPES["tall"]
    a = _params([s])
    b, start = _clone(a), _clone(a)
    ours = ok.Muon(a, lr=0.05, ns_dtype="fp32")
    theirs = torch.optim.Muon(b, lr=0.05)
    _run_pair(ours, theirs, a, b, _grads([s], 10), torch_ns=torch.float32)
    assert _rel_displacement(a[0], b[0], start[0]) < 1e-5


@pytest.mark.parametrize("adjust", ADJUST, ids=str)
def test_default_bf16_close_to_torch_bf16_muon(adjust):
    """Both in bf16 (different rounding order inside the iteration): within 5e-2
    of torch's displacement after 10 steps."""
    shapes = list(SHAPES.values())
    a = _params(shapes)
    b, start = _clone(a), _clone(a)
    ours = ok.Muon(a, lr=0.05, adjust_lr_fn=adjust)
    theirs = torch.optim.Muon(b, lr=0.05, adjust_lr_fn=adjust)
    _run_pair(ours, theirs, a, b, _grads(shapes, 10))
    for p, q, p0 in zip(a, b, start):
        assert _rel_displacement(p, q, p0) < 5e-2


def test_torch_muon_state_dict_loads_and_continues():
    """torch.optim.Muon's state dict (momentum_buffer only, no step) into ok.Muon and
    back: continuing after the swap equals continuing in the first library (both
    with float64 Newton-Schulz)."""
    s = (6, 4)
    grads = _grads([s], 6)
    for direction in ("torch->ok", "ok->torch"):
        a = _params([s])
        b = _clone(a)
        t_opt = torch.optim.Muon(b, lr=0.05)
        o_opt = ok.Muon(a, lr=0.05, ns_dtype="fp64")
        first, second = (t_opt, o_opt) if direction == "torch->ok" else (o_opt, t_opt)
        p_first = b if first is t_opt else a
        p_second = a if first is t_opt else b
        for g in grads[:3]:
            p_first[0].grad = g[0].clone()
            _torch_step(first, torch.float64) if first is t_opt else first.step()
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        buf.seek(0)
        second.load_state_dict(torch.load(buf))
        with torch.no_grad():
            p_second[0].copy_(p_first[0])
        for g in grads[3:]:
            for p, opt in ((p_first[0], first), (p_second[0], second)):
                p.grad = g[0].clone()
                _torch_step(opt, torch.float64) if opt is t_opt else opt.step()
        torch.testing.assert_close(p_second[0], p_first[0], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- auxiliary AdamW
def test_aux_adamw_equals_torch_adamw():
    """A use_muon=False group (matrices and vectors) and the vectors of a Muon group
    take AdamW: equal to torch.optim.AdamW with the same hyperparameters."""
    shapes_aux = [(6, 4), (5,)]
    shapes_muon = [(6, 4), (4,), ()]
    a = _params(shapes_aux + shapes_muon)
    b = _clone(a)
    aux_hp = dict(lr=3e-3, weight_decay=0.01, adamw_betas=(0.8, 0.99), adamw_eps=1e-6)
    muon_hp = dict(lr=2e-2, weight_decay=0.1, adamw_betas=(0.9, 0.95), adamw_eps=1e-8)
    ours = ok.Muon([{"params": a[:2], "use_muon": False, **aux_hp}, {"params": a[2:], **muon_hp}])
    ref_aux = torch.optim.AdamW(b[:2], lr=3e-3, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6)
    ref_vec = torch.optim.AdamW(b[3:], lr=2e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for step in _grads(shapes_aux + shapes_muon, 20):
        for p, q, g in zip(a, b, step):
            p.grad, q.grad = g.clone(), g.clone()
        b[2].grad = None  # the Muon matrix is not part of the reference
        ours.step()
        ref_aux.step()
        ref_vec.step()
    for i in (0, 1, 3, 4):
        torch.testing.assert_close(a[i], b[i])
    assert set(ours.state[a[2]]) == {"step", "momentum_buffer"}
    for i in (0, 1, 3, 4):
        assert set(ours.state[a[i]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_complex_params_take_adamw_in_an_adamw_group_and_are_refused_in_a_muon_group():
    g = torch.Generator().manual_seed(0)
    z = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64, generator=g))
    w = nn.Parameter(z.detach().clone())
    ours = ok.Muon([{"params": [z], "use_muon": False}], lr=1e-2, weight_decay=0.01)
    ref = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.01, betas=(0.9, 0.95))
    for _ in range(5):
        gz = torch.randn(4, 3, dtype=torch.complex64, generator=g)
        z.grad, w.grad = gz.clone(), gz.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(z, w)
    with pytest.raises(TypeError, match="complex"):
        ok.Muon([z])
    opt = ok.Muon([nn.Parameter(torch.randn(3, 3))])
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


# --------------------------------------------------------------------------- matrix views
def _equal_runs(big, pieces, view, steps=5, **hp):
    """ok.Muon on ``big`` equals ok.Muon on the matrices ``view(big)`` cut into
    ``pieces`` (each its own parameter), float64 Newton-Schulz."""
    hp = dict(lr=0.05, ns_dtype="fp64", **hp)
    p = nn.Parameter(big.clone())
    parts = [nn.Parameter(x.clone()) for x in view(big)]
    opt_big = ok.Muon([p], **{k: val for k, val in hp.items()})
    plain = {k: val for k, val in hp.items() if k not in ("reshape", "split")}
    opt_parts = ok.Muon(parts, **plain)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        grad = torch.randn(big.shape, generator=g, dtype=big.dtype)
        p.grad = grad
        for q, gq in zip(parts, view(grad)):
            q.grad = gq.clone()
        opt_big.step()
        opt_parts.step()
    for got, want in zip(view(p.detach()), parts):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_3d_stack_equals_its_matrices(adjust):
    big = torch.randn(3, 7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _equal_runs(big, 3, lambda t: list(t.unbind(0)), adjust_lr_fn=adjust)


def test_batch_reshape_stacks_over_all_leading_dims():
    big = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _equal_runs(big, 6, lambda t: list(t.reshape(6, 4, 5).unbind(0)), reshape="batch")


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_conv_filters_are_flattened(adjust):
    big = torch.randn(8, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _equal_runs(big, 1, lambda t: [t.reshape(8, 27)], adjust_lr_fn=adjust)
    conv1d = torch.randn(6, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _equal_runs(conv1d, 1, lambda t: [t.reshape(6, 8)], reshape="flatten", adjust_lr_fn=adjust)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_split_rows_equal_separate_matrices(adjust):
    """A fused QKV weight (12, 5) with split=3 equals three (4, 5) weights,
    including the lr adjustment of the (4, 5) blocks."""
    big = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _equal_runs(big, 3, lambda t: list(t.split(4, dim=0)), split=3, adjust_lr_fn=adjust)
    stack = torch.randn(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _equal_runs(stack, 4, lambda t: [x for m in t.unbind(0) for x in m.split(3, dim=0)], split=2,
                adjust_lr_fn=adjust)


def test_matrix_shape_and_lr_ratio():
    assert matrix_shape((4, 5)) == (4, 5)
    assert matrix_shape((3, 4, 5)) == (3, 4, 5)
    assert matrix_shape((3, 4, 5), "flatten") == (3, 20)
    assert matrix_shape((8, 3, 3, 3)) == (8, 27)
    assert matrix_shape((2, 3, 4, 5), "batch") == (2, 3, 4, 5)
    assert matrix_shape((12, 5), split=3) == (3, 4, 5)
    with pytest.raises(ValueError, match="split"):
        matrix_shape((10, 5), split=3)
    assert lr_ratio(12, 5, None) == math.sqrt(12 / 5) and lr_ratio(5, 12, "original") == 1.0
    assert lr_ratio(5, 12, "match_rms_adamw") == pytest.approx(0.2 * math.sqrt(12))


# --------------------------------------------------------------------------- Newton-Schulz
def _polar(m):
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(16, 8), (8, 16), (3, 10, 6)])
def test_converging_schedule_gives_the_polar_factor(shape):
    """With the convergent quintic Newton-Schulz (15x - 10x^3 + 3x^5) / 8 and
    enough iterations the iteration reaches U V^T of the SVD, per matrix."""
    m = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # well-conditioned matrices: singular values in [0.3, 1] of the largest
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    s = torch.linspace(1.0, 0.3, u.shape[-1], dtype=torch.float64)
    m = u @ torch.diag_embed(s.expand(*u.shape[:-2], -1)) @ vh
    o = newton_schulz(m, schedule((1.875, -1.25, 0.375), 40), 1e-7, torch.float64)
    torch.testing.assert_close(o, _polar(m), rtol=0, atol=1e-10)


def _paper_polar_express(g, steps):
    """Algorithm 1 of Amsel et al., "The Polar Express" (arXiv:2505.16932), in float64."""
    raw = [(8.28721201814563, -23.595886519098837, 17.300387312530933),
           (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
           (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
           (3.3184196573706015, -2.488488024314874, 0.51004894012372),
           (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
           (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
           (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
           (1.875, -1.25, 0.375)]
    coeffs = [(a / 1.01, b / 1.01 ** 3, c / 1.01 ** 5) for a, b, c in raw[:-1]] + [raw[-1]]
    x = g.double()
    if g.size(-2) > g.size(-1):
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    for a, b, c in (coeffs[:steps] + [coeffs[-1]] * max(0, steps - len(coeffs))):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if g.size(-2) > g.size(-1) else x


@pytest.mark.parametrize("steps", [5, 10])
def test_polar_express_schedule_equals_the_papers_algorithm(steps):
    m = torch.randn(24, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = newton_schulz(m, schedule("polar_express", steps), 1e-7, torch.float64)
    torch.testing.assert_close(got, _paper_polar_express(m, steps), rtol=0, atol=1e-6)
    if steps == 10:  # and it converges
        assert (got - _polar(m)).abs().max() < 1e-2


def test_per_iteration_schedule_and_its_last_triple_repeating():
    triples = ((3.0, -3.0, 1.0), (2.0, -1.5, 0.5))
    assert schedule(triples, 4) == (triples[0], triples[1], triples[1], triples[1])
    assert schedule(triples, 1) == (triples[0],)
    assert schedule((3.4445, -4.7750, 2.0315), 2) == ((3.4445, -4.7750, 2.0315),) * 2
    assert len(schedule("polar_express", 5)) == 5 and schedule("polar_express", 5) == POLAR_EXPRESS[:5]
    # the optimizer follows the schedule: a schedule of equal triples is the single triple
    a = _params([(6, 4)])
    b = _clone(a)
    o1 = ok.Muon(a, lr=0.1, ns_dtype="fp64", ns_coefficients=[(3.4445, -4.7750, 2.0315)] * 5)
    o2 = ok.Muon(b, lr=0.1, ns_dtype="fp64")
    _run_pair(o1, o2, a, b, _grads([(6, 4)], 3))
    assert torch.equal(a[0], b[0])
    assert o1.param_groups[0]["ns_coefficients"] == ((3.4445, -4.775, 2.0315),) * 5


# --------------------------------------------------------------------------- param groups
class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.mT / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.proj(att @ v)
        return x + self.out(torch.relu(self.fc(self.ln2(x))))


class _TinyLM(nn.Module):
    def __init__(self, vocab=40, d=16, tied=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(8, d))
        self.blocks = nn.ModuleList([_Block(d), _Block(d)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def _where(groups, model):
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            out[names[id(p)]] = ("muon" if g["use_muon"] else "adamw", g.get("split", 1), g.get("reshape"))
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_muon_param_groups_split_by_module_type(tied):
    torch.manual_seed(0)
    model = _TinyLM(tied=tied)
    groups = ok.muon_param_groups(model, muon=dict(lr=0.02), adamw=dict(lr=3e-3, weight_decay=0.0))
    where = _where(groups, model)
    assert len(where) == len(list(model.parameters()))  # each parameter exactly once
    for name, p in model.named_parameters():
        expect = "adamw" if (p.dim() < 2 or name in ("emb.weight", "head.weight")) else "muon"
        assert where[name][0] == expect, name
    assert where["pos"][0] == "muon"  # a raw 2-D parameter is a matrix unless named (next test)
    assert ("head.weight" in where) != tied  # a tied head is the embedding's parameter
    muon_group, aux_group = groups
    assert muon_group["lr"] == 0.02 and aux_group["lr"] == 3e-3 and aux_group["weight_decay"] == 0.0

    opt = ok.Muon(groups, lr=0.02)
    idx = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(2))

    def loss_fn(m):
        return nn.functional.cross_entropy(m(idx).flatten(0, 1), target.flatten())

    losses = train(model, loss_fn, opt, 30)
    assert losses[-1] < 0.8 * losses[0]
    for p, st in opt.state.items():
        assert ("momentum_buffer" in st) == (where[{id(q): n for n, q in model.named_parameters()}[id(p)]][0]
                                             == "muon")


def test_muon_param_groups_explicit_choices_win():
    torch.manual_seed(0)
    model = _TinyLM()
    groups = ok.muon_param_groups(model, adamw_names=["pos", "blocks.1.out"], muon_names=["head.weight"],
                                  split={"blocks.0.qkv.weight": 3}, head=None)
    where = _where(groups, model)
    assert where["pos"][0] == "adamw" and where["blocks.1.out.weight"][0] == "adamw"
    assert where["head.weight"][0] == "muon"
    assert where["blocks.0.qkv.weight"] == ("muon", 3, None)
    assert where["blocks.1.qkv.weight"] == ("muon", 1, None)
    assert where["emb.weight"][0] == "adamw"  # module type, not overridden
    opt = ok.Muon(groups)
    assert [g.get("split", 1) for g in opt.param_groups] == [1, 3, 1]
    # head names, and the classifier head of a model without embeddings
    assert _where(ok.muon_param_groups(model, head="blocks.1.fc"), model)["blocks.1.fc.weight"][0] == "adamw"
    mlp, _ = mlp_problem()
    where = _where(ok.muon_param_groups(mlp), mlp)
    assert where["0.weight"][0] == "muon" and where["2.weight"][0] == "adamw"


def test_muon_param_groups_conv1d_flattens_and_conv2d_is_muon():
    model = nn.Sequential(nn.Conv1d(3, 4, 5), nn.Conv2d(4, 6, 3), nn.Linear(6, 2))
    where = _where(ok.muon_param_groups(model), model)
    assert where["0.weight"] == ("muon", 1, "flatten")
    assert where["1.weight"] == ("muon", 1, None)
    assert where["2.weight"][0] == "adamw" and where["0.bias"][0] == "adamw"


def test_muon_param_groups_bad_input():
    model = _TinyLM()
    with pytest.raises(ValueError, match="adamw_names"):
        ok.muon_param_groups(model, adamw_names=["no.such"])
    with pytest.raises(ValueError, match="muon_names"):
        ok.muon_param_groups(model, muon_names=["ln_f.weight"])  # 1-D
    with pytest.raises(ValueError, match="muon_names"):
        ok.muon_param_groups(model, muon_names=["pos"], adamw_names=["pos"])
    with pytest.raises(ValueError, match="head"):
        ok.muon_param_groups(model, head="nohead")
    with pytest.raises(TypeError, match="lrr"):
        ok.muon_param_groups(model, adamw=dict(lrr=1e-3))
    with pytest.raises(ValueError, match="split"):
        ok.muon_param_groups(model, split={"emb.weight": 2})
    with pytest.raises(ValueError, match="split"):  # 3 does not divide the 16 rows
        ok.Muon(ok.muon_param_groups(model, split={"blocks.0.proj.weight": 3}))
    with pytest.raises(TypeError, match="model"):
        ok.muon_param_groups([nn.Parameter(torch.zeros(2, 2))])


# --------------------------------------------------------------------------- compile, precision, resume
def _two_group_run(compiled, ns_dtype, steps=6):
    shapes = [(6, 4), (7,), (3, 5, 4), (4, 8)]
    params = _params(shapes, dtype=torch.float64 if ns_dtype == "fp64" else torch.float32)
    start = _clone(params)
    opt = ok.Muon([{"params": params[:2]}, {"params": params[2:], "lr": 0.01, "split": 1}],
                  lr=0.02, ns_dtype=ns_dtype, compile=compiled)
    for step in _grads(shapes, steps, dtype=params[0].dtype):
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return params, start


@pytest.mark.parametrize("ns_dtype,bar", [("fp64", 1e-10), ("bf16", 1e-3)])
def test_compiled_equals_eager(ns_dtype, bar):
    """Inside the compiled step the iteration is one opaque operator running the
    eager code, so only the fused elementwise steps around it round differently.
    fp64 (float64 parameters, hence float64 hyperparameters): within 1e-10 of
    the displacement (measured 4e-15); bf16 with float32 parameters, where a
    differently rounded input can flip the 8-bit rounding of a product: 1e-3
    (measured 3e-7)."""
    eager, start = _two_group_run(False, ns_dtype)
    compiled, _ = _two_group_run(True, ns_dtype)
    for p, q, p0 in zip(compiled, eager, start):
        assert _rel_displacement(p, q, p0) < bar


def test_q8_momentum_trains_and_is_stored_in_q8():
    model, loss_fn = mlp_problem()
    opt = ok.Muon(model.parameters(), lr=0.02, state_precision="q8", min_quant_size=0)
    losses = train(model, loss_fn, opt, 60)
    assert losses[-1] < 0.5 * losses[0]
    for p, st in opt.state.items():
        name = "momentum_buffer" if p.dim() >= 2 else "exp_avg"
        assert st["_layout"][name][0] == "q8"


def _lm_run(opt_factory, steps, model=None, opt=None):
    torch.manual_seed(0)
    model = model or _TinyLM()
    opt = opt or opt_factory(model)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        idx = torch.randint(0, 40, (2, 8), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("extra", [{}, {"ns_coefficients": "polar_express", "state_precision": "bf16"},
                                   {"ns_dtype": torch.float32, "adjust_lr_fn": "match_rms_adamw",
                                    "state_precision": "q8", "min_quant_size": 0}],
                         ids=["bf16-ns", "polar-express", "fp32-ns-q8"])
def test_resume_is_bit_exact_through_torch_load_defaults(extra):
    def factory(model):
        return ok.Muon(ok.muon_param_groups(model, adamw=dict(lr=3e-3)), lr=0.02, **copy.deepcopy(extra))

    straight, _ = _lm_run(factory, 8)
    first, opt1 = _lm_run(factory, 4)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only=True
    for group in saved["param_groups"]:
        assert isinstance(group["ns_dtype"], str)
    resumed = copy.deepcopy(first)
    opt2 = factory(resumed)
    opt2.load_state_dict(saved)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):  # replay the batches of steps 1-4, then continue with 5-8
        torch.randint(0, 40, (2, 8), generator=g)
    for _ in range(4):
        idx = torch.randint(0, 40, (2, 8), generator=g)
        opt2.zero_grad()
        nn.functional.cross_entropy(resumed(idx).flatten(0, 1), idx.flatten()).backward()
        opt2.step()
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_disk_placement_equals_device(tmp_path):
    def run(**kw):
        model, loss_fn = mlp_problem()
        opt = ok.Muon(model.parameters(), lr=0.02, **kw)
        train(model, loss_fn, opt, 5)
        return list(model.parameters())

    for a, b in zip(run(), run(state_placement="disk", state_dir=str(tmp_path))):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("key,value,exc", [
    ("ns_dtype", torch.float16, ValueError), ("ns_dtype", "half", ValueError), ("ns_dtype", 3, TypeError),
    ("ns_coefficients", (1.0, 2.0), ValueError), ("ns_coefficients", "jordan", ValueError),
    ("ns_coefficients", ((1.0, 2.0, 3.0), (1.0, float("nan"), 0.0)), ValueError),
    ("ns_coefficients", 3.0, TypeError), ("ns_coefficients", (), TypeError),
    ("ns_steps", -1, ValueError), ("ns_steps", 2.5, TypeError),
    ("adjust_lr_fn", "spectral", ValueError), ("reshape", "stack", ValueError), ("split", 0, ValueError),
    ("use_muon", 1, TypeError), ("adamw_betas", (0.9, 1.0), ValueError), ("adamw_eps", -1.0, ValueError),
    ("momentum", 1.0, ValueError), ("nesterov", "yes", TypeError),
    ("projection", "galore", TypeError),
])
def test_bad_hyperparameters_raise_naming_the_argument(key, value, exc):
    params = _params([(4, 3), (3,)])
    with pytest.raises(exc, match=key):
        ok.Muon(params, **{key: value})
    opt = ok.Muon(params[:1])
    with pytest.raises(exc, match=key):
        opt.add_param_group({"params": params[1:], key: value})
    assert len(opt.param_groups) == 1 and not opt.state


def test_projection_and_bad_split_are_refused_before_anything_changes():
    params = _params([(10, 4)])
    with pytest.raises(ValueError, match="projection"):
        ok.Muon(params, projection=ok.GaLore(rank=2))
    with pytest.raises(ValueError, match="split"):
        ok.Muon(params, split=3)
    opt = ok.Muon(_params([(4, 4)]))
    with pytest.raises(ValueError, match="split"):
        opt.add_param_group({"params": params, "split": 3})
    assert len(opt.param_groups) == 1
    ok.Muon([{"params": params, "split": 3, "use_muon": False}])  # AdamW groups do not split


def test_info_names_paper_and_reference():
    info = ok.info("muon")
    assert "Muon" in info.paper and info.reference == "torch.optim.Muon"
    assert info.defaults["lr"] == 1e-3 and info.defaults["weight_decay"] == 0.1
    assert info.defaults["ns_coefficients"] == (3.4445, -4.7750, 2.0315)
