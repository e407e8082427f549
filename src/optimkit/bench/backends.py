"""Where trials run: this process, a pool of local processes, or Ray tasks.

A backend has ``capacity`` (trials it can hold at once), ``submit(spec)``
and ``wait() -> (spec, result)`` returning one finished trial. Results come
back to the driver, which alone writes the results store.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from typing import Any

from .protocol import BenchError
from .runner import TrialSpec, run_trial

__all__ = ["LocalBackend", "ProcessBackend", "RayBackend", "make_backend"]


class LocalBackend:
    """Trials run one after another in this process."""

    name = "local"

    def __init__(self, threads: int = 1):
        self.threads = threads
        self.capacity = 1
        self._queue: list[TrialSpec] = []

    def submit(self, spec: TrialSpec) -> None:
        self._queue.append(spec)

    def wait(self) -> tuple[TrialSpec, dict]:
        spec = self._queue.pop(0)
        return spec, run_trial(spec, threads=self.threads)

    def close(self) -> None:
        self._queue.clear()


def _run_payload(payload: dict, threads: int) -> dict:
    return run_trial(payload, threads=threads)


class ProcessBackend:
    """``jobs`` worker processes on this machine (spawned, one torch thread each)."""

    name = "local"

    def __init__(self, jobs: int, threads: int = 1):
        self.capacity = jobs
        self.threads = threads
        self._pool = cf.ProcessPoolExecutor(max_workers=jobs,
                                            mp_context=multiprocessing.get_context("spawn"))
        self._futures: dict[cf.Future, TrialSpec] = {}

    def submit(self, spec: TrialSpec) -> None:
        self._futures[self._pool.submit(_run_payload, spec.to_dict(), self.threads)] = spec

    def wait(self) -> tuple[TrialSpec, dict]:
        done, _ = cf.wait(list(self._futures), return_when=cf.FIRST_COMPLETED)
        fut = next(iter(done))
        spec = self._futures.pop(fut)
        return spec, fut.result()

    def close(self) -> None:
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


class RayBackend:
    """Trials as Ray tasks: a local Ray runtime, or an existing cluster by ``address``.

    Every worker must be able to import ``optimkit`` (installed in the
    cluster's Python environment).
    """

    name = "ray"

    def __init__(self, address: str | None = None, jobs: int | None = None, threads: int = 1):
        try:
            import ray
        except ImportError:
            raise BenchError("--backend ray needs Ray: pip install 'ray'") from None
        self.ray = ray
        self._owns_runtime = not ray.is_initialized()
        if self._owns_runtime:
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                          configure_logging=False)
            if address:
                kwargs["address"] = address
            elif jobs:
                kwargs["num_cpus"] = jobs
            try:
                ray.init(**kwargs)
            except Exception as exc:  # ConnectionError, RuntimeError, ...
                where = f"at {address}" if address else "locally"
                raise BenchError(f"cannot start Ray {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.capacity = max(1, min(jobs, cpus) if jobs else cpus)
        self.threads = threads
        self._task = ray.remote(num_cpus=1, max_retries=1)(_run_payload)
        self._refs: dict[Any, TrialSpec] = {}

    def submit(self, spec: TrialSpec) -> None:
        self._refs[self._task.remote(spec.to_dict(), self.threads)] = spec

    def wait(self) -> tuple[TrialSpec, dict]:
        ready, _ = self.ray.wait(list(self._refs), num_returns=1)
        ref = ready[0]
        spec = self._refs.pop(ref)
        return spec, self.ray.get(ref)

    def close(self) -> None:
        for ref in self._refs:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:
                pass
        self._refs.clear()
        if self._owns_runtime:
            self.ray.shutdown()


def make_backend(kind: str, jobs: int = 1, address: str | None = None, threads: int = 1):
    if kind == "local":
        if jobs < 1:
            raise BenchError(f"--jobs must be at least 1, got {jobs}")
        return LocalBackend(threads) if jobs == 1 else ProcessBackend(jobs, threads)
    if kind == "ray":
        return RayBackend(address, jobs if jobs and jobs > 1 else None, threads)
    raise BenchError(f"unknown backend {kind!r} (local or ray)")
