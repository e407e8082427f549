"""Bench protocol: optimizer specs, lr grid, study plans, tuning choice, profiles and score."""
from __future__ import annotations

import math

import pytest

from optimkit.bench import scoring
from optimkit.bench.protocol import (SUITES, BenchConfig, BenchError, OptimizerSpec,
                                     parse_optimizer_list, tuning_objective)
from optimkit.bench.workloads import get_workload

INF = math.inf


# --------------------------------------------------------------------------- scoring
def test_median_counts_misses_as_infinite():
    assert scoring.median([3, 1, 2]) == 2
    assert scoring.median([1, 3]) == 2
    assert scoring.median([1, INF]) == INF
    assert scoring.median([1, 2, INF]) == 2


def test_ratios_profile_and_score_by_hand():
    table = {
        "w1": {"a": {"steps": 100}, "b": {"steps": 200}, "c": {"steps": INF}},
        "w2": {"a": {"steps": 300}, "b": {"steps": 100}, "c": {"steps": 500}},
        "w3": {"a": {"steps": INF}, "b": {"steps": INF}, "c": {"steps": INF}},  # nobody: left out
    }
    ratios, excluded = scoring.performance_ratios(table)
    assert excluded == ["w3"]
    assert ratios["a"] == {"w1": 1.0, "w2": 3.0}
    assert ratios["b"] == {"w1": 2.0, "w2": 1.0}
    assert ratios["c"] == {"w1": INF, "w2": 5.0}
    assert scoring.profile(ratios["a"], [1.0, 2.9, 3.0, 4.0]) == [0.5, 0.5, 1.0, 1.0]
    # B = mean_w max(0, 4 - r) / 3
    assert scoring.score(ratios["a"]) == pytest.approx((3 / 3 + 1 / 3) / 2)
    assert scoring.score(ratios["b"]) == pytest.approx((2 / 3 + 3 / 3) / 2)
    assert scoring.score(ratios["c"]) == 0.0


def test_score_is_the_normalized_area_under_the_profile():
    ratios = {"w1": 1.0, "w2": 1.7, "w3": 3.2, "w4": INF, "w5": 6.0}
    n = 30000
    taus = [1 + 3 * (i + 0.5) / n for i in range(n)]
    area = sum(scoring.profile(ratios, taus)) * 3 / n / 3
    assert scoring.score(ratios) == pytest.approx(area, abs=1e-3)


def test_time_to_target_table_medians_over_seeds():
    def row(opt, seed, steps, secs, status="ok"):
        return {"phase": "eval", "track": "external", "workload": "w", "optimizer": opt,
                "status": status, "reached": steps is not None, "steps_to_target": steps,
                "seconds_to_target": secs, "final_metric": 0.1, "lr": 0.01, "step_budget": 500}
    rows = [row("a", 1, 100, 1.0), row("a", 2, 300, 3.0), row("a", 3, 200, 2.0),
            row("b", 1, 100, 1.0), row("b", 2, None, None),
            {**row("x", 1, 10, 0.1), "phase": "tune"}]
    t = scoring.time_to_target_table(rows)["external"]["w"]
    assert t["a"]["steps"] == 200 and t["a"]["seconds"] == 2.0 and t["a"]["reached"] == 3
    assert t["b"]["steps"] == INF and t["b"]["reached"] == 1 and t["b"]["n"] == 2
    assert "x" not in t


# --------------------------------------------------------------------------- specs
def test_optimizer_spec_parsing():
    s = OptimizerSpec.parse("sgd:momentum=0.9,nesterov=true")
    assert (s.name, s.hparams) == ("sgd", {"momentum": 0.9, "nesterov": True})
    assert s.label == "sgd:momentum=0.9,nesterov=true"
    assert OptimizerSpec.parse("AdamW").label == "adamw"
    assert OptimizerSpec.parse("adamw:betas=0.9/0.95").hparams == {"betas": (0.9, 0.95)}
    assert OptimizerSpec.parse("sgd:lr=0.1").default_lr == 0.1
    with pytest.raises(BenchError, match="unknown optimizer"):
        OptimizerSpec.parse("nosuchopt")
    with pytest.raises(BenchError, match="unknown hyperparameter 'momentm'"):
        OptimizerSpec.parse("sgd:momentm=0.9")
    with pytest.raises(BenchError, match="momentum"):
        OptimizerSpec.parse("sgd:momentum=-1")
    with pytest.raises(BenchError, match="key=value"):
        OptimizerSpec.parse("sgd:momentum")


def test_optimizer_list_splitting():
    assert parse_optimizer_list(["adamw,sgd:momentum=0.9,nesterov=true,lion"]) == \
        ["adamw", "sgd:momentum=0.9,nesterov=true", "lion"]
    assert parse_optimizer_list(["adamw", "lion,", "sgd:momentum=0.9"]) == ["adamw", "lion", "sgd:momentum=0.9"]


