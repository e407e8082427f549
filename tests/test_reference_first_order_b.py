"""AdamP, SGDP, Grams, LAMB, LARS and AdEMAMix against independent references.

Each case runs 60 steps on mixed shapes (1-D, 2-D, 3-D and 4-D conv-like
tensors) in two param groups with different hyperparameters and compares the
parameters with:

* a reference step written here from the papers' equations (with the
  conventions of the authors' code), one tensor at a time in plain torch;
* the authors' or a peer package where it is pip-installable and faithful:
  ``adamp`` (adamp.AdamP / SGDP, the authors'), ``grams-pytorch``
  (grams.Grams, the authors'), ``torch-optimizer`` (torch_optimizer.Lamb),
  ``pytorch-optimizer`` (pytorch_optimizer.LARS and AdEMAMix).
  (apple/ml-ademamix is not on PyPI; ``bitsandbytes.optim.LARS`` is a
  different rule, SGD with update-norm clipping.)

and checks ``compile=True`` against eager on one case per optimizer.
"""
from __future__ import annotations

import math

import pytest
import torch

import optimkit as ok

STEPS = 60

# Group 0 gets the first SPLIT tensors, group 1 the rest; both hold 1-D and N-D tensors.
SHAPES = [(4, 3, 3, 3), (6, 5), (7,), (3, 4, 2), (5, 2, 3, 3), (6,), (5, 8), (4,)]
SPLIT = 4


# ----------------------------------------------------------------- gradient streams

def random_grads(params, gen, t):
    return [torch.randn(p.shape, generator=gen) for p in params]


def _orthogonal(g, p, rows):
    """``g`` minus its component along ``p`` in each of ``rows`` rows."""
    gv, pv = g.reshape(rows, -1), p.reshape(rows, -1)
    gv = gv - pv * (gv * pv).sum(1, keepdim=True) / (pv * pv).sum(1, keepdim=True)
    return gv.reshape(g.shape)


# how the AdamP/SGDP stream makes each tensor's gradient: orthogonal to the
# weight per output channel, orthogonal to the whole tensor, or free
ADAMP_MODES = ["channel", "layer", "free", "channel", "layer", "free", "free", "free"]


def scale_invariant_grads(params, gen, t):
    """Random gradients, made orthogonal to the weights (as for weights followed by a
    normalization layer) channel-wise or layer-wise for some tensors, so that both
    projections of AdamP/SGDP fire; computed from the reference's current weights."""
    out = []
    for p, mode in zip(params, ADAMP_MODES):
        g = torch.randn(p.shape, generator=gen)
        p = p.detach()
        if mode == "channel":
            g = _orthogonal(g, p, p.shape[0])
        elif mode == "layer":
            g = _orthogonal(g, p, 1)
        out.append(g)
    return out


# ----------------------------------------------------------------- hand-written references
# ``*_ref(p, g, st, hp, t)`` updates one tensor ``p`` in place for step t (1-based).

def _cos_max(g, p, rows, eps):
    gv, pv = g.reshape(rows, -1), p.reshape(rows, -1)
    cos = (gv * pv).sum(1) / (gv.norm(dim=1).clamp_min(eps) * pv.norm(dim=1).clamp_min(eps))
    return cos.abs().max().item(), pv.shape[1]


def _project(p, g, u, hp, st):
    """AdamP's projection; returns (u, weight-decay factor) and counts which branch fired."""
    if p.ndim <= 1:
        return u, 1.0
    for rows, kind in ((p.shape[0], "channel"), (1, "layer")):
        cos, dim = _cos_max(g, p, rows, hp["eps"])
        if cos < hp["delta"] / math.sqrt(dim):
            pv, uv = p.reshape(rows, -1), u.reshape(rows, -1)
            pn = pv / (pv.norm(dim=1, keepdim=True) + hp["eps"])
            u = (uv - pn * (pn * uv).sum(1, keepdim=True)).reshape(p.shape)
            st.setdefault("hits", []).append(kind)
            return u, hp["wd_ratio"]
    st.setdefault("hits", []).append("none")
    return u, 1.0


