"""Drive a bench run: plan studies, run their trials on a backend, store results.

The driver keeps every study's finished trials (read back from the store when
resuming), asks each study for the trials it can start, hands them to the
backend up to its capacity, and stores each result as soon as it returns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .backends import make_backend
from .progress import Progress
from .protocol import BenchConfig, BenchError, Study
from .runner import state_nbytes
from .store import Store

__all__ = ["run_bench", "BenchOutcome", "measure_state_bytes"]


@dataclass
class BenchOutcome:
    run_id: int
    how: str                 # "new", "resumed" or "complete"
    ran: int = 0             # trials run by this invocation
    reused: int = 0          # finished trials found in the store
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def measure_state_bytes(name: str, hparams: dict) -> float | None:
    """Measured optimizer-state bytes per parameter after one step on a small MLP."""
    import optimkit

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    try:
        opt = optimkit.create(name, model.parameters(), **hparams)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward(create_graph=type(opt).requires_create_graph)
        opt.step()
    except Exception:
        return None
    return state_nbytes(opt) / sum(p.numel() for p in model.parameters())


def run_bench(cfg: BenchConfig, store: Store, backend: str = "local", jobs: int = 1,
              address: str | None = None, new_run: bool = False, progress: bool = True,
              threads: int = 1, on_note=None) -> BenchOutcome:
    """Run (or resume) the bench described by ``cfg``; results go to ``store``."""
    import optimkit

    t_start = time.monotonic()
    config = cfg.to_json()
    run_id, how = store.open_run(config, cfg.config_hash(), backend, new=new_run)
    outcome = BenchOutcome(run_id=run_id, how=how)
    studies = cfg.studies()
    by_ident = {s.ident: s for s in studies}
    for spec, row in store.finished_specs(run_id):
        study = by_ident.get((spec.workload, spec.optimizer, spec.track))
        if study is not None:
            study.add_result(spec, row)
            outcome.reused += 1
    if how == "complete" or all(s.complete() for s in studies):
        if how != "complete":
            store.finish_run(run_id)
            outcome.how = "complete"
        outcome.seconds = time.monotonic() - t_start
        return outcome

    for o in cfg.optimizers:
        info = optimkit.info(o.name)
        store.save_optimizer(run_id, o.label, o.name, o.hparams, info.family,
                             float(info.state_bytes), measure_state_bytes(o.name, o.hparams))

    units_per_trial = {s.ident: float(s.budget) for s in studies}
    total_trials = sum(s.planned_trials() for s in studies)
    bar = Progress(total_units=sum(s.planned_trials() * s.budget for s in studies),
                   total_trials=total_trials, enabled=progress)
    for s in studies:
        bar.skip(len(s.results) * s.budget, len(s.results))

    back = make_backend(backend, jobs=jobs, address=address, threads=threads)
    active: dict[str, Study] = {}
    try:
        while True:
            for study in studies:
                if len(active) >= back.capacity:
                    break
                for spec in study.next_specs(set(active)):
                    if len(active) >= back.capacity:
                        break
                    back.submit(spec)
                    active[spec.key] = study
            if not active:
                break
            spec, result = back.wait()
            study = active.pop(spec.key)
            store.save_trial(run_id, spec, study.workload.metric, result)
            study.add_result(spec, result)
            outcome.ran += 1
            if result["status"] == "error":
                msg = f"{spec.optimizer} on {spec.workload}: {result['error']}"
                if msg not in outcome.errors:
                    outcome.errors.append(msg)
                    bar.note(f"note: trial failed: {msg}")
            bar.advance(units_per_trial[study.ident],
                        f"{spec.workload} / {spec.optimizer} ({spec.track} {spec.phase})")
    finally:
        back.close()
        bar.close()
    unfinished = [s for s in studies if not s.complete()]
    if unfinished:  # should not happen: every study plans its own trials to the end
        raise BenchError(f"bench stopped with unfinished studies: {unfinished[:3]}")
    store.finish_run(run_id)
    outcome.seconds = time.monotonic() - t_start
    return outcome
