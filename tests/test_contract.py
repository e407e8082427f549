"""Properties every registered optimizer must have (parametrized over the registry)."""
from __future__ import annotations

import copy

import pytest
import torch

import optimkit as ok
from helpers import as_grad, grad_stream, make_params, mlp_problem, run_with_grads, train, two_groups
from optimizer_cases import contract_hp, gradient_names

NAMES = gradient_names()


def needs_graph(name: str) -> bool:
    return ok.info(name).cls.requires_create_graph


@pytest.mark.parametrize("name", NAMES)
def test_decreases_loss(name):
    model, loss_fn = mlp_problem()
    opt = ok.create(name, model.parameters(), **contract_hp(name))
    losses = train(model, loss_fn, opt, 60, create_graph=needs_graph(name))
    assert losses[-1] < 0.9 * losses[0], f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_exact(name):
    model, loss_fn = mlp_problem()
    start = copy.deepcopy(model)
    hp = contract_hp(name)
    graph = needs_graph(name)

    straight = copy.deepcopy(start)
    opt = ok.create(name, straight.parameters(), **hp)
    train(straight, loss_fn, opt, 20, create_graph=graph)

    first = copy.deepcopy(start)
    opt1 = ok.create(name, first.parameters(), **hp)
    train(first, loss_fn, opt1, 10, create_graph=graph)
    saved_model = copy.deepcopy(first.state_dict())
    saved_opt = copy.deepcopy(opt1.state_dict())
    del opt1, first

    resumed, _ = mlp_problem(seed=123)  # a fresh model with other weights, then loaded
    resumed.load_state_dict(saved_model)
    opt2 = ok.create(name, resumed.parameters(), **hp)
    opt2.load_state_dict(saved_opt)
    train(resumed, loss_fn, opt2, 10, create_graph=graph)

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name}: resumed run differs from the uninterrupted one"
    for sa, sb in zip(opt.state.values(), opt2.state.values()):
        for key in sa:
            va, vb = sa[key], sb[key]
            if isinstance(va, torch.Tensor):
                assert va.dtype == vb.dtype and torch.equal(va, vb), f"{name}: state {key} differs"


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_pickle_make_independent_equal_optimizers(name):
    """copy.deepcopy and torch.save/torch.load of a model with its optimizer give an
    optimizer that continues exactly as the original and shares nothing with it
    (fast-path plans and compiled kernels are rebuilt, never copied)."""
    import io

    model, loss_fn = mlp_problem()
    graph = needs_graph(name)
    try:  # q8 state (the Adam family's fast path keeps a plan of packed pointers)
        opt = ok.create(name, model.parameters(), **contract_hp(name), state_precision="q8", min_quant_size=0)
    except ValueError:  # e.g. centred RMSprop refuses quantized variance states
        opt = ok.create(name, model.parameters(), **contract_hp(name))
    train(model, loss_fn, opt, 3, create_graph=graph)
    copied_model, copied_opt = copy.deepcopy((model, opt))
    buf = io.BytesIO()
    torch.save((model, opt), buf)
    buf.seek(0)
    loaded_model, loaded_opt = torch.load(buf, weights_only=False)
    before = [{k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for s in opt.state.values()]
    for m, o in ((copied_model, copied_opt), (loaded_model, loaded_opt)):
        train(m, loss_fn, o, 3, create_graph=graph)
    for s, b in zip(opt.state.values(), before):  # the copies' steps left the original alone
        for k, v in b.items():
            assert torch.equal(s[k], v), f"{name}: a copy's step changed the original's {k}"
    train(model, loss_fn, opt, 3, create_graph=graph)
    for other in (copied_model, loaded_model):
        for a, b in zip(model.parameters(), other.parameters()):
            assert torch.equal(a, b), f"{name}: the copy continued differently"


@pytest.mark.parametrize("name", NAMES)
def test_respects_per_group_lr(name):
    params = make_params()
    opt = ok.create(name, two_groups(params), **contract_hp(name))
    stream = grad_stream(params, 6)
    run_with_grads(opt, params, stream[:3])
    opt.param_groups[1]["lr"] = 0.0
    frozen = [p.detach().clone() for p in params[2:]]
    moving = [p.detach().clone() for p in params[:2]]
    run_with_grads(opt, params, stream[3:])
    for p, q in zip(params[2:], frozen):
        assert torch.equal(p, q), f"{name}: a group with lr=0 changed"
    assert any(not torch.equal(p, q) for p, q in zip(params[:2], moving)), f"{name}: lr>0 group did not move"


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_value_is_used(name):
    """A torch scheduler changes lr; a run whose lr is halved must differ from one that is not."""
    a, b = make_params(), make_params()
    opt_a = ok.create(name, a, **contract_hp(name))
    opt_b = ok.create(name, b, **contract_hp(name))
    sched = torch.optim.lr_scheduler.StepLR(opt_b, step_size=1, gamma=0.5)
    stream = grad_stream(a, 4)
    for grads in stream:
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = as_grad(opt_a, p, g), as_grad(opt_b, q, g)
        opt_a.step()
        opt_b.step()
        sched.step()
    assert opt_b.param_groups[0]["lr"] == pytest.approx(opt_a.param_groups[0]["lr"] / 16)
    assert any(not torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("name", NAMES)
def test_all_grads_none_leaves_params_untouched(name):
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = ok.create(name, params, **contract_hp(name))
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert len(opt.state) == 0


@pytest.mark.parametrize("name", NAMES)
def test_params_without_grad_are_skipped(name):
    params = make_params()
    opt = ok.create(name, params, **contract_hp(name))
    stream = grad_stream(params, 3)
    before = params[1].detach().clone()
    for grads in stream:
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if i == 1 else as_grad(opt, p, g)
        opt.step()
    assert torch.equal(params[1], before)
    assert params[1] not in opt.state


@pytest.mark.parametrize("name", NAMES)
def test_maximize_equals_minimizing_the_negation(name):
    a, b = make_params(), make_params()
    opt_a = ok.create(name, a, maximize=True, **contract_hp(name))
    opt_b = ok.create(name, b, **contract_hp(name))
    for grads in grad_stream(a, 5):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = as_grad(opt_a, p, g), as_grad(opt_b, q, -g)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_complex_params_equal_their_real_view(name):
    g = torch.Generator().manual_seed(0)
    z = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.complex64, generator=g))
    r = torch.nn.Parameter(torch.view_as_real(z.detach().clone()).clone())
    if not getattr(ok.info(name).cls, "supports_complex", True):
        # refused when the optimizer is built, naming the cause (Muon: its matrix rule)
        with pytest.raises(TypeError, match="complex"):
            ok.create(name, [z], **contract_hp(name))
        return
    opt_z = ok.create(name, [z], **contract_hp(name))
    opt_r = ok.create(name, [r], **contract_hp(name))
    for _ in range(4):
        gz = torch.randn(6, 4, dtype=torch.complex64, generator=g)
        z.grad, r.grad = as_grad(opt_z, z, gz), as_grad(opt_r, r, torch.view_as_real(gz))
        opt_z.step()
        opt_r.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach())


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients(name):
    """Optimizers that torch.optim runs on sparse gradients (SGD, Adagrad) take them,
    without weight decay as torch; the others refuse them before changing anything."""
    emb = torch.nn.Embedding(10, 4, sparse=True)
    hp = contract_hp(name)
    if ok.info(name).cls.supports_sparse:
        hp["weight_decay"] = 0.0
    opt = ok.create(name, emb.parameters(), **hp)
    emb(torch.tensor([1, 2])).sum().backward()
    if ok.info(name).cls.supports_sparse:
        before = emb.weight.detach().clone()
        opt.step()
        rows = [0, 3, 4, 5, 6, 7, 8, 9]  # rows without gradient do not move on a first step
        assert torch.equal(emb.weight[rows], before[rows]) and not torch.equal(emb.weight, before)
    else:
        before = emb.weight.detach().clone()
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()
        assert torch.equal(before, emb.weight) and len(opt.state) == 0


