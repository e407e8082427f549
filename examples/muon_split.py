"""ok.Muon with ok.muon_param_groups on a tiny transformer LM, against AdamW.

``ok.muon_param_groups(model, ...)`` splits a model's parameters the way Muon
needs: the hidden matrices (attention and MLP weights) to Muon groups, and the
embeddings, the output head and every vector (biases, LayerNorm gains) to the
AdamW rule that ``ok.Muon`` runs for ``use_muon=False`` groups. The fused QKV
projection is orthogonalized as three blocks (``split={"...qkv": 3}``). This
script prints the split, then trains the same byte-level decoder (same initial
weights, same batches) with that Muon setup and with AdamW alone, and prints
train/validation loss side by side. The text is this interpreter's own
standard-library source (nothing is downloaded). A plot goes to ``--out``.

    python examples/muon_split.py                # defaults: a few minutes on 2 CPU cores
    python examples/muon_split.py --quick        # seconds: a smoke run

The last line printed is ``RESULT {json}`` (also written to
``<out>/muon_split.json``) for scripts and tests.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import optimkit as ok
from _common import finish, lm_data, parse as parse_args, parser, plot_lm, start, train_lm


class TinyLM(nn.Module):
    """Byte-level decoder: embeddings, pre-norm blocks (fused QKV attention, GELU MLP), untied head."""

    def __init__(self, vocab: int = 256, d: int = 96, layers: int = 3, heads: int = 3, ctx: int = 64):
        super().__init__()
        self.heads = heads
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d),
            ln2=nn.LayerNorm(d), fc=nn.Linear(d, 4 * d), out=nn.Linear(4 * d, d))) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, time, vocab) for byte ids ``idx`` (batch, time)."""
        b, t = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for L in self.layers:
            d = x.shape[-1]
            q, k, v = L["qkv"](L["ln1"](x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + L["proj"](a.transpose(1, 2).reshape(b, t, d))
            x = x + L["out"](F.gelu(L["fc"](L["ln2"](x))))
        return self.head(self.ln(x))


def describe_split(model: nn.Module, groups: list[dict]) -> list[dict]:
    """Which parameters each group holds (names, elements, rule) for printing."""
    names = {id(p): n for n, p in model.named_parameters()}
    rows = []
    for i, g in enumerate(groups):
        rule = "Muon" if g.get("use_muon", True) else "AdamW"
        rows.append({"group": i, "rule": rule, "split": g.get("split", 1), "lr": g.get("lr"),
                     "names": [names[id(p)] for p in g["params"]],
                     "elements": sum(p.numel() for p in g["params"])})
    return rows


def run(name: str, make_opt, cfg: argparse.Namespace, train: torch.Tensor, val_batches: list) -> dict:
    """Train one model from the seed's initial weights; returns its curves."""
    torch.manual_seed(cfg.seed)
    model = TinyLM(d=cfg.d_model, layers=cfg.layers, heads=cfg.heads, ctx=cfg.ctx)
    return train_lm(name, model, make_opt(model), cfg, train, val_batches)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings; ``--quick`` shrinks the model and the run to a smoke test."""
    p = parser(__doc__, 400, 40, "a tiny model and few steps (seconds)")
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--adamw-lr", type=float, default=3e-3, help="AdamW's lr, alone and as Muon's AdamW groups'")
    cfg = parse_args(p, argv, 400, 40, (dict(d_model=48, layers=2, heads=2, ctx=32, batch=16, eval_batches=4),
                                        dict(d_model=96, layers=3, heads=3, ctx=64, batch=16, eval_batches=8)))
    cfg.eval_every = max(1, cfg.steps // 8)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Print the split, run both optimizers, print the comparison, write the plot and JSON."""
    cfg = parse(argv)
    start(cfg)
    train, val, val_batches = lm_data(cfg)
    print(f"corpus: {len(train):,} train / {len(val):,} val bytes; LM d={cfg.d_model} layers={cfg.layers} "
          f"ctx={cfg.ctx}; {cfg.steps} steps, batch {cfg.batch}")

    def muon_groups(model: nn.Module) -> list[dict]:
        qkv = {f"layers.{i}.qkv.weight": 3 for i in range(len(model.layers))}  # Q, K, V orthogonalized separately
        return ok.muon_param_groups(model, muon=dict(lr=cfg.muon_lr),
                                    adamw=dict(lr=cfg.adamw_lr, weight_decay=0.0), split=qkv)

    torch.manual_seed(cfg.seed)
    probe = TinyLM(d=cfg.d_model, layers=cfg.layers, heads=cfg.heads, ctx=cfg.ctx)
    split = describe_split(probe, muon_groups(probe))
    print("muon_param_groups:")
    for r in split:
        shown = ", ".join(r["names"][:4]) + (f", ... ({len(r['names'])} tensors)" if len(r["names"]) > 4 else "")
        print(f"  group {r['group']}: {r['rule']:<5} split={r['split']} lr={r['lr']} "
              f"{r['elements']:>8,} elements: {shown}")

    results = [run("Muon + AdamW (muon_param_groups)", lambda m: ok.Muon(muon_groups(m), weight_decay=0.0),
                   cfg, train, val_batches),
               run("AdamW", lambda m: ok.AdamW(m.parameters(), lr=cfg.adamw_lr, weight_decay=0.0,
                                               betas=(0.9, 0.95)), cfg, train, val_batches)]
    print(f"{'optimizer':<34} {'state B/param':>13} {'train first':>11} {'train last':>10} {'val first':>9} "
          f"{'val last':>8} {'time s':>7}")
    for r in results:
        print(f"{r['name']:<34} {r['state_bytes'] / r['params']:>13.2f} {r['train_loss_first']:>11.3f} "
              f"{r['train_loss_last']:>10.3f} {r['val_loss_first']:>9.3f} {r['val_loss_last']:>8.3f} "
              f"{r['seconds']:>7.1f}")
    png = os.path.join(cfg.out, "muon_split.png")
    plot_lm(results, png, "tiny byte-level LM: Muon split vs AdamW", ("tab:red", "tab:blue"))
    summary = {"example": "muon_split", "steps": cfg.steps, "quick": cfg.quick, "plot": png, "split": split,
               "runs": results}
    return finish("muon_split", cfg, png, summary,
                  [{k: v for k, v in r.items() if k != "train_curve"} for r in results], split=split)


if __name__ == "__main__":
    main(sys.argv[1:])
