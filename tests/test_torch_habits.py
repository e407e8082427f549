"""torch.optim habits that optimkit optimizers must keep (patterns from PyTorch's
own optimizer tests): tensor hyperparameters, float64 compiled steps, sparse
gradients, clear errors for parameters a compiled step cannot take, the training-loop
habits (schedulers, swa_utils, GradScaler, zero_grad, add_param_group, named, tied and
frozen parameters) and torch.optim's foreach/fused/differentiable/capturable switches."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

import optimkit as ok
from optimkit.kernels import q8_adamw
from helpers import as_grad, grad_stream, make_params, run_with_grads, two_groups
from optimizer_cases import contract_hp, gradient_names

NAMES = gradient_names()
#: fewer tensors where a test compiles (compile time grows with the tensors of a group)
SMALL = [(5, 3), (7,)]


def _tensor_hp(name: str) -> tuple[dict, dict]:
    """(hyperparameters with lr and betas as 0-d tensors, the same as Python floats)."""
    hp = contract_hp(name)
    defaults = ok.info(name).defaults
    lr = torch.tensor(hp.get("lr", defaults["lr"]))
    tensors, floats = dict(hp, lr=lr), dict(hp, lr=lr.item())
    if isinstance(defaults.get("betas"), tuple):
        betas = tuple(torch.tensor(b) for b in hp.get("betas", defaults["betas"]))
        tensors["betas"], floats["betas"] = betas, tuple(b.item() for b in betas)
    return tensors, floats


# ---------------------------------------------------------------- (a) tensor hyperparameters

@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_and_betas_equal_their_float_values(name):
    tensors, floats = _tensor_hp(name)
    a, b = make_params(), make_params()
    opt_t = ok.create(name, a, **tensors)
    opt_f = ok.create(name, b, **floats)
    group = opt_t.param_groups[0]
    assert group["lr"] is tensors["lr"]  # kept, as torch.optim keeps it
    if "betas" in tensors:
        assert all(x is y for x, y in zip(group["betas"], tensors["betas"]))
    for i, grads in enumerate(grad_stream(a, 6)):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = as_grad(opt_t, p, g), as_grad(opt_f, q, g)
        opt_t.step()
        opt_f.step()
        if i == 2:  # a scheduler that writes the tensor in place
            group["lr"].fill_(group["lr"] * 0.5)
            opt_f.param_groups[0]["lr"] = group["lr"].item()
    for p, q in zip(a, b):
        assert torch.equal(p, q), name


def test_per_group_tensor_lrs_follow_a_torch_scheduler():
    a, b = make_params(), make_params()
    opt_t = ok.AdamW(two_groups(a, lr=torch.tensor(3e-3)), lr=torch.tensor(1e-2))
    opt_f = ok.AdamW(two_groups(b, lr=torch.tensor(3e-3).item()), lr=torch.tensor(1e-2).item())
    sched_t = torch.optim.lr_scheduler.StepLR(opt_t, step_size=1, gamma=0.5)
    sched_f = torch.optim.lr_scheduler.StepLR(opt_f, step_size=1, gamma=0.5)
    lrs = [g["lr"] for g in opt_t.param_groups]
    for grads in grad_stream(a, 5):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_t.step()
        opt_f.step()
        sched_t.step()
        sched_f.step()
    assert [g["lr"] for g in opt_t.param_groups] == lrs  # filled in place, same objects
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt_t.param_groups)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
def test_compiled_tensor_lr_equals_eager_without_recompiling(name):
    import torch._dynamo

    with q8_adamw.disabled():  # the Inductor kernel, not the C fast path
        _compiled_tensor_lr_run(name, torch._dynamo)


def _compiled_tensor_lr_run(name, dynamo):
    tensors, floats = _tensor_hp(name)
    a, b = make_params(SMALL), make_params(SMALL)
    opt_c = ok.create(name, a, compile=True, **tensors)
    opt_e = ok.create(name, b, **floats)
    lr = opt_c.param_groups[0]["lr"]
    stream = grad_stream(a, 6)
    run_with_grads(opt_c, a, stream[:1])  # compiles
    run_with_grads(opt_e, b, stream[:1])
    with dynamo.config.patch(error_on_recompile=True):
        for grads in stream[1:]:
            lr.fill_(lr * 0.7)
            opt_e.param_groups[0]["lr"] = lr.item()
            run_with_grads(opt_c, a, [grads])
            run_with_grads(opt_e, b, [grads])
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value,exc", [(torch.tensor([1e-3, 2e-3]), ValueError), (torch.tensor(-1e-3), ValueError),
                                       (torch.tensor(1e-3 + 0j), TypeError), (torch.tensor(True), TypeError)])
def test_bad_tensor_lr_is_refused_naming_it(value, exc):
    params = make_params()
    with pytest.raises(exc, match="lr"):
        ok.AdamW(params, lr=value)
    opt = ok.AdamW(params[:2])
    with pytest.raises(exc, match="lr"):
        opt.add_param_group({"params": params[2:], "lr": value})
    assert len(opt.param_groups) == 1


def test_bad_tensor_beta_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        ok.AdamW(make_params(), betas=(torch.tensor(0.9), torch.tensor(1.0)))


def test_one_element_tensor_lr_is_accepted():
    a, b = make_params(), make_params()
    opt_t = ok.SGD(a, lr=torch.tensor([0.1]), momentum=0.9)
    opt_f = ok.SGD(b, lr=torch.tensor(0.1).item(), momentum=0.9)
    stream = grad_stream(a, 3)
    run_with_grads(opt_t, a, stream)
    run_with_grads(opt_f, b, stream)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- (b) float64 compiled steps

@pytest.mark.parametrize("name", NAMES)
def test_compiled_equals_eager_in_float64(name):
    """Hyperparameters reach a compiled float64 kernel in float64 (eager uses Python
    floats): the two agree step by step to float64 rounding, not float32's."""
    hp = contract_hp(name)
    if "ns_dtype" in ok.info(name).defaults:  # an iteration dtype of its own (bf16 by default)
        hp["ns_dtype"] = "fp64"
    a, b = make_params(SMALL, dtype=torch.float64), make_params(SMALL, dtype=torch.float64)
    opt_e = ok.create(name, a, **hp)
    opt_c = ok.create(name, b, compile=True, **hp)
    for grads in grad_stream(a, 4):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = as_grad(opt_e, p, g), as_grad(opt_c, q, g)
        opt_e.step()
        opt_c.step()
        for p, q in zip(a, b):
            assert q.dtype == torch.float64
            torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14, msg=name)


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers in the order of their values (adjacent floats differ by 1)."""
    i = x.view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def _one_step_ulps(name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """From the same low-precision parameters, gradients and (warmed-up) state, one
    step eager and one compiled, in ulps from the step computed in float64 and
    rounded once to ``dtype``."""
    hp = contract_hp(name)
    base = make_params([(16, 8), (33,)])
    warm = ok.create(name, base, **hp)
    run_with_grads(warm, base, grad_stream(base, 3))
    grads = grad_stream(base, 1, seed=7)[0]
    out = {}
    with q8_adamw.disabled():
        for mode, work in (("eager", dtype), ("compiled", dtype), ("ref", torch.float64)):
            ps = [torch.nn.Parameter(p.detach().to(dtype).to(work)) for p in base]
            opt = ok.create(name, ps, compile=mode == "compiled", **hp)
            for p, q, g in zip(base, ps, grads):
                opt.state[q] = {k: v.to(dtype).to(work) if isinstance(v, torch.Tensor) and v.is_floating_point()
                                else v for k, v in warm.state[p].items()}
                q.grad = g.to(dtype).to(work)
            opt.step()
            out[mode] = torch.cat([q.detach().to(dtype).flatten() for q in ps])
    return {mode: (_ordered_bits(out[mode]) - _ordered_bits(out["ref"])).abs() for mode in ("eager", "compiled")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["adamw", "sgd", "lion", "rmsprop", "adan"])
def test_low_precision_compiled_step_rounds_once(name, dtype):
    """Documented in docs/architecture.md (Execution modes): for bf16/fp16 parameters
    Inductor computes a step in fp32 and rounds once, eager rounds after every
    foreach op. From the same start the compiled step is within one ulp of the exact
    step rounded once, and at least as close to it as the eager step, which may be
    off by one ulp (or more, where the rule cancels) in a good part of the elements:
    the two modes differ by whole ulps, beyond torch's fp16 tolerance (rtol 1e-4)."""
    ulps = _one_step_ulps(name, dtype)
    assert ulps["compiled"].max() <= 1, name
    assert ulps["compiled"].sum() <= ulps["eager"].sum(), name


