"""The memory guide's table: measured state bytes and accuracy cost of each memory setting.

For every setting (state precision, projection, placement) this script trains the
same 4-layer MLP (64-256-256-256-10, 150,794 parameters) with AdamW on
scikit-learn's bundled 8x8 digits (1200 training images, 597 held out; nothing is
downloaded), then reports

* the optimizer state bytes, measured with ``optimkit.state_bytes`` from the
  tensors actually held (codes, scales, projector matrices, step counters), split
  by where they live (device/host memory or memory-mapped files), and per
  parameter;
* the held-out cross-entropy and error after training, mean over seeds, with
  each seed's loss, and the mean over seeds of the loss difference to the fp32
  run of the same seed (the same as the difference of the means).

Every setting uses the same hyperparameters (AdamW lr 1e-3, betas (0.9, 0.999),
weight decay 0.01, batch 64), the same initial weights and the same batch order
per seed, so the only difference is the memory setting. Projections keep their
own defaults except rank (a quarter of the 256-wide layers) and interval.

Run (about 5 minutes on one CPU core)::

    python benchmarks/memory_guide.py             # Markdown table on stdout
    python benchmarks/memory_guide.py --json      # the same numbers as JSON
    python benchmarks/memory_guide.py --steps 300 --seeds 0   # quicker, noisier
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from typing import Any, Callable

import torch
import torch.nn.functional as F

import optimkit as ok

HP = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2)
WIDTHS = (64, 256, 256, 256, 10)
BATCH = 64
RANK = 64


def settings(state_dir: str) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """(label, constructor keywords) for every row of the table, fp32 first."""
    return [
        ("fp32 (default)", lambda: {}),
        ('state_precision="bf16"', lambda: dict(state_precision="bf16")),
        ('state_precision="q8"', lambda: dict(state_precision="q8")),
        ('state_precision="q8", state_rounding="stochastic"',
         lambda: dict(state_precision="q8", state_rounding="stochastic")),
        ('state_precision="fp8"', lambda: dict(state_precision="fp8")),
        ('state_precision="q4"', lambda: dict(state_precision="q4")),
        (f"projection=GaLore(rank={RANK})", lambda: dict(projection=ok.GaLore(rank=RANK, interval=200))),
        (f"projection=APOLLO(rank={RANK})", lambda: dict(projection=ok.APOLLO(rank=RANK, interval=200))),
        ("projection=APOLLOMini()", lambda: dict(projection=ok.APOLLOMini(interval=200))),
        ("projection=FRUGAL(density=0.25)", lambda: dict(projection=ok.FRUGAL(density=0.25, interval=200))),
        (f'GaLore(rank={RANK}) + state_precision="q8"',
         lambda: dict(projection=ok.GaLore(rank=RANK, interval=200), state_precision="q8")),
        ('state_placement="cpu"', lambda: dict(state_placement="cpu")),
        ('state_placement="disk"', lambda: dict(state_placement="disk", state_dir=state_dir)),
    ]


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits, pixels / 16, one fixed shuffle: 1200 train, 597 held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1200], perm[1200:]
    return x[tr], y[tr], x[va], y[va]


def mlp(seed: int) -> torch.nn.Module:
    """The fixed 4-layer ReLU MLP, initialized from ``seed``."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def train(kwargs: dict[str, Any], seed: int, steps: int, data) -> dict[str, Any]:
    """Train one setting on one seed; return its measured state bytes and held-out metrics."""
    xtr, ytr, xva, yva = data
    model = mlp(seed)
    opt = ok.AdamW(model.parameters(), **HP, **kwargs)
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (BATCH,), generator=gen)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(xva)
        val_loss = F.cross_entropy(logits, yva).item()
        val_error = (logits.argmax(1) != yva).float().mean().item()
    by_place = ok.state_bytes(opt, by_placement=True)
    n_params = sum(p.numel() for p in model.parameters())
    report = ok.memory_report(opt, file=_Null())
    return dict(val_loss=val_loss, val_error=val_error, by_placement=by_place,
                state_bytes=sum(by_place.values()), n_params=n_params, report=report)


class _Null:
    """A file that discards what is written (memory_report prints)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    """Run every setting on every seed and print the table (Markdown or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps per run (default 600)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    data = digits()
    rows = []
    with tempfile.TemporaryDirectory() as state_dir:
        for label, make in settings(state_dir):
            runs = [train(make(), s, args.steps, data) for s in args.seeds]
            rows.append(dict(setting=label, runs=runs))
            print(f"done: {label}", file=sys.stderr)
    base = {s: r["val_loss"] for s, r in zip(args.seeds, rows[0]["runs"])}
    base_bytes = rows[0]["runs"][0]["state_bytes"]
    out = []
    for row in rows:
        runs = row["runs"]
        first = runs[0]
        out.append(dict(
            setting=row["setting"], n_params=first["n_params"], state_bytes=first["state_bytes"],
            by_placement=first["by_placement"], bytes_per_param=first["state_bytes"] / first["n_params"],
            ratio_to_fp32=first["state_bytes"] / base_bytes,
            val_loss=statistics.mean(r["val_loss"] for r in runs),
            val_error=statistics.mean(r["val_error"] for r in runs),
            delta_loss=statistics.mean(r["val_loss"] - base[s] for s, r in zip(args.seeds, runs)),
            val_losses=[r["val_loss"] for r in runs], report=first["report"]))
    meta = dict(model="MLP " + "-".join(map(str, WIDTHS)), task="sklearn digits (1200 train / 597 held out)",
                optimizer=f"AdamW {HP}", batch=BATCH, steps=args.steps, seeds=args.seeds,
                torch=torch.__version__, optimkit=ok.__version__)
    if args.json:
        print(json.dumps(dict(meta=meta, rows=out), indent=2))
        return 0
    print(f"{meta['model']} ({out[0]['n_params']:,} parameters), {meta['task']}; AdamW lr 1e-3, "
          f"wd 0.01, batch {BATCH}, {args.steps} steps; seeds {args.seeds}; torch {torch.__version__}\n")
    print("| setting | state bytes | where | B/param | x fp32 | held-out loss, mean (per seed) | loss - fp32 "
          "| held-out error |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in out:
        where = ", ".join(f"{k} {v:,}" for k, v in sorted(r["by_placement"].items()))
        print(f"| `{r['setting']}` | {r['state_bytes']:,} | {where} | {r['bytes_per_param']:.3f} | "
              f"{r['ratio_to_fp32']:.3f} | {r['val_loss']:.4f} ({', '.join(f'{v:.4f}' for v in r['val_losses'])}) | "
              f"{r['delta_loss']:+.4f} | "
              f"{100 * r['val_error']:.2f}% |")
    print("\nok.memory_report of the q8 run (seed", args.seeds[0], "):\n")
    print("```\n" + next(r["report"] for r in out if r["setting"] == 'state_precision="q8"') + "\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
