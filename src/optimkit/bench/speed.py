"""Step-time benchmark: optimkit's optimizers against torch.optim (and peers).

Every contender steps its own copy of the same transformer-shaped parameter
set with the same gradients. Contenders are timed round-robin (a few steps
each per round, many rounds) so that machine noise hits all of them alike;
we report the median step time, ns per parameter, and ratios to torch's
fused AdamW. The streaming-bandwidth limit is the step's bytes moved divided
by the measured copy bandwidth: no implementation can be faster.

    python benchmarks/step_speed.py            # or: optimkit speed
    python benchmarks/step_speed.py --json
    python benchmarks/step_speed.py --geometry   # Muon, Shampoo, SOAP, PSGD-Kron

``--geometry`` times the geometry-aware optimizers on a small transformer's
parameters over windows of the preconditioner refresh interval (so refresh
steps count), against AdamW and torch.optim.Muon in the same run
(:func:`run_geometry`).
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
    layer = _layer_shapes(d_model)
    per_layer = sum(torch.Size(s).numel() for s in layer)
    emb = vocab * d_model
    n_layers = max(1, round((target_params - emb) / per_layer))
    return [(vocab, d_model)] + layer * n_layers + [(d_model,), (d_model,)]


def _layer_shapes(d_model: int) -> list[tuple]:
    """One GPT-like block: qkv, proj, mlp up/down weights with their biases, two norms (gain, bias)."""
    return [(3 * d_model, d_model), (3 * d_model,), (d_model, d_model), (d_model,),
            (4 * d_model, d_model), (4 * d_model,), (d_model, 4 * d_model), (d_model,),
            (d_model,), (d_model,), (d_model,), (d_model,)]


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
    """Step time and state bytes per parameter of ``contenders`` (default:
    :func:`default_contenders`) on a transformer-shaped parameter set of about
    ``target_params`` parameters, with fixed gradients. After ``warmup`` steps each,
    ``rounds`` round-robin rounds time ``steps_per_round`` steps per contender; the
    result dict holds the medians, as ratios to torch's fused AdamW measured in the
    same rounds (``vs_torch_fused``), with the memory-bandwidth limit of each from the
    measured copy bandwidth (``optimkit speed``)."""
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


# --------------------------------------------------------------------------- geometry-aware optimizers
#: registry names of the preconditioned optimizers timed by :func:`run_geometry`, with the label
#: used in the report; those not registered (yet) are skipped with a note
SECOND_ORDER = (("shampoo", "Shampoo"), ("soap", "SOAP"), ("psgd_kron", "PSGD-Kron"))
#: hyperparameters that set how often the preconditioner is refreshed, in the order they are looked for
_INTERVAL_KEYS = ("precondition_frequency", "preconditioner_update_frequency", "update_freq",
                  "precondition_every")
_PROBABILITY_KEYS = ("preconditioner_update_probability", "precond_update_prob", "update_probability")


def geometry_shapes(d_model: int = 256, n_layers: int = 2, vocab: int = 2048) -> list[tuple[tuple, str]]:
    """``(shape, role)`` of a small GPT-like model: the embedding (``"embedding"``),
    per block the qkv/proj/mlp weights (``"matrix"``) and biases and norm gains
    (``"vector"``), and a final norm."""
    out = [((vocab, d_model), "embedding")]
    for _ in range(n_layers):
        out += [(s, "matrix" if len(s) == 2 else "vector") for s in _layer_shapes(d_model)]
    return out + [((d_model,), "vector"), ((d_model,), "vector")]


def interval_hyperparameters(name: str, interval: int) -> tuple[dict, str]:
    """The keyword that makes registered optimizer ``name`` refresh its preconditioner
    every ``interval`` steps, and a note saying which one was used."""
    defaults = ok.info(name).defaults
    for key in _INTERVAL_KEYS:
        if key in defaults:
            return {key: interval}, f"{key}={interval}"
    for key in _PROBABILITY_KEYS:
        if key in defaults:
            return {key: 1.0 / interval}, f"{key}=1/{interval} (random refreshes, {interval} steps on average)"
    return {}, "no refresh-interval setting found: its defaults"


@dataclass
class GeometryContender:
    """A row of :func:`run_geometry`: ``make(params)`` builds the optimizer for the
    parameters of ``param_set`` (``"all"`` or ``"matrices"``, the blocks' 2-D weights)."""
    name: str
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    param_set: str = "all"
    note: str = ""
    windows: list[float] = field(default_factory=list)  # per-step time of each window (window / its steps)
    slowest: list[float] = field(default_factory=list)  # slowest step of each window (the refresh)
    fastest: list[float] = field(default_factory=list)  # typical step: median step of each window
    warmup_s: float = float("nan")


#: rows every ratio is taken against, per parameter set (those present in the run)
GEOMETRY_BASELINES = {"all": ("torch AdamW fused", "torch AdamW foreach", "optimkit AdamW eager"),
                      "matrices": ("torch Muon", "torch AdamW fused (matrices)")}


def geometry_contenders(interval: int = 10, muon: bool = True, second_order: bool = True,
                        compile_muon: bool = True, names: tuple = SECOND_ORDER,
                        notes: list[str] | None = None) -> list[GeometryContender]:
    """AdamW baselines (torch fused/foreach, optimkit) on every parameter; Muon
    (torch's and optimkit's eager/compiled, Newton-Schulz in bf16 for both) on
    the blocks' matrices; every registered optimizer of ``names`` on every
    parameter with its preconditioner refreshed every ``interval`` steps.
    Optimizers of ``names`` that are not registered are skipped with a line in
    ``notes``."""
    out = []
    if second_order:
        out += [
            GeometryContender("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
            GeometryContender("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
            GeometryContender("optimkit AdamW eager", lambda ps: ok.AdamW(ps, lr=1e-3)),
        ]
        registered = set(ok.available())
        for reg_name, label in names:
            if reg_name not in registered:
                if notes is not None:
                    notes.append(f"{label} ({reg_name!r}): skipped, not registered in this optimkit")
                continue
            hp, note = interval_hyperparameters(reg_name, interval)
            if reg_name == "shampoo":
                hp["grafting"] = "adam"  # the usual configuration (Distributed Shampoo's examples)
                note += ", grafting='adam'"
            out.append(GeometryContender(f"optimkit {label}", lambda ps, n=reg_name, hp=hp: ok.create(n, ps, **hp),
                                         note=note))
            if reg_name == "shampoo":  # smaller blocks: cheaper roots and products, coarser preconditioner
                hp256 = {**hp, "max_preconditioner_dim": 256}
                out.append(GeometryContender("optimkit Shampoo blocks 256",
                                             lambda ps, hp=hp256: ok.Shampoo(ps, **hp),
                                             note=note + ", max_preconditioner_dim=256"))
    if muon:
        out += [
            GeometryContender("torch Muon", lambda ps: torch.optim.Muon(ps, lr=1e-3), "matrices",
                              "Newton-Schulz in bf16 (torch casts to bfloat16)"),
            GeometryContender("torch AdamW fused (matrices)",
                              lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), "matrices"),
            GeometryContender("optimkit Muon eager", lambda ps: ok.Muon(ps, lr=1e-3, ns_dtype="bf16"),
                              "matrices", "ns_dtype='bf16'"),
        ]
        if compile_muon:
            out.append(GeometryContender("optimkit Muon compiled",
                                         lambda ps: ok.Muon(ps, lr=1e-3, ns_dtype="bf16", compile=True),
                                         "matrices", "ns_dtype='bf16'"))
    return out


def run_geometry(d_model: int = 256, n_layers: int = 2, vocab: int = 2048, interval: int = 10,
                 windows: int = 5, k: int = 1, contenders: list[GeometryContender] | None = None,
                 seed: int = 0, progress: Callable[[str], None] | None = None) -> dict:
    """Amortized step time of the geometry-aware optimizers against AdamW and torch's Muon.

    Every contender steps its own copy of the same parameters (:func:`geometry_shapes`)
    with fixed gradients. After a warm-up of ``2 * interval`` steps (compilation, and
    past the first preconditioner refresh), each round times one window of
    ``k * interval`` consecutive steps per contender, round-robin so machine noise
    hits all alike; a window holds exactly ``k`` refreshes whatever its start. The
    figure of a contender is the median over ``windows`` rounds of window time /
    steps, reported as ratios to the baselines of its parameter set
    (:data:`GEOMETRY_BASELINES`) measured in the same rounds. The slowest step of
    a window (the refresh) and its median step are reported too (as ratios)."""
    notes: list[str] = []
    if contenders is None:
        contenders = geometry_contenders(interval, notes=notes)
    shaped = geometry_shapes(d_model, n_layers, vocab)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) * 0.02 for s, _ in shaped]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s, _ in shaped]
    select = {"all": [True] * len(shaped), "matrices": [role == "matrix" for _, role in shaped]}
    counts = {key: sum(torch.Size(s).numel() for (s, _), m in zip(shaped, mask) if m)
              for key, mask in select.items()}
    runs = []
    for c in contenders:
        mask = select[c.param_set]
        params = [torch.nn.Parameter(t.clone()) for t, m in zip(init, mask) if m]
        for p, g in zip(params, [g for g, m in zip(grads, mask) if m]):
            p.grad = g.clone()
        try:
            opt = c.make(params)
            t0 = time.perf_counter()
            for _ in range(2 * interval):
                opt.step()
            c.warmup_s = time.perf_counter() - t0
        except Exception as e:  # reported, not fatal
            notes.append(f"{c.name}: skipped ({type(e).__name__}: {str(e)[:100]})")
            if progress:
                progress(notes[-1])
            continue
        if progress:
            progress(f"{c.name}: warm-up ({2 * interval} steps) {c.warmup_s:.1f}s")
        runs.append((c, opt))
    steps = k * interval
    for r in range(windows):
        for c, opt in runs:
            ts = []
            t_window = time.perf_counter()
            for _ in range(steps):
                t = time.perf_counter()
                opt.step()
                ts.append(time.perf_counter() - t)
            c.windows.append((time.perf_counter() - t_window) / steps)
            c.slowest.append(max(ts))
            c.fastest.append(statistics.median(ts))
        if progress:
            progress(f"round {r + 1}/{windows} done")
    med = {c.name: statistics.median(c.windows) for c, _ in runs}
    results = []
    for c, _ in runs:
        bases = [b for b in GEOMETRY_BASELINES[c.param_set] if b in med]
        results.append({
            "name": c.name, "param_set": c.param_set, "params": counts[c.param_set], "note": c.note,
            "amortized_step_s": med[c.name], "refresh_step_s": statistics.median(c.slowest),
            "typical_step_s": statistics.median(c.fastest), "warmup_s": c.warmup_s,
            "ratios": {b: med[c.name] / med[b] for b in bases},
            "refresh_ratio": {b: statistics.median(c.slowest) / med[b] for b in bases},
            "typical_ratio": {b: statistics.median(c.fastest) / med[b] for b in bases},
        })
    return {"shapes": {"d_model": d_model, "n_layers": n_layers, "vocab": vocab, "tensors": len(shaped),
                       "params": counts["all"], "matrix_params": counts["matrices"]},
            "interval": interval, "window_steps": steps, "windows": windows, "device": "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "muon_setup": "matrices only: torch.optim.Muon and optimkit Muon step the blocks' 2-D weights "
                          "(embedding, biases and norms excluded); Newton-Schulz in bf16 in both",
            "results": results, "notes": notes}


