"""Results store: schema, plain SQL, atomic trials, resuming (also after kill -9)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from optimkit.bench import engine
from optimkit.bench.engine import run_bench
from optimkit.bench.protocol import BenchConfig, BenchError, OptimizerSpec
from optimkit.bench.store import SCHEMA_VERSION, Store

pytest.importorskip("sklearn")


def _cfg(optimizers=("adamw", "sgd:momentum=0.9"), workloads=("quadratic", "logreg_cancer"), **kw):
    base = dict(suite="test", workloads=list(workloads),
                optimizers=[OptimizerSpec.parse(o) for o in optimizers], n_trials=3,
                tune_seeds=(0,), eval_seeds=(1000, 1001), tracks=("external", "self"))
    base.update(kw)
    return BenchConfig(**base)


def _planned(cfg) -> int:
    return sum(s.planned_trials() for s in cfg.studies())


def test_bench_fills_the_schema_and_plain_sql_works(tmp_path):
    cfg = _cfg()
    with Store(str(tmp_path / "r.sqlite")) as store:
        out = run_bench(cfg, store, progress=False)
    assert out.how == "new" and out.ran == _planned(cfg) == 2 * 2 * (3 + 2 + 2)
    con = sqlite3.connect(tmp_path / "r.sqlite")
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert con.execute("SELECT status, suite FROM runs").fetchall() == [("complete", "test")]
    assert json.loads(con.execute("SELECT config FROM runs").fetchone()[0])["n_trials"] == 3
    n_trials, n_keys = con.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM trials").fetchone()
    assert n_trials == n_keys == out.ran
    # every trial has its metric series, starting with the evaluation at step 0
    rows = con.execute("SELECT t.trial_id, t.steps_run, t.eval_every, MIN(m.step), MAX(m.step), COUNT(*) "
                       "FROM trials t JOIN metrics m USING (trial_id) GROUP BY t.trial_id").fetchall()
    assert len(rows) == n_trials
    for _, steps_run, every, lo, hi, _n in rows:
        assert lo == 0 and hi == steps_run
    # the example query of docs/bench.md
    q = ("SELECT optimizer, AVG(steps_to_target) AS mean_steps, SUM(reached) AS reached, COUNT(*) AS runs "
         "FROM trials WHERE phase = 'eval' AND track = 'external' AND workload = 'quadratic' "
         "GROUP BY optimizer ORDER BY mean_steps")
    res = con.execute(q).fetchall()
    assert {r[0] for r in res} == {"adamw", "sgd:momentum=0.9"} and all(r[3] == 2 for r in res)
    # measured optimizer state: AdamW keeps 8 bytes per parameter
    adamw = con.execute("SELECT declared_state_bytes, measured_state_bytes FROM optimizers "
                        "WHERE optimizer='adamw'").fetchone()
    assert adamw == (8.0, pytest.approx(8.0))
    con.close()


def test_rerun_reuses_everything(tmp_path):
    cfg = _cfg(optimizers=("adamw",), workloads=("quadratic",))
    db = str(tmp_path / "r.sqlite")
    with Store(db) as store:
        first = run_bench(cfg, store, progress=False)
    with Store(db) as store:
        again = run_bench(cfg, store, progress=False)
        assert (again.run_id, again.how, again.ran, again.reused) == (first.run_id, "complete", 0, first.ran)
        fresh = run_bench(cfg, store, progress=False, new_run=True)
        assert fresh.run_id != first.run_id and fresh.ran == first.ran
        other = run_bench(_cfg(optimizers=("adamw",), workloads=("quadratic",), n_trials=2), store, progress=False)
        assert other.how == "new"


def test_interrupted_bench_resumes_without_rerunning_finished_trials(tmp_path, monkeypatch):
    cfg = _cfg()
    db = str(tmp_path / "r.sqlite")
    calls = []
    real = engine.make_backend

    class Interrupting:
        def __init__(self, inner):
            self.inner, self.capacity = inner, inner.capacity

        def submit(self, spec):
            self.inner.submit(spec)

        def wait(self):
            if len(calls) == 9:
                raise KeyboardInterrupt
            spec, result = self.inner.wait()
            calls.append(spec.key)
            return spec, result

        def close(self):
            self.inner.close()

    monkeypatch.setattr(engine, "make_backend", lambda *a, **k: Interrupting(real(*a, **k)))
    with Store(db) as store, pytest.raises(KeyboardInterrupt):
        run_bench(cfg, store, progress=False)
    with Store(db) as store:
        before = {r["key"]: (r["trial_id"], r["finished"]) for r in store.trials(1)}
        assert len(before) == 9 and store.run(1)["status"] == "running"
    monkeypatch.setattr(engine, "make_backend", real)
    with Store(db) as store:
        out = run_bench(cfg, store, progress=False)
        assert (out.run_id, out.how, out.reused, out.ran) == (1, "resumed", 9, _planned(cfg) - 9)
        after = {r["key"]: (r["trial_id"], r["finished"]) for r in store.trials(1)}
        assert store.run(1)["status"] == "complete"
    assert len(after) == _planned(cfg)
    assert all(after[k] == v for k, v in before.items())  # finished trials untouched


def test_save_trial_is_idempotent(tmp_path):
    from optimkit.bench.runner import TrialSpec, run_trial

    spec = TrialSpec("quadratic", "adamw", "adamw", {"lr": 0.1}, seed=0, steps=20, eval_every=10, target=1e-3)
    result = run_trial(spec)
    with Store(str(tmp_path / "r.sqlite")) as store:
        run_id, _ = store.open_run({"suite": "x"}, "h", "local")
        assert store.save_trial(run_id, spec, "relative_loss", result) is True
        assert store.save_trial(run_id, spec, "relative_loss", result) is False
        rows = store.trials(run_id)
        assert len(rows) == 1 and rows[0]["key"] == spec.key and rows[0]["lr"] == 0.1
        assert store.series([rows[0]["trial_id"]])[rows[0]["trial_id"]][0][0] == 0
        (spec2, row), = list(store.finished_specs(run_id))
        assert spec2.key == spec.key


def test_bad_database_files(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(BenchError, match="not a database"):
        Store(str(bad))
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE x (a)")
    con.commit()
    con.close()
    with pytest.raises(BenchError, match="not an optimkit results store"):
        Store(str(other))
    with pytest.raises(BenchError, match="no results database"):
        Store(str(tmp_path / "missing.sqlite"), create=False)
    with pytest.raises(BenchError, match="does not exist"):
        Store(str(tmp_path / "no" / "dir.sqlite"))


def _bench_cmd(out):
    return [sys.executable, "-m", "optimkit.cli", "bench", "--workloads", "mlp_digits", "logreg_cancer",
            "--optimizers", "adamw,sgd:momentum=0.9,rmsprop", "--trials", "4", "--eval-seeds", "2",
            "--out", str(out), "--no-report", "--quiet", "--json"]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume(tmp_path):
    """kill -9 the bench process while it runs; rerunning keeps every finished trial once."""
    out = tmp_path / "res"
    db = out / "bench.sqlite"
    total = 2 * 3 * (4 + 2 + 2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_bench_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    done = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
                    done = con.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
                    con.close()
                except sqlite3.OperationalError:
                    done = 0
            if done >= 6:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "bench finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    con = sqlite3.connect(db)
    before = dict(((k, (tid, fin)) for k, tid, fin in con.execute("SELECT key, trial_id, finished FROM trials")))
    assert con.execute("SELECT status FROM runs").fetchall() == [("running",)]
    con.close()
    assert 6 <= len(before) < total

    res = subprocess.run(_bench_cmd(out), capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["how"] == "resumed"
    assert summary["reused"] == len(before) and summary["ran"] == total - len(before)

    con = sqlite3.connect(db)
    rows = con.execute("SELECT key, trial_id, finished FROM trials").fetchall()
    assert len(rows) == total and len({r[0] for r in rows}) == total  # each trial exactly once
    for key, tid, fin in rows:
        if key in before:
            assert before[key] == (tid, fin)  # not re-run
    assert con.execute("SELECT COUNT(*), MIN(status) FROM runs").fetchone() == (1, "complete")
    orphans = con.execute("SELECT COUNT(*) FROM trials t WHERE NOT EXISTS "
                          "(SELECT 1 FROM metrics m WHERE m.trial_id = t.trial_id)").fetchone()[0]
    assert orphans == 0
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