# ---------------------------------------------------------------- (c) sparse gradients

def _rosenbrock(xy):
    x, y = xy
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2


def _rosenbrock_grad(xy):
    x, y = xy
    return torch.stack((-400 * x * (y - x ** 2) - 2 * (1 - x), 200 * (y - x ** 2)))


def _coordinate_grad(xy, step: int) -> torch.Tensor:
    """The gradient's coordinate ``step % 2`` only, as an uncoalesced sparse tensor
    (the coordinate appears twice, with values summing to its derivative)."""
    i = step % 2
    d = _rosenbrock_grad(xy.detach())[i]
    values = torch.stack((d / 4, d - d / 4))
    return torch.sparse_coo_tensor(torch.tensor([[i, i]]), values, (2,))


@pytest.mark.parametrize("name,hp", [
    ("sgd", dict(lr=1e-3)),
    ("sgd", dict(lr=5e-4, momentum=0.9)),
    ("sgd", dict(lr=5e-4, momentum=0.9, nesterov=True)),
    ("sgd", dict(lr=5e-4, momentum=0.5, dampening=0.5)),
    ("adagrad", dict(lr=0.1)),
    ("adagrad", dict(lr=0.1, lr_decay=1e-3, initial_accumulator_value=0.1)),
])
def test_rosenbrock_sparse_equals_dense(name, hp):
    """Cyclic coordinate descent on a 2-D Rosenbrock function: a sparse gradient and
    its dense equivalent give the same iterates, and the iterates descend."""
    start = torch.tensor([1.5, 1.5])
    sparse, dense = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_s, opt_d = ok.create(name, [sparse], **hp), ok.create(name, [dense], **hp)
    for step in range(150):
        sparse.grad = _coordinate_grad(sparse, step)
        dense.grad = _coordinate_grad(dense, step).to_dense()
        opt_s.step()
        opt_d.step()
        assert torch.equal(sparse, dense), step
    assert _rosenbrock(sparse.detach()) < 0.1 * _rosenbrock(start)


