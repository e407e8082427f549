"""Time-to-target tables, performance profiles and the AlgoPerf-style score.

For each track, workload and optimizer, the time to target is the median
over the held-out evaluation seeds (a seed that misses the target counts as
infinite, so a median can be infinite). With ``t[s][w]`` that median for
optimizer ``s`` on workload ``w``:

* performance ratio ``r[s][w] = t[s][w] / min_s' t[s'][w]`` (>= 1, inf if missed);
* performance profile ``rho_s(tau) = share of workloads with r[s][w] <= tau``;
* score ``B_s = 1/(r_max - 1) * integral_1^r_max rho_s(tau) dtau`` with ``r_max = 4``,
  which is ``mean_w max(0, r_max - r[s][w]) / (r_max - 1)``: 1 means fastest
  everywhere, 0 means never within 4x of the fastest.

Workloads that no optimizer reached are left out (and listed).
"""
from __future__ import annotations

import math
from typing import Iterable

__all__ = ["median", "time_to_target_table", "performance_ratios", "profile", "score", "R_MAX"]

R_MAX = 4.0
INF = math.inf


def median(xs: Iterable[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return math.nan
    if n % 2:
        return s[n // 2]
    a, b = s[n // 2 - 1], s[n // 2]
    return INF if math.isinf(a) or math.isinf(b) else 0.5 * (a + b)


def time_to_target_table(trials: list[dict]) -> dict[str, dict[str, dict[str, dict]]]:
    """``{track: {workload: {optimizer: cell}}}`` from the evaluation trials.

    A cell has ``steps`` and ``seconds`` (medians, inf if missed), ``reached``
    and ``n`` (seeds), ``final`` (median final metric), ``lr`` and ``budget``.
    """
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        if t["phase"] != "eval":
            continue
        groups.setdefault((t["track"], t["workload"], t["optimizer"]), []).append(t)
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for (track, workload, opt), rows in groups.items():
        ok = [r for r in rows if r["status"] == "ok" and r["reached"]]
        finals = [r["final_metric"] if r["final_metric"] is not None else INF for r in rows]
        cell = {
            "steps": median([r["steps_to_target"] if r in ok else INF for r in rows]),
            "seconds": median([r["seconds_to_target"] if r in ok else INF for r in rows]),
            "reached": len(ok), "n": len(rows), "final": median(finals),
            "lr": rows[0]["lr"], "budget": rows[0]["step_budget"],
            "status": sorted({r["status"] for r in rows}),
        }
        out.setdefault(track, {}).setdefault(workload, {})[opt] = cell
    return out


def performance_ratios(table: dict[str, dict[str, dict]], measure: str = "steps"
                       ) -> tuple[dict[str, dict[str, float]], list[str]]:
    """``({optimizer: {workload: ratio}}, excluded_workloads)`` for one track."""
    ratios: dict[str, dict[str, float]] = {}
    excluded = []
    optimizers = sorted({o for cells in table.values() for o in cells})
    for workload, cells in table.items():
        times = {o: c[measure] for o, c in cells.items()}
        best = min((t for t in times.values() if math.isfinite(t)), default=INF)
        if not math.isfinite(best):
            excluded.append(workload)
            continue
        for o in optimizers:
            t = times.get(o, INF)
            ratios.setdefault(o, {})[workload] = (t / best if best > 0 else (1.0 if t == 0 else INF)) \
                if math.isfinite(t) else INF
    for o in optimizers:
        ratios.setdefault(o, {})
    return ratios, excluded


def profile(ratios: dict[str, float], taus: Iterable[float]) -> list[float]:
    """rho(tau) for one optimizer's ratios over the workloads."""
    vals = list(ratios.values())
    if not vals:
        return [0.0 for _ in taus]
    return [sum(r <= tau for r in vals) / len(vals) for tau in taus]


def score(ratios: dict[str, float], r_max: float = R_MAX) -> float:
    """Area under the performance profile from 1 to ``r_max``, normalized to [0, 1]."""
    vals = list(ratios.values())
    if not vals:
        return 0.0
    return sum(max(0.0, r_max - r) / (r_max - 1.0) for r in vals if math.isfinite(r)) / len(vals)
