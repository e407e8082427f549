"""A small GPT on byte-level Python source: fp32 AdamW vs q8 AdamW + GaLore.

Trains the same decoder (same initial weights, same batches) twice, once with
``ok.AdamW`` keeping its moments in fp32 and once with ``ok.AdamW`` keeping
8-bit block-wise moments (``state_precision="q8"``) of GaLore-projected
gradients (``projection=ok.GaLore(rank=...)``), and prints side by side the
optimizer state bytes ``ok.memory_report`` measures and the train/validation
losses. The text is this interpreter's own standard-library source, read as
bytes (nothing is downloaded). A plot of both loss curves goes to ``--out``.

    python examples/gpt_q8_galore.py                 # defaults: a few minutes on 2 CPU cores
    python examples/gpt_q8_galore.py --quick         # seconds: a smoke run
    python examples/gpt_q8_galore.py --steps 2000 --out runs/gpt

The last line printed is ``RESULT {json}`` (also written to
``<out>/gpt_q8_galore.json``) for scripts and tests.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
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
    train, val = [], []
    for name in CORPUS:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                raw = fh.read()
            cut = int(len(raw) * (1 - val_fraction))
            train.append(raw[:cut])
            val.append(raw[cut:])
    if not train:
        raise RuntimeError(f"no corpus file found under {root!r}")

    def as_tensor(parts: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()

    return as_tensor(train), as_tensor(val)


class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention (fused QKV) and a GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block on ``x`` of shape (batch, time, d)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A compact byte-level GPT: token + position embeddings, blocks, final norm, tied head."""

    def __init__(self, vocab: int = 256, d: int = 96, layers: int = 3, heads: int = 3, ctx: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, time, vocab) for byte ids ``idx`` (batch, time)."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.ln(x), self.tok.weight)