def adamp_ref(p, g, st, hp, t):
    b1, b2 = hp["betas"]
    if t == 1:
        st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["v"] = b2 * st["v"] + (1 - b2) * g * g
    den = st["v"].sqrt() / math.sqrt(1 - b2 ** t) + hp["eps"]
    num = b1 * st["m"] + (1 - b1) * g if hp["nesterov"] else st["m"]
    u, factor = _project(p, g, num / den, hp, st)
    p.mul_(1 - hp["lr"] * hp["weight_decay"] * factor)
    p.sub_(hp["lr"] / (1 - b1 ** t) * u)


def sgdp_ref(p, g, st, hp, t):
    mu, damp = hp["momentum"], hp["dampening"]
    if t == 1:
        st["b"] = torch.zeros_like(p)
    st["b"] = mu * st["b"] + (1 - damp) * g
    u = g + mu * st["b"] if hp["nesterov"] else st["b"]
    u, factor = _project(p, g, u, hp, st)
    if not hp["nesterov"]:
        st["b"] = u  # the authors' code projects the update in place, and it is the buffer
    p.mul_(1 - hp["lr"] * hp["weight_decay"] * factor / (1 - mu))
    p.sub_(hp["lr"] * u)


def grams_ref(p, g, st, hp, t):
    b1, b2 = hp["betas"]
    if t == 1:
        st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
    p.mul_(1 - hp["lr"] * hp["weight_decay"])
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["v"] = b2 * st["v"] + (1 - b2) * g * g
    s = math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if hp["correct_bias"] else 1.0
    p.sub_(hp["lr"] * s * torch.sign(g) * st["m"].abs() / (st["v"].sqrt() + hp["eps"]))


def lamb_ref(p, g, st, hp, t):
    b1, b2 = hp["betas"]
    if t == 1:
        st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["v"] = b2 * st["v"] + (1 - b2) * g * g
    r = st["m"] / (st["v"].sqrt() + hp["eps"]) + hp["weight_decay"] * p
    w_norm = min(p.norm().item(), hp["clamp_value"])
    r_norm = r.norm().item()
    trust = 1.0 if (w_norm == 0 or r_norm == 0 or hp["adam"]) else w_norm / r_norm
    st["clamped"] = st.get("clamped", 0) + (p.norm().item() > hp["clamp_value"])
    s = math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if hp["debias"] else 1.0
    p.sub_(hp["lr"] * s * trust * r)


def lars_ref(p, g, st, hp, t):
    mu, wd = hp["momentum"], hp["weight_decay"]
    if t == 1:
        st["b"] = torch.zeros_like(p)
    if p.ndim > 1 or not hp["exclude_1d"]:
        w_norm, g_norm = p.norm().item(), g.norm().item()
        den = g_norm + wd * w_norm
        local = hp["trust_coefficient"] * w_norm / den if (w_norm > 0 and den > 0) else 1.0
        g = local * (g + wd * p)
    st["b"] = mu * st["b"] + (1 - hp["dampening"]) * g
    p.sub_(hp["lr"] * (g + mu * st["b"] if hp["nesterov"] else st["b"]))


def _ademamix_beta3(t, b1, b3, warmup):
    """The half-life warmup of beta3 in closed form: 1/ln(b) is interpolated linearly."""
    if warmup is None or t >= warmup:
        return b3
    a = t / warmup
    return math.exp(1.0 / ((1 - a) / math.log(b1) + a / math.log(b3)))


def ademamix_ref(p, g, st, hp, t):
    b1, b2, b3 = hp["betas"]
    if t == 1:
        st["m1"], st["m2"], st["v"] = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    aw = hp["alpha_warmup"]
    alpha = hp["alpha"] * min(t / aw, 1.0) if aw is not None else hp["alpha"]
    b3t = _ademamix_beta3(t, b1, b3, hp["beta3_warmup"])
    st["m1"] = b1 * st["m1"] + (1 - b1) * g
    st["m2"] = b3t * st["m2"] + (1 - b3t) * g
    st["v"] = b2 * st["v"] + (1 - b2) * g * g
    den = st["v"].sqrt() / math.sqrt(1 - b2 ** t) + hp["eps"]
    u = (st["m1"] / (1 - b1 ** t) + alpha * st["m2"]) / den + hp["weight_decay"] * p
    p.sub_(hp["lr"] * u)


