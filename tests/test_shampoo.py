"""Shampoo: against a reference step written from Distributed Shampoo's equations,
by reduction to torch.optim (Adam/AdamW, Adagrad, SGD), and on problems it is for."""
from __future__ import annotations

import io
import itertools

import pytest
import torch

import optimkit as ok
from helpers import digits_problem, kron_quadratic, train, tuned_steps_to_target
from optimkit.transforms.kronecker import inverse_root, merge_dims

F64 = dict(preconditioner_dtype="fp64")


# --------------------------------------------------------------------------- reference
def _ref_root(a: torch.Tensor, exponent: float, eps: float) -> torch.Tensor:
    lam, q = torch.linalg.eigh(a.double())
    lam = lam - min(float(lam.min()), 0.0) + eps
    return (q @ torch.diag(lam ** -exponent) @ q.T)


def _blocks(shape, max_dim):
    """Index ranges of every block (each dim cut into chunks of max_dim)."""
    per_dim = [[(s, min(s + max_dim, d)) for s in range(0, d, max_dim)] for d in shape]
    return list(itertools.product(*per_dim))


def _sl(ranges):
    return tuple(slice(a, b) for a, b in ranges)


class RefShampoo:
    """Distributed Shampoo's update for one tensor, written out per block with
    einsum-free explicit unfoldings, in float64."""

    def __init__(self, p, *, lr, betas=(0.9, 1.0), beta3=-1.0, epsilon=1e-12, momentum=0.0, dampening=0.0,
                 weight_decay=0.0, max_preconditioner_dim=1024, precondition_frequency=1,
                 start_preconditioning_step=-1, exponents=None, use_nesterov=False, use_bias_correction=True,
                 use_decoupled_weight_decay=True, grafting=None, grafting_beta2=None, grafting_epsilon=None,
                 merged_shape=None, precondition_1d=False):
        self.p = p.detach().double().clone()
        self.hp = dict(lr=lr, b1=betas[0], b2=betas[1], b3=betas[0] if beta3 == -1 else beta3, eps=epsilon,
                       mu=momentum, damp=dampening, wd=weight_decay, freq=precondition_frequency,
                       start=precondition_frequency if start_preconditioning_step == -1
                       else start_preconditioning_step, nesterov=use_nesterov, bias=use_bias_correction,
                       decoupled=use_decoupled_weight_decay, graft=grafting,
                       gb2={"adagrad": 1.0, "rmsprop": 0.99, "adam": 0.999}.get(grafting, 1.0)
                       if grafting_beta2 is None else grafting_beta2,
                       geps={"adagrad": 1e-10, "rmsprop": 1e-8, "adam": 1e-8}.get(grafting, 0.0)
                       if grafting_epsilon is None else grafting_epsilon)
        self.shape = tuple(p.shape)
        self.merged = merged_shape or self.shape
        self.pre = p.dim() >= 2 or (p.dim() == 1 and precondition_1d)
        self.blocks = _blocks(self.merged, max_preconditioner_dim) if self.pre else []
        order = len(self.merged)
        self.exponent = (exponents or {}).get(order, 1.0 / (2 * order))
        self.factors = [[torch.zeros(b - a, b - a, dtype=torch.float64) for a, b in blk] for blk in self.blocks]
        self.roots = [[torch.zeros_like(f) for f in fs] for fs in self.factors]
        self.m = torch.zeros(self.shape, dtype=torch.float64)
        self.a = torch.zeros(self.shape, dtype=torch.float64)
        self.buf = torch.zeros(self.shape, dtype=torch.float64)
        self.t = 0

    @staticmethod
    def _gram(x, k):
        x = x.movedim(k, 0).reshape(x.shape[k], -1)
        return x @ x.T

    @staticmethod
    def _mul_dim(x, m, k):
        """Multiply dim k of x by the symmetric matrix m."""
        return torch.tensordot(m, x.movedim(k, 0), dims=([1], [0])).movedim(0, k)

    def _graft(self, x, a):
        h = self.hp
        if h["graft"] in (None, "sgd"):
            return x
        bc2 = 1 - h["gb2"] ** self.t if h["graft"] == "adam" else 1.0
        return x / ((a / bc2).sqrt() + h["geps"])

    def step(self, g):
        h = self.hp
        self.t += 1
        t = self.t
        g = g.double().clone()
        if h["wd"] and not h["decoupled"]:
            g = g + h["wd"] * self.p
        gm = g.reshape(self.merged)
        for blk, fs in zip(self.blocks, self.factors):
            gb = gm[_sl(blk)]
            for k, f in enumerate(fs):
                o = self._gram(gb, k)
                f.copy_(f + o if h["b2"] == 1 else h["b2"] * f + (1 - h["b2"]) * o)
        if h["graft"] in ("adagrad",) or (h["graft"] in ("rmsprop", "adam") and h["gb2"] == 1):
            self.a += g * g
        elif h["graft"] in ("rmsprop", "adam"):
            self.a = h["gb2"] * self.a + (1 - h["gb2"]) * g * g
        if (t % h["freq"] == 0 and t > h["start"]) or t == h["start"]:
            bc = 1 - h["b2"] ** t if (h["bias"] and h["b2"] < 1) else 1.0
            for fs, rs in zip(self.factors, self.roots):
                for f, r in zip(fs, rs):
                    r.copy_(_ref_root(f / bc, self.exponent, h["eps"]))
        if h["b1"]:
            bar = h["b3"] * self.m + (1 - h["b3"]) * g
            self.m = h["b1"] * self.m + (1 - h["b1"]) * g
            if h["b3"] == h["b1"]:
                bar = self.m.clone()
            if h["bias"]:
                bar = bar / (1 - h["b3"] * h["b1"] ** (t - 1))
        else:
            bar = g
        if not self.pre or (t < h["start"] and h["graft"] is not None):
            d = self._graft(bar, self.a)
        else:
            d = torch.zeros(self.merged, dtype=torch.float64)
            barm, am = bar.reshape(self.merged), self.a.reshape(self.merged)
            for blk, rs in zip(self.blocks, self.roots):
                x = barm[_sl(blk)]
                y = x
                for k, r in enumerate(rs):
                    y = self._mul_dim(y, r, k)
                if h["graft"] is not None:
                    ref = self._graft(x, am[_sl(blk)])
                    y = y * (ref.norm() / (y.norm() + 1e-16))
                d[_sl(blk)] = y
            d = d.reshape(self.shape)
        if h["wd"] and h["decoupled"]:
            d = d + h["wd"] * self.p
        if h["mu"]:
            self.buf = h["mu"] * self.buf + (1 - h["damp"]) * d
            d = (1 - h["damp"]) * d + h["mu"] * self.buf if h["nesterov"] else self.buf.clone()
        self.p = self.p - h["lr"] * d
        return self.p


