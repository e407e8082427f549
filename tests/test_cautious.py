"""The generic ``cautious=`` flag (Cautious Optimizers, Liang et al. 2024) on C-AdamW.

``cautious=True`` (= ``"kozistr"``) zeroes the components of the final update
whose sign disagrees with the gradient and rescales the rest by
``numel / (kept + 1)`` (the original code, as ``pytorch_optimizer``);
``cautious="timm"`` rescales by ``1 / max(mean(mask), 1e-3)`` (timm's ``caution``).

Checked against a C-AdamW step written here in plain per-tensor torch, and
against ``pytorch-optimizer`` where installed. pytorch-optimizer 4.1 has no
cautious AdamW (its ``AdamW`` is torch's), but two of its cautious optimizers
reduce to C-AdamW: ``AdEMAMix(alpha=0, weight_decouple=True)`` exactly, and
``AdamP(delta=0)`` (the projection never fires) up to its placement of eps
(added to the uncorrected ``sqrt(v)``). Both mask the first moment ``m``; as the
Adam denominator is positive, that is the same mask as on the final update.
"""
from __future__ import annotations

import math

import pytest
import torch

import optimkit as ok
from helpers import grad_stream, make_params, run_with_grads, two_groups

STEPS = 60
SHAPES = [(5, 3), (7,), (2, 3, 4), (1,), (6, 6), (4, 2, 3, 3)]
GROUP1 = dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1)


def c_adamw_ref(params_groups, grads_per_step, mode):
    """C-AdamW from the equations, one tensor at a time; returns the final params."""
    out = []
    for group in params_groups:
        hp = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, **group["hp"]}
        b1, b2 = hp["betas"]
        for idx in group["idx"]:
            p = group["start"][idx].clone()
            m, v = torch.zeros_like(p), torch.zeros_like(p)
            for t, grads in enumerate(grads_per_step, start=1):
                g = grads[idx]
                p.mul_(1 - hp["lr"] * hp["weight_decay"])
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                u = (m / (1 - b1 ** t)) / (v.sqrt() / math.sqrt(1 - b2 ** t) + hp["eps"])
                mask = (u * g > 0).float()
                if mode == "timm":
                    scale = 1.0 / max(mask.mean().item(), 1e-3)
                else:
                    scale = mask.numel() / (mask.sum().item() + 1)
                p.sub_(hp["lr"] * u * mask * scale)
            out.append((idx, p))
    return [p for _, p in sorted(out, key=lambda x: x[0])]


def _run_optimkit(steps=STEPS, **hp):
    params = make_params(SHAPES)
    start = [p.detach().clone() for p in params]
    opt = ok.create("adamw", two_groups(params, **GROUP1), lr=1e-2, **hp)
    stream = grad_stream(params, steps)
    run_with_grads(opt, params, stream)
    return start, stream, params


@pytest.mark.parametrize("mode", [True, "kozistr", "timm"])
def test_c_adamw_matches_handwritten_reference(mode):
    start, stream, params = _run_optimkit(cautious=mode)
    groups = [{"idx": [0, 1], "hp": {}, "start": start},
              {"idx": list(range(2, len(SHAPES))), "hp": GROUP1, "start": start}]
    expected = c_adamw_ref(groups, stream, "timm" if mode == "timm" else "kozistr")
    for p, q in zip(params, expected):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    # caution changed the run: it is not plain AdamW
    _, _, plain = _run_optimkit()
    assert any(not torch.allclose(p, q) for p, q in zip(params, plain))


def test_kozistr_and_timm_rescalings_differ():
    _, _, a = _run_optimkit(steps=5, cautious=True)
    _, _, b = _run_optimkit(steps=5, cautious="timm")
    assert any(not torch.allclose(p, q) for p, q in zip(a, b))


def test_cautious_false_is_plain_adamw():
    _, _, a = _run_optimkit(steps=10, cautious=False)
    _, _, b = _run_optimkit(steps=10)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("peer", ["ademamix_alpha0", "adamp_delta0"])
