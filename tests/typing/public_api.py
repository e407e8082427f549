"""Typed usage of optimkit's public API, checked by mypy (``[tool.mypy]`` in pyproject.toml).

This file is what a user's type-checked training script sees: every line must
type-check, and the ``# type: ignore[code]`` lines must still be errors
(``warn_unused_ignores``), so a public name that disappears from the type
checker's view, or a return type that degrades to ``Any``, fails the check.
It also runs (``tests/test_packaging.py`` executes it), so it stays valid code.
"""
from __future__ import annotations

import io

import torch
from torch import nn

import optimkit as ok
from optimkit.core.registry import OptimizerInfo


def model() -> nn.Module:
    """A small LM-shaped module: embedding, hidden matrices, head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 16))


def train(opt: torch.optim.Optimizer | ok.ScheduleFreeWrapper, m: nn.Module, steps: int = 2) -> float:
    """A few steps of a torch training loop; returns the last loss."""
    x = torch.randint(16, (4, 5))
    loss = torch.zeros(())
    for _ in range(steps):
        loss = m(x).logsumexp(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def main() -> None:
    """Exercise the public surface with the types a user would write down."""
    m = model()

    # the optimizer classes: each is a torch.optim.Optimizer and an ok.Optimizer
    adamw: ok.Optimizer = ok.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
    base: torch.optim.Optimizer = adamw
    lion = ok.Lion(m.parameters(), lr=1e-4, state_precision="q8")
    train(lion, m)
    galore = ok.AdamW(m.parameters(), projection=ok.GaLore(rank=4, interval=10))
    projection: ok.Projection = ok.GaLore(rank=2)
    apollo: ok.Projection = ok.APOLLO(rank=2)
    groups: list[dict] = ok.muon_param_groups(m, adamw=dict(lr=3e-4))
    muon = ok.Muon(groups, lr=0.02)
    sf = ok.ScheduleFreeWrapper(torch.optim.SGD(m.parameters(), lr=0.1))
    sf_opt: torch.optim.Optimizer = sf  # a wrapper around any torch optimizer, itself one
    sf.train()
    train_sf: float = train(sf, m, steps=1)
    avg = ok.PolynomialDecayAverager(m)
    train(muon, m)
    avg.step()

    # the registry
    names: list[str] = ok.available()
    created: ok.Optimizer = ok.create("adamw", m.parameters(), lr=1e-3)
    meta: OptimizerInfo = ok.info("adamw")

    # memory
    report: str = ok.memory_report(galore, file=io.StringIO())
    total = ok.state_bytes(adamw)
    by_place = ok.state_bytes(adamw, by_placement=True)

    # schedules and scaling
    sched: torch.optim.lr_scheduler.LambdaLR = ok.schedules.cosine(100, num_warmup_steps=10).scheduler(adamw)
    factor: float = ok.schedules.wsd(10, 20, 100)(50)
    batch_lr: float = ok.scaling.batch_lr(1e-3, 256, 64, rule="sqrt")
    pgroups = ok.param_groups(m, lr=1e-3, weight_decay=0.1)
    version: str = ok.__version__
    checkpointer: type[ok.checkpoint.AsyncCheckpointer] = ok.checkpoint.AsyncCheckpointer
    diloco: type[ok.DiLoCo] = ok.DiLoCo

    print(len(names), meta.name, len(report), total, by_place, sched.last_epoch, factor, batch_lr,
          len(pgroups), version, type(base).__name__, train_sf, type(sf_opt).__name__, type(created).__name__,
          type(projection).__name__, type(apollo).__name__, checkpointer.__name__, diloco.__name__)


def type_errors() -> None:
    """Misuses the checker must reject (never called: each line is also a runtime error)."""
    ok.available() + 1  # type: ignore[operator]
    ok.info(3)  # type: ignore[arg-type]
    ok.create("adamw", []).no_such_method()  # type: ignore[attr-defined]
    ok.schedules.cosine("100")  # type: ignore[arg-type]
    ok.__version__ + 1  # type: ignore[operator]
    ok.GaLore(rank="4")  # type: ignore[arg-type]
    ok.NoSuchOptimizer  # type: ignore[attr-defined]
    ok.checkpoint.NoSuchName  # type: ignore[attr-defined]
    ok.DiLoCo.no_such_method  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
