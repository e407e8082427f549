"""Step-time benchmark: optimkit's optimizers against torch.optim (and peers).

Every contender steps its own copy of the same transformer-shaped parameter
set with the same gradients. Contenders are timed round-robin (a few steps
each per round, many rounds) so that machine noise hits all of them alike;
we report the median step time, ns per parameter, and ratios to torch's
fused AdamW. The streaming-bandwidth limit is the step's bytes moved divided
by the measured copy bandwidth: no implementation can be faster.

    python benchmarks/step_speed.py            # or: optimkit speed
    python benchmarks/step_speed.py --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import optimkit as ok


def transformer_shapes(target_params: float = 8e6, d_model: int = 256, vocab: int = 8192) -> list[tuple]:
    """Shapes of a GPT-like model: embedding, per layer qkv/proj/mlp weights,
    biases and norm gains; as many layers as fit ``target_params``."""
    layer = [(3 * d_model, d_model), (3 * d_model,), (d_model, d_model), (d_model,),
             (4 * d_model, d_model), (4 * d_model,), (d_model, 4 * d_model), (d_model,),
             (d_model,), (d_model,), (d_model,), (d_model,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    emb = vocab * d_model
    n_layers = max(1, round((target_params - emb) / per_layer))
    return [(vocab, d_model)] + layer * n_layers + [(d_model,), (d_model,)]


@dataclass
class Contender:
    name: str
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    bytes_per_param: float  # state bytes per parameter (fp32 = 4 per state tensor)
    times: list[float] = field(default_factory=list)


def default_contenders(device: str = "cpu") -> list[Contender]:
    out = [
        Contender("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), 8),
        Contender("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), 8),
        Contender("optimkit AdamW eager", lambda ps: ok.AdamW(ps, lr=1e-3), 8),
        Contender("optimkit AdamW compiled", lambda ps: ok.AdamW(ps, lr=1e-3, compile=True), 8),
    ]
    return out


def copy_bandwidth(n_bytes: int = 256 << 20, repeats: int = 7, device: str = "cpu") -> float:
    """Measured streaming bandwidth in bytes/second: ``a += b`` on large float32
    tensors moves 3 bytes per byte of ``a`` (read a, read b, write a in place,
    like an optimizer step; a plain copy would also pay for write-allocate)."""
    a = torch.ones(n_bytes // 4, device=device)
    b = torch.ones_like(a)
    ts = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a.add_(b)
        _sync(device)
        ts.append(time.perf_counter() - t)
    return 3 * n_bytes / statistics.median(ts)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(target_params: float = 8e6, rounds: int = 15, steps_per_round: int = 3, warmup: int = 3,
        contenders: list[Contender] | None = None, device: str = "cpu", seed: int = 0,
        progress: Callable[[str], None] | None = None) -> dict:
    shapes = transformer_shapes(target_params)
    n = sum(torch.Size(s).numel() for s in shapes)
    contenders = contenders or default_contenders(device)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    runs = []
    for c in contenders:
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt = c.make(params)
        t0 = time.perf_counter()
        for _ in range(warmup):  # includes compilation
            opt.step()
        _sync(device)
        if progress:
            progress(f"{c.name}: warm-up {time.perf_counter() - t0:.1f}s")
        runs.append((c, opt))
    for _ in range(rounds):
        for c, opt in runs:
            for _ in range(steps_per_round):
                _sync(device)
                t = time.perf_counter()
                opt.step()
                _sync(device)
                c.times.append(time.perf_counter() - t)
    bw = copy_bandwidth(device=device)
    results = []
    base = None
    for c, _ in runs:
        med = statistics.median(c.times)
        if c.name == "torch AdamW fused":
            base = med
        results.append({"name": c.name, "median_s": med, "ns_per_param": med / n * 1e9,
                        "state_bytes_per_param": c.bytes_per_param})
    for r in results:
        r["vs_torch_fused"] = r["median_s"] / base if base else None
    # AdamW moves: params r/w (8) + grads r (4) + two fp32 states r/w (16) bytes/param.
    limit = 28 * n / bw
    return {"params": n, "tensors": len(shapes), "device": device, "threads": torch.get_num_threads(),
            "copy_bandwidth_GBps": bw / 1e9, "bandwidth_limit_s": limit,
            "bandwidth_limit_vs_torch_fused": limit / base if base else None, "results": results}


def format_table(report: dict) -> str:
    lines = [f"{report['params'] / 1e6:.2f}M parameters in {report['tensors']} tensors on "
             f"{report['device']} ({report['threads']} threads); median of round-robin steps",
             f"{'contender':<28}{'ns/param':>10}{'vs torch fused':>16}{'state B/param':>15}"]
    for r in report["results"]:
        ratio = f"{r['vs_torch_fused']:.3f}x" if r["vs_torch_fused"] else "-"
        lines.append(f"{r['name']:<28}{r['ns_per_param']:>10.3f}{ratio:>16}{r['state_bytes_per_param']:>15.2f}")
    lines.append(f"{'bandwidth limit (AdamW fp32)':<28}{report['bandwidth_limit_s'] / report['params'] * 1e9:>10.3f}"
                 f"{report['bandwidth_limit_vs_torch_fused']:>15.3f}x"
                 f"   (copy bandwidth {report['copy_bandwidth_GBps']:.1f} GB/s)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=float, default=8.0, help="millions of parameters (default 8)")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (default 15)")
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        parser = argparse.ArgumentParser(prog="optimkit speed", description=__doc__.split("\n\n")[0])
        add_arguments(parser)
        args = parser.parse_args(argv)
    report = run(target_params=args.params * 1e6, rounds=args.rounds, steps_per_round=args.steps_per_round,
                 device=args.device, progress=None if args.json else lambda s: print(s, file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
