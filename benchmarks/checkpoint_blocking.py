"""How long the training loop waits for a checkpoint: AsyncCheckpointer.save() against a
synchronous atomic save (optimkit.checkpoint.save_atomic: torch.save, SHA-256, flush,
fsync, rename, directory fsync) and a plain ``torch.save`` to a path (no fsync) of the
same state, side by side in one run.

    python benchmarks/checkpoint_blocking.py [--params 8e6] [--repeats 9] [--device cpu|cuda] [--dir DIR]

The state is an MLP's ``state_dict()`` and its AdamW ``state_dict()`` after one step
(3 x 4 bytes per parameter). Each repeat, in alternating order, times one synchronous
atomic save, one plain ``torch.save``, one ``save(..., until=opt)`` (the host copy
overlapping the next forward/backward; blocking = save() + what the next step waits)
and one asynchronous ``save()`` (the previous background write finished, as when
saves are further apart than a write: the blocking time is the host snapshot); between
repeats the loop trains until the background write is published. Reported: medians,
their ratio, the background write's median duration, and the median training-step time
while a write is in flight against idle (what the writer thread costs the loop).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import optimkit as ok
from optimkit import checkpoint_io as cio


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        cio._sync_stream(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=8e6, help="model parameters (state is 12 bytes each)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    width = int((args.params / 3) ** 0.5)  # three width x width layers
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(3)]).to(device)
    opt = ok.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(64, width, device=device)

    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    step()
    n = sum(p.numel() for p in model.parameters())
    state = lambda: {"model": model.state_dict(), "optimizer": opt.state_dict()}  # noqa: E731
    root = args.dir or tempfile.mkdtemp(prefix="ckpt-bench-")
    ckpt = cio.AsyncCheckpointer(os.path.join(root, "async"), keep=2)
    sync_path = os.path.join(root, "sync.pt")
    plain_path = os.path.join(root, "plain.pt")
    sync_t, plain_t, async_t, write_t, busy_steps, idle_steps = [], [], [], [], [], []
    overlap_t, overlap_steps = [], []
    for r in range(args.repeats + 1):  # the first repeat warms up (page cache, buffers) and is dropped
        order = ("sync", "plain", "async", "overlap") if r % 2 else ("overlap", "async", "plain", "sync")
        for kind in order:
            step()
            _sync(device)
            t0 = time.perf_counter()
            if kind == "sync":
                cio.save_atomic(sync_path, state())
                t = time.perf_counter() - t0
                if r:
                    sync_t.append(t)
            elif kind == "plain":
                torch.save(state(), plain_path)
                t = time.perf_counter() - t0
                if r:
                    plain_t.append(t)
            elif kind == "overlap":  # the copy overlaps the next forward/backward; its step waits for it
                ckpt.save(r, state(), until=opt)
                t = time.perf_counter() - t0
                s0 = time.perf_counter()
                step()
                _sync(device)
                if r:
                    overlap_steps.append(time.perf_counter() - s0)
                    overlap_t.append(t + ckpt.snapshot_wait_seconds)
                ckpt.wait()
            else:
                ckpt.save(r, state())
                t = time.perf_counter() - t0
                while ckpt.busy:  # the loop trains on while the write is in flight
                    s0 = time.perf_counter()
                    step()
                    _sync(device)
                    if r:
                        busy_steps.append(time.perf_counter() - s0)
                ckpt.wait()
                w = time.perf_counter() - t0
                if r:
                    async_t.append(t)
                    write_t.append(w)
        for _ in range(5):
            s0 = time.perf_counter()
            step()
            _sync(device)
            if r:
                idle_steps.append(time.perf_counter() - s0)
    ckpt.close()
    med = statistics.median
    mb = os.path.getsize(sync_path) / 2**20
    print(f"device {device}, {n / 1e6:.1f}M parameters, checkpoint {mb:.0f} MiB, {args.repeats} repeats, "
          f"torch threads {torch.get_num_threads()}")
    print(f"synchronous save_atomic        median {med(sync_t) * 1e3:8.1f} ms")
    print(f"plain torch.save (no fsync)    median {med(plain_t) * 1e3:8.1f} ms")
    print(f"AsyncCheckpointer.save blocks  median {med(async_t) * 1e3:8.1f} ms")
    print(f"  ratio async/save_atomic      {med(async_t) / med(sync_t):8.3f}")
    print(f"  ratio async/plain torch.save {med(async_t) / med(plain_t):8.3f}")
    print(f"save(until=opt) blocks         median {med(overlap_t) * 1e3:8.1f} ms "
          "(save() + the wait in the next step)")
    print(f"  ratio overlapped/save_atomic {med(overlap_t) / med(sync_t):8.3f}")
    extra = med(overlap_steps) - med(idle_steps)
    print(f"  the overlapped step / idle step: median {med(overlap_steps) / med(idle_steps):.2f}x "
          f"(+{extra * 1e3:.1f} ms: the copy shares the cores and memory bandwidth with forward/backward); "
          f"blocking + that: {(med(overlap_t) + extra) / med(sync_t):.3f} of save_atomic")
    print(f"  background write until published median {med(write_t) * 1e3:.1f} ms "
          f"({med(write_t) / med(sync_t):.2f}x the synchronous save)")
    if busy_steps:
        print(f"training step while writing / idle: median {med(busy_steps) / med(idle_steps):.2f}x "
              f"({len(busy_steps)} vs {len(idle_steps)} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
