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
import contextlib
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
    moved_bytes: float  # bytes per parameter a step must read + write (params, grads, state)
    context: Callable = contextlib.nullcontext  # wraps each step (e.g. to force a path)
    times: list[float] = field(default_factory=list)
    state_bytes: float = float("nan")


def _reference_path():
    from ..kernels import q8_adamw

    return q8_adamw.disabled()


def default_contenders(device: str = "cpu", precisions: bool = True, peers: bool = True) -> list[Contender]:
    """torch's AdamW (fused, foreach), optimkit's AdamW on each execution path
    and, with ``precisions``, in q8/q4; with ``peers``, the 8-bit AdamWs of
    bitsandbytes and torchao when they are installed."""
    out = [
        Contender("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), 28),
        Contender("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), 28),
        Contender("optimkit AdamW eager", lambda ps: ok.AdamW(ps, lr=1e-3), 28),
        Contender("optimkit AdamW compiled", lambda ps: ok.AdamW(ps, lr=1e-3, compile=True), 28),
        Contender("optimkit AdamW compiled/Inductor", lambda ps: ok.AdamW(ps, lr=1e-3, compile=True), 28,
                  _reference_path),
    ]
    if precisions:
        out += [
            Contender("optimkit q8 AdamW fast", lambda ps: ok.AdamW(ps, lr=1e-3, state_precision="q8"), 16),
            Contender("optimkit q8 AdamW fast/stochastic",
                      lambda ps: ok.AdamW(ps, lr=1e-3, state_precision="q8", state_rounding="stochastic"), 16),
            Contender("optimkit q8 AdamW compiled", lambda ps: ok.AdamW(ps, lr=1e-3, state_precision="q8",
                                                                      compile=True), 16, _reference_path),
            Contender("optimkit q4 AdamW compiled", lambda ps: ok.AdamW(ps, lr=1e-3, state_precision="q4",
                                                                      compile=True), 14),
        ]
    if peers:
        try:
            import bitsandbytes as bnb  # noqa: F401

            out.append(Contender("bitsandbytes AdamW8bit",
                                 lambda ps: __import__("bitsandbytes").optim.AdamW8bit(ps, lr=1e-3), 16))
        except Exception:  # not installed, or no usable backend
            pass
        try:
            from torchao.optim import AdamW8bit  # noqa: F401

            out.append(Contender("torchao AdamW8bit",
                                 lambda ps: __import__("torchao.optim", fromlist=["AdamW8bit"]).AdamW8bit(ps, lr=1e-3),
                                 16))
        except Exception:
            pass
    return out


def _measured_state_bytes(opt) -> float:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                inner = getattr(v, "__tensor_flatten__", None)
                if inner is not None:  # tensor subclasses (torchao) hold their data in inner tensors
                    names, _ = v.__tensor_flatten__()
                    total += sum(getattr(v, n).numel() * getattr(v, n).element_size() for n in names)
                else:
                    total += v.numel() * v.element_size()
    return total


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
        try:
            opt = c.make(params)
            t0 = time.perf_counter()
            with c.context():
                for _ in range(warmup):  # includes compilation
                    opt.step()
            _sync(device)
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            if progress:
                progress(f"{c.name}: skipped ({type(e).__name__}: {str(e)[:80]})")
            continue
        c.state_bytes = _measured_state_bytes(opt) / n
        if progress:
            progress(f"{c.name}: warm-up {time.perf_counter() - t0:.1f}s")
        runs.append((c, opt))
    # slow contenders (the reference paths, peers on CPU) take one step per round
    per_round = {}
    for c, opt in runs:
        with c.context():
            _sync(device)
            t = time.perf_counter()
            opt.step()
            _sync(device)
            per_round[c.name] = 1 if time.perf_counter() - t > 0.05 else steps_per_round
    for _ in range(rounds):
        for c, opt in runs:
            with c.context():
                for _ in range(per_round[c.name]):
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
                        "state_bytes_per_param": c.state_bytes, "moved_bytes_per_param": c.moved_bytes,
                        "bandwidth_limit_s": c.moved_bytes * n / bw})
    for r in results:
        r["vs_torch_fused"] = r["median_s"] / base if base else None
        r["limit_vs_torch_fused"] = r["bandwidth_limit_s"] / base if base else None
    return {"params": n, "tensors": len(shapes), "device": device, "threads": torch.get_num_threads(),
            "stream_bandwidth_GBps": bw / 1e9, "results": results}


def format_table(report: dict) -> str:
    lines = [f"{report['params'] / 1e6:.2f}M parameters in {report['tensors']} tensors on "
             f"{report['device']} ({report['threads']} threads); median of round-robin steps; "
             f"streaming bandwidth {report['stream_bandwidth_GBps']:.1f} GB/s",
             f"{'contender':<30}{'ns/param':>10}{'vs torch fused':>16}{'state B/param':>15}"
             f"{'bandwidth limit':>17}"]
    for r in report["results"]:
        ratio = f"{r['vs_torch_fused']:.3f}x" if r["vs_torch_fused"] else "-"
        limit = f"{r['limit_vs_torch_fused']:.3f}x" if r["limit_vs_torch_fused"] else "-"
        lines.append(f"{r['name']:<30}{r['ns_per_param']:>10.3f}{ratio:>16}{r['state_bytes_per_param']:>15.3f}"
                     f"{limit:>17}")
    lines.append("bandwidth limit: bytes a step must move / measured streaming bandwidth, vs torch fused")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=float, default=8.0, help="millions of parameters (default 8)")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (default 15)")
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fp32-only", action="store_true", help="skip the q8/q4 contenders")
    parser.add_argument("--no-peers", action="store_true", help="skip bitsandbytes/torchao even if installed")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        parser = argparse.ArgumentParser(prog="optimkit speed", description=__doc__.split("\n\n")[0])
        add_arguments(parser)
        args = parser.parse_args(argv)
    contenders = default_contenders(args.device, precisions=not args.fp32_only, peers=not args.no_peers)
    report = run(target_params=args.params * 1e6, rounds=args.rounds, steps_per_round=args.steps_per_round,
                 device=args.device, contenders=contenders,
                 progress=None if args.json else lambda s: print(s, file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