class Reference(torch.optim.Optimizer):
    """Runs a per-tensor reference step; every hyperparameter is given explicitly."""

    def __init__(self, params, step_fn, **hp):
        self.step_fn = step_fn
        super().__init__(params, hp)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                st["t"] = st.get("t", 0) + 1
                self.step_fn(p, p.grad, st, group, st["t"])


# The references' defaults (from the authors' code), given in full to the hand-written references.
REF_DEFAULTS = {
    "adamp": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1,
                  nesterov=False),
    "sgdp": dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, eps=1e-8,
                 delta=0.1, wd_ratio=0.1),
    "grams": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True),
    "lamb": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, clamp_value=10.0, adam=False,
                 debias=False),
    "lars": dict(lr=1e-3, weight_decay=0.0, momentum=0.9, dampening=0.0, trust_coefficient=1e-3,
                 nesterov=False, exclude_1d=True),
    "ademamix": dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None, alpha_warmup=None,
                     eps=1e-8, weight_decay=0.0),
}
REF_STEPS = {"adamp": adamp_ref, "sgdp": sgdp_ref, "grams": grams_ref, "lamb": lamb_ref,
             "lars": lars_ref, "ademamix": ademamix_ref}
GRADS = {"adamp": scale_invariant_grads, "sgdp": scale_invariant_grads}


# ----------------------------------------------------------------- harness