@pytest.mark.parametrize("hp", [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.9, dampening=0.3), dict(momentum=0.9, maximize=True)],
                         ids=["plain", "momentum", "nesterov", "dampening", "maximize"])
def test_sgd_sparse_embedding_grads_match_torch(hp):
    torch.manual_seed(0)
    ours, theirs = torch.nn.Embedding(12, 4, sparse=True), torch.nn.Embedding(12, 4, sparse=True)
    theirs.load_state_dict(ours.state_dict())
    opt_o = ok.SGD(ours.parameters(), lr=0.1, **hp)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1, **hp)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        idx = torch.randint(0, 12, (6,), generator=g)  # repeated rows: uncoalesced gradients
        target = torch.randn(6, 4, generator=g)
        for emb, opt in ((ours, opt_o), (theirs, opt_t)):
            opt.zero_grad()
            ((emb(idx) - target) ** 2).sum().backward()
            assert emb.weight.grad.is_sparse
            opt.step()
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_sparse_grads_with_weight_decay_are_refused_as_torch_does(name):
    torch_cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[name]
    for ours in (False, True):
        emb = torch.nn.Embedding(5, 3, sparse=True)
        opt = (ok.create(name, emb.parameters(), lr=0.1, weight_decay=0.1) if ours
               else torch_cls(emb.parameters(), lr=0.1, weight_decay=0.1))
        emb(torch.tensor([1, 2])).sum().backward()
        before = emb.weight.detach().clone()
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()
        assert torch.equal(before, emb.weight)
        assert not ours or len(opt.state) == 0


