"""optimkit's optimizer benchmark: workloads, tuning protocol, results store, report.

Command line: ``optimkit bench --suite quick`` (see docs/bench.md). From Python::

    from optimkit.bench import BenchConfig, OptimizerSpec, Store, run_bench, write_report
    cfg = BenchConfig(suite="custom", workloads=["mlp_digits"],
                      optimizers=[OptimizerSpec.parse("adamw"), OptimizerSpec.parse("lion")])
    with Store("bench.sqlite") as store:
        outcome = run_bench(cfg, store)
        write_report(store, "results", outcome.run_id)

Submodules import torch only; the report needs matplotlib for its plots,
``--search tpe`` needs optuna and ``--backend ray`` needs ray.
"""
from .engine import BenchOutcome, run_bench
from .protocol import SUITES, BenchConfig, BenchError, OptimizerSpec, Study
from .report import summarize, write_report
from .runner import TrialSpec, run_trial
from .scoring import performance_ratios, profile, score
from .store import Store
from .workloads import WORKLOADS, Workload, get_workload, stdlib_corpus, workload_names

__all__ = ["BenchConfig", "BenchError", "BenchOutcome", "OptimizerSpec", "SUITES", "Store", "Study",
           "TrialSpec", "WORKLOADS", "Workload", "get_workload", "performance_ratios", "profile",
           "run_bench", "run_trial", "score", "stdlib_corpus", "summarize", "workload_names",
           "write_report"]
