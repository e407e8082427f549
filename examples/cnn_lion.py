"""A small CNN on scikit-learn's 8x8 digits: ok.Lion vs ok.AdamW.

Trains the same convolutional network (same initial weights, same minibatch
order) with Lion ("Symbolic Discovery of Optimization Algorithms", Chen et
al. 2023: the sign of an interpolated momentum, so a learning rate about 3-10x
below AdamW's and a weight decay as many times larger) and with AdamW, and
prints test accuracy and loss side by side. The data ship with scikit-learn
(nothing is downloaded). A plot of both curves goes to ``--out``.

    python examples/cnn_lion.py                 # defaults: under a minute on 2 CPU cores
    python examples/cnn_lion.py --quick         # seconds: a smoke run
    python examples/cnn_lion.py --steps 3000

The last line printed is ``RESULT {json}`` (also written to
``<out>/cnn_lion.json``) for scripts and tests.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import optimkit as ok
from _common import finish, parse as parse_args, parser, start


def digits(seed: int) -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits as (x_train, y_train, x_test, y_test): 1x8x8 images scaled to [0, 1], a stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.images / 16.0, d.target, test_size=0.25, random_state=seed,
                                          stratify=d.target)
    f = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


class CNN(nn.Module):
    """conv(16) - conv(32) - maxpool - linear(64) - linear(10), ReLUs between."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, classes) for images (batch, 1, 8, 8)."""
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) of ``model`` on ``x, y``."""
    model.eval()
    logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def run(name: str, make_opt, cfg: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict:
    """Train one CNN from the seed's initial weights; returns its curves and final test metrics."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(cfg.seed)
    model = CNN()
    opt = make_opt(model)
    sched = ok.schedules.cosine(cfg.steps, num_warmup_steps=cfg.steps // 20).scheduler(opt)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same minibatches for every optimizer
    loss0, acc0 = evaluate(model, xte, yte)
    curve, train_curve = [(0, loss0, acc0)], []
    order = torch.randperm(len(xtr), generator=gen)
    pos, t0 = 0, time.perf_counter()
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch > len(order):
            order, pos = torch.randperm(len(xtr), generator=gen), 0
        idx = order[pos:pos + cfg.batch]
        pos += cfg.batch
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_curve.append((step, loss.item()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append((step, *evaluate(model, xte, yte)))
    k = max(1, min(len(train_curve) // 10, 20))
    return {"name": name, "params": sum(p.numel() for p in model.parameters()), "state_bytes": ok.state_bytes(opt),
            "train_loss_first": sum(l for _, l in train_curve[:k]) / k,
            "train_loss_last": sum(l for _, l in train_curve[-k:]) / k,
            "test_loss_first": loss0, "test_acc_first": acc0, "test_loss": curve[-1][1], "test_acc": curve[-1][2],
            "seconds": time.perf_counter() - t0, "curve": curve}


def plot(results: list[dict], path: str) -> None:
    """Test loss and accuracy of every run against the step, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for r in results:
        s, l, a = zip(*r["curve"])
        a1.plot(s, l, "o-", ms=3, label=r["name"])
        a2.plot(s, a, "o-", ms=3, label=f"{r['name']} ({r['test_acc']:.1%})")
    a1.set(xlabel="step", ylabel="test cross-entropy", yscale="log")
    a2.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1))
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("CNN on sklearn digits (8x8)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings; ``--quick`` is a short smoke run."""
    p = parser(__doc__, 600, 60, "few steps (seconds)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lion-lr", type=float, default=1e-3)
    p.add_argument("--adamw-lr", type=float, default=3e-3)
    cfg = parse_args(p, argv, 600, 60)
    cfg.eval_every = max(1, cfg.steps // 10)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Run both optimizers, print the comparison, write the plot and JSON; returns the results."""
    cfg = parse(argv)
    start(cfg)
    data = digits(cfg.seed)
    print(f"digits: {len(data[0])} train / {len(data[2])} test images; {cfg.steps} steps, batch {cfg.batch}")
    # Lion: lr ~3x below AdamW's, weight decay as many times larger (same lr * wd product)
    results = [run(f"Lion lr={cfg.lion_lr:g}", lambda m: ok.Lion(m.parameters(), lr=cfg.lion_lr, weight_decay=0.3),
                   cfg, data),
               run(f"AdamW lr={cfg.adamw_lr:g}", lambda m: ok.AdamW(m.parameters(), lr=cfg.adamw_lr, weight_decay=0.1),
                   cfg, data)]
    print(f"{'optimizer':<18} {'state B/param':>13} {'train first':>11} {'train last':>10} {'test loss':>9} "
          f"{'test acc':>8} {'time s':>7}")
    for r in results:
        print(f"{r['name']:<18} {r['state_bytes'] / r['params']:>13.2f} {r['train_loss_first']:>11.3f} "
              f"{r['train_loss_last']:>10.3f} {r['test_loss']:>9.4f} {r['test_acc']:>8.2%} {r['seconds']:>7.1f}")
    png = os.path.join(cfg.out, "cnn_lion.png")
    plot(results, png)
    summary = {"example": "cnn_lion", "steps": cfg.steps, "quick": cfg.quick, "plot": png, "runs": results}
    return finish("cnn_lion", cfg, png, summary, [{k: v for k, v in r.items() if k != "curve"} for r in results])


if __name__ == "__main__":
    main(sys.argv[1:])