def _grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


CASES = {
    "tall": ((9, 4), {}),
    "wide": ((3, 7), dict(betas=(0.9, 0.999), grafting="adam")),
    "square_momentum": ((5, 5), dict(betas=(0.0, 1.0), momentum=0.9, use_nesterov=True, dampening=0.1,
                                      grafting="adagrad")),
    "order3": ((4, 3, 2), dict(grafting="rmsprop", weight_decay=0.05)),
    "blocked": ((10, 6), dict(max_preconditioner_dim=4, grafting="sgd", weight_decay=0.01,
                               use_decoupled_weight_decay=False)),
    "frequency": ((6, 4), dict(precondition_frequency=3, start_preconditioning_step=4, grafting="adam",
                                beta3=0.5)),
    "shampoo2": ((6, 3), dict(exponents={2: 0.5}, epsilon=1e-6, betas=(0.5, 0.9),
                              use_bias_correction=False)),
    "vector_1d": ((7,), dict(precondition_1d=True, grafting="adam", epsilon=1e-3)),
    "vector_grafted": ((7,), dict(grafting="adam")),
    "merged": ((4, 3, 2), dict(merged_shape=(4, 6), max_preconditioner_dim=8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_step(case):
    shape, hp = CASES[case]
    hp = dict(hp)
    lr = 0.05
    merged = hp.pop("merged_shape", None)
    exponents = hp.pop("exponents", None)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    ref = RefShampoo(p, lr=lr, exponents=exponents, merged_shape=merged, **hp)
    opt = ok.Shampoo([p], lr=lr, inverse_exponent_override=exponents, use_merge_dims=merged is not None,
                     **F64, **hp)
    for t, g in enumerate(_grads(shape, 12), 1):
        p.grad = g.clone()
        opt.step()
        want = ref.step(g)
        torch.testing.assert_close(p.detach().double(), want, rtol=2e-5, atol=2e-6,
                                   msg=lambda m: f"{case}, step {t}: {m}")


def test_merge_dims_rule():
    assert merge_dims((4, 3, 2), 8) == (4, 6)
    assert merge_dims((64, 3, 3, 3), 1024) == (576, 3)
    assert merge_dims((64, 3, 3, 3), 32) == (64, 27)
    assert merge_dims((1, 100), 10) == (100,)
    assert merge_dims((2048, 512), 1024) == (2048, 512)


def test_inverse_root_keeps_previous_when_not_finite():
    prev = torch.eye(3) * 7
    bad = torch.full((3, 3), float("nan"))
    assert torch.equal(inverse_root(bad, 0.25, 1e-12, "fp32", prev), prev)
    a = torch.diag(torch.tensor([16.0, 1.0, 0.0]))
    r = inverse_root(a, 0.25, 0.0 + 1e-30, "fp64", prev)
    assert torch.allclose(r[:2, :2].diag(), torch.tensor([0.5, 1.0]))


# --------------------------------------------------------------------------- reductions
NEVER = 10 ** 9  # start_preconditioning_step beyond the run: the grafted method alone


def _side_by_side(make_a, make_b, shapes, steps, seed=1, rtol=1e-5, atol=1e-6):
    """Two optimizers from the same parameters on the same gradients: parameters equal."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    opt_a, opt_b = make_a(a), make_b(b)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen)
            x.grad, y.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=rtol, atol=atol)


def _run_pair(shampoo_kwargs, torch_cls, torch_kwargs, steps=15, shapes=((6, 4), (5,), (3, 2, 2))):
    _side_by_side(lambda a: torch_cls(a, **torch_kwargs),
                  lambda b: ok.Shampoo(b, start_preconditioning_step=NEVER, **shampoo_kwargs), shapes, steps)


def test_adam_grafting_reduces_to_adamw():
    _run_pair(dict(lr=1e-2, betas=(0.9, 1.0), grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8,
                   weight_decay=0.05),
              torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05))


def test_adam_grafting_with_l2_reduces_to_adam():
    _run_pair(dict(lr=1e-2, grafting="adam", weight_decay=0.05, use_decoupled_weight_decay=False),
              torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05))


def test_adagrad_grafting_reduces_to_adagrad():
    _run_pair(dict(lr=0.1, betas=(0.0, 1.0), grafting="adagrad"), torch.optim.Adagrad,
              dict(lr=0.1, eps=1e-10))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_grafting_reduces_to_sgd(nesterov):
    _run_pair(dict(lr=0.05, betas=(0.0, 1.0), grafting="sgd", momentum=0.9, use_nesterov=nesterov,
                   weight_decay=1e-3, use_decoupled_weight_decay=False),
              torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-3))


# --------------------------------------------------------------------------- problems it is for
def test_ill_conditioned_quadratic_five_times_fewer_steps_than_tuned_adam():
    """Kronecker-structured quadratic, condition number 1e4: Shampoo's factors see the
    structure a diagonal method cannot."""
    problem = kron_quadratic
    lrs = [10 ** (k / 2) for k in range(-6, 3)]
    adam = tuned_steps_to_target(lambda p, lr: torch.optim.Adam(p, lr=lr), lrs, problem, 1e-4, 2000)
    shampoo = tuned_steps_to_target(lambda p, lr: ok.Shampoo(p, lr=lr, **SHAMPOO_QUADRATIC), lrs, problem,
                                    1e-4, 2000)
    print(f"steps to 1e-4: Shampoo {shampoo}, tuned Adam {adam}")
    assert shampoo * 5 <= adam, f"Shampoo {shampoo} steps vs tuned Adam {adam}"


SHAMPOO_QUADRATIC = dict(betas=(0.5, 0.99), grafting="adam", epsilon=1e-10, use_merge_dims=False)


def test_trains_digits_with_adam_grafting():
    model, loss_fn = digits_problem()
    opt = ok.Shampoo(model.parameters(), lr=3e-2, betas=(0.9, 0.999), epsilon=1e-8, grafting="adam",
                     precondition_frequency=5)
    losses = train(model, loss_fn, opt, 60)
    assert losses[-1] < 0.01 * losses[0], losses[::10]  # measured: 2.34 -> 0.0039


# --------------------------------------------------------------------------- contract details
def test_factors_stay_full_precision_and_state_dict_loads_with_torch_load():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(96, 64))
    opt = ok.Shampoo([w], lr=1e-3, grafting="adam", state_precision="q8", min_quant_size=0)
    for g in _grads(w.shape, 3):
        w.grad = g
        opt.step()
    st = opt.state[w]
    assert st["shampoo_factors"].dtype == torch.float32 and st["shampoo_roots"].dtype == torch.float32
    assert st["shampoo_factors"].numel() == 96 ** 2 + 64 ** 2
    assert "filtered_grad:codes" in st or any(k.startswith("filtered_grad:") for k in st)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf)
    twin = ok.Shampoo([torch.nn.Parameter(w.detach().clone())], lr=1e-3, grafting="adam",
                      state_precision="q8", min_quant_size=0)
    twin.load_state_dict(loaded)


def test_blocks_cover_large_dims():
    w = torch.nn.Parameter(torch.randn(10, 3))
    opt = ok.Shampoo([w], max_preconditioner_dim=4, use_merge_dims=False)
    w.grad = torch.randn(10, 3)
    opt.step()
    # three row blocks (4, 4, 2), each with a rows factor and a 3x3 columns factor
    assert opt.state[w]["shampoo_factors"].numel() == (16 + 9) * 2 + (4 + 9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(precondition_frequency=10, start_preconditioning_step=5), "start_preconditioning_step"),
    (dict(start_preconditioning_step=-2), "start_preconditioning_step"),
    (dict(grafting="lion"), "grafting"),
    (dict(betas=(0.9, 0.0)), "betas"),
    (dict(betas=(1.0, 1.0)), "betas"),
    (dict(beta3=1.5), "beta3"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(inverse_exponent_override={0: 0.5}), "inverse_exponent_override"),
    (dict(inverse_exponent_override={2: -1.0}), "inverse_exponent_override"),
    (dict(preconditioner_dtype="bf16"), "preconditioner_dtype"),
    (dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
    (dict(projection=ok.GaLore(rank=2)), "projection"),
])
def test_bad_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ok.Shampoo([torch.nn.Parameter(torch.randn(3, 3))], **kwargs)


def test_turning_on_momentum_after_the_first_step_is_a_clear_error():
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = ok.Shampoo([w])
    w.grad = torch.randn(4, 3)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="momentum"):
        opt.step()
    assert torch.equal(w, before)


def test_compiled_refresh_and_plain_steps_equal_eager():
    """Grafting-only, refresh and plain steps (three kernels), blocks, a 3-D tensor."""
    hp = dict(lr=0.02, grafting="adam", precondition_frequency=2, max_preconditioner_dim=4)
    _side_by_side(lambda a: ok.Shampoo(a, **hp), lambda b: ok.Shampoo(b, compile=True, **hp),
                  [(8, 5), (5,), (3, 2, 4)], steps=4, seed=3)


# --------------------------------------------------------------------------- peers
@pytest.mark.parametrize("shape", [(6, 4), (5,), (3, 4, 2)])
def test_matches_pytorch_optimizer_shampoo(shape):
    """pytorch_optimizer.Shampoo is the original Shampoo (Gupta et al. 2018): summed
    factors started at eps I, inverse roots every step (SVD), no filtering and no
    grafting, every dim preconditioned (vectors too). That is this Shampoo with
    betas (0, 1), epsilon = matrix_eps (added at the root instead of at the start:
    the same matrix), no merging and precondition_1d. Measured in float64: <= 1.1e-12
    relative to the distance travelled."""
    from pytorch_optimizer import Shampoo as PeerShampoo

    torch.manual_seed(0)
    start = torch.randn(shape, dtype=torch.float64)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours = ok.Shampoo([a], lr=0.05, betas=(0.0, 1.0), epsilon=1e-6, use_merge_dims=False, precondition_1d=True,
                      **F64)
    peer = PeerShampoo([b], lr=0.05, matrix_eps=1e-6)
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        peer.step()
    err = float((a - b).detach().norm() / (b.detach() - start).norm())
    assert err < 1e-9, err
