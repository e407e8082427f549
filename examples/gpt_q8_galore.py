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
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import optimkit as ok
from _common import finish, lm_data, parse as parse_args, parser, plot_lm, start, train_lm

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


def run(name: str, make_opt, cfg: argparse.Namespace, train: torch.Tensor, val_batches: list) -> dict:
    """Train one model from the seed's initial weights; returns its curves, state bytes
    and ``ok.memory_report``."""
    torch.manual_seed(cfg.seed)
    model = GPT(d=cfg.d_model, layers=cfg.layers, heads=cfg.heads, ctx=cfg.ctx)
    opt = make_opt(model)
    result = train_lm(name, model, opt, cfg, train, val_batches)
    report = io.StringIO()
    ok.memory_report(opt, file=report)
    return {**result, "memory_report": report.getvalue().rstrip()}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings; ``--quick`` shrinks the model and the run to a smoke test."""
    p = parser(__doc__, 300, 40, "a tiny model and few steps (seconds)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=None, help="GaLore rank (default d_model / 4)")
    p.add_argument("--interval", type=int, default=None, help="GaLore subspace refresh interval (default steps / 4)")
    p.add_argument("--galore-scale", type=float, default=0.25, help="GaLore's update scale (alpha)")
    cfg = parse_args(p, argv, 300, 40, (dict(d_model=64, layers=2, heads=2, ctx=32, batch=16, eval_batches=4),
                                        dict(d_model=96, layers=3, heads=3, ctx=64, batch=16, eval_batches=8)))
    cfg.rank = cfg.rank or cfg.d_model // 4
    cfg.interval = cfg.interval or max(1, cfg.steps // 4)
    cfg.eval_every = max(1, cfg.steps // 8)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Run both optimizers, print the comparison, write the plot and JSON; returns the results."""
    cfg = parse(argv)
    start(cfg)
    train, val, val_batches = lm_data(cfg)
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
    plot_lm(results, png, f"byte-level GPT on stdlib source ({a['params']:,} params)",
            ("tab:blue", "tab:orange", "tab:green"),
            val_label=lambda r: f"{r['name']} val ({r['state_bytes'] / 2**10:.0f} KiB state)")
    summary = {"example": "gpt_q8_galore", "steps": cfg.steps, "quick": cfg.quick, "plot": png,
               "runs": [{k: v for k, v in r.items() if k != "memory_report"} for r in results]}
    return finish("gpt_q8_galore", cfg, png, summary,
                  [{k: v for k, v in r.items() if k not in ("memory_report", "train_curve")} for r in results])


if __name__ == "__main__":
    main(sys.argv[1:])