def test_suites_are_well_formed():
    quick = SUITES["quick"]
    assert len(quick.optimizers) >= 8 and len(quick.workloads) >= 4
    for s in SUITES.values():
        for w in s.workloads:
            get_workload(w)
        assert not set(s.tune_seeds) & set(s.eval_seeds)


# --------------------------------------------------------------------------- studies
def _cfg(**kw) -> BenchConfig:
    base = dict(suite="t", workloads=["quadratic"], optimizers=[OptimizerSpec.parse("adamw")],
                n_trials=4, tune_seeds=(0,), eval_seeds=(1000, 1001), tracks=("external", "self"))
    base.update(kw)
    return BenchConfig(**base)


def test_config_validation():
    with pytest.raises(BenchError, match="held-out"):
        _cfg(tune_seeds=(0,), eval_seeds=(0,))
    with pytest.raises(BenchError, match="unknown workload"):
        _cfg(workloads=["nope"])
    with pytest.raises(BenchError, match="trials"):
        _cfg(n_trials=0)
    assert _cfg().config_hash() == _cfg().config_hash()
    assert _cfg().config_hash() != _cfg(n_trials=5).config_hash()


def test_grid_is_log_spaced_around_the_default_lr():
    study = _cfg(n_trials=8).studies()[0]
    grid = study.grid()
    assert len(grid) == 8
    assert grid[0] == pytest.approx(1e-4) and grid[-1] == pytest.approx(10 ** -0.5, rel=1e-5)
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    assert all(r == pytest.approx(10 ** 0.5, rel=1e-4) for r in ratios)


def _fake_result(reached_at=None, best=1.0, status="ok"):
    return {"status": status, "reached": reached_at is not None, "steps_to_target": reached_at,
            "best_metric": best}


def test_external_study_tunes_then_evaluates_the_fastest_lr():
    cfg = _cfg(tune_seeds=(0, 1))
    study = [s for s in cfg.studies() if s.track == "external"][0]
    tune = study.next_specs(set())
    assert len(tune) == 4 * 2 and all(s.phase == "tune" and s.stop_at_target for s in tune)
    # while a tuning trial is running, no evaluation is planned
    first, rest = tune[0], tune[1:]
    fast_lr = study.grid()[2]
    for s in rest:
        r = _fake_result(100 if s.hparams["lr"] == fast_lr else (300 if s.hparams["lr"] > fast_lr else None),
                         best=0.5 if s.hparams["lr"] == fast_lr else 2.0)
        study.add_result(s, r)
    assert study.next_specs({first.key}) == []
    study.add_result(first, _fake_result(None, 3.0))
    evals = study.next_specs(set())
    assert [s.seed for s in evals] == [1000, 1001]
    assert all(s.phase == "eval" and not s.stop_at_target and s.hparams["lr"] == fast_lr for s in evals)
    assert not study.complete()
    for s in evals:
        study.add_result(s, _fake_result(120))
    assert study.complete() and study.next_specs(set()) == []


def test_self_tuning_study_runs_defaults_with_a_larger_budget():
    cfg = _cfg()
    study = [s for s in cfg.studies() if s.track == "self"][0]
    specs = study.next_specs(set())
    assert [s.seed for s in specs] == [1000, 1001]
    assert all(s.hparams == {} and s.steps == int(round(1.5 * get_workload("quadratic").steps)) for s in specs)


def test_tuning_objective_orders_runs():
    hit_fast, hit_slow = _fake_result(50), _fake_result(200)
    miss_close, miss_far = _fake_result(None, best=0.0011), _fake_result(None, best=0.5)
    diverged = _fake_result(None, best=0.0001, status="diverged")
    objs = [tuning_objective(r, 600, 0.001) for r in (hit_fast, hit_slow, miss_close, miss_far, diverged)]
    assert objs == sorted(objs)


def test_tpe_suggestions_are_deterministic_and_in_range():
    pytest.importorskip("optuna")
    cfg = _cfg(search="tpe", n_trials=5)
    runs = []
    for _ in range(2):
        study = [s for s in cfg.studies() if s.track == "external"][0]
        lrs = []
        while True:
            specs = study.next_specs(set())
            if not specs or specs[0].phase == "eval":
                break
            lr = specs[0].hparams["lr"]
            lrs.append(lr)
            assert study.lr_lo <= lr <= study.lr_hi
            study.add_result(specs[0], _fake_result(int(100 + 1000 * abs(math.log10(lr) + 1.5)), 0.5))
        runs.append(lrs)
    assert len(runs[0]) == 5 and len(set(runs[0])) == 5
    assert runs[0] == runs[1]