def test_sparse_grads_still_refused_where_torch_refuses_them():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = ok.AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        torch.optim.AdamW(emb.parameters()).step()


# ---------------------------------------------------------------- (d) parameters a step cannot take

@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_integer_params_are_refused_at_step_naming_the_dtype(compile):
    """torch.optim accepts integer tensors at construction (a model's frozen integer
    buffers-as-parameters never get a gradient) and fails inside the step; optimkit
    also accepts them and refuses, before changing anything, one that has a gradient."""
    frozen = torch.nn.Parameter(torch.zeros(3, dtype=torch.int8), requires_grad=False)
    w = torch.nn.Parameter(torch.ones(3))
    opt = ok.SGD([w, frozen], lr=0.1, compile=compile)
    w.grad = torch.ones(3)
    opt.step()  # the integer parameter has no gradient: skipped, as in torch
    counts = torch.zeros(3, dtype=torch.int64)
    opt.add_param_group({"params": [counts]})
    counts.grad = torch.ones(3, dtype=torch.int64)
    before = w.detach().clone()
    with pytest.raises(TypeError, match="torch.int64 is not floating point"):
        opt.step()
    assert torch.equal(w, before) and torch.equal(counts, torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("name", ["sgd", "adamw", "adagrad"])
def test_meta_params_with_compile_fail_naming_the_cause(name):
    ps = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in SMALL]
    opt = ok.create(name, ps, compile=True, **contract_hp(name))
    for p in ps:
        p.grad = torch.empty_like(p)
    with pytest.raises(ValueError, match="compile=True cannot step meta-device parameters"):
        opt.step()
    assert len(opt.state) == 0
    eager = ok.create(name, ps, **contract_hp(name))  # eager steps on meta tensors (shapes only)
    eager.step()
    assert all(p.device.type == "meta" for p in ps)


# ---------------------------------------------------------------- (e) no per-step recompiles

def _sporadic_run(compile: bool, steps: int, **hp):
    """bf16 parameters with one fp32 parameter in the same group, some of them
    missing steps at random: the buckets (by step count and dtype) change from step
    to step. Returns the parameters and the optimizer."""
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 6), (6,), (4,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in shapes]
    ps.append(torch.nn.Parameter(torch.randn(6, generator=g)))  # e.g. a norm kept in fp32
    opt = ok.AdamW(ps, compile=compile, lr=1e-2, **hp)
    for _ in range(steps):
        for i, p in enumerate(ps):
            has = i == 0 or bool(torch.rand((), generator=g) < 0.6)
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype) if has else None
        opt.step()
    return ps, opt


@pytest.mark.parametrize("hp", [dict(bf16_compensation="stochastic_rounding"),
                                dict(bf16_compensation="stochastic_rounding", state_precision="q8",
                                     state_rounding="stochastic", min_quant_size=0)], ids=["sr", "sr-q8"])
def test_long_compiled_bf16_stochastic_rounding_run_never_recompiles(hp):
    """Buckets that change from step to step each get a kernel of their own (a few,
    compiled once each) instead of recompiling one kernel at every step."""
    import torch._dynamo

    with torch._dynamo.config.patch(error_on_recompile=True):
        ps, opt = _sporadic_run(True, 50, **hp)
    assert all(torch.isfinite(p).all() for p in ps)
    assert len(opt._kernels) <= 12


