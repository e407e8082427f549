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
import json
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


def batch(data: torch.Tensor, size: int, ctx: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random windows of ``ctx`` bytes and their next-byte targets."""
    i = torch.randint(len(data) - ctx - 1, (size,), generator=gen).tolist()
    return torch.stack([data[j:j + ctx] for j in i]), torch.stack([data[j + 1:j + ctx + 1] for j in i])


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy (nats per byte) over fixed validation batches."""
    model.eval()
    out = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches) / len(batches)
    model.train()
    return out


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
    opt = make_opt(model)
    sched = ok.schedules.cosine(cfg.steps, num_warmup_steps=cfg.steps // 20, min_lr_ratio=0.1).scheduler(opt)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same batches for every optimizer
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
    k = max(1, min(len(train_curve) // 10, 20))
    return {"name": name, "params": sum(p.numel() for p in model.parameters()), "state_bytes": ok.state_bytes(opt),
            "train_loss_first": sum(l for _, l in train_curve[:k]) / k,
            "train_loss_last": sum(l for _, l in train_curve[-k:]) / k,
            "val_loss_first": val_curve[0][1], "val_loss_last": val_curve[-1][1],
            "seconds": time.perf_counter() - start, "train_curve": train_curve, "val_curve": val_curve}


def plot(results: list[dict], path: str) -> None:
    """Train (smoothed) and validation loss of every run, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r, color in zip(results, ("tab:red", "tab:blue")):
        steps, losses = zip(*r["train_curve"])
        w = max(1, len(losses) // 25)
        smooth = [sum(losses[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(losses))]
        ax.plot(steps, smooth, color=color, alpha=0.6, label=f"{r['name']} train")
        vs, vl = zip(*r["val_curve"])
        ax.plot(vs, vl, "o-", color=color, label=f"{r['name']} val")
    ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)", title="tiny byte-level LM: Muon split vs AdamW")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings; ``--quick`` shrinks the model and the run to a smoke test."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per optimizer (default 400, quick 40)")
    p.add_argument("--quick", action="store_true", help="a tiny model and few steps (seconds)")
    p.add_argument("--out", default="examples_out", help="directory for the plot and the JSON results")
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--adamw-lr", type=float, default=3e-3, help="AdamW's lr, alone and as Muon's AdamW groups'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    cfg = p.parse_args(argv)
    size = dict(d_model=48, layers=2, heads=2, ctx=32, batch=16, eval_batches=4) if cfg.quick else \
        dict(d_model=96, layers=3, heads=3, ctx=64, batch=16, eval_batches=8)
    for k, v in size.items():
        setattr(cfg, k, v)
    cfg.steps = cfg.steps if cfg.steps is not None else (40 if cfg.quick else 400)
    if cfg.steps < 1:
        p.error(f"--steps must be >= 1, got {cfg.steps}")
    cfg.eval_every = max(1, cfg.steps // 8)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Print the split, run both optimizers, print the comparison, write the plot and JSON."""
    cfg = parse(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    train, val = stdlib_bytes()
    gen = torch.Generator().manual_seed(12345)
    val_batches = [batch(val, 32, cfg.ctx, gen) for _ in range(cfg.eval_batches)]
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
    plot(results, png)
    summary = {"example": "muon_split", "steps": cfg.steps, "quick": cfg.quick, "plot": png, "split": split,
               "runs": results}
    with open(os.path.join(cfg.out, "muon_split.json"), "w") as fh:
        json.dump(summary, fh)
    print(f"plot: {png}")
    print("RESULT " + json.dumps({"example": "muon_split", "plot": png, "split": split,
                                  "runs": [{k: v for k, v in r.items() if k not in ("train_curve",)}
                                           for r in results]}))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
