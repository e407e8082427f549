"""One benchmark trial: train one optimizer on one workload with one seed.

A trial is described by a :class:`TrialSpec` and returns a plain ``dict``
(picklable, JSON-friendly) so that it can run in this process, in a worker
process or as a Ray task, and land in the results store unchanged.

Time-to-target follows AlgoPerf: the metric is evaluated every
``eval_every`` steps; the first evaluation at or below the target gives the
steps and the training wall seconds (evaluation time is not counted) needed
to reach it.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .workloads import get_workload

__all__ = ["TrialSpec", "run_trial", "state_nbytes"]

TRACKS = ("external", "self")
PHASES = ("tune", "eval")


@dataclass(frozen=True)
class TrialSpec:
    """What to run: the optimizer (registry ``name`` plus ``hparams``) on a workload."""

    workload: str
    optimizer: str               # label of the optimizer spec, e.g. "sgd:momentum=0.9"
    name: str                    # registry name passed to optimkit.create
    hparams: dict[str, Any] = field(hash=False)
    seed: int = 0
    steps: int = 100
    eval_every: int = 10
    target: float = 0.0
    track: str = "external"
    phase: str = "eval"
    stop_at_target: bool = False

    @property
    def key(self) -> str:
        """A stable identity: the same key is the same trial (used for resuming)."""
        return json.dumps([self.track, self.phase, self.workload, self.optimizer,
                           _jsonable(self.hparams), self.seed, self.steps, self.stop_at_target],
                          sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hparams"] = _jsonable(self.hparams)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrialSpec":
        d = dict(d)
        d["hparams"] = _from_jsonable(d["hparams"])
        return cls(**d)


def _jsonable(hp: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(hp.items())}


def _from_jsonable(hp: dict) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in hp.items()}


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state tensors (0-d counters excluded)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                total += v.numel() * v.element_size()
    return total


def _param_groups(cls, task, hparams: dict):
    """The optimizer's own param groups for the task's model (``param_groups_for``,
    e.g. Muon's split by module type), else the task's parameters."""
    params = task.parameters()
    if task.module is None:
        return params
    groups = cls.param_groups_for(task.module, dict(hparams))
    if groups is None:
        return params
    grouped = [id(p) for g in groups for p in g["params"]]
    if sorted(grouped) != sorted(id(p) for p in params):
        raise RuntimeError(f"{cls.__name__}.param_groups_for does not hold the task's parameters once each")
    return groups


def run_trial(spec: TrialSpec | dict, threads: int | None = 1) -> dict:
    """Run one trial and return its result (see :data:`RESULT_FIELDS` in the store).

    ``threads`` sets torch's intra-op threads for the trial (restored after);
    ``None`` leaves it alone. Exceptions from the optimizer are caught and
    reported as ``status="error"``; a non-finite loss or metric ends the
    trial as ``status="diverged"``.
    """
    if isinstance(spec, dict):
        spec = TrialSpec.from_dict(spec)
    import optimkit

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    workload = get_workload(spec.workload)
    result: dict[str, Any] = {
        "key": spec.key, "status": "ok", "reached": False, "steps_to_target": None,
        "seconds_to_target": None, "final_metric": None, "best_metric": None,
        "final_train_loss": None, "steps_run": 0, "train_seconds": 0.0, "opt_seconds": 0.0,
        "eval_seconds": 0.0, "n_params": 0, "state_bytes": 0, "data_hash": workload.data_hash(),
        "worker": f"{socket.gethostname()}:{os.getpid()}", "error": None, "started": started,
        "finished": None, "series": [],
    }
    series = result["series"]
    try:
        task = workload.make(spec.seed)
        params = task.parameters()
        result["n_params"] = sum(p.numel() for p in params)
        cls = optimkit.info(spec.name).cls
        opt = optimkit.create(spec.name, _param_groups(cls, task, spec.hparams), **spec.hparams)
        create_graph = cls.requires_create_graph
        if cls.gradient_free:
            raise ValueError(f"{spec.name} is zeroth-order: it evaluates the loss at perturbed weights on the "
                             "same batch, which bench workloads (one fresh batch per loss call) do not offer")
        # rules that read the loss (Polyak steps) get it through a closure over this step's loss
        with_loss = cls.requires_closure

        # optimizers with an evaluation point of their own (schedule-free) are evaluated there
        modes = callable(getattr(opt, "eval", None)) and callable(getattr(opt, "train", None))

        def evaluate(step: int, train_seconds: float, train_loss: float | None) -> float:
            t0 = time.perf_counter()
            if modes:
                opt.eval()
            try:
                value = task.evaluate()
            finally:
                if modes:
                    opt.train()
            result["eval_seconds"] += time.perf_counter() - t0
            series.append((step, train_seconds, train_loss, value))
            return value

        value = evaluate(0, 0.0, None)
        best = value
        train_seconds = opt_seconds = 0.0
        loss_sum, loss_n = 0.0, 0
        step = 0
        for step in range(1, spec.steps + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = task.train_loss(step)
            loss.backward(create_graph=create_graph)
            t1 = time.perf_counter()
            if with_loss:
                opt.step(lambda: loss)
            else:
                opt.step()
            t2 = time.perf_counter()
            train_seconds += t2 - t0
            opt_seconds += t2 - t1
            loss_value = float(loss.detach())
            loss_sum += loss_value
            loss_n += 1
            finite = math.isfinite(loss_value)
            if not finite or step % spec.eval_every == 0 or step == spec.steps:
                mean_loss = loss_sum / loss_n if finite else loss_value
                loss_sum, loss_n = 0.0, 0
                value = evaluate(step, train_seconds, mean_loss)
                if not (finite and math.isfinite(value)):
                    result["status"] = "diverged"
                    break
                best = min(best, value)
                if not result["reached"] and value <= spec.target:
                    result.update(reached=True, steps_to_target=step, seconds_to_target=train_seconds)
                    if spec.stop_at_target:
                        break
        result.update(steps_run=step, train_seconds=train_seconds, opt_seconds=opt_seconds,
                      final_metric=_finite_or_none(value), best_metric=_finite_or_none(best),
                      final_train_loss=_finite_or_none(series[-1][2]) if series[-1][2] is not None else None,
                      state_bytes=state_nbytes(opt))
    except Exception as exc:  # a failing optimizer is a result, not a crash of the bench
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    finally:
        if threads:
            torch.set_num_threads(old_threads)
    result["series"] = [(s, t, _finite_or_none(l), _finite_or_none(v)) for s, t, l, v in series]
    result["finished"] = time.time()
    return result


def _finite_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