def format_geometry_table(report: dict) -> str:
    sh = report["shapes"]
    lines = [f"{sh['params'] / 1e6:.2f}M parameters in {sh['tensors']} tensors (d_model {sh['d_model']}, "
             f"{sh['n_layers']} blocks, vocab {sh['vocab']}; matrices {sh['matrix_params'] / 1e6:.2f}M) on "
             f"{report['device']} ({report['threads']} threads); median over {report['windows']} round-robin "
             f"windows of {report['window_steps']} steps (refresh interval {report['interval']})"]
    for param_set, title in (("all", "every parameter, vs AdamW"), ("matrices", "block matrices, vs Muon")):
        rows = [r for r in report["results"] if r["param_set"] == param_set]
        if not rows:
            continue
        bases = list(rows[0]["ratios"])
        lines.append(f"-- {title}: amortized step time ratio (refresh step, median step) --")
        lines.append(f"{'contender':<30}" + "".join(f"{'vs ' + b:>32}" for b in bases))
        for r in rows:
            cells = [f"{r['ratios'][b]:.2f}x ({r['refresh_ratio'][b]:.2f}, {r['typical_ratio'][b]:.2f})"
                     for b in bases]
            lines.append(f"{r['name']:<30}" + "".join(f"{c:>32}" for c in cells)
                         + (f"   [{r['note']}]" if r["note"] else ""))
    lines += [f"note: {n}" for n in report["notes"]]
    if any(r["param_set"] == "matrices" for r in report["results"]):
        lines.append(f"muon: {report['muon_setup']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=float, default=8.0, help="millions of parameters (default 8)")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (default 15)")
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fp32-only", action="store_true", help="skip the q8/q4 contenders")
    parser.add_argument("--no-peers", action="store_true", help="skip bitsandbytes/torchao even if installed")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    geo = parser.add_argument_group("geometry-aware optimizers (--geometry)")
    geo.add_argument("--geometry", action="store_true",
                     help="time Muon, Shampoo, SOAP, PSGD-Kron (those registered) against AdamW and "
                          "torch.optim.Muon, amortized over the preconditioner refresh interval")
    geo.add_argument("--d-model", type=int, default=256, help="model width (default 256)")
    geo.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    geo.add_argument("--vocab", type=int, default=2048, help="embedding rows (default 2048)")
    geo.add_argument("--interval", type=int, default=10, help="preconditioner refresh interval (default 10)")
    geo.add_argument("--windows", type=int, default=5, help="timed windows of --interval steps (default 5)")
    geo.add_argument("--threads", type=int, default=None,
                     help="torch threads (default: torch's); 1 is steadier on a loaded machine")
    geo.add_argument("--no-compile", action="store_true", help="skip optimkit's compiled Muon (~40 s compile)")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        parser = argparse.ArgumentParser(prog="optimkit speed", description=__doc__.split("\n\n")[0])
        add_arguments(parser)
        args = parser.parse_args(argv)
    if args.geometry:
        if args.device != "cpu":
            raise SystemExit("optimkit speed: --geometry runs on the CPU only")
        if args.threads is not None:
            torch.set_num_threads(max(1, args.threads))
        notes: list[str] = []
        contenders = geometry_contenders(args.interval, compile_muon=not args.no_compile, notes=notes)
        report = run_geometry(d_model=args.d_model, n_layers=args.layers, vocab=args.vocab,
                              interval=args.interval, windows=args.windows, contenders=contenders,
                              progress=None if args.json else lambda s: print(s, file=sys.stderr))
        report["notes"] = notes + report["notes"]
        print(json.dumps(report, indent=2) if args.json else format_geometry_table(report))
        return 0
    contenders = default_contenders(args.device, precisions=not args.fp32_only, peers=not args.no_peers)
    report = run(target_params=args.params * 1e6, rounds=args.rounds, steps_per_round=args.steps_per_round,
                 device=args.device, contenders=contenders,
                 progress=None if args.json else lambda s: print(s, file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
