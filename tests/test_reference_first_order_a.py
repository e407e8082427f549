"""Lion, Adan, AdaBelief, DiffGrad, Yogi and ADOPT against independent references.

Each case runs 60 steps on mixed shapes in two param groups with different
hyperparameters and compares the parameters with:

* a reference step written here from the papers' equations (and the defaults /
  conventions of the authors' code), one tensor at a time in plain torch, so
  that something is checked even without the peer packages;
* the authors' or a peer package where it is pip-installable and faithful:
  ``lion-pytorch`` (lion_pytorch.Lion), ``pytorch-optimizer`` (Lion, Adan,
  AdaBelief), ``adabelief-pytorch`` (adabelief_pytorch.AdaBelief),
  ``torch-optimizer`` (DiffGrad, Yogi), ``torch-adopt`` (adopt.ADOPT).
  (``adan-pytorch`` is not used: it is a different early variant of Adan, not
  the authors' code, which is not on PyPI.)

and checks ``compile=True`` against eager on one case per optimizer.
"""
from __future__ import annotations

import math

import pytest
import torch

import optimkit as ok
from helpers import grad_stream, make_params, run_with_grads

STEPS = 60

pytestmark = [  # noise from the peer packages under torch 2.13
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Use _accelerator_graph_capture_health_check:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch._utils.is_compiling` is deprecated:UserWarning"),
]


# ----------------------------------------------------------------- hand-written references
# Each ``*_ref(p, g, st, hp, t, extra)`` updates one tensor ``p`` in place for step t (1-based).

def lion_ref(p, g, st, hp, t, extra):
    b1, b2 = hp["betas"]
    m = st.setdefault("m", torch.zeros_like(p))
    p.mul_(1 - hp["lr"] * hp["weight_decay"])
    c = b1 * m + (1 - b1) * g
    p.sub_(hp["lr"] * torch.sign(c))
    m.copy_(b2 * m + (1 - b2) * g)


def adan_global_clip(grads, hp):
    """sail-sg Adan: one clipping factor from the norm of all gradients (float32)."""
    if hp["max_grad_norm"] <= 0:
        return 1.0
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
    return torch.clamp(torch.tensor(hp["max_grad_norm"]) / (norm + hp["eps"]), max=1.0).item()


def adan_ref(p, g, st, hp, t, clip):
    b1, b2, b3 = hp["betas"]
    lr, wd, eps = hp["lr"], hp["weight_decay"], hp["eps"]
    g = g * clip
    if t == 1:
        st["m"], st["d"], st["n"] = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
        st["prev"] = g.clone()
    diff = g - st["prev"]
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["d"] = b2 * st["d"] + (1 - b2) * diff
    st["n"] = b3 * st["n"] + (1 - b3) * (g + b2 * diff) ** 2
    denom = st["n"].sqrt() / math.sqrt(1 - b3 ** t) + eps
    update = st["m"] / (1 - b1 ** t) / denom + b2 * st["d"] / (1 - b2 ** t) / denom
    if hp["no_prox"]:
        p.copy_(p * (1 - lr * wd) - lr * update)
    else:
        p.copy_((p - lr * update) / (1 + lr * wd))
    st["prev"] = g.clone()


def adabelief_ref(p, g, st, hp, t, extra):
    b1, b2 = hp["betas"]
    lr, wd, eps = hp["lr"], hp["weight_decay"], hp["eps"]
    if hp["weight_decouple"]:
        p.mul_(1 - wd if hp["fixed_decay"] else 1 - lr * wd)
    else:
        g = g + wd * p
    if t == 1:
        st["m"], st["s"], st["smax"] = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["s"] = b2 * st["s"] + (1 - b2) * (g - st["m"]) ** 2 + eps  # the belief, eps stored in it
    s = st["s"]
    if hp["amsgrad"]:
        st["smax"] = torch.maximum(st["smax"], st["s"])
        s = st["smax"]
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    if not hp["rectify"]:
        p.sub_(lr / bc1 * st["m"] / (s.sqrt() / math.sqrt(bc2) + eps))
        return
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2 ** t / bc2
    if rho >= 5:
        r = math.sqrt(bc2 * (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) / bc1
        p.sub_(lr * r * st["m"] / (s.sqrt() + eps))
    elif hp["degenerated_to_sgd"]:
        p.sub_(lr / bc1 * st["m"])


def diffgrad_ref(p, g, st, hp, t, extra):
    b1, b2 = hp["betas"]
    g = g + hp["weight_decay"] * p
    if t == 1:
        st["m"], st["v"], st["prev"] = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["v"] = b2 * st["v"] + (1 - b2) * g * g
    xi = 1 / (1 + torch.exp(-(st["prev"] - g).abs()))
    st["prev"] = g.clone()
    step = hp["lr"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    p.sub_(step * xi * st["m"] / (st["v"].sqrt() + hp["eps"]))


def yogi_ref(p, g, st, hp, t, extra):
    b1, b2 = hp["betas"]
    g = g + hp["weight_decay"] * p
    if t == 1:
        st["m"] = torch.full_like(p, hp["initial_accumulator"])
        st["v"] = torch.full_like(p, hp["initial_accumulator"])
    st["m"] = b1 * st["m"] + (1 - b1) * g
    g2 = g * g
    st["v"] = st["v"] - (1 - b2) * torch.sign(st["v"] - g2) * g2
    denom = st["v"].sqrt() / math.sqrt(1 - b2 ** t) + hp["eps"]
    p.sub_(hp["lr"] / (1 - b1 ** t) * st["m"] / denom)


def adopt_ref(p, g, st, hp, t, extra):
    b1, b2 = hp["betas"]
    lr, wd = hp["lr"], hp["weight_decay"]
    if not hp["decoupled"]:
        g = g + wd * p
    if t == 1:  # v_0 = g_0^2, no update
        st["m"], st["v"] = torch.zeros_like(p), g * g
        return
    if hp["decoupled"]:
        p.mul_(1 - lr * wd)
    bound = (t - 1) ** 0.25  # the authors' clip_lambda(step) with step = previous steps
    normed = torch.clamp(g / torch.clamp(st["v"].sqrt(), min=hp["eps"]), -bound, bound)
    st["m"] = b1 * st["m"] + (1 - b1) * normed
    p.sub_(lr * st["m"])
    st["v"] = b2 * st["v"] + (1 - b2) * g * g


REFS = {"lion": lion_ref, "adan": adan_ref, "adabelief": adabelief_ref, "diffgrad": diffgrad_ref,
        "yogi": yogi_ref, "adopt": adopt_ref}
PRE = {"adan": adan_global_clip}  # per-step work over all gradients before the groups step


# ----------------------------------------------------------------- peer packages
# name -> [(package label, factory(groups, shared) -> torch optimizer)], with
# optimkit argument names translated to the package's.

def _lion_pytorch(groups, shared):
    return pytest.importorskip("lion_pytorch").Lion(groups, **shared)


def _kozistr(cls_name, rename=None, fill=()):
    """pytorch_optimizer's class; ``fill``: flags whose optimkit default differs from the package's."""
    rename = rename or {}

    def make(groups, shared):
        pkg = pytest.importorskip("pytorch_optimizer")
        shared = {**{k: ok.info(cls_name.lower()).defaults[k] for k in fill}, **shared}
        tr = lambda d: {rename.get(k, k): v for k, v in d.items()}  # noqa: E731
        return getattr(pkg, cls_name)([tr(g) for g in groups], foreach=False, **tr(shared))

    return make


def _adabelief_pytorch(groups, shared):
    return pytest.importorskip("adabelief_pytorch").AdaBelief(groups, print_change_log=False, **shared)


def _torch_optimizer(cls_name):
    def make(groups, shared):
        return getattr(pytest.importorskip("torch_optimizer"), cls_name)(groups, **shared)

    return make


def _torch_adopt(groups, shared):
    rename = lambda d: {("decouple" if k == "decoupled" else k): v for k, v in d.items()}  # noqa: E731
    return pytest.importorskip("adopt").ADOPT([rename(g) for g in groups], **rename(shared))


PACKAGES = {
    "lion": {"lion-pytorch": _lion_pytorch, "pytorch-optimizer": _kozistr("Lion")},
    "adan": {"pytorch-optimizer": _kozistr("Adan", {"no_prox": "weight_decouple"})},
    "adabelief": {"adabelief-pytorch": _adabelief_pytorch,
                  "pytorch-optimizer": _kozistr("AdaBelief", {"amsgrad": "ams_bound"}, fill=("rectify",))},
    "diffgrad": {"torch-optimizer": _torch_optimizer("DiffGrad")},
    "yogi": {"torch-optimizer": _torch_optimizer("Yogi")},
    "adopt": {"torch-adopt": _torch_adopt},
}

# (name, hyperparameters shared by both groups, overrides for the second group, packages that apply)
ALL = None
CASES = [
    ("lion", dict(lr=1e-3), dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.1), ALL),
    ("lion", dict(lr=1e-3, weight_decay=0.5), dict(lr=2e-3, betas=(0.5, 0.9)), ALL),
    # weight decay large enough that (1 + lr wd)^-1 and 1 - lr wd differ visibly
    ("adan", dict(lr=1e-2, weight_decay=0.5), dict(lr=3e-3, betas=(0.9, 0.9, 0.999), weight_decay=0.1), ALL),
    ("adan", dict(lr=1e-2, weight_decay=0.5, no_prox=True), dict(lr=3e-3, eps=1e-6), ALL),
    # the gradient norm is about 8.5: some steps are clipped, others not
    ("adan", dict(lr=1e-2, max_grad_norm=8.5, weight_decay=0.02), dict(lr=3e-3, betas=(0.9, 0.8, 0.9)), ALL),
    ("adabelief", dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1), ALL),
    # betas[1] = 0.6: rho_inf = 4, never rectified (SGD-like steps throughout)
    ("adabelief", dict(lr=1e-2, weight_decay=0.01, weight_decouple=False),
     dict(lr=3e-3, betas=(0.9, 0.6), eps=1e-8), ALL),
    ("adabelief", dict(lr=1e-2, rectify=False, weight_decay=0.01), dict(lr=3e-3, eps=1e-8, amsgrad=True), ALL),
    ("adabelief", dict(lr=1e-2, fixed_decay=True, weight_decay=0.01, degenerated_to_sgd=False),
     dict(betas=(0.5, 0.9)), ALL),
    # adabelief_pytorch ignores the running max in its rectified branch; pytorch_optimizer uses it
    ("adabelief", dict(lr=1e-2, amsgrad=True), dict(lr=3e-3, betas=(0.8, 0.99)), ("pytorch-optimizer",)),
    ("diffgrad", dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1), ALL),
    ("diffgrad", dict(lr=1e-2, eps=1e-6, weight_decay=0.01), dict(betas=(0.5, 0.9)), ALL),
    ("yogi", dict(), dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1), ALL),
    ("yogi", dict(lr=0.05, eps=1e-6, initial_accumulator=0.1), dict(weight_decay=0.01, initial_accumulator=0.0),
     ALL),
    ("adopt", dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1), ALL),
    ("adopt", dict(lr=1e-2, decoupled=True, weight_decay=0.1), dict(lr=3e-3, eps=1e-3), ALL),
]


def _ids(case):
    return f"{case[0]}-{'-'.join(f'{k}={v}' for k, v in {**case[1], **case[2]}.items())}"


def _groups(params, over):
    return [{"params": params[:2]}, {"params": params[2:], **over}]


def _optimkit_run(name, shared, over, steps=STEPS, **extra):
    params = make_params()
    opt = ok.create(name, _groups(params, over), **shared, **extra)
    run_with_grads(opt, params, grad_stream(params, steps))
    return params


def _reference_run(name, shared, over, steps=STEPS):
    params = [p.detach().clone() for p in make_params()]
    defaults = {**ok.info(name).defaults, **shared}
    groups = [(range(0, 2), defaults), (range(2, len(params)), {**defaults, **over})]
    states = [dict() for _ in params]
    for t, grads in enumerate(grad_stream(params, steps), start=1):
        extra = PRE[name](grads, defaults) if name in PRE else None
        for idx, hp in groups:
            for i in idx:
                REFS[name](params[i], grads[i].clone(), states[i], hp, t, extra)
    return params


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_equations(case):
    name, shared, over, _ = case
    got = _optimkit_run(name, shared, over)
    want = _reference_run(name, shared, over)
    for p, q in zip(got, want):
        torch.testing.assert_close(p.detach(), q)


PACKAGE_CASES = [(pkg, case) for case in CASES for pkg in PACKAGES[case[0]]
                 if case[3] is ALL or pkg in case[3]]


@pytest.mark.parametrize("pkg,case", PACKAGE_CASES, ids=[f"{pkg}-{_ids(c)}" for pkg, c in PACKAGE_CASES])
def test_matches_package(pkg, case):
    name, shared, over, _ = case
    params = make_params()
    ref = PACKAGES[name][pkg](_groups(params, over), dict(shared))
    run_with_grads(ref, params, grad_stream(params, STEPS))
    got = _optimkit_run(name, shared, over)
    for p, q in zip(got, params):
        torch.testing.assert_close(p.detach(), q.detach())


COMPILE_CASES = {  # one case per optimizer, chosen to exercise its static branches
    "lion": (dict(lr=1e-3, weight_decay=0.1), dict(lr=3e-4)),
    "adan": (dict(lr=1e-2, max_grad_norm=8.5, weight_decay=0.02), dict(lr=3e-3, no_prox=True)),
    "adabelief": (dict(lr=1e-2, weight_decay=0.01), dict(lr=3e-3, amsgrad=True)),
    "diffgrad": (dict(lr=1e-2, weight_decay=0.01), dict(lr=3e-3)),
    "yogi": (dict(weight_decay=0.01), dict(lr=3e-3, initial_accumulator=0.1)),
    "adopt": (dict(lr=1e-2, decoupled=True, weight_decay=0.1), dict(lr=3e-3)),
}


@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_compiled_equals_eager(name):
    shared, over = COMPILE_CASES[name]
    eager = _optimkit_run(name, shared, over, steps=10)
    compiled = _optimkit_run(name, shared, over, steps=10, compile=True)
    for p, q in zip(compiled, eager):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)


def test_adopt_first_step_only_initialises_the_second_moment():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = ok.create("adopt", params, lr=1e-2, weight_decay=0.1, decoupled=True)
    grads = grad_stream(params, 2)
    run_with_grads(opt, params, grads[:1])
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    for p, g in zip(params, grads[0]):
        assert torch.equal(opt.state[p]["exp_avg_sq"], g * g)
        assert not opt.state[p]["exp_avg"].any()
    run_with_grads(opt, params, grads[1:])
    assert all(not torch.equal(p, q) for p, q in zip(params, before))


def test_adan_clips_by_the_norm_over_all_groups():
    """max_grad_norm uses one norm over every group, so splitting params into groups changes nothing."""
    a, b = make_params(), make_params()
    opt_a = ok.create("adan", a, lr=1e-2, max_grad_norm=1.0)
    opt_b = ok.create("adan", _groups(b, {}), lr=1e-2, max_grad_norm=1.0)
    stream = grad_stream(a, 5)
    run_with_grads(opt_a, a, stream)
    run_with_grads(opt_b, b, stream)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)