def _initial(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ts = [torch.randn(s, generator=gen) for s in SHAPES]
    ts[5].zero_()  # a zero-initialised bias: exercises the "norm is 0" rules of LAMB/LARS
    return ts


def _groups(params, hp0, hp1):
    return [{"params": params[:SPLIT], **hp0}, {"params": params[SPLIT:], **hp1}]


def run(factories, hp0, hp1, grad_fn=random_grads, steps=STEPS):
    """Run each factory(groups) on copies of the same weights with the same gradients;
    gradients are generated from the first run's weights. Returns (params, optimizers)."""
    start = _initial()
    runs = [[torch.nn.Parameter(t.clone()) for t in start] for _ in factories]
    opts = [f(_groups(ps, hp0, hp1)) for f, ps in zip(factories, runs)]
    gen = torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        grads = grad_fn(runs[0], gen, t)
        for ps, opt in zip(runs, opts):
            for p, g in zip(ps, grads):
                p.grad = g.clone()  # some references modify the gradient in place
            opt.step()
    return runs, opts


def reference(name, **shared):
    return lambda groups: Reference(groups, REF_STEPS[name], **{**REF_DEFAULTS[name], **shared})


def optimkit(name, **shared):
    return lambda groups: ok.create(name, groups, **shared)


def assert_runs_close(runs, rtol=1e-5, atol=1e-6):
    for ps in runs[1:]:
        for i, (p, q) in enumerate(zip(runs[0], ps)):
            torch.testing.assert_close(q, p, rtol=rtol, atol=atol, msg=lambda m: f"tensor {i}: {m}")


# (name, shared hyperparameters, group-0 overrides, group-1 overrides)
CASES = [
    ("adamp", dict(lr=1e-2), dict(weight_decay=0.1),
     dict(lr=3e-3, betas=(0.8, 0.99), delta=0.2, wd_ratio=0.5, eps=1e-6)),
    ("adamp", dict(lr=1e-2, nesterov=True, weight_decay=0.05), dict(), dict(betas=(0.5, 0.9), wd_ratio=0.0)),
    ("sgdp", dict(lr=0.05, momentum=0.9, weight_decay=0.01), dict(),
     dict(lr=0.02, momentum=0.5, dampening=0.1, delta=0.2, wd_ratio=0.5)),
    ("sgdp", dict(lr=0.05, nesterov=True, momentum=0.9), dict(weight_decay=0.1), dict(momentum=0.0)),
    ("grams", dict(lr=1e-2), dict(weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-8)),
    ("grams", dict(lr=1e-2, correct_bias=False), dict(weight_decay=0.01), dict(betas=(0.5, 0.9))),
    ("lamb", dict(lr=1e-2), dict(weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-8)),
    ("lamb", dict(lr=1e-2, debias=True, clamp_value=2.0), dict(weight_decay=0.01), dict(betas=(0.5, 0.9))),
    ("lamb", dict(lr=1e-2, adam=True, weight_decay=0.1), dict(), dict(eps=1e-3)),
    ("lars", dict(lr=0.1, trust_coefficient=0.02), dict(weight_decay=0.01),
     dict(lr=0.05, momentum=0.5, dampening=0.1, trust_coefficient=1e-3)),
    ("lars", dict(lr=0.1, nesterov=True, weight_decay=0.05), dict(), dict(momentum=0.0, trust_coefficient=0.1)),
    ("lars", dict(lr=0.1, exclude_1d=False, trust_coefficient=0.02), dict(weight_decay=0.1),
     dict(nesterov=True)),
    ("ademamix", dict(lr=1e-2), dict(weight_decay=0.1),
     dict(lr=3e-3, betas=(0.8, 0.99, 0.999), alpha=5.0, eps=1e-6)),
    ("ademamix", dict(lr=1e-2, weight_decay=0.01), dict(alpha_warmup=20, beta3_warmup=30),
     dict(betas=(0.5, 0.9, 0.99), alpha_warmup=80, beta3_warmup=10)),
]


def _ids(case):
    name, shared, hp0, hp1 = case
    return f"{name}-{'-'.join(f'{k}={v}' for k, v in shared.items())}|{hp0}|{hp1}".replace(" ", "")


# ----------------------------------------------------------------- tests: hand-written references

@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_handwritten_reference(case):
    name, shared, hp0, hp1 = case
    runs, opts = run([reference(name, **shared), optimkit(name, **shared)], hp0, hp1,
                     grad_fn=GRADS.get(name, random_grads))
    assert_runs_close(runs)
    ref_state = opts[0].state
    if name in ("adamp", "sgdp"):  # the stream makes every branch of the projection fire
        hits = [h for st in ref_state.values() for h in st.get("hits", [])]
        assert {"channel", "layer", "none"} <= set(hits), set(hits)
    if name == "lamb" and shared.get("clamp_value"):
        assert any(st["clamped"] for st in ref_state.values())


def test_defaults_match_the_references():
    for name, defaults in REF_DEFAULTS.items():
        assert ok.info(name).defaults == defaults, name


def test_projection_removes_the_radial_part_of_matrices_only():
    """SGDP, momentum 0.9: a radial gradient, then one tangential to every row. On a matrix the
    second update loses the radial momentum (channel-wise projection) and weight decay is scaled
    by wd_ratio; the same rows as 1-D tensors are not projected."""
    w = torch.nn.Parameter(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    rows = [torch.nn.Parameter(torch.tensor([2.0, 0.0])), torch.nn.Parameter(torch.tensor([0.0, 3.0]))]
    hp = dict(lr=0.1, momentum=0.9, weight_decay=0.1, wd_ratio=0.5)
    opt_w, opt_rows = ok.create("sgdp", [w], **hp), ok.create("sgdp", rows, **hp)
    wd = 0.1 * 0.1 / (1 - 0.9)  # lr * weight_decay / (1 - momentum)
    expected = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    for g, projected in ((torch.eye(2), False), (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), True)):
        w.grad = g.clone()
        rows[0].grad, rows[1].grad = g[0].clone(), g[1].clone()
        opt_w.step()
        opt_rows.step()
        if not projected:
            buf = g.clone()
            expected = expected * (1 - wd) - 0.1 * buf
            torch.testing.assert_close(w.detach(), expected)
            torch.testing.assert_close(torch.stack([r.detach() for r in rows]), expected)
        else:
            buf = 0.9 * buf + g
            exp_rows = expected * (1 - wd) - 0.1 * buf
            exp_w = expected * (1 - 0.5 * wd) - 0.1 * g  # only the tangential part moves
            torch.testing.assert_close(w.detach(), exp_w)
            torch.testing.assert_close(torch.stack([r.detach() for r in rows]), exp_rows)


# ----------------------------------------------------------------- tests: peer packages

def _peer_groups_run(name, peer_factory, shared_ok, hp0, hp1, grad_fn=random_grads):
    runs, _ = run([peer_factory, optimkit(name, **shared_ok)], hp0, hp1, grad_fn=grad_fn)
    assert_runs_close(runs)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("adamp", "sgdp")], ids=_ids)
