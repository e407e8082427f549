"""DiLoCo sync cost by outer-gradient precision, side by side (gloo ranks on CPU).

Each rank holds the same ~``--numel`` fp32 parameters (in 8 tensors) and an inner
SGD; one outer sync (outer gradient, collective, decode and mean, Nesterov step,
reset) is timed as ``step()`` of a DiLoCo with ``sync_every=1`` minus the plain
inner step, for fp32 / bf16 / q8 in interleaved rounds. Prints the median sync time
of each precision as a ratio to fp32 and the payload bytes per parameter each
worker sent. Usage: ``python benchmarks/diloco_sync.py [--world 2] [--numel 4000000]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRECISIONS = ("fp32", "bf16", "q8")


def _rank(rank, world, numel, rounds, store, out):
    import optimkit as ok

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    shapes = [(numel // 8,)] * 8
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    opts = {p: ok.DiLoCo(torch.optim.SGD(params, lr=1e-3), sync_every=1, outer_grad_precision=p)
            for p in PRECISIONS}
    plain = torch.optim.SGD(params, lr=1e-3)
    times = {p: [] for p in PRECISIONS + ("inner",)}
    for r in range(rounds):
        order = list(PRECISIONS[r % 3:] + PRECISIONS[:r % 3]) + ["inner"]
        for p in order:
            for q, gr in zip(params, grads):
                q.grad = gr
            dist.barrier()
            t0 = time.perf_counter()
            (plain if p == "inner" else opts[p]).step()
            times[p].append(time.perf_counter() - t0)
    if rank == 0:
        torch.save({"times": times, "bytes": {p: opts[p].communicated_bytes / rounds / numel
                                              for p in PRECISIONS}}, out)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--numel", type=int, default=4_000_000)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.pt")
        mp.spawn(_rank, args=(args.world, args.numel, args.rounds, os.path.join(d, "store"), out),
                 nprocs=args.world)
        res = torch.load(out)
    inner = statistics.median(res["times"]["inner"])
    sync = {p: statistics.median(res["times"][p]) - inner for p in PRECISIONS}
    print(f"DiLoCo sync, {args.world} gloo ranks, {args.numel} fp32 params, median of {args.rounds}:")
    for p in PRECISIONS:
        print(f"  {p:5s} sync time {sync[p] / sync['fp32']:.2f}x fp32   sent {res['bytes'][p]:.4f} B/param")


if __name__ == "__main__":
    main()