def test_compiled_kernel_hitting_the_recompile_limit_falls_back_to_eager():
    """A guard failure that the kernel key does not foresee (here: gradients with
    other strides) recompiles; past the limit the kernel warns once and runs eagerly,
    with the eager results."""
    import torch._dynamo

    a, b = make_params([(6, 4), (6, 4)]), make_params([(6, 4), (6, 4)])
    opt_c = ok.SGD(a, lr=0.1, momentum=0.9, compile=True)
    opt_e = ok.SGD(b, lr=0.1, momentum=0.9)
    stream = grad_stream(a, 5)
    with torch._dynamo.config.patch(recompile_limit=1):
        run_with_grads(opt_c, a, stream[:2])  # first step, then the momentum kernel
        run_with_grads(opt_e, b, stream[:2])
        with pytest.warns(RuntimeWarning, match="recompile limit"):
            for p, q, g in zip(a, b, stream[2]):  # same shapes, transposed strides
                p.grad, q.grad = g.t().contiguous().t(), g.clone()
            opt_c.step()
            opt_e.step()
        assert "eager" in opt_c._kernels.values()
        run_with_grads(opt_c, a, stream[3:])
        run_with_grads(opt_e, b, stream[3:])
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_compiled_kernels_per_family_are_capped_then_eager():
    """More bucket compositions than torch._dynamo.config.recompile_limit for one kernel
    family: the extra ones run eagerly, with a warning, and give the eager results."""
    import torch._dynamo

    shapes = [(3,), (4,), (5,)]
    a, b = make_params(shapes), make_params(shapes)
    opt_c = ok.SGD(a, lr=0.1, compile=True)
    opt_e = ok.SGD(b, lr=0.1)
    stream = grad_stream(a, 3)
    with torch._dynamo.config.patch(recompile_limit=2):
        with pytest.warns(RuntimeWarning, match="different buckets"):
            for step, grads in enumerate(stream):  # one parameter per step: three compositions
                for i, (p, q, g) in enumerate(zip(a, b, grads)):
                    p.grad = q.grad = g.clone() if i == step else None
                opt_c.step()
                opt_e.step()
    assert list(opt_c._kernels.values()).count("eager") == 1
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["adam", "rmsprop", "yogi"])
def test_compiled_bf16_compensation_with_l2_decay(name):
    """L2 decay adds fp32 working parameters to bf16 gradients: compiled steps used to
    fail (lerp_ of a bf16 state towards an fp32 value); the step now runs in fp32 in
    both modes, so compiled and eager agree to bf16 rounding."""
    results = []
    for compile in (False, True):
        ps = make_params(SMALL, dtype=torch.bfloat16)
        opt = ok.create(name, ps, compile=compile, bf16_compensation="kahan", **contract_hp(name))
        run_with_grads(opt, ps, grad_stream(ps, 4))
        results.append([p.detach().float() for p in ps])
    for e, c in zip(*results):
        torch.testing.assert_close(c, e, rtol=0, atol=2e-2)


# ---------------------------------------------------------------- (e) the training-loop habits

#: a few optimizers of different kinds (plain, sign, adaptive step size, preconditioned,
#: schedule-free) for the training-loop habits below
HABITS = ["adamw", "sgd", "lion", "prodigy", "soap", "schedulefree_adamw"]


def _tied_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(6, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 6))
    model[2].weight = model[0].weight  # tied input/output embedding
    return model


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (8,), generator=g)
    return torch.nn.functional.cross_entropy(model(ids), torch.randint(0, 6, (8,), generator=g))


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", HABITS)
def test_reduce_lr_on_plateau_lowers_the_lr_the_step_uses(name):
    params = make_params(SMALL)
    opt = ok.create(name, params, **contract_hp(name))
    lr0 = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for loss in (1.0, 1.0, 1.0):  # no improvement: cut after every plateaued epoch
        run_with_grads(opt, params, grad_stream(params, 1))
        sched.step(loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * 0.25)
    again = ok.create(name, make_params(SMALL), **contract_hp(name))
    torch.optim.lr_scheduler.ReduceLROnPlateau(again, factor=0.5, patience=0).load_state_dict(sched.state_dict())