def test_adamp_sgdp_match_authors_package(case):
    adamp = pytest.importorskip("adamp")  # pip: adamp
    name, shared, hp0, hp1 = case
    cls = adamp.AdamP if name == "adamp" else adamp.SGDP
    _peer_groups_run(name, lambda groups: cls(groups, **shared), shared, hp0, hp1, scale_invariant_grads)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "grams"], ids=_ids)
def test_grams_matches_authors_package(case):
    grams = pytest.importorskip("grams")  # pip: grams-pytorch
    name, shared, hp0, hp1 = case
    _peer_groups_run(name, lambda groups: grams.Grams(groups, **shared), shared, hp0, hp1)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "lamb"], ids=_ids)
def test_lamb_matches_torch_optimizer(case):
    torch_optimizer = pytest.importorskip("torch_optimizer")  # pip: torch-optimizer
    name, shared, hp0, hp1 = case
    _peer_groups_run(name, lambda groups: torch_optimizer.Lamb(groups, **shared), shared, hp0, hp1)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "lars" and c[1].get("exclude_1d", True)],
                         ids=_ids)
def test_lars_matches_pytorch_optimizer(case):
    po = pytest.importorskip("pytorch_optimizer")  # pip: pytorch-optimizer
    name, shared, hp0, hp1 = case
    _peer_groups_run(name, lambda groups: po.LARS(groups, **shared), shared, hp0, hp1)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "ademamix"], ids=_ids)
def test_ademamix_matches_pytorch_optimizer(case):
    """pytorch_optimizer.AdEMAMix with decoupled decay and alpha=2 is apple's rule; its single
    ``t_alpha_beta3`` warmup uses the same half-life schedule (up to apple's 1e-8 inside the log)."""
    po = pytest.importorskip("pytorch_optimizer")  # pip: pytorch-optimizer
    name, shared, hp0, hp1 = case

    def translate(hp):
        hp = dict(hp)
        a, b = hp.pop("alpha_warmup", None), hp.pop("beta3_warmup", None)
        if a is not None:
            hp["t_alpha_beta3"] = a
        return hp, b

    peer_hp0, b0 = translate(hp0)
    peer_hp1, b1 = translate(hp1)
    # one warmup length for both schedules in the peer: give optimkit the same
    hp0 = {**hp0, "beta3_warmup": peer_hp0.get("t_alpha_beta3")} if b0 is not None else hp0
    hp1 = {**hp1, "beta3_warmup": peer_hp1.get("t_alpha_beta3")} if b1 is not None else hp1
    start = _initial()
    runs = [[torch.nn.Parameter(t.clone()) for t in start] for _ in range(2)]
    peer = po.AdEMAMix(_groups(runs[0], peer_hp0, peer_hp1), weight_decouple=True,
                       **{"alpha": 2.0, **shared})
    ours = ok.create(name, _groups(runs[1], hp0, hp1), **shared)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        grads = random_grads(runs[0], gen, 0)
        for ps, opt in zip(runs, (peer, ours)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    assert_runs_close(runs)


# ----------------------------------------------------------------- tests: compiled = eager

COMPILE_CASES = [CASES[1], CASES[2], CASES[4], CASES[7], CASES[9], CASES[13]]


@pytest.mark.parametrize("case", COMPILE_CASES, ids=_ids)
def test_compiled_equals_eager(case):
    name, shared, hp0, hp1 = case
    runs, _ = run([optimkit(name, **shared), optimkit(name, compile=True, **shared)], hp0, hp1,
                  grad_fn=GRADS.get(name, random_grads), steps=12)
    assert_runs_close(runs, rtol=1e-6, atol=1e-6)


def test_rules_coupled_to_the_weight_refuse_a_projection():
    from optimkit.projection.base import Projection

    class Dummy(Projection):
        def subspace_shape(self, p):
            return p.shape

    for name, hp in (("adamp", {}), ("sgdp", {}), ("lars", dict(weight_decay=0.1))):
        with pytest.raises(ValueError, match="projection"):
            ok.create(name, [torch.nn.Parameter(torch.randn(3, 2))], projection=Dummy(), **hp)