def batch(data: torch.Tensor, size: int, ctx: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random windows of ``ctx`` bytes and their next-byte targets."""
    i = torch.randint(len(data) - ctx - 1, (size,), generator=gen)
    x = torch.stack([data[j:j + ctx] for j in i.tolist()])
    y = torch.stack([data[j + 1:j + ctx + 1] for j in i.tolist()])
    return x, y


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy (nats per byte) over fixed validation batches."""
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def run(name: str, make_opt, cfg: argparse.Namespace, train: torch.Tensor, val_batches: list) -> dict:
    """Train one model from the seed's initial weights; returns its curves and state bytes."""
    torch.manual_seed(cfg.seed)
    model = GPT(d=cfg.d_model, layers=cfg.layers, heads=cfg.heads, ctx=cfg.ctx)
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same batches for every optimizer
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
    report = io.StringIO()
    ok.memory_report(opt, file=report)
    n_params = sum(p.numel() for p in model.parameters())
    k = max(1, min(len(train_curve) // 10, 20))  # train loss: mean of the first / last k steps
    return {"name": name, "params": n_params, "state_bytes": ok.state_bytes(opt),
            "memory_report": report.getvalue().rstrip(), "train_loss_first": sum(l for _, l in train_curve[:k]) / k,
            "train_loss_last": sum(l for _, l in train_curve[-k:]) / k, "val_loss_first": val_curve[0][1],
            "val_loss_last": val_curve[-1][1], "seconds": seconds, "train_curve": train_curve,
            "val_curve": val_curve}


def plot(results: list[dict], path: str, title: str) -> None:
    """Train (smoothed) and validation loss of every run, one figure, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r, color in zip(results, ("tab:blue", "tab:orange", "tab:green")):
        steps, losses = zip(*r["train_curve"])
        w = max(1, len(losses) // 25)
        smooth = [sum(losses[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(losses))]
        ax.plot(steps, smooth, color=color, alpha=0.6, label=f"{r['name']} train")
        vs, vl = zip(*r["val_curve"])
        ax.plot(vs, vl, "o-", color=color, label=f"{r['name']} val ({r['state_bytes'] / 2**10:.0f} KiB state)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings; ``--quick`` shrinks the model and the run to a smoke test."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per optimizer (default 300, quick 40)")
    p.add_argument("--quick", action="store_true", help="a tiny model and few steps (seconds)")
    p.add_argument("--out", default="examples_out", help="directory for the plot and the JSON results")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=None, help="GaLore rank (default d_model / 4)")
    p.add_argument("--interval", type=int, default=None, help="GaLore subspace refresh interval (default steps / 4)")
    p.add_argument("--galore-scale", type=float, default=0.25, help="GaLore's update scale (alpha)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    cfg = p.parse_args(argv)
    size = dict(d_model=64, layers=2, heads=2, ctx=32, batch=16, eval_batches=4) if cfg.quick else \
        dict(d_model=96, layers=3, heads=3, ctx=64, batch=16, eval_batches=8)
    for k, v in size.items():
        setattr(cfg, k, v)
    cfg.steps = cfg.steps if cfg.steps is not None else (40 if cfg.quick else 300)
    if cfg.steps < 1:
        p.error(f"--steps must be >= 1, got {cfg.steps}")
    cfg.rank = cfg.rank or cfg.d_model // 4
    cfg.interval = cfg.interval or max(1, cfg.steps // 4)
    cfg.eval_every = max(1, cfg.steps // 8)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Run both optimizers, print the comparison, write the plot and JSON; returns the results."""
    cfg = parse(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    train, val = stdlib_bytes()
    gen = torch.Generator().manual_seed(12345)
    val_batches = [batch(val, 32, cfg.ctx, gen) for _ in range(cfg.eval_batches)]
    print(f"corpus: {len(train):,} train / {len(val):,} val bytes of stdlib source; "
          f"GPT d={cfg.d_model} layers={cfg.layers} ctx={cfg.ctx}; {cfg.steps} steps, batch {cfg.batch}")

    def fp32(model):
        return ok.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))

    def q8_galore(model):
        # as in the GaLore paper, the projection is for the blocks' matrices (attention, MLP); the
        # embeddings and the LayerNorm gains/biases keep full-rank moments. Both groups store q8
        # moments for state tensors of >= 1024 elements (smaller ones, e.g. LayerNorm gains, stay fp32).
        matrices = [p for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2]
        ids = {id(p) for p in matrices}
        rest = [p for p in model.parameters() if id(p) not in ids]
        galore = ok.GaLore(rank=cfg.rank, interval=cfg.interval, scale=cfg.galore_scale)
        return ok.AdamW([{"params": matrices, "projection": galore}, {"params": rest}], lr=cfg.lr,
                        weight_decay=0.1, betas=(0.9, 0.95), state_precision="q8", min_quant_size=1024)

    results = [run("fp32 AdamW", fp32, cfg, train, val_batches),
               run(f"q8 AdamW + GaLore r{cfg.rank}", q8_galore, cfg, train, val_batches)]
    for r in results:
        print()
        print(r["memory_report"])
    print()
    print(f"{'optimizer':<26} {'state KiB':>10} {'B/param':>8} {'train first':>11} {'train last':>10} "
          f"{'val first':>9} {'val last':>8} {'time s':>7}")
    for r in results:
        print(f"{r['name']:<26} {r['state_bytes'] / 2**10:>10.1f} {r['state_bytes'] / r['params']:>8.3f} "
              f"{r['train_loss_first']:>11.3f} {r['train_loss_last']:>10.3f} {r['val_loss_first']:>9.3f} "
              f"{r['val_loss_last']:>8.3f} {r['seconds']:>7.1f}")
    a, b = results
    print(f"state bytes ratio (q8+GaLore / fp32): {b['state_bytes'] / a['state_bytes']:.3f}; "
          f"val loss difference: {b['val_loss_last'] - a['val_loss_last']:+.3f} nats/byte")
    png = os.path.join(cfg.out, "gpt_q8_galore.png")
    plot(results, png, f"byte-level GPT on stdlib source ({a['params']:,} params)")
    summary = {"example": "gpt_q8_galore", "steps": cfg.steps, "quick": cfg.quick, "plot": png,
               "runs": [{k: v for k, v in r.items() if k != "memory_report"} for r in results]}
    with open(os.path.join(cfg.out, "gpt_q8_galore.json"), "w") as fh:
        json.dump(summary, fh)
    print(f"plot: {png}")
    print("RESULT " + json.dumps({"example": "gpt_q8_galore", "plot": png,
                                  "runs": [{k: v for k, v in r.items() if k not in ("memory_report", "train_curve")}
                                           for r in results]}))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
