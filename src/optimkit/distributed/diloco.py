"""``DiLoCo``: distributed low-communication training around any optimizer.

"DiLoCo: Distributed Low-Communication Training of Language Models" (Douillard
et al. 2023, arXiv 2311.08105). Each of ``M`` workers (the ranks of a process
group) runs the *inner* optimizer alone for ``H = sync_every`` steps; then the
*outer gradient*, the mean over workers of how far each moved away from the
shared *global* parameters, is formed with one collective::

    delta = theta_global - mean_m theta_m          (all-reduce, or all-gather of low-precision codes)
    theta_global <- outer_step(theta_global, delta) (Nesterov SGD, lr 0.7, momentum 0.9 by default)
    theta_m <- theta_global                         (every worker restarts from the new global point)

The inner optimizer's state stays local (it is never communicated or reset).

Streaming DiLoCo ("Streaming DiLoCo with overlapping communication", Douillard
et al. 2025, arXiv 2501.18512): with ``fragments=P`` the parameters are split
into ``P`` fragments; fragment ``p`` is synchronized every ``H`` steps, at the
steps ``t`` with ``t = floor((p + 1) H / P) (mod H)``, so the collectives are
spread over the round (the last fragment syncs at multiples of ``H``, as
``torchft.local_sgd.DiLoCo``). With ``overlap_steps=tau`` a fragment's outer
gradient is taken ``tau`` inner steps before its sync step and communicated
asynchronously while those steps run; at the sync step the outer step is
applied and the worker's (meanwhile further trained) fragment is mixed with the
new global one: ``theta_m <- (1 - alpha) theta_global + alpha theta_m``.

``outer_grad_precision`` says what travels: ``"fp32"`` (float32, float64 for
float64 parameters, all-reduced), ``"bf16"`` (bfloat16, all-gathered) or ``"q8"``
(optimkit's block-wise 8-bit codec, :class:`optimkit.state.codecs.Q8`: codes
and one float32 scale per 256 elements, all-gathered). Low-precision outer
gradients are decoded on every worker and averaged there in rank order, so all
workers compute the same bits; each worker uses the decoded copy of its own
outer gradient too.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = ["DiLoCo"]

OUTER_GRAD_PRECISIONS = ("fp32", "bf16", "q8")
OUTER_PLACEMENTS = ("device", "cpu")
_SETTINGS = ("sync_every", "overlap_steps", "alpha", "outer_grad_precision")


def _real(name: str, value: Any, low: float, high: float | None, low_open: bool = False,
          high_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    x = float(value)
    ok = x == x and (x > low if low_open else x >= low)
    if high is not None:
        ok = ok and (x < high if high_open else x <= high)
    elif not math.isfinite(x):
        ok = False
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high is None or high_open else "]"
        raise ValueError(f"Invalid {name}: {value!r} (must be in {lo}{low}, {'inf' if high is None else high}{hi})")
    return x


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if int(value) < low:
        raise ValueError(f"Invalid {name}: {value!r} (must be >= {low})")
    return int(value)


def _world(group) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without an initialized process group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass
class _Pending:
    """One fragment's outer gradient in flight: ``finish()`` gives the mean flat buffer
    of each bucket (waiting for the collectives); ``due`` is the step it is applied at."""
    fragment: int
    due: int
    finish: Callable[[], list[Tensor]]
    result: list[Tensor] | None = field(default=None)

    def means(self) -> list[Tensor]:
        if self.result is None:
            self.result = self.finish()
        return self.result


class DiLoCo:
    """DiLoCo around ``inner`` (any ``torch.optim.Optimizer``, optimkit's or torch's).

    ``opt = ok.DiLoCo(ok.AdamW(model.parameters(), lr=4e-4), sync_every=500)``, then
    train as with ``inner`` (``opt.zero_grad()``, ``loss.backward()``, ``opt.step()``)
    on each rank's own data. Without an initialized ``torch.distributed`` process group
    (or with one of size 1) the outer step still runs, on this worker's own outer
    gradient.

    Args:
        inner: the optimizer each worker runs locally (its parameters are the model's).
        outer: ``"nesterov"`` (``torch.optim.SGD(nesterov=True)``), ``"sgd"``
            (heavy ball, or plain SGD with ``outer_momentum=0``), or a factory called
            with the list of global parameter tensors that returns an optimizer
            (``functools.partial(ok.AdamW, lr=1e-3)``); ``outer_lr`` and
            ``outer_momentum`` are then not used.
        outer_lr, outer_momentum: the outer SGD's learning rate and momentum.
        sync_every: ``H``, inner steps between two syncs of a fragment.
        fragments: ``P``: an int (the parameters, in the inner optimizer's order, cut
            into ``P`` contiguous fragments of about equal size) or a sequence of
            parameter lists that partitions the inner optimizer's parameters.
            ``P <= sync_every``.
        overlap_steps: ``tau`` in ``[0, sync_every)``: inner steps that overlap the
            communication of a fragment's outer gradient.
        alpha: mixing factor in ``[0, 1]`` at a fragment's sync (0: take the global one).
        outer_grad_precision: ``"fp32"``, ``"bf16"`` or ``"q8"`` (see the module docs).
        outer_placement: ``"device"`` (global copy and outer state beside the
            parameters) or ``"cpu"`` (in host memory; the outer step runs there).
        process_group: the workers; ``None``: the default group (if initialized).

    On construction the parameters of rank 0 of the group are broadcast, so that
    every worker starts from the same global point.
    """

    def __init__(self, inner: torch.optim.Optimizer, outer: str | Callable = "nesterov", outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, sync_every: int = 500, *, fragments: int | Sequence = 1,
                 overlap_steps: int = 0, alpha: float = 0.0, outer_grad_precision: str = "fp32",
                 outer_placement: str = "device", process_group=None):
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"inner must be a torch.optim.Optimizer, got {type(inner).__name__}")
        if isinstance(outer, str):
            if outer not in ("nesterov", "sgd"):
                raise ValueError(f"Invalid outer: {outer!r} (must be 'nesterov', 'sgd' or an optimizer factory)")
            outer_lr = _real("outer_lr", outer_lr, 0.0, None, low_open=True)
            outer_momentum = _real("outer_momentum", outer_momentum, 0.0, 1.0)
            if outer == "nesterov" and outer_momentum == 0.0:
                raise ValueError("Invalid outer_momentum: 0.0 (outer='nesterov' needs a momentum > 0; "
                                 "use outer='sgd' for plain SGD)")
        elif not callable(outer):
            raise TypeError(f"outer must be 'nesterov', 'sgd' or a callable returning an optimizer, "
                            f"got {type(outer).__name__}")
        self.sync_every = _int("sync_every", sync_every, 1)
        self.overlap_steps = _int("overlap_steps", overlap_steps, 0)
        if self.overlap_steps >= self.sync_every:
            raise ValueError(f"Invalid overlap_steps: {overlap_steps} (must be < sync_every = {self.sync_every})")
        self.alpha = _real("alpha", alpha, 0.0, 1.0, high_open=False)
        if not isinstance(outer_grad_precision, str) or outer_grad_precision not in OUTER_GRAD_PRECISIONS:
            raise ValueError(f"Invalid outer_grad_precision: {outer_grad_precision!r} "
                             f"(must be one of {', '.join(OUTER_GRAD_PRECISIONS)})")
        self.outer_grad_precision = outer_grad_precision
        if not isinstance(outer_placement, str) or outer_placement not in OUTER_PLACEMENTS:
            raise ValueError(f"Invalid outer_placement: {outer_placement!r} (must be 'device' or 'cpu')")
        self.outer_placement = outer_placement
        self.process_group = process_group
        self.rank, self.world_size = _world(process_group)

        params = self._inner_params(inner)
        if not params:
            raise ValueError("inner has no parameters")
        bad = [p for p in params if not p.is_floating_point()]
        if bad:
            raise TypeError(f"DiLoCo needs real floating-point parameters, got {bad[0].dtype} "
                            f"(complex parameters: train their torch.view_as_real views)")
        self._fragments = self._split(params, fragments)
        if len(self._fragments) > self.sync_every:
            raise ValueError(f"Invalid fragments: {len(self._fragments)} fragments (must be <= sync_every = "
                             f"{self.sync_every}: each fragment syncs at its own step of the round)")
        self.inner = inner
        self._params = params
        self._index = {p: i for i, p in enumerate(params)}
        n = len(self._fragments)
        self._offsets = [((p + 1) * self.sync_every) // n % self.sync_every for p in range(n)]

        with torch.no_grad():
            if self.world_size > 1:
                src = torch.distributed.get_global_rank(process_group, 0) if process_group is not None else 0
                for p in params:
                    torch.distributed.broadcast(p.data, src=src, group=process_group)
            self._global = [p.detach().to("cpu", copy=True) if outer_placement == "cpu" else p.detach().clone()
                            for p in params]
        if isinstance(outer, str):
            self.outer = torch.optim.SGD(self._global, lr=outer_lr, momentum=outer_momentum,
                                         nesterov=outer == "nesterov")
        else:
            self.outer = outer(self._global)
            if not isinstance(self.outer, torch.optim.Optimizer):
                raise TypeError(f"outer factory must return a torch.optim.Optimizer, "
                                f"got {type(self.outer).__name__}")
        self._step = 0
        self.syncs = [0] * n
        #: payload bytes this worker has sent in outer-gradient collectives
        self.communicated_bytes = 0
        self._pending: list[_Pending] = []

    # --------------------------------------------------------------- setup helpers
    @staticmethod
    def _inner_params(inner) -> list[Tensor]:
        seen, out = set(), []
        for g in inner.param_groups:
            for p in g["params"]:
                if p not in seen:
                    seen.add(p)
                    out.append(p)
        return out

    @staticmethod
    def _split(params: list[Tensor], fragments) -> list[list[Tensor]]:
        if isinstance(fragments, numbers.Integral) and not isinstance(fragments, bool):
            count = int(fragments)
            if count < 1 or count > len(params):
                raise ValueError(f"Invalid fragments: {count} (must be in [1, {len(params)}], the number of "
                                 f"parameters)")
            total = sum(p.numel() for p in params)
            out: list[list[Tensor]] = [[]]
            seen = 0
            for i, p in enumerate(params):
                left, unopened = len(params) - i, count - len(out)
                if out[-1] and unopened and (left <= unopened or seen >= len(out) * total / count):
                    out.append([])
                out[-1].append(p)
                seen += p.numel()
            return out
        if isinstance(fragments, (str, bytes)) or not isinstance(fragments, Sequence):
            raise TypeError(f"fragments must be an int or a sequence of parameter lists, "
                            f"got {type(fragments).__name__}")
        out = [list(f) for f in fragments]
        flat = [p for f in out for p in f]
        if not out or any(not f for f in out):
            raise ValueError("Invalid fragments: every fragment needs at least one parameter")
        ids = {id(p) for p in params}
        if len(flat) != len(params) or {id(p) for p in flat} != ids or len({id(p) for p in flat}) != len(flat):
            raise ValueError("Invalid fragments: the fragments must partition the inner optimizer's parameters "
                             "(each parameter in exactly one fragment)")
        return out

    # --------------------------------------------------------------- the torch.optim surface
    @property
    def param_groups(self):
        """The inner optimizer's param groups (give LR schedulers ``opt.inner``)."""
        return self.inner.param_groups

    @property
    def state(self):
        """The inner optimizer's state."""
        return self.inner.state

    @property
    def fragments(self) -> list[list[Tensor]]:
        """The parameter fragments; fragment ``p`` syncs at the steps :meth:`sync_steps` gives."""
        return [list(f) for f in self._fragments]

    @property
    def global_params(self) -> list[Tensor]:
        """The global (outer) copy of every parameter, in the inner optimizer's order."""
        return list(self._global)

    @property
    def local_step(self) -> int:
        """Inner steps taken so far."""
        return self._step

    def sync_steps(self, fragment: int) -> tuple[int, int]:
        """``(first, period)``: fragment ``fragment`` syncs at steps ``first + k * period``."""
        off = self._offsets[fragment]
        return (off if off else self.sync_every), self.sync_every

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``."""
        self.inner.zero_grad(set_to_none)

    # --------------------------------------------------------------- step
    def step(self, closure=None):
        """One inner step; then the outer-gradient collectives that start at this step
        and the outer steps due at it. Returns the closure's loss, if any."""
        loss = self.inner.step(closure) if closure is not None else self.inner.step()
        self._step += 1
        t = self._step
        for f, off in enumerate(self._offsets):
            if (t + self.overlap_steps) % self.sync_every == off:
                self._start(f, due=t + self.overlap_steps)
        due = [pend for pend in self._pending if pend.due == t]
        if due:
            self._pending = [pend for pend in self._pending if pend.due != t]
            for pend in due:
                self._apply(pend)
        return loss

    def _buckets(self, fragment: int) -> list[list[int]]:
        """Parameter indices of ``fragment`` grouped by (device, dtype): one flat buffer each."""
        keyed: dict = {}
        for p in self._fragments[fragment]:
            keyed.setdefault((p.device, p.dtype), []).append(self._index[p])
        return list(keyed.values())

    @torch.no_grad()
    def _start(self, fragment: int, due: int) -> None:
        finishers = []
        for idx in self._buckets(fragment):
            flat = torch.cat([(self._global[i].to(self._params[i].device) - self._params[i].detach()).reshape(-1)
                              for i in idx])
            finishers.append(self._communicate(flat))

        def finish() -> list[Tensor]:
            return [f() for f in finishers]
        self._pending.append(_Pending(fragment, due, finish))

    def _communicate(self, flat: Tensor) -> Callable[[], Tensor]:
        """Start the collective that averages ``flat`` over the workers; returns the
        function that waits for it and gives the mean (in ``flat``'s dtype)."""
        dist, group, world = torch.distributed, self.process_group, self.world_size
        prec = self.outer_grad_precision
        acc = torch.float64 if flat.dtype == torch.float64 else torch.float32
        if prec == "fp32":  # float32 (float64 for float64 parameters), summed by the backend
            buf = flat.to(acc)
            self.communicated_bytes += buf.numel() * buf.element_size()
            if world == 1:
                return lambda: buf.to(flat.dtype)
            work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True)

            def finish_sum():
                work.wait()
                return buf.div_(world).to(flat.dtype)
            return finish_sum
        if prec == "bf16":
            payload = [flat.to(torch.bfloat16).view(torch.uint8)]  # the bytes: exact over any backend

            def decode(parts):
                return parts[0].view(torch.bfloat16).to(acc)
        else:
            from ..state.codecs import Q8
            codec = Q8()
            storage = codec.encode(flat.float(), signed=True)
            payload = [storage["codes"], storage["absmax"]]

            def decode(parts):
                return codec.decode({"codes": parts[0], "absmax": parts[1]}, (flat.numel(),), signed=True).to(acc)
        self.communicated_bytes += sum(t.numel() * t.element_size() for t in payload)
        if world == 1:
            return lambda: decode(payload).to(flat.dtype)
        gathered = [[torch.empty_like(t) for _ in range(world)] for t in payload]
        works = [dist.all_gather(g, t, group=group, async_op=True) for g, t in zip(gathered, payload)]

        def finish_gather():
            for w in works:
                w.wait()
            total = decode([g[0] for g in gathered])
            for r in range(1, world):  # rank order: every worker adds the same numbers in the same order
                total = total + decode([g[r] for g in gathered])
            return total.div_(world).to(flat.dtype)
        return finish_gather

    @torch.no_grad()
    def _apply(self, pend: _Pending) -> None:
        means = pend.means()
        frag_idx = [i for idx in self._buckets(pend.fragment) for i in idx]
        for g in self._global:
            g.grad = None
        for idx, mean in zip(self._buckets(pend.fragment), means):
            offset = 0
            for i in idx:
                g = self._global[i]
                n = g.numel()
                g.grad = mean[offset:offset + n].view(g.shape).to(g.device, copy=True)
                offset += n
        self.outer.step()
        for i in frag_idx:
            g, p = self._global[i], self._params[i]
            g.grad = None
            if self.alpha == 0.0:
                p.copy_(g)
            else:
                mixed = g.to(p.device, copy=True)
                mixed.lerp_(p.detach(), self.alpha)
                p.copy_(mixed)
        self.syncs[pend.fragment] += 1

    # --------------------------------------------------------------- state dict
    def state_dict(self) -> dict:
        """``{"inner": ..., "outer": ..., "diloco": {...}}``: the inner and outer optimizers'
        state dicts, the global parameters, step and sync counters and any outer gradient
        in flight (waited for and stored as its mean). Tensors and plain values only."""
        return {"inner": self.inner.state_dict(), "outer": self.outer.state_dict(),
                "diloco": {"step": self._step, "syncs": list(self.syncs),
                           "communicated_bytes": self.communicated_bytes,
                           "fragments": [[self._index[p] for p in f] for f in self._fragments],
                           **{k: getattr(self, k) for k in _SETTINGS},
                           "global": [g.clone() for g in self._global],
                           "pending": [{"fragment": pend.fragment, "due": pend.due,
                                        "means": [m.clone() for m in pend.means()]} for pend in self._pending]}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a dict from :meth:`state_dict`; the schedule settings and fragments must
        match this wrapper's (``ValueError`` naming the key otherwise, before anything
        is changed)."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"inner", "outer", "diloco"}:
            raise ValueError("DiLoCo.load_state_dict expects {'inner': ..., 'outer': ..., 'diloco': ...} "
                             "(a dict from DiLoCo.state_dict())")
        mine = state_dict["diloco"]
        for k in _SETTINGS:
            if mine.get(k) != getattr(self, k):
                raise ValueError(f"diloco {k}: {mine.get(k)!r} saved, {getattr(self, k)!r} here")
        frags = [[self._index[p] for p in f] for f in self._fragments]
        if [list(map(int, f)) for f in mine["fragments"]] != frags:
            raise ValueError("diloco fragments: the saved fragments differ from this wrapper's")
        saved = mine["global"]
        if len(saved) != len(self._global) or any(tuple(s.shape) != tuple(g.shape)
                                                  for s, g in zip(saved, self._global)):
            raise ValueError("diloco global: the saved global parameters do not match the inner parameters")
        if len(mine["syncs"]) != len(self._fragments):
            raise ValueError("diloco syncs: one count per fragment expected")
        for pend in mine["pending"]:
            f = int(pend["fragment"])
            if not 0 <= f < len(self._fragments) or len(pend["means"]) != len(self._buckets(f)):
                raise ValueError(f"diloco pending: entry for fragment {f} does not match the fragments")
        self.inner.load_state_dict(state_dict["inner"])
        self.outer.load_state_dict(state_dict["outer"])
        with torch.no_grad():
            for g, s in zip(self._global, saved):
                g.copy_(s)
        self._step = int(mine["step"])
        self.syncs = [int(s) for s in mine["syncs"]]
        self.communicated_bytes = int(mine["communicated_bytes"])
        self._pending = []
        for pend in mine["pending"]:
            f = int(pend["fragment"])
            means = [m.to(self._params[idx[0]].device, self._params[idx[0]].dtype, copy=True)
                     for m, idx in zip(pend["means"], self._buckets(f))]
            self._pending.append(_Pending(f, int(pend["due"]), list, result=means))
