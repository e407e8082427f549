"""Learning-rate schedules: each a pure ``step -> factor`` callable and a torch ``LambdaLR``.

    import optimkit as ok
    sched = ok.schedules.cosine(num_training_steps=10_000, num_warmup_steps=500)
    sched(0), sched(500), sched(10_000)          # 0.0, 1.0, 0.0: factors of each group's lr
    lr_scheduler = sched.scheduler(opt)          # torch.optim.lr_scheduler.LambdaLR

A schedule's value depends on the step only (no internal counter), so resuming is
trivial: the ``LambdaLR`` it builds saves its ``last_epoch`` and the schedule's
arguments in its ``state_dict``. The factor multiplies every param group's own
initial ``lr`` (LambdaLR semantics), so per-group learning rates compose with it.

Argument names follow ``transformers.optimization`` where it has a counterpart
(``num_warmup_steps``, ``num_training_steps``, ...), and so do the values: they
equal ``transformers``' schedules exactly (tests/test_schedules.py). Formulas:
docs/schedules.md.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from .core import validation as v

__all__ = ["Schedule", "constant", "linear_warmup", "linear", "cosine", "cosine_restarts", "wsd",
           "inverse_sqrt", "polynomial", "one_cycle", "refined", "refined_weights", "median_filter",
           "preconditioned_norm"]


def _step(step: Any) -> int:
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step.item())
    return v.nonneg_int("step", step)


def _choice(name: str, value: Any, options: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
    if value not in options:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, options))})")
    return value


def _warmup(step: int, num_warmup_steps: int) -> float:
    """transformers' linear warmup: step / max(1, num_warmup_steps)."""
    return float(step) / float(max(1, num_warmup_steps))


def _lengths(num_training_steps: Any, num_warmup_steps: Any, strict: bool = False) -> tuple[int, int]:
    """Validated ``(num_training_steps, num_warmup_steps)``: warmup <= (``strict``: <) training."""
    total = v.positive_int("num_training_steps", num_training_steps)
    warm = v.nonneg_int("num_warmup_steps", num_warmup_steps)
    if warm > total or (strict and warm == total):
        raise ValueError(f"Invalid num_warmup_steps: {warm} (must be {'<' if strict else '<='} "
                         f"num_training_steps = {total})")
    return total, warm


