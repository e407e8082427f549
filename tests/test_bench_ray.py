"""``--backend ray``: trials run as Ray tasks on a local Ray runtime and land in the same store."""
from __future__ import annotations

import json
import os
import sqlite3

import pytest

pytest.importorskip("sklearn")
ray = pytest.importorskip("ray")

from optimkit.cli import main  # noqa: E402

ARGS = ["--workloads", "quadratic,logreg_cancer", "--optimizers", "adamw,sgd:momentum=0.9", "--trials", "2",
        "--eval-seeds", "2", "--no-report", "--quiet", "--json"]


@pytest.mark.slow
def test_ray_backend_matches_local(tmp_path, capsys):
    assert main(["bench", *ARGS, "--out", str(tmp_path / "ray"), "--backend", "ray", "--jobs", "2"]) == 0
    ray_run = json.loads(capsys.readouterr().out)
    assert not ray.is_initialized()  # the bench shut down the runtime it started
    assert main(["bench", *ARGS, "--out", str(tmp_path / "local")]) == 0
    local_run = json.loads(capsys.readouterr().out)
    planned = 2 * 2 * (2 + 2 + 2)
    assert ray_run["ran"] == local_run["ran"] == planned

    def rows(db):
        con = sqlite3.connect(db)
        out = {r[0]: r[1:] for r in con.execute(
            "SELECT key, status, steps_to_target, final_metric, worker, run_id FROM trials")}
        backend = con.execute("SELECT backend, status FROM runs").fetchall()
        con.close()
        return out, backend

    ray_rows, ray_backend = rows(ray_run["db"])
    local_rows, _ = rows(local_run["db"])
    assert ray_backend == [("ray", "complete")]
    assert set(ray_rows) == set(local_rows) and len(ray_rows) == planned
    # the same trials give the same results wherever they run
    for key, (status, steps, final, _w, _r) in local_rows.items():
        assert ray_rows[key][:3] == (status, steps, final)
    # and they did run in Ray worker processes
    pids = {w.rsplit(":", 1)[1] for *_, w, _r in ray_rows.values()}
    assert str(os.getpid()) not in pids
