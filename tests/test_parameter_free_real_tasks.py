"""The tuning-free claim on real tasks: parameter-free methods at their default
learning rate end within 10 % of a tuned AdamW's final validation metric, on
bench workloads run for three times their bench budget (the bench budgets are
too short for d to grow from 1e-6 and pay off; docs/tuning_free.md has the
table at 1x and 3x)."""
from __future__ import annotations

import pytest

from optimkit.bench import workloads as wl
from optimkit.bench.runner import run_trial
from test_bench_workloads import _spec

GRID = (0.1, 0.316, 1.0, 3.16, 10.0)  # x the workload's reference lr


def _final(workload: str, optimizer: str, steps: int, **hp) -> float:
    spec = _spec(workload, seed=1000, optimizer=optimizer, steps=steps, stop_at_target=False)
    spec.hparams.clear()
    spec.hparams.update(hp)
    result = run_trial(spec)
    assert result["status"] == "ok", result["error"]
    return result["final_metric"]


def _tuned_adamw(workload: str, steps: int) -> float:
    ref = wl.get_workload(workload).reference_lr
    return min(_final(workload, "adamw", steps, lr=ref * f) for f in GRID)


# measured (seed 1000, 3x budget): AdamW tuned / parameter-free at default lr; the bar is
# 10 % plus the metric's resolution (one validation example for error rates)
CASES = [
    ("mlp_digits", "prodigy", dict(safeguard_warmup=True, use_bias_correction=True)),     # 0.0111 / 0.0111
    ("autoencoder_digits", "prodigy", dict(safeguard_warmup=True, use_bias_correction=True)),  # 0.0177 / 0.0169
    ("logreg_cancer", "dog", {}),                                                          # 0.1237 / 0.1183
]


@pytest.mark.slow  # about 40 s
@pytest.mark.parametrize("workload,optimizer,hp", CASES, ids=[f"{w}-{o}" for w, o, _ in CASES])
def test_default_lr_within_ten_percent_of_tuned_adamw(workload, optimizer, hp):
    steps = 3 * wl.get_workload(workload).steps
    tuned = _tuned_adamw(workload, steps)
    free = _final(workload, optimizer, steps, **hp)
    print(f"{workload}: tuned AdamW {tuned:.4g}, {optimizer} at default lr {free:.4g}")
    assert free <= 1.10 * tuned + _resolution(workload), (tuned, free)


def _resolution(workload: str) -> float:
    """The smallest step of the workload's metric that 10 % may be finer than: one
    validation example for an error rate (mlp_digits: 1/360, i.e. 4 -> 5 errors is
    +25 %; measured 4 and 4 errors on one CPU, 4 and 5 on another), else 0."""
    if wl.get_workload(workload).metric != "val_error":
        return 0.0
    assert workload == "mlp_digits", "the validation set size of another error-rate workload"
    from optimkit.bench.workloads import _digits

    return 1.0 / len(_digits()[3])
