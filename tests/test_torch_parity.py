"""Parity with torch.optim: same gradients, 100 steps, two param groups with
different hyperparameters and mixed shapes, default float32 tolerances, eager
and compiled."""
from __future__ import annotations

import pytest
import torch

import optimkit as ok
from helpers import grad_stream, make_params, run_with_grads

# (optimkit name, torch class, shared hyperparameters, overrides for the second group)
CASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.05), dict(lr=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01), dict(dampening=0.3)),
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), dict(lr=0.01, weight_decay=0.1)),
    ("adam", torch.optim.Adam, dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1)),
    ("adam", torch.optim.Adam, dict(lr=1e-2, amsgrad=True), dict(eps=1e-6)),
    ("adam", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True), dict(lr=1e-3)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2), dict(weight_decay=0.1, betas=(0.5, 0.9))),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, amsgrad=True), dict(weight_decay=0.0)),
    ("amsgrad", torch.optim.Adam, dict(lr=1e-2, amsgrad=True), dict(lr=1e-3)),
    ("nadam", torch.optim.NAdam, dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1)),
    ("nadam", torch.optim.NAdam, dict(lr=1e-2, momentum_decay=0.05), dict(eps=1e-6, weight_decay=0.01)),
    ("nadam", torch.optim.NAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
     dict(lr=1e-3, momentum_decay=0.0)),
    # betas[1] = 0.999 rectifies from step 6, 0.99 from step 5; 0.6 never (rho_inf = 4)
    ("radam", torch.optim.RAdam, dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1)),
    ("radam", torch.optim.RAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
     dict(lr=1e-3, eps=1e-6)),
    ("radam", torch.optim.RAdam, dict(lr=1e-2, betas=(0.9, 0.6)), dict(betas=(0.5, 0.99))),
    ("adamax", torch.optim.Adamax, dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1)),
    ("adamax", torch.optim.Adamax, dict(lr=1e-2, eps=1e-3), dict(weight_decay=0.01, betas=(0.5, 0.9))),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.05), dict(lr=0.01, weight_decay=0.1)),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1),
     dict(eps=1e-6, lr_decay=0.0)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2), dict(lr=3e-3, alpha=0.9, weight_decay=0.1)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, momentum=0.9), dict(weight_decay=0.01, eps=1e-6)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, centered=True), dict(momentum=0.5, alpha=0.95)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-3, centered=True, momentum=0.9, weight_decay=0.01),
     dict(lr=1e-2, centered=False)),
    ("adadelta", torch.optim.Adadelta, dict(), dict(lr=0.5, weight_decay=0.1)),
    ("adadelta", torch.optim.Adadelta, dict(lr=0.5, rho=0.95), dict(eps=1e-4, rho=0.5)),
]


def _ids(case):
    return f"{case[0]}-{'-'.join(f'{k}={v}' for k, v in {**case[2], **case[3]}.items())}"


def _run(factory, steps):
    params = make_params()
    groups = [{"params": params[:2]}, {"params": params[2:]}]
    opt = factory(groups)
    run_with_grads(opt, params, grad_stream(params, steps))
    return params, opt


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_torch(case, compiled):
    name, torch_cls, hp, second = case
    steps = 100

    def ours(groups):
        groups[1].update(second)
        return ok.create(name, groups, compile=compiled, **hp)

    def theirs(groups):
        groups[1].update(second)
        return torch_cls(groups, **hp)

    mine, _ = _run(ours, steps)
    ref, _ = _run(theirs, steps)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_adagrad_sparse_matches_torch(compiled):
    """Sparse embedding gradients: optimkit densifies them; torch.optim.Adagrad takes its sparse path."""
    weights = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    embs = [torch.nn.Embedding(12, 4, sparse=True) for _ in range(2)]
    for e in embs:
        e.weight.data.copy_(weights)
    hp = dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)
    opts = [ok.create("adagrad", embs[0].parameters(), compile=compiled, **hp),
            torch.optim.Adagrad(embs[1].parameters(), **hp)]
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        idx = torch.randint(0, 12, (5,), generator=g)  # repeated indices and untouched rows
        target = torch.randn(5, 4, generator=g)
        for e, opt in zip(embs, opts):
            opt.zero_grad()
            ((e(idx) - target) ** 2).sum().backward()
            assert e.weight.grad.is_sparse
            opt.step()
    torch.testing.assert_close(embs[0].weight, embs[1].weight)


def test_adagrad_rejects_weight_decay_with_sparse_grads():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    before = emb.weight.detach().clone()
    opt = ok.create("adagrad", emb.parameters(), weight_decay=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="weight_decay"):
        opt.step()
    assert torch.equal(emb.weight, before) and len(opt.state) == 0
