"""Launch a function on several CPU ranks (gloo) from a test: ``run_ranks``.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` fresh Python processes,
each joins one gloo process group (rendezvous through a file, so there is no port
to race for), imports ``fn`` by module and qualified name, calls
``fn(rank, world_size, *args)`` and sends back what it returns (anything
``torch.save`` can write). The list of per-rank results comes back in rank order.
A rank that fails or hangs fails the call with the ranks' logs; every rank is
killed on the way out, so a hang costs ``timeout`` seconds, not the CI job.

``fn`` must be a module-level function of an importable module (a test module
is fine: the tests folder is on the workers' path). Workers run with one thread
(``torch.set_num_threads(1)``), CPU only.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import time

import torch

__all__ = ["run_ranks", "one_thread"]


@contextlib.contextmanager
def one_thread():
    """Run the block with one intra-op thread (the count is restored after): the
    single-process references of small distributed tests run 10-40x faster on a
    shared CI machine than with a thread per core fighting the rank processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker() -> None:
    """Entry point of one rank: ``python -c ... <job dir> <rank>``."""
    job, rank = sys.argv[1], int(sys.argv[2])
    with open(os.path.join(job, "job.pkl"), "rb") as f:
        spec = pickle.load(f)
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(spec["backend"], init_method="file://" + os.path.join(job, "store"), rank=rank,
                            world_size=spec["world_size"], timeout=datetime.timedelta(seconds=spec["timeout"]))
    try:
        fn = _resolve(spec["module"], spec["qualname"])
        result = fn(rank, spec["world_size"], *spec["args"])
        torch.save(result, os.path.join(job, f"result{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 180.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; per-rank results.

    ``args`` are pickled to the workers; a rank that raises, exits non-zero or is
    still running after ``timeout`` seconds raises ``AssertionError`` here (with
    the tail of each rank's log) after every rank has been stopped.
    """
    if fn.__module__ == "__main__" or "<locals>" in fn.__qualname__:
        raise ValueError("run_ranks needs a module-level function of an importable module")
    if not torch.distributed.is_available():
        import pytest

        pytest.skip("torch.distributed is not available")
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as job:
        with open(os.path.join(job, "job.pkl"), "wb") as f:
            pickle.dump({"module": fn.__module__, "qualname": fn.__qualname__, "args": args,
                         "world_size": world_size, "timeout": timeout, "backend": backend}, f)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([here] + [p for p in sys.path if p]))
        code = "import dist_helpers; dist_helpers._worker()"
        logs = [open(os.path.join(job, f"log{r}.txt"), "wb") for r in range(world_size)]
        procs = [subprocess.Popen([sys.executable, "-c", code, job, str(r)], stdout=logs[r],
                                  stderr=subprocess.STDOUT, env=env) for r in range(world_size)]
        deadline, failed_at, problem = time.monotonic() + timeout, None, None
        try:
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                    failed_at = now  # give the others a moment to report, then stop them
                if now > deadline:
                    problem = f"ranks still running after {timeout:.0f} s"
                    break
                if failed_at is not None and now > failed_at + 5:
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for f in logs:
                f.close()
        codes = [p.returncode for p in procs]
        if problem or any(c != 0 for c in codes):
            tails = []
            for r in range(world_size):
                with open(os.path.join(job, f"log{r}.txt"), "rb") as f:
                    tails.append(f"--- rank {r} (exit {codes[r]}):\n" + f.read().decode(errors="replace")[-3000:])
            raise AssertionError(f"run_ranks({fn.__qualname__}, {world_size}): {problem or 'a rank failed'}\n"
                                 + "\n".join(tails))
        return [torch.load(os.path.join(job, f"result{r}.pt"), weights_only=False) for r in range(world_size)]