def test_sequential_lr_warmup_then_cosine_equals_torch_adamw():
    """SequentialLR (LinearLR warmup, then CosineAnnealingLR) drives ok.AdamW exactly as
    it drives torch.optim.AdamW: the same lr at every step and bit-identical weights;
    the scheduler's state dict resumes it on a fresh optimizer."""
    def make(cls, params):
        opt = cls(params, lr=1e-2, weight_decay=0.1)
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
        return opt, torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[4])

    ours, theirs = make_params(SMALL), make_params(SMALL)
    opt, sched = make(ok.AdamW, ours)
    ref, ref_sched = make(torch.optim.AdamW, theirs)
    for step, grads in enumerate(grad_stream(ours, 12)):
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"], step
        assert _same(ours, theirs), f"weights differ at step {step}"
    again, again_sched = make(ok.AdamW, make_params(SMALL))
    again.load_state_dict(opt.state_dict())
    again_sched.load_state_dict(sched.state_dict())
    assert again.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("name", HABITS)
def test_swa_utils_average_the_iterates_and_swalr_sets_the_lr(name):
    from torch.optim.swa_utils import SWALR, AveragedModel

    model = torch.nn.Linear(3, 2)
    opt = ok.create(name, model.parameters(), **contract_hp(name))
    swa, swalr = AveragedModel(model), SWALR(opt, swa_lr=1e-3, anneal_epochs=1)
    snaps = []
    for i in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, generator=torch.Generator().manual_seed(i))).square().sum().backward()
        opt.step()
        swa.update_parameters(model)
        swalr.step()
        snaps.append(model.weight.detach().clone())
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    torch.testing.assert_close(swa.module.weight, torch.stack(snaps).mean(0))


