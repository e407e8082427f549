"""Shared test utilities: deterministic problems and step loops."""
from __future__ import annotations

import copy
import io
import functools
from typing import Callable

import torch

SHAPES = [(5, 3), (7,), (2, 3, 4), (1,), (6, 6)]


def make_params(shapes=SHAPES, seed: int = 0, dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def grad_stream(params, steps: int, seed: int = 1, scale: float = 1.0):
    """A fixed sequence of gradients (one list per step) for ``params``."""
    g = torch.Generator().manual_seed(seed)
    return [[scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params] for _ in range(steps)]


def as_grad(opt, p, g):
    """``g`` as the gradient ``opt`` takes: for optimizers that read Hessian-vector
    products (``requires_create_graph``) the same values with a graph whose Hessian is
    the identity (``g + (p - p.detach())``), else a copy."""
    if getattr(type(opt), "requires_create_graph", False):
        with torch.enable_grad():
            return g + (p - p.detach())
    return g.clone()


def run_with_grads(opt: torch.optim.Optimizer, params, grads_per_step) -> None:
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = as_grad(opt, p, g)
        opt.step()


def two_groups(params, **group1):
    """Split params into two groups; the second gets ``group1`` overrides."""
    return [{"params": params[:2]}, {"params": params[2:], **group1}]


def mlp_problem(seed: int = 0):
    """A small MLP regression on a fixed synthetic teacher: (model, loss_fn)."""
    torch.manual_seed(seed)
    x = torch.randn(64, 8)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    with torch.no_grad():
        y = teacher(x)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    return model, lambda m: torch.nn.functional.mse_loss(m(x), y)


def digits_problem(seed: int = 0, n: int = 256):
    """Softmax regression + small MLP on scikit-learn's bundled digits: (model, loss_fn)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:n], dtype=torch.float32) / 16.0
    y = torch.tensor(data.target[:n])
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    return model, lambda m: torch.nn.functional.cross_entropy(m(x), y)


def train(model, loss_fn, opt, steps: int, create_graph: bool | None = None) -> list[float]:
    """``steps`` closure steps; ``create_graph=None``: as the optimizer requires."""
    if create_graph is None:
        create_graph = getattr(type(opt), "requires_create_graph", False)
    losses = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = loss_fn(model)
            loss.backward(create_graph=create_graph)
            return loss
        losses.append(float(opt.step(closure).detach()))
    return losses


def clone_model(model):
    return copy.deepcopy(model)


@functools.lru_cache(maxsize=None)
def digits_split():
    """scikit-learn's digits (1797 8x8 images), pixels / 16 (always-zero pixels stay
    zero), shuffled once: (x_train, y_train, x_val, y_val) with 1200 train, 597 held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1200], perm[1200:]
    return x[tr], y[tr], x[va], y[va]


def kron_quadratic(m: int = 16, n: int = 8, cond: float = 1e4, seed: int = 0, dtype=torch.float32):
    """An ill-conditioned matrix quadratic with Kronecker-structured curvature.

    ``f(W) = 0.5 tr((W - W*)^T A (W - W*) B)``: gradient ``A (W - W*) B``, Hessian
    ``B (x) A``, whose condition number is ``cond`` (``A`` and ``B`` random rotations of
    log-spaced eigenvalues, each with condition ``sqrt(cond)``). Returns
    ``(W, loss_fn)``: a zero-initialized parameter and ``loss_fn(W) -> tensor``; the
    minimum is 0, at ``W*`` (standard normal). The problem second-order methods are
    meant for: every direction-wise step size of a first-order method is a compromise
    between the largest and the smallest curvature. ``dtype``: of the parameter and
    the problem (float64 for counts that must not depend on the machine's rounding)."""
    g = torch.Generator().manual_seed(seed)
    side = cond ** 0.5

    def spd(k: int) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
        eig = torch.logspace(0, torch.log10(torch.tensor(side)).item(), k, dtype=torch.float64)
        return ((q * eig) @ q.T).to(dtype)

    a, b = spd(m), spd(n)
    target = torch.randn(m, n, generator=g).to(dtype)
    w = torch.nn.Parameter(torch.zeros(m, n, dtype=dtype))

    def loss_fn(param: torch.Tensor) -> torch.Tensor:
        e = param - target
        return 0.5 * (e * (a @ e @ b)).sum()

    return w, loss_fn


def steps_to_target(make_opt: Callable, problem: Callable, rel: float, max_steps: int) -> int:
    """Steps until ``loss <= rel * initial loss`` for an optimizer ``make_opt([W])`` on
    ``problem()`` (a fresh ``(W, loss_fn)`` per call); ``max_steps + 1`` if never (or
    when the loss stops being finite)."""
    w, loss_fn = problem()
    opt = make_opt([w])
    with torch.no_grad():
        start = float(loss_fn(w))
    for step in range(1, max_steps + 1):
        opt.zero_grad()
        loss = loss_fn(w)
        loss.backward()
        opt.step()
        with torch.no_grad():
            now = float(loss_fn(w))
        if not now == now or now == float("inf"):
            return max_steps + 1
        if now <= rel * start:
            return step
    return max_steps + 1


def tuned_steps_to_target(make_opt: Callable, lrs, problem: Callable, rel: float, max_steps: int) -> int:
    """The fewest :func:`steps_to_target` over a grid of learning rates, for
    ``make_opt(params, lr)``."""
    return min(steps_to_target(lambda p, lr=lr: make_opt(p, lr), problem, rel, max_steps) for lr in lrs)


def lockstep(ours, peer, a, b, grads: Callable, steps: int, *, seed: int = 1, rtol: float = 1e-5,
             atol: float = 1e-5, after: Callable | None = None, label: str = "") -> None:
    """Step two optimizers side by side for ``steps`` steps on the same gradients
    (``grads(a, generator)``, taken at ``a``), asserting that their parameters ``a``
    and ``b`` agree after every step; ``after(t)`` runs extra checks after step ``t``."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        for x, y, g in zip(a, b, grads(a, gen)):
            x.grad, y.grad = g.clone(), g.clone()
        ours.step()
        peer.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{label} step {t}: {m}")
        if after is not None:
            after(t)


def resume_on_digits(make_opt: Callable, steps: int = 10):
    """Train ``steps`` on a digits model, save the optimizer through ``torch.save`` /
    ``torch.load``'s defaults, resume a copy of the model with ``make_opt`` and the
    loaded dict, train both ``steps`` more and assert equal weights. Returns
    ``(uninterrupted optimizer, resumed optimizer, the loaded dict)``."""
    model, loss_fn = digits_problem(n=64)
    other = copy.deepcopy(model)
    opt = make_opt(model.parameters())
    train(model, loss_fn, opt, steps)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only
    other.load_state_dict(model.state_dict())
    resumed = make_opt(other.parameters())
    resumed.load_state_dict(saved)
    train(model, loss_fn, opt, steps)
    train(other, loss_fn, resumed, steps)
    for x, y in zip(model.parameters(), other.parameters()):
        assert torch.equal(x, y)
    return opt, resumed, saved
