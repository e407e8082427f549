"""State dicts: plain values only (``torch.load``'s weights-only default reads
them), whole-dict validation before anything changes, and interoperation with
``torch.optim``'s state dicts."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import optimkit as ok
from optimizer_cases import contract_hp, gradient_names

PROJECTIONS = {
    "galore": lambda: ok.GaLore(rank=2, interval=2),
    "apollo": lambda: ok.APOLLO(rank=2, interval=2),
    "apollo_mini": lambda: ok.APOLLOMini(interval=2),
    "frugal": lambda: ok.FRUGAL(rank=2, interval=2),
}
PRECISIONS = ["fp32", "bf16", "q8", "q4", "fp8"]
PLACEMENTS = ["device", "cpu", "disk"]


def _params(seed=0, late=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 6), (6,), (4, 5)] + ([(5, 3)] if late else [])
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _step(opt, params, k, late=False):
    """One step on a fixed quadratic; with ``late`` the last parameter gets
    gradients only from step 4 on (its state is created after a resume at 3)."""
    opt.zero_grad(set_to_none=True)
    live = params if not late or k >= 3 else params[:-1]
    loss = sum(((p - 0.1 * (i + 1)) ** 2).sum() * (1 + 0.1 * k) for i, p in enumerate(live))
    loss.backward(create_graph=getattr(type(opt), "requires_create_graph", False))
    opt.step()


def _weights_only_roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)  # torch's default: weights_only=True


def _resume_equals_uninterrupted(build, late=False, steps=(3, 3)):
    a = _params(late=late)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = build(a)
    for k in range(steps[0]):
        _step(opt_a, a, k, late)
    sd = _weights_only_roundtrip(opt_a.state_dict())
    with torch.no_grad():
        for pa, pb in zip(a, b):
            pb.copy_(pa)
    opt_b = build(b)
    opt_b.load_state_dict(sd)
    for k in range(steps[0], steps[0] + steps[1]):
        _step(opt_a, a, k, late)
        _step(opt_b, b, k, late)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    return opt_a, opt_b


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("proj", list(PROJECTIONS))
def test_projected_state_dict_loads_with_torch_load_defaults(proj, precision, placement, tmp_path):
    kw = dict(state_precision=precision, min_quant_size=1, state_placement=placement)
    if placement == "disk":
        kw["state_dir"] = str(tmp_path)

    def build(params):
        return ok.AdamW(params, lr=1e-2, projection=PROJECTIONS[proj](), **kw)

    opt_a, opt_b = _resume_equals_uninterrupted(build)
    saved = opt_a.state_dict()["param_groups"][0]["projection"]
    assert saved["type"] == type(opt_a.param_groups[0]["projection"]).__name__
    assert saved["settings"] == opt_a.param_groups[0]["projection"].state_dict_safe()


@pytest.mark.parametrize("proj", ["apollo", "frugal"])
def test_projection_counters_resume(proj):
    """APOLLO/FRUGAL seed each new parameter's random projection from a counter
    of the projection object: a parameter first seen after the resume gets the
    seed it would have had without the interruption."""
    def build(params):
        return ok.AdamW(params, lr=1e-2, projection=PROJECTIONS[proj]())

    _resume_equals_uninterrupted(build, late=True)


def test_saved_projection_wins_like_other_hyperparameters():
    a = _params()
    opt = ok.AdamW(a, projection=ok.GaLore(rank=2, interval=2))
    for k in range(2):
        _step(opt, a, k)
    sd = _weights_only_roundtrip(opt.state_dict())
    fresh = ok.AdamW(_params())  # built without a projection
    fresh.load_state_dict(sd)
    proj = fresh.param_groups[0]["projection"]
    assert isinstance(proj, ok.GaLore) and proj.rank == 2 and proj.interval == 2
    same = ok.GaLore(rank=2, interval=2)
    mine = ok.AdamW(_params(), projection=same)
    mine.load_state_dict(sd)
    assert mine.param_groups[0]["projection"] is same  # the optimizer's own object is kept


@pytest.mark.parametrize("name", gradient_names())
def test_every_optimizer_state_dict_loads_with_torch_load_defaults(name):
    kw = contract_hp(name)
    cls = ok.info(name).cls
    for extra in ({}, {"state_precision": "q8", "min_quant_size": 1},
                  {"projection": ok.GaLore(rank=2, interval=2)}):
        try:
            cls(_params(), **kw, **extra)
        except ValueError:  # e.g. L2 decay or AdamP's test have no projected form
            continue
        _resume_equals_uninterrupted(lambda ps: cls(ps, **kw, **copy.deepcopy(extra)))


# --------------------------------------------------------------------------- bad dicts
def _trained(name="adamw", **kw):
    params = _params()
    opt = ok.create(name, params, **kw)
    for k in range(2):
        _step(opt, params, k)
    return opt, params


def _other_optimizer_dict(name):
    opt, _ = _trained(name)
    return opt.state_dict()


def _edit(fn):
    def make(sd):
        sd = copy.deepcopy(sd)
        fn(sd)
        return sd
    return make


def _set_state(pid, key, value):
    return _edit(lambda sd: sd["state"][pid].__setitem__(key, value(sd["state"][pid]) if callable(value) else value))


def _set_group(key, value):
    return _edit(lambda sd: sd["param_groups"][0].__setitem__(key, value))


BAD = {
    "another optimizer (Lion)": (lambda sd: _other_optimizer_dict("lion"), "exp_avg_sq"),
    "another optimizer (SGD)": (lambda sd: _other_optimizer_dict("sgd"), "missing"),
    "transposed state": (_set_state(0, "exp_avg", lambda st: st["exp_avg"].T.contiguous()), "shape"),
    "truncated state": (_set_state(0, "exp_avg", lambda st: st["exp_avg"][:3]), "shape"),
    "flattened state": (_set_state(0, "exp_avg_sq", lambda st: st["exp_avg_sq"].reshape(-1)), "shape"),
    "integer state": (_set_state(1, "exp_avg", lambda st: st["exp_avg"].long()), "dtype"),
    "missing exp_avg": (_edit(lambda sd: sd["state"][0].pop("exp_avg")), "exp_avg"),
    "missing step": (_edit(lambda sd: sd["state"][1].pop("step")), "step"),
    "string state": (_set_state(0, "exp_avg", "zeros"), "tensor"),
    "unexpected key": (_set_state(0, "momentum_buffer", lambda st: torch.zeros(8, 6)), "momentum_buffer"),
    "negative step": (_set_state(0, "step", -1), "step"),
    "fractional step": (_set_state(0, "step", 1.5), "step"),
    "string step": (_set_state(0, "step", "2"), "step"),
    "bool step": (_set_state(0, "step", True), "step"),
    "negative lr": (_set_group("lr", -1.0), "lr"),
    "string lr": (_set_group("lr", "fast"), "lr"),
    "bad betas": (_set_group("betas", ("x", 2.0)), "betas"),
    "beta out of range": (_set_group("betas", (0.9, 2.0)), "betas"),
    "bad precision": (_set_group("state_precision", "q3"), "state_precision"),
    "bad projection": (_set_group("projection", {"type": "NoSuchProjection", "settings": {}}), "projection"),
    "bad projection settings": (_set_group("projection", {"type": "GaLore", "settings": {"rank": -2}}), "rank"),
    "fewer groups": (_edit(lambda sd: sd["param_groups"].clear()), "param groups"),
    "group size": (_edit(lambda sd: sd["param_groups"][0]["params"].pop()), "params"),
    "unknown param id": (_edit(lambda sd: sd["state"].__setitem__(99, sd["state"][0])), "99"),
    "not a dict": (lambda sd: [sd], "dict"),
    "no state": (_edit(lambda sd: sd.pop("state")), "state"),
}


def _snapshot(opt, params):
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params], \
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


@pytest.mark.parametrize("case", list(BAD))
def test_bad_state_dict_raises_and_changes_nothing(case):
    make, words = BAD[case]
    opt, params = _trained()
    twin, twin_params = _trained()
    sd, before_params, before_groups = _snapshot(opt, params)
    with pytest.raises(ValueError, match=words):
        opt.load_state_dict(make(opt.state_dict()))
    after_sd, after_params, after_groups = _snapshot(opt, params)
    assert [torch.equal(a, b) for a, b in zip(before_params, after_params)] == [True] * len(params)
    assert before_groups == after_groups
    assert sd["state"].keys() == after_sd["state"].keys()
    for pid, st in sd["state"].items():
        for key, value in st.items():
            other = after_sd["state"][pid][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    # and it still trains exactly like an optimizer that never saw the bad dict
    for k in range(2, 4):
        _step(opt, params, k)
        _step(twin, twin_params, k)
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


@pytest.mark.parametrize("precision", ["q8", "fp8"])
def test_bad_codec_layout_is_rejected(precision):
    opt, params = _trained(state_precision=precision, min_quant_size=1)
    sd = opt.state_dict()
    cases = [
        (_edit(lambda d: d["state"][0].pop("exp_avg:absmax")), "absmax"),
        (_edit(lambda d: d["state"][0]["_layout"].__setitem__("exp_avg", ("q9", True, (8, 6), False))), "precision"),
        (_edit(lambda d: d["state"][0]["_layout"].__setitem__("exp_avg", (precision, True, (6, 8), False))), "shape"),
        (_edit(lambda d: d["state"][0]["_layout"].__setitem__("exp_avg_sq", (precision, True, (8, 6), False))),
         "signed"),
        (_edit(lambda d: d["state"][0].__setitem__("exp_avg:codes", d["state"][0]["exp_avg:codes"][:4])), "shape"),
        (_edit(lambda d: d["state"][0]["_layout"].__setitem__("momentum_buffer", (precision, True, (8, 6)))),
         "momentum_buffer"),
    ]
    before = copy.deepcopy(opt.state_dict())
    for make, words in cases:
        with pytest.raises(ValueError, match=words):
            opt.load_state_dict(make(sd))
    after = opt.state_dict()
    for pid, st in before["state"].items():
        for key, value in st.items():
            other = after["state"][pid][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_tensor_step_and_scalar_state_become_python_numbers():
    opt, params = _trained("nadam")
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = torch.tensor(float(st["step"]))
        st["mu_product"] = torch.tensor(st["mu_product"], dtype=torch.float64)
    fresh = ok.NAdam([torch.nn.Parameter(p.detach().clone()) for p in params])
    fresh.load_state_dict(sd)
    for st in fresh.state.values():
        assert type(st["step"]) is int and type(st["mu_product"]) is float


# --------------------------------------------------------------------------- torch.optim
TORCH_NAMED = [
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.1)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01)),
    ("Adadelta", dict(lr=1.0)),
    ("Adamax", dict(lr=1e-2)),
    ("NAdam", dict(lr=1e-2)),
    ("RAdam", dict(lr=1e-2)),
    ("RMSprop", dict(lr=1e-2, momentum=0.9, centered=True)),
    ("Adafactor", dict(lr=1e-2)),
]


@pytest.mark.parametrize("direction", ["torch_to_optimkit", "optimkit_to_torch"])
@pytest.mark.parametrize("name,kw", TORCH_NAMED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TORCH_NAMED)])
def test_torch_state_dicts_interoperate(name, kw, direction):
    """Train 4 steps with one library, load its state dict into the other's
    optimizer of the same name, continue 4 steps on both: equal to fp32 tolerance
    (and the loaded optimizer really used the loaded state: a fresh one differs)."""
    first, second = getattr(torch.optim, name), getattr(ok, name)
    if direction == "optimkit_to_torch":
        first, second = second, first

    def make(cls, params):
        return cls(params, **kw)

    a = _params()
    opt_a = make(first, a)
    for k in range(4):
        _step(opt_a, a, k)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    c = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = make(second, b)
    opt_b.load_state_dict(copy.deepcopy(_weights_only_roundtrip(opt_a.state_dict())))
    opt_c = make(second, c)
    for k in range(4, 8):
        _step(opt_a, a, k)
        _step(opt_b, b, k)
        _step(opt_c, c, k)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
    if any(isinstance(v, torch.Tensor) and v.numel() > 1 for st in opt_a.state.values() for v in st.values()):
        assert any(not torch.allclose(pa, pc, rtol=1e-5, atol=1e-6) for pa, pc in zip(a, c))