def test_c_adamw_matches_pytorch_optimizer(peer):
    po = pytest.importorskip("pytorch_optimizer")  # pip: pytorch-optimizer
    start, stream, params = _run_optimkit(cautious=True)
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    groups = [{"params": theirs[:2]}, {"params": theirs[2:], **GROUP1}]
    if peer == "ademamix_alpha0":
        groups[1]["betas"] = (*GROUP1["betas"], 0.9999)
        opt = po.AdEMAMix(groups, lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=0.0, weight_decay=1e-2,
                          weight_decouple=True, cautious=True)
    else:  # eps placement differs (1e-8 vs 1e-8 / sqrt(1 - b2^t)): below the tolerance here
        opt = po.AdamP(groups, lr=1e-2, weight_decay=1e-2, weight_decouple=True, delta=0.0, cautious=True)
    run_with_grads(opt, theirs, stream)
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_mask_and_rescale_on_a_small_example():
    """SGD with momentum 0.9, lr 1: the second update b = 0.9 g1 + g2 = (-0.1, 0.1, 1.4, 0.9)
    agrees in sign with g2 = (-1, 1, 0.5, 0) on 3 of 4 components (a zero gradient is a
    disagreement)."""
    g1, g2 = torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.tensor([-1.0, 1.0, 0.5, 0.0])
    b = 0.9 * g1 + g2
    for mode, s1, s2 in (("kozistr", 4 / 5, 4 / 4), ("timm", 1.0, 4 / 3)):
        p = torch.nn.Parameter(torch.zeros(4))
        opt = ok.create("sgd", [p], lr=1.0, momentum=0.9, cautious=mode)
        p.grad = g1.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), -s1 * g1)
        p.grad = g2.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), -s1 * g1 - s2 * b * torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_all_components_disagree():
    """Nothing kept: the update is zero for both rescalings (timm's 1/1e-3 multiplies zeros)."""
    for mode in ("kozistr", "timm"):
        p = torch.nn.Parameter(torch.ones(3))
        opt = ok.create("sgd", [p], lr=1.0, momentum=0.9, cautious=mode)
        p.grad = torch.ones(3)
        opt.step()
        p.grad = -0.5 * torch.ones(3)  # b = 0.9 - 0.5 = 0.4 > 0 against g < 0 everywhere
        before = p.detach().clone()
        opt.step()
        assert torch.equal(p.detach(), before)


def test_maximize_masks_with_the_ascent_gradient():
    a, b = make_params(SHAPES), make_params(SHAPES)
    opt_a = ok.create("adamw", a, lr=1e-2, cautious=True, maximize=True)
    opt_b = ok.create("adamw", b, lr=1e-2, cautious=True)
    for grads in grad_stream(a, 8):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), -g
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["kozistr", "timm"])
def test_compiled_equals_eager(mode):
    a, b = make_params(SHAPES), make_params(SHAPES)
    opt_a = ok.create("adamw", two_groups(a, **GROUP1), lr=1e-2, cautious=mode)
    opt_b = ok.create("adamw", two_groups(b, **GROUP1), lr=1e-2, cautious=mode, compile=True)
    for grads in grad_stream(a, 8):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


def test_rejected_without_momentum():
    without = [n for n in ok.available() if not ok.info(n).cls.has_momentum]
    assert without, "expected some registered optimizer without momentum"
    for name in without:
        with pytest.raises(TypeError, match="cautious"):
            ok.create(name, make_params(), cautious=True)

    class NoMomentum(ok.Optimizer):  # unregistered (no name)
        defaults = dict(lr=1e-3)

        def build(self):
            return []

    with pytest.raises(TypeError, match="unexpected keyword argument 'cautious'"):
        NoMomentum(make_params(), cautious=True)
    assert "cautious" not in NoMomentum(make_params()).defaults


def test_invalid_cautious_value():
    with pytest.raises(ValueError, match="cautious"):
        ok.create("adamw", make_params(), cautious="sometimes")
