"""What the examples share: the byte-level corpus, the language-model training
loop and its evaluation, command-line basics, loss plots and result output.

The examples import it from their own directory (``python examples/x.py`` puts
that directory first on ``sys.path``).
"""
from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import optimkit as ok

#: standard-library modules whose source is the corpus (those missing are skipped)
CORPUS = ("argparse.py", "textwrap.py", "difflib.py", "functools.py", "contextlib.py", "dataclasses.py",
          "heapq.py", "bisect.py", "queue.py", "string.py", "copy.py", "random.py", "pprint.py", "glob.py")


def stdlib_bytes(val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation byte tensors: the last ``val_fraction`` of every corpus file is validation."""
    root = sysconfig.get_paths().get("stdlib") or ""
    if not os.path.isfile(os.path.join(root, "textwrap.py")):
        import textwrap

        root = os.path.dirname(textwrap.__file__)
    train, val = bytearray(), bytearray()
    for name in CORPUS:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                raw = fh.read()
            cut = int(len(raw) * (1 - val_fraction))
            train += raw[:cut]
            val += raw[cut:]
    if not train:
        raise RuntimeError(f"no corpus file found under {root!r}")
    return torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(val, dtype=torch.uint8).long()


def lm_data(cfg: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The corpus as (train bytes, validation bytes, ``cfg.eval_batches`` fixed
    validation batches of ``cfg.ctx`` bytes)."""
    train, val = stdlib_bytes()
    gen = torch.Generator().manual_seed(12345)
    return train, val, [batch(val, 32, cfg.ctx, gen) for _ in range(cfg.eval_batches)]


def batch(data: torch.Tensor, size: int, ctx: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random windows of ``ctx`` bytes and their next-byte targets."""
    i = torch.randint(len(data) - ctx - 1, (size,), generator=gen).tolist()
    return torch.stack([data[j:j + ctx] for j in i]), torch.stack([data[j + 1:j + ctx + 1] for j in i])


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy (nats per byte) over fixed validation batches."""
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def train_lm(name: str, model: nn.Module, opt: torch.optim.Optimizer, cfg: argparse.Namespace,
             train: torch.Tensor, val_batches: list) -> dict:
    """Train ``model`` with ``opt`` for ``cfg.steps`` steps (cosine schedule with 5 %
    warmup, batches drawn from ``cfg.seed + 1`` so every optimizer sees the same ones);
    returns its curves, first/last losses (train: mean of the first/last k steps),
    parameter count, state bytes and seconds."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    sched = ok.schedules.cosine(cfg.steps, num_warmup_steps=cfg.steps // 20, min_lr_ratio=0.1).scheduler(opt)
    train_curve, val_curve = [], [(0, evaluate(model, val_batches))]
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x, y = batch(train, cfg.batch, cfg.ctx, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_curve.append((step, loss.item()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_curve.append((step, evaluate(model, val_batches)))
    seconds = time.perf_counter() - start
    k = max(1, min(len(train_curve) // 10, 20))
    return {"name": name, "params": sum(p.numel() for p in model.parameters()), "state_bytes": ok.state_bytes(opt),
            "train_loss_first": sum(l for _, l in train_curve[:k]) / k,
            "train_loss_last": sum(l for _, l in train_curve[-k:]) / k,
            "val_loss_first": val_curve[0][1], "val_loss_last": val_curve[-1][1],
            "seconds": seconds, "train_curve": train_curve, "val_curve": val_curve}


def plot_lm(results: list[dict], path: str, title: str, colors: tuple, val_label=None) -> None:
    """Train (smoothed) and validation loss of every run in one figure, saved as PNG;
    ``val_label(result)`` names a validation curve (default: the run's name + " val")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r, color in zip(results, colors):
        steps, losses = zip(*r["train_curve"])
        w = max(1, len(losses) // 25)
        smooth = [sum(losses[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(losses))]
        ax.plot(steps, smooth, color=color, alpha=0.6, label=f"{r['name']} train")
        vs, vl = zip(*r["val_curve"])
        ax.plot(vs, vl, "o-", color=color, label=val_label(r) if val_label else f"{r['name']} val")
    ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser(doc: str, default_steps: int, quick_steps: int, quick_help: str) -> argparse.ArgumentParser:
    """The options every example takes: --steps, --quick, --out, --seed, --threads."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per optimizer (default {default_steps}, quick {quick_steps})")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default="examples_out", help="directory for the plot and the JSON results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return p


def parse(p: argparse.ArgumentParser, argv, default_steps: int, quick_steps: int,
          sizes: tuple[dict, dict] | None = None) -> argparse.Namespace:
    """Parse ``argv``; set the model size entries (``sizes``: (quick, default)) and the
    step count; refuse ``--steps < 1``."""
    cfg = p.parse_args(argv)
    for k, v in (sizes[0] if cfg.quick else sizes[1]).items() if sizes else ():
        setattr(cfg, k, v)
    cfg.steps = cfg.steps if cfg.steps is not None else (quick_steps if cfg.quick else default_steps)
    if cfg.steps < 1:
        p.error(f"--steps must be >= 1, got {cfg.steps}")
    return cfg


def start(cfg: argparse.Namespace) -> None:
    """Apply ``--threads`` and create ``--out``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)


def finish(example: str, cfg: argparse.Namespace, png: str, summary: dict, printed: list[dict],
           **extra) -> dict:
    """Write ``<out>/<example>.json`` (``summary``), print the plot path and the last line
    ``RESULT {json}`` (``printed``: the runs as scripts and tests read them, plus ``extra``)."""
    with open(os.path.join(cfg.out, f"{example}.json"), "w") as fh:
        json.dump(summary, fh)
    print(f"plot: {png}")
    print("RESULT " + json.dumps({"example": example, "plot": png, **extra, "runs": printed}))
    return summary