class Schedule:
    """Base: ``schedule(step) -> factor`` (a float, pure in the step) and ``schedule.scheduler(opt)``.

    Subclasses set their arguments as plain attributes in ``__init__`` (numbers,
    strings, tuples of floats: what ``LambdaLR.state_dict`` stores and
    ``torch.load(weights_only=True)`` reads back) and implement :meth:`factor`.
    """

    name = "schedule"

    def factor(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, step: Any) -> float:
        return float(self.factor(_step(step)))

    def scheduler(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1) -> LambdaLR:
        """A ``torch.optim.lr_scheduler.LambdaLR`` whose factor for every group is this schedule."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, numbers.Integral) or last_epoch < -1:
            raise ValueError(f"Invalid last_epoch: {last_epoch!r} (must be an int >= -1)")
        return LambdaLR(optimizer, self, last_epoch=int(last_epoch))

    def values(self, steps: int) -> list[float]:
        """``[self(0), ..., self(steps - 1)]`` (for plotting and tests)."""
        return [self(t) for t in range(v.nonneg_int("steps", steps))]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={val!r}" for k, val in vars(self).items() if not k.startswith("_")
                         and not isinstance(val, tuple))
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------- simple shapes
class constant(Schedule):
    """1 after an optional linear warmup (``transformers.get_constant_schedule_with_warmup``)."""

    def __init__(self, num_warmup_steps: int = 0):
        self.num_warmup_steps = v.nonneg_int("num_warmup_steps", num_warmup_steps)

    def factor(self, step):
        if step < self.num_warmup_steps:
            return _warmup(step, self.num_warmup_steps)
        return 1.0


class linear_warmup(constant):
    """Linear warmup ``min(1, t / T_w)`` ("Accurate, Large Minibatch SGD"), then constant 1."""


class linear(Schedule):
    """Linear warmup to 1 over ``num_warmup_steps``, then linear decay to ``min_lr_ratio``
    at ``num_training_steps`` (and after). With ``min_lr_ratio=0`` it equals
    ``transformers.get_linear_schedule_with_warmup``; ``num_warmup_steps=0`` is plain
    linear decay ``1 - t/T``."""

    def __init__(self, num_training_steps: int, num_warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        self.num_training_steps, self.num_warmup_steps = _lengths(num_training_steps, num_warmup_steps)
        self.min_lr_ratio = v.closed_unit("min_lr_ratio", min_lr_ratio)

    def factor(self, step):
        if step < self.num_warmup_steps:
            return _warmup(step, self.num_warmup_steps)
        f = max(0.0, float(self.num_training_steps - step)
                / float(max(1, self.num_training_steps - self.num_warmup_steps)))
        if self.min_lr_ratio:
            f = f * (1.0 - self.min_lr_ratio) + self.min_lr_ratio
        return f


class cosine(Schedule):
    """Linear warmup, then cosine ("SGDR") ``r + (1 - r)(1 + cos(2π c p))/2`` with ``p`` the
    progress after warmup, ``c = num_cycles`` (0.5: one half-wave down to ``r``) and
    ``r = min_lr_ratio``. Equals ``transformers.get_cosine_schedule_with_warmup``
    (``get_cosine_with_min_lr_schedule_with_warmup`` with ``min_lr_rate=min_lr_ratio``). Past ``num_training_steps`` the
    formula continues (as in transformers); with ``num_cycles=0.5`` it rises again, so
    stop there or use :func:`wsd`/``clamp=True`` (holds the end value)."""

    def __init__(self, num_training_steps: int, num_warmup_steps: int = 0, num_cycles: float = 0.5,
                 min_lr_ratio: float = 0.0, clamp: bool = False):
        self.num_training_steps, self.num_warmup_steps = _lengths(num_training_steps, num_warmup_steps)
        self.num_cycles = v.positive("num_cycles", num_cycles)
        self.min_lr_ratio = v.closed_unit("min_lr_ratio", min_lr_ratio)
        self.clamp = v.boolean("clamp", clamp)

    def factor(self, step):
        if step < self.num_warmup_steps:
            return _warmup(step, self.num_warmup_steps)
        if self.clamp:
            step = min(step, self.num_training_steps)
        progress = float(step - self.num_warmup_steps) / float(max(1, self.num_training_steps
                                                                   - self.num_warmup_steps))
        f = 0.5 * (1.0 + math.cos(math.pi * float(self.num_cycles) * 2.0 * progress))
        f = f * (1 - self.min_lr_ratio) + self.min_lr_ratio
        return max(0, f)


class cosine_restarts(Schedule):
    """Linear warmup, then ``num_cycles`` cosine waves from 1 to ``min_lr_ratio``, each
    restarting at 1 (SGDR's warm restarts, equal periods), and ``min_lr_ratio`` from
    ``num_training_steps`` on. With ``min_lr_ratio=0`` it equals
    ``transformers.get_cosine_with_hard_restarts_schedule_with_warmup``."""

    def __init__(self, num_training_steps: int, num_warmup_steps: int = 0, num_cycles: int = 1,
                 min_lr_ratio: float = 0.0):
        self.num_training_steps, self.num_warmup_steps = _lengths(num_training_steps, num_warmup_steps)
        self.num_cycles = v.positive_int("num_cycles", num_cycles)
        self.min_lr_ratio = v.closed_unit("min_lr_ratio", min_lr_ratio)

    def factor(self, step):
        if step < self.num_warmup_steps:
            return _warmup(step, self.num_warmup_steps)
        progress = float(step - self.num_warmup_steps) / float(max(1, self.num_training_steps
                                                                   - self.num_warmup_steps))
        if progress >= 1.0:
            return self.min_lr_ratio
        f = max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(self.num_cycles) * progress) % 1.0))))
        if self.min_lr_ratio:
            f = f * (1.0 - self.min_lr_ratio) + self.min_lr_ratio
        return f


_SHAPES = ("linear", "cosine", "1-sqrt")


class wsd(Schedule):
    """Warmup-stable-decay ("MiniCPM"; "Scaling Laws and Compute-Optimal Training Beyond
    Fixed Training Durations"): ``warmup_type`` warmup from ``min_lr_ratio`` to 1 over
    ``num_warmup_steps``, 1 for ``num_stable_steps``, ``decay_type`` decay to
    ``min_lr_ratio`` over ``num_decay_steps``, then ``min_lr_ratio``. Give
    ``num_training_steps`` (the stable phase is what remains) or ``num_stable_steps``
    (used when both are given, with a warning). Shapes: ``"linear"``, ``"cosine"``
    (``num_cycles`` waves; 0.5: one half-wave), ``"1-sqrt"`` (decay ``1 - sqrt(p)``), and for
    the decay also ``"1-square"`` (``1 - p**2``, not in transformers).
    Values equal ``transformers.get_wsd_schedule`` exactly, same arguments."""

    def __init__(self, num_warmup_steps: int, num_decay_steps: int, num_training_steps: int | None = None,
                 num_stable_steps: int | None = None, warmup_type: str = "linear", decay_type: str = "cosine",
                 min_lr_ratio: float = 0.0, num_cycles: float = 0.5):
        self.num_warmup_steps = v.nonneg_int("num_warmup_steps", num_warmup_steps)
        self.num_decay_steps = v.nonneg_int("num_decay_steps", num_decay_steps)
        if num_training_steps is None and num_stable_steps is None:
            raise ValueError("Invalid num_training_steps: give num_training_steps or num_stable_steps")
        if num_stable_steps is None:
            total = v.nonneg_int("num_training_steps", num_training_steps)
            num_stable_steps = total - self.num_warmup_steps - self.num_decay_steps
            if num_stable_steps < 0:
                raise ValueError(f"Invalid num_training_steps: {total} (must be >= num_warmup_steps + "
                                 f"num_decay_steps = {self.num_warmup_steps + self.num_decay_steps})")
        else:
            if num_training_steps is not None:
                v.nonneg_int("num_training_steps", num_training_steps)
                warnings.warn("wsd: both num_training_steps and num_stable_steps given; "
                              "num_stable_steps is used", stacklevel=2)
            num_stable_steps = v.nonneg_int("num_stable_steps", num_stable_steps)
        self.num_stable_steps = num_stable_steps
        self.warmup_type = _choice("warmup_type", warmup_type, _SHAPES)
        self.decay_type = _choice("decay_type", decay_type, _SHAPES + ("1-square",))
        self.min_lr_ratio = v.closed_unit("min_lr_ratio", min_lr_ratio)
        self.num_cycles = v.positive("num_cycles", num_cycles)

    def factor(self, step):
        r = self.min_lr_ratio
        w, s, d = self.num_warmup_steps, self.num_stable_steps, self.num_decay_steps
        if step < w:
            p = float(step) / float(max(1, w))
            if self.warmup_type == "linear":
                f = p
            elif self.warmup_type == "cosine":
                f = 0.5 * (1.0 - math.cos(math.pi * p))
            else:
                f = 1.0 - math.sqrt(1.0 - p)
            return max(0.0, f * (1.0 - r) + r)
        if step < w + s:
            return 1.0
        if step < w + s + d:
            p = float(step - w - s) / float(max(1, d))
            if self.decay_type == "linear":
                f = 1.0 - p
            elif self.decay_type == "cosine":
                f = 0.5 * (1.0 + math.cos(math.pi * float(self.num_cycles) * 2.0 * p))
            elif self.decay_type == "1-sqrt":
                f = 1.0 - math.sqrt(p)
            else:
                f = 1.0 - p * p
            return max(0.0, f * (1.0 - r) + r)
        return r


class inverse_sqrt(Schedule):
    """Linear warmup, then ``1/sqrt((t + timescale - T_w)/timescale)``: with the default
    ``timescale = num_warmup_steps`` this is ``sqrt(T_w / t)`` ("Attention Is All You
    Need"). Equals ``transformers.get_inverse_sqrt_schedule`` (timescale default
    ``num_warmup_steps or 10_000``)."""

    def __init__(self, num_warmup_steps: int, timescale: int | None = None):
        self.num_warmup_steps = v.nonneg_int("num_warmup_steps", num_warmup_steps)
        if timescale is None:
            timescale = self.num_warmup_steps or 10_000
        self.timescale = v.positive_int("timescale", timescale)

    def factor(self, step):
        if step < self.num_warmup_steps:
            return _warmup(step, self.num_warmup_steps)
        shift = self.timescale - self.num_warmup_steps
        return 1.0 / math.sqrt((step + shift) / self.timescale)


class polynomial(Schedule):
    """Linear warmup, then ``((lr_init - lr_end) (1 - p)^power + lr_end) / lr_init`` with ``p``
    the progress after warmup, and ``lr_end / lr_init`` from ``num_training_steps`` on.
    With the defaults ``lr_init=1`` ``lr_end`` is the final factor; pass the optimizer's
    ``lr`` as ``lr_init`` and an absolute ``lr_end`` to reproduce
    ``transformers.get_polynomial_decay_schedule_with_warmup`` exactly (it reads
    ``lr_init`` from ``optimizer.defaults["lr"]``; its default ``lr_end`` is 1e-7)."""

    def __init__(self, num_training_steps: int, num_warmup_steps: int = 0, lr_end: float = 0.0,
                 power: float = 1.0, lr_init: float = 1.0):
        self.num_training_steps, self.num_warmup_steps = _lengths(num_training_steps, num_warmup_steps,
                                                                  strict=True)
        self.lr_init = v.positive("lr_init", lr_init)
        self.lr_end = v.nonneg("lr_end", lr_end)
        if not self.lr_end < self.lr_init:
            raise ValueError(f"Invalid lr_end: {lr_end} (must be < lr_init = {lr_init})")
        self.power = v.positive("power", power)

    def factor(self, step):
        if step < self.num_warmup_steps:
            return _warmup(step, self.num_warmup_steps)
        if step > self.num_training_steps:
            return self.lr_end / self.lr_init
        decay_steps = self.num_training_steps - self.num_warmup_steps
        remaining = 1 - (step - self.num_warmup_steps) / decay_steps
        return ((self.lr_init - self.lr_end) * remaining ** self.power + self.lr_end) / self.lr_init


class one_cycle(Schedule):
    """One-cycle ("Super-Convergence"), as ``torch.optim.lr_scheduler.OneCycleLR`` with the
    factor relative to ``max_lr``: from ``1/div_factor`` up to 1 over the first
    ``pct_start`` of ``total_steps``, then down to ``1/(div_factor*final_div_factor)``
    at step ``total_steps - 1`` (held after). ``three_phase``: up, back down to
    ``1/div_factor`` symmetrically, then the final anneal. ``anneal_strategy``:
    ``"cos"`` or ``"linear"``. Give the optimizer ``lr = max_lr`` (the factor
    multiplies it). The learning rate only; momentum cycling is not done."""

    def __init__(self, total_steps: int, pct_start: float = 0.3, anneal_strategy: str = "cos",
                 div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False):
        self.total_steps = v.positive_int("total_steps", total_steps)
        self.pct_start = v.closed_unit("pct_start", pct_start)
        self.anneal_strategy = _choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        self.div_factor = v.positive("div_factor", div_factor)
        self.final_div_factor = v.positive("final_div_factor", final_div_factor)
        self.three_phase = v.boolean("three_phase", three_phase)
        if self.total_steps < 2:
            raise ValueError(f"Invalid total_steps: {total_steps} (must be >= 2)")

    def _phases(self):
        init, top = 1.0 / self.div_factor, 1.0
        low = init / self.final_div_factor
        up = float(self.pct_start * self.total_steps) - 1
        if self.three_phase:
            return [(up, init, top), (float(2 * self.pct_start * self.total_steps) - 2, top, init),
                    (self.total_steps - 1, init, low)]
        return [(up, init, top), (self.total_steps - 1, top, low)]

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def factor(self, step):
        phases = self._phases()
        step = min(step, self.total_steps - 1)
        start_step = 0.0
        for i, (end_step, start, end) in enumerate(phases):
            if step <= end_step or i == len(phases) - 1:
                span = end_step - start_step
                pct = (step - start_step) / span if span else 1.0
                return self._anneal(start, end, pct)
            start_step = end_step
        raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- refinement
def median_filter(values: Sequence[float], width: int) -> list[float]:
    """Running median over a centred window of ``width`` values (made odd: ``width | 1``),
    the series extended at both ends by its end values ("nearest" padding)."""
    xs = [float(x) for x in values]
    width = v.positive_int("width", width) | 1
    if not xs or width == 1:
        return xs
    half = width // 2
    t = torch.tensor(xs, dtype=torch.float64)
    padded = torch.cat([t[:1].expand(half), t, t[-1:].expand(half)])
    windows = padded.unfold(0, width, 1)
    return windows.sort(dim=1).values[:, half].tolist()


def refined_weights(grad_norms: Sequence[float], smoothing: float = 0.0, power: float = 2.0) -> list[float]:
    """The refined schedule over the logged steps, before interpolation: with
    ``Ĝ = median_filter(grad_norms, max(1, round(smoothing * T)))``,
    ``w_t = Ĝ_t^-power * sum_{p > t} Ĝ_p^-power`` for ``t = 0..T-1``, divided by its
    maximum (peak 1; the last value is 0)."""
    if isinstance(grad_norms, torch.Tensor):
        grad_norms = grad_norms.detach().double().flatten().tolist()
    if isinstance(grad_norms, (str, bytes)) or not hasattr(grad_norms, "__len__"):
        raise TypeError(f"grad_norms must be a sequence of numbers, got {type(grad_norms).__name__}")
    norms = [v.positive(f"grad_norms[{i}]", g) for i, g in enumerate(grad_norms)]
    if len(norms) < 2:
        raise ValueError(f"Invalid grad_norms: {len(norms)} values (need at least 2)")
    if any(math.isinf(g) for g in norms):
        raise ValueError("Invalid grad_norms: infinite values")
    smoothing = v.closed_unit("smoothing", smoothing)
    power = v.positive("power", power)
    width = max(1, round(smoothing * len(norms)))
    g = torch.tensor(median_filter(norms, width), dtype=torch.float64)
    inv = g.pow(-power)
    tail = inv.flip(0).cumsum(0).flip(0) - inv  # sum over p > t
    w = inv * tail
    return (w / w.max()).tolist()


def preconditioned_norm(grads: Sequence[torch.Tensor], second_moments: Sequence[torch.Tensor], eps: float = 1e-8,
                        bias_correction: float = 1.0) -> float:
    """``sqrt(Σ_i g_i² / (sqrt(v_i / bias_correction) + eps))`` over all tensors: the gradient
    norm in an Adam-type optimizer's diagonal geometry, to log per step for :class:`refined`
    with such optimizers (``bias_correction = 1 - beta2**step`` for Adam's ``v̂``)."""
    grads, vs = list(grads), list(second_moments)
    if len(grads) != len(vs):
        raise ValueError(f"Invalid second_moments: {len(vs)} tensors for {len(grads)} gradients")
    eps = v.nonneg("eps", eps)
    bc = v.positive("bias_correction", bias_correction)
    total = 0.0
    for i, (g, m) in enumerate(zip(grads, vs)):
        if not isinstance(g, torch.Tensor) or not isinstance(m, torch.Tensor):
            raise TypeError(f"grads[{i}] and second_moments[{i}] must be tensors")
        if g.shape != m.shape:
            raise ValueError(f"Invalid second_moments[{i}]: shape {tuple(m.shape)}, gradient {tuple(g.shape)}")
        g64, m64 = g.detach().double(), m.detach().double()
        total += (g64.square() / ((m64 / bc).sqrt() + eps)).sum().item()
    return math.sqrt(total)


class refined(Schedule):
    """Schedule refinement ("When, Why and How Much? Adaptive Learning Rate Scheduling by
    Refinement", Defazio et al. 2023, Algorithm 1) from a previous run's logged gradient
    norms ``G_0..G_{T-1}`` (one per step): :func:`refined_weights` (median-smoothed
    norms, ``w_t ∝ Ĝ_t^-2 Σ_{p>t} Ĝ_p^-2``, peak 1, last 0), stretched linearly onto
    ``num_training_steps`` (default ``T``; step ``s`` reads position ``s (T-1)/(N-1)``
    by linear interpolation) and 0 from ``num_training_steps - 1`` on. Constant norms
    give linear decay ``1 - s/(N-1)``. For Adam-family runs log the preconditioned norm
    the paper uses in place of ``G`` (see docs/schedules.md); ``power`` changes the
    exponent 2. ``num_warmup_steps`` adds an explicit linear warmup (multiplied in);
    the refined shape usually has its own."""

    def __init__(self, grad_norms: Sequence[float], num_training_steps: int | None = None,
                 smoothing: float = 0.0, power: float = 2.0, num_warmup_steps: int = 0):
        self.weights = tuple(refined_weights(grad_norms, smoothing, power))
        self.smoothing, self.power = float(smoothing), float(power)
        if num_training_steps is None:
            num_training_steps = len(self.weights)
        self.num_training_steps = v.positive_int("num_training_steps", num_training_steps)
        if self.num_training_steps < 2:
            raise ValueError(f"Invalid num_training_steps: {num_training_steps} (must be >= 2)")
        self.num_warmup_steps = v.nonneg_int("num_warmup_steps", num_warmup_steps)

    def factor(self, step):
        n, w = self.num_training_steps, self.weights
        if step >= n - 1:
            return 0.0
        x = step * (len(w) - 1) / (n - 1)
        i = int(math.floor(x))
        frac = x - i
        f = w[i] if frac == 0.0 else w[i] + (w[i + 1] - w[i]) * frac
        if step < self.num_warmup_steps:
            f *= _warmup(step, self.num_warmup_steps)
        return f