@pytest.mark.parametrize("name", NAMES)
def test_closure_and_hooks(name):
    model, loss_fn = mlp_problem()
    opt = ok.create(name, model.parameters(), **contract_hp(name))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward(create_graph=needs_graph(name))
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]


# ---------------------------------------------------------------- bad input

def _invalid_cases(name):
    defaults = ok.info(name).defaults
    cases = []
    if "lr" in defaults:
        cases.append(("lr", -1.0, ValueError))
        cases.append(("lr", "0.1", TypeError))
    if "eps" in defaults and isinstance(defaults["eps"], float):
        cases.append(("eps", -1e-8, ValueError))
    if "weight_decay" in defaults:
        cases.append(("weight_decay", -0.1, ValueError))
    if "betas" in defaults:
        n = len(defaults["betas"])
        cases.append(("betas", (1.0,) + tuple(defaults["betas"][1:]), ValueError))
        cases.append(("betas", tuple(defaults["betas"][:-1]) + (-0.1,), ValueError))
    if "momentum" in defaults:
        cases.append(("momentum", -0.5, ValueError))
    cases.append(("maximize", "yes", TypeError))
    return cases


@pytest.mark.parametrize("name", NAMES)
def test_invalid_hyperparameters_raise_naming_the_argument(name):
    for key, value, exc in _invalid_cases(name):
        params = make_params()
        with pytest.raises(exc, match=key):
            ok.create(name, params, **{key: value})
        # the same value in a param group is rejected before the group is added
        opt = ok.create(name, params[:2])
        with pytest.raises(exc, match=key):
            opt.add_param_group({"params": params[2:], key: value})
        assert len(opt.param_groups) == 1 and len(opt.state) == 0


@pytest.mark.parametrize("name", NAMES)
def test_unknown_keyword_raises_type_error(name):
    with pytest.raises(TypeError, match="not_a_hyperparameter"):
        ok.create(name, make_params(), not_a_hyperparameter=1.0)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_equals_eager(name):
    """compile=True runs the same rule through torch.compile: equal within 1e-6 relative."""
    a, b = make_params(), make_params()
    opt_a = ok.create(name, two_groups(a, lr=contract_hp(name).get("lr", ok.info(name).defaults.get("lr", 1.0)) / 2),
                      **contract_hp(name))
    opt_b = ok.create(name, two_groups(b, lr=contract_hp(name).get("lr", ok.info(name).defaults.get("lr", 1.0)) / 2),
                      compile=True, **contract_hp(name))
    for grads in grad_stream(a, 6):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = as_grad(opt_a, p, g), as_grad(opt_b, q, g)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