@pytest.mark.parametrize("name", HABITS)
def test_grad_scaler_unscale_clip_and_inf_skip(name):
    """GradScaler's loop (scale, unscale_, clip_grad_norm_, step, update) equals the
    unscaled loop (the scale is a power of two), and a step with an inf gradient is
    skipped: parameters and optimizer state unchanged."""
    models = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [ok.create(name, m.parameters(), **contract_hp(name)) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for i in range(3):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
        for k, (m, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            loss = m(x).square().sum()
            if k == 0:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            if k == 0:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
    torch.testing.assert_close(list(models[0].parameters()), list(models[1].parameters()))
    before = [p.detach().clone() for p in models[0].parameters()]
    state = copy.deepcopy(opts[0].state_dict()["state"])
    opts[0].zero_grad()
    scaler.scale(models[0](torch.full((1, 3), float("inf"))).sum()).backward()
    scaler.step(opts[0])
    scaler.update()
    assert _same(before, models[0].parameters())
    assert scaler.get_scale() < 2.0 ** 8
    after = opts[0].state_dict()["state"]
    for pid, values in state.items():
        for key, v in values.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, after[pid][key]), key


@pytest.mark.parametrize("name", HABITS)
def test_zero_grad_set_to_none_and_frozen_params(name):
    params = make_params(SMALL)
    frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    opt = ok.create(name, params + [frozen], **contract_hp(name))
    run_with_grads(opt, params, grad_stream(params, 2))
    assert torch.equal(frozen, torch.ones(4)) and frozen.grad is None
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.zero_grad()  # torch's default: set_to_none=True
    assert all(p.grad is None for p in params)
    before = [p.detach().clone() for p in params]
    opt.step()  # no gradients: nothing moves
    assert _same(before, params)


@pytest.mark.parametrize("name", HABITS)
def test_add_param_group_mid_training_resumes_bit_exact(name):
    params = make_params(SMALL)
    extra = make_params([(4,)], seed=3)
    opt = ok.create(name, params, **contract_hp(name))
    run_with_grads(opt, params, grad_stream(params, 2))
    opt.add_param_group({"params": extra, "lr": opt.param_groups[0]["lr"] * 0.5})
    everything = params + extra
    run_with_grads(opt, everything, grad_stream(everything, 2, seed=5))
    copies = [p.detach().clone().requires_grad_() for p in everything]
    again = ok.create(name, copies[:len(params)], **contract_hp(name))
    again.add_param_group({"params": copies[len(params):]})
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[1]["lr"] == opt.param_groups[1]["lr"]
    stream = grad_stream(everything, 2, seed=7)
    run_with_grads(opt, everything, stream)
    run_with_grads(again, copies, stream)
    assert _same(everything, copies)


@pytest.mark.parametrize("name", HABITS)
def test_named_parameters_round_trip_their_names(name, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = ok.create(name, model.named_parameters(), **contract_hp(name))
    names = [n for n, _ in model.named_parameters()]
    assert opt.param_groups[0]["param_names"] == names
    for i in range(2):
        opt.zero_grad()
        model(torch.randn(5, 3, generator=torch.Generator().manual_seed(i))).square().mean().backward()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert saved["param_groups"][0]["param_names"] == names
    twin = copy.deepcopy(model)
    again = ok.create(name, twin.named_parameters(), **contract_hp(name))
    again.load_state_dict(saved)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(9))
    for m, o in ((model, opt), (twin, again)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    assert _same(model.parameters(), twin.parameters())


@pytest.mark.parametrize("name", HABITS)
def test_tied_weights_are_one_parameter_with_one_state(name):
    model = _tied_model()
    opt = ok.create(name, model.parameters(), **contract_hp(name))
    assert sum(p is model[0].weight for p in opt.param_groups[0]["params"]) == 1
    for i in range(3):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()
    assert model[2].weight is model[0].weight and torch.isfinite(model[0].weight).all()
    assert len(opt.state_dict()["state"]) == len(opt.param_groups[0]["params"])


@pytest.mark.parametrize("name, torch_cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_tied_weights_step_as_torch_optim(name, torch_cls):
    ours, theirs = _tied_model(), _tied_model()
    hp = contract_hp(name)
    opts = [ok.create(name, ours.parameters(), **hp), torch_cls(theirs.parameters(), **hp)]
    for i in range(3):
        for m, o in zip((ours, theirs), opts):
            o.zero_grad()
            _loss(m, i).backward()
            o.step()
    torch.testing.assert_close(list(ours.parameters()), list(theirs.parameters()))


# ---------------------------------------------------------------- (f) torch.optim's switches

@pytest.mark.parametrize("name", ok.available())
def test_torch_switches_are_accepted_and_change_nothing(name):
    """foreach/fused/differentiable/capturable, as torch users pass them by habit: in
    the signature, accepted, not kept in the groups; fused=True means compile=True."""
    sig = inspect.signature(ok.info(name).cls)
    assert {k: sig.parameters[k].default for k in ("foreach", "fused", "differentiable", "capturable")} \
        == {"foreach": None, "fused": None, "differentiable": False, "capturable": False}
    hp = contract_hp(name)
    for kw in ({"foreach": True}, {"foreach": False, "fused": False, "differentiable": False,
                                   "capturable": False}, {"fused": True}):
        opt = ok.create(name, make_params(SMALL), **hp, **kw)
        group = opt.param_groups[0]
        assert group["compile"] is bool(kw.get("fused"))
        assert not {"foreach", "fused", "differentiable", "capturable"} & set(group)


def test_foreach_false_steps_as_the_default():
    a, b = make_params(), make_params()
    opts = [ok.create("adamw", a), ok.create("adamw", b, foreach=False, fused=False)]
    stream = grad_stream(a, 3)
    for opt, ps in zip(opts, (a, b)):
        run_with_grads(opt, ps, stream)
    assert _same(a, b)


def test_fused_true_is_the_compiled_step():
    a, b = make_params(SMALL), make_params(SMALL)
    opts = [ok.create("adamw", a, compile=True), ok.create("adamw", b, fused=True)]
    stream = grad_stream(a, 2)
    for opt, ps in zip(opts, (a, b)):
        run_with_grads(opt, ps, stream)
    assert _same(a, b)


@pytest.mark.parametrize("kw, exc, match", [
    ({"fused": True, "compile": False}, ValueError, "fused=True.*compile=False"),
    ({"differentiable": True}, ValueError, "differentiable=True"),
    ({"capturable": True}, ValueError, "capturable=True"),
    ({"foreach": 1}, TypeError, "foreach"),
    ({"fused": "yes"}, TypeError, "fused"),
    ({"capturable": None}, TypeError, "capturable"),
])
def test_bad_torch_switches_are_refused_naming_them(kw, exc, match):
    with pytest.raises(exc, match=match):
        ok.create("adamw", make_params(SMALL), **kw)
    opt = ok.create("adamw", make_params(SMALL))
    with pytest.raises(exc, match=match):
        opt.add_param_group({"params": make_params([(2,)], seed=4), **kw})


def test_group_dict_switches_map_per_group():
    params = make_params(SMALL)
    opt = ok.create("adamw", [{"params": params[:1], "fused": True, "foreach": False},
                              {"params": params[1:]}])
    assert [g["compile"] for g in opt.param_groups] == [True, False]
    assert "fused" not in opt.param_groups[0] and "foreach" not in opt.param_groups[0]


@pytest.mark.parametrize("torch_kw", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_torch_optim_state_dicts_with_switches_load(torch_kw):
    """torch.optim keeps foreach/fused/differentiable/capturable in its param groups:
    its state dicts load, the switches are dropped, and the steps go on as torch's."""
    a, b = make_params(SMALL), make_params(SMALL)
    theirs = torch.optim.AdamW(a, lr=1e-2, **torch_kw)
    stream = grad_stream(a, 4)
    run_with_grads(theirs, a, stream[:2])
    saved = theirs.state_dict()
    assert {"foreach", "fused", "differentiable", "capturable"} <= set(saved["param_groups"][0])
    with torch.no_grad():
        for p, q in zip(b, a):
            p.copy_(q)
    ours = ok.create("adamw", b, lr=1e-2)
    ours.load_state_dict(saved)
    assert not {"foreach", "fused", "differentiable", "capturable"} & set(ours.param_groups[0])
    run_with_grads(theirs, a, stream[2:])
    run_with_grads(ours, b, stream[2:])
    torch.testing.assert_close(a, b)


def test_muon_param_groups_take_the_switches_per_group():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = ok.Muon(ok.muon_param_groups(model, adamw={"fused": True, "foreach": False}))
    assert {g["use_muon"]: g["compile"] for g in opt.param_groups} == {True: False, False: True}


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_copies_made_after_a_scheduler_attached_step_themselves(name):
    """An LR scheduler wraps ``opt.step`` in the instance (a wrapper that calls the
    optimizer it was made for). A deep copy or a pickle of the optimizer taken after
    that must step itself, not the original, as torch.optim's copies do."""
    import io

    params = make_params(SMALL)
    opt = ok.create(name, params, **contract_hp(name))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    grads = grad_stream(params, 3)
    run_with_grads(opt, params, grads[:1])
    sched.step()
    before = [p.detach().clone() for p in params]
    twin = copy.deepcopy(opt)
    buf = io.BytesIO()
    torch.save(opt, buf)                                  # a local wrapper function would not pickle
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        mine = [p for g in other.param_groups for p in g["params"]]
        run_with_grads(other, mine, grads[1:])
        for p, q in zip(params, before):
            assert torch.equal(p, q)                      # the original did not move
        assert not torch.equal(mine[0], before[0])
