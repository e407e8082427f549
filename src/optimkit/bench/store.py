"""The results store: one SQLite file, queryable with plain SQL.

Tables (see docs/bench.md for every column)::

    meta(key, value)                         schema version
    runs(run_id, config_hash, suite, config, status, created, updated, finished,
         python, torch, optimkit, platform, backend)
    optimizers(run_id, optimizer, name, hparams, family, declared_state_bytes,
               measured_state_bytes)
    trials(trial_id, run_id, key, track, phase, workload, optimizer, name, hparams, lr,
           seed, step_budget, eval_every, metric, target, status, reached,
           steps_to_target, seconds_to_target, final_metric, best_metric,
           final_train_loss, steps_run, train_seconds, opt_seconds, eval_seconds,
           n_params, state_bytes, data_hash, worker, error, started, finished)
    metrics(trial_id, step, seconds, train_loss, value)

A trial and its metric series are written in one transaction when the trial
has finished, so a bench killed at any moment leaves only whole trials, and
``UNIQUE(run_id, key)`` keeps each trial once: rerunning the same bench
resumes it and skips every finished trial.
"""
from __future__ import annotations

import json
import os
import platform
import sqlite3
import sys
import time
from typing import Any, Iterator

from .protocol import BenchError
from .runner import TrialSpec

__all__ = ["Store", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id      INTEGER PRIMARY KEY,
    config_hash TEXT NOT NULL,
    suite       TEXT NOT NULL,
    config      TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('running', 'complete')),
    created     REAL NOT NULL,
    updated     REAL,
    finished    REAL,
    python      TEXT,
    torch       TEXT,
    optimkit    TEXT,
    platform    TEXT,
    backend     TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_hash ON runs(config_hash);
CREATE TABLE IF NOT EXISTS optimizers (
    run_id               INTEGER NOT NULL REFERENCES runs(run_id),
    optimizer            TEXT NOT NULL,
    name                 TEXT NOT NULL,
    hparams              TEXT NOT NULL,
    family               TEXT,
    declared_state_bytes REAL,
    measured_state_bytes REAL,
    PRIMARY KEY (run_id, optimizer)
);
CREATE TABLE IF NOT EXISTS trials (
    trial_id          INTEGER PRIMARY KEY,
    run_id            INTEGER NOT NULL REFERENCES runs(run_id),
    key               TEXT NOT NULL,
    track             TEXT NOT NULL,
    phase             TEXT NOT NULL,
    workload          TEXT NOT NULL,
    optimizer         TEXT NOT NULL,
    name              TEXT NOT NULL,
    hparams           TEXT NOT NULL,
    lr                REAL,
    seed              INTEGER NOT NULL,
    step_budget       INTEGER NOT NULL,
    eval_every        INTEGER NOT NULL,
    metric            TEXT NOT NULL,
    target            REAL NOT NULL,
    status            TEXT NOT NULL,
    reached           INTEGER NOT NULL,
    steps_to_target   INTEGER,
    seconds_to_target REAL,
    final_metric      REAL,
    best_metric       REAL,
    final_train_loss  REAL,
    steps_run         INTEGER,
    train_seconds     REAL,
    opt_seconds       REAL,
    eval_seconds      REAL,
    n_params          INTEGER,
    state_bytes       INTEGER,
    data_hash         TEXT,
    worker            TEXT,
    error             TEXT,
    started           REAL,
    finished          REAL,
    UNIQUE (run_id, key)
);
CREATE INDEX IF NOT EXISTS trials_by_study ON trials(run_id, workload, optimizer, track, phase);
CREATE TABLE IF NOT EXISTS metrics (
    trial_id   INTEGER NOT NULL REFERENCES trials(trial_id),
    step       INTEGER NOT NULL,
    seconds    REAL,
    train_loss REAL,
    value      REAL,
    PRIMARY KEY (trial_id, step)
) WITHOUT ROWID;
"""

TRIAL_COLUMNS = ("status", "reached", "steps_to_target", "seconds_to_target", "final_metric",
                 "best_metric", "final_train_loss", "steps_run", "train_seconds", "opt_seconds",
                 "eval_seconds", "n_params", "state_bytes", "data_hash", "worker", "error",
                 "started", "finished")


class Store:
    """A results database (SQLite file). Raises :class:`BenchError` for a bad file."""

    def __init__(self, path: str, create: bool = True):
        self.path = path
        if not create and not os.path.exists(path):
            raise BenchError(f"no results database at {path}")
        if os.path.isdir(path):
            raise BenchError(f"{path} is a directory, not a results database")
        parent = os.path.dirname(os.path.abspath(path))
        if create and not os.path.isdir(parent):
            raise BenchError(f"cannot create database {path}: directory {parent} does not exist")
        try:
            self.conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA foreign_keys = ON")
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "meta" not in tables:
                raise BenchError(f"{path} is a SQLite database but not an optimkit results store")
            if "meta" in tables:
                row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row[0]) if row else None
                if version != SCHEMA_VERSION:
                    raise BenchError(f"{path} has results schema version {version}; this optimkit "
                                     f"reads version {SCHEMA_VERSION}")
            elif create:
                with self.transaction():
                    for stmt in SCHEMA.split(";"):
                        if stmt.strip():
                            self.conn.execute(stmt)
                    self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                                      (str(SCHEMA_VERSION),))
            else:
                raise BenchError(f"{path} is an empty database, not an optimkit results store")
        except sqlite3.DatabaseError as exc:
            raise BenchError(f"cannot read results database {path}: {exc} "
                             "(corrupt or not a SQLite file?)") from None
        except OSError as exc:
            raise BenchError(f"cannot open results database {path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Close the database connection."""
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    class _Tx:
        def __init__(self, conn):
            self.conn = conn

        def __enter__(self):
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, etype, exc, tb):
            if etype is None:
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")
            return False

    def transaction(self) -> "_Tx":
        """A context manager: one SQLite transaction, committed on exit, rolled back on error."""
        return Store._Tx(self.conn)

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except sqlite3.DatabaseError as exc:
            raise BenchError(f"results database {self.path}: {exc}") from None

    # ------------------------------------------------------------------ runs
    def open_run(self, config: dict, config_hash: str, backend: str, new: bool = False) -> tuple[int, str]:
        """The run to continue (same config, not complete) or a new one.

        Returns ``(run_id, how)`` with ``how`` in ``"new"``, ``"resumed"``, ``"complete"``.
        """
        def go():
            if not new:
                row = self.conn.execute(
                    "SELECT run_id, status FROM runs WHERE config_hash=? ORDER BY run_id DESC LIMIT 1",
                    (config_hash,)).fetchone()
                if row is not None:
                    return row["run_id"], ("complete" if row["status"] == "complete" else "resumed")
            import torch

            import optimkit

            now = time.time()
            with self.transaction():
                cur = self.conn.execute(
                    "INSERT INTO runs (config_hash, suite, config, status, created, updated, python, "
                    "torch, optimkit, platform, backend) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (config_hash, config.get("suite", ""), json.dumps(config),
                     "running", now, now, sys.version.split()[0], torch.__version__,
                     getattr(optimkit, "__version__", "?"), platform.platform(), backend))
            return cur.lastrowid, "new"
        return self._guard(go)

    def finish_run(self, run_id: int) -> None:
        """Mark run ``run_id`` complete (status and finish time)."""
        def go():
            now = time.time()
            with self.transaction():
                self.conn.execute("UPDATE runs SET status='complete', finished=?, updated=? WHERE run_id=?",
                                  (now, now, run_id))
        self._guard(go)

    def runs(self) -> list[dict]:
        """Every stored run, as dicts of the ``runs`` table, oldest first."""
        return self._guard(lambda: [dict(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY run_id")])

    def run(self, run_id: int | None = None) -> dict:
        """One run (the latest by default)."""
        def go():
            if run_id is None:
                row = self.conn.execute("SELECT * FROM runs ORDER BY run_id DESC LIMIT 1").fetchone()
                if row is None:
                    raise BenchError(f"{self.path} holds no bench run yet")
            else:
                row = self.conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
                if row is None:
                    raise BenchError(f"{self.path} has no run {run_id}")
            return dict(row)
        return self._guard(go)

    # ------------------------------------------------------------------ optimizers
    def save_optimizer(self, run_id: int, label: str, name: str, hparams: dict, family: str,
                       declared: float | None, measured: float | None) -> None:
        """Store (or replace) one optimizer of a run with its declared and measured state bytes."""
        def go():
            with self.transaction():
                self.conn.execute(
                    "INSERT OR REPLACE INTO optimizers VALUES (?,?,?,?,?,?,?)",
                    (run_id, label, name, json.dumps(_jsonable(hparams), sort_keys=True), family,
                     declared, measured))
        self._guard(go)

    def optimizers(self, run_id: int) -> list[dict]:
        """The ``optimizers`` rows of run ``run_id``, in the order they were saved."""
        return self._guard(lambda: [dict(r) for r in self.conn.execute(
            "SELECT * FROM optimizers WHERE run_id=? ORDER BY rowid", (run_id,))])

    # ------------------------------------------------------------------ trials
    def save_trial(self, run_id: int, spec: TrialSpec, workload_metric: str, result: dict) -> bool:
        """Store a finished trial and its series atomically; False if it was already there."""
        def go():
            hp = _jsonable(spec.hparams)
            lr = spec.hparams.get("lr", _default_lr(spec.name))
            values = [result.get(c) for c in TRIAL_COLUMNS]
            values[1] = int(bool(values[1]))
            with self.transaction():
                cur = self.conn.execute(
                    "INSERT OR IGNORE INTO trials (run_id, key, track, phase, workload, optimizer, name, "
                    "hparams, lr, seed, step_budget, eval_every, metric, target, "
                    + ", ".join(TRIAL_COLUMNS) + ") VALUES (" + ",".join("?" * (14 + len(TRIAL_COLUMNS))) + ")",
                    (run_id, spec.key, spec.track, spec.phase, spec.workload, spec.optimizer, spec.name,
                     json.dumps(hp, sort_keys=True), lr, spec.seed, spec.steps, spec.eval_every,
                     workload_metric, spec.target, *values))
                if cur.rowcount == 0:
                    return False
                tid = cur.lastrowid
                self.conn.executemany("INSERT INTO metrics VALUES (?,?,?,?,?)",
                                      [(tid, s, t, l, v) for s, t, l, v in result.get("series", [])])
                self.conn.execute("UPDATE runs SET updated=? WHERE run_id=?", (time.time(), run_id))
            return True
        return self._guard(go)

    def trials(self, run_id: int, **where: Any) -> list[dict]:
        """The ``trials`` rows of run ``run_id``, filtered by column equality (``phase="eval"``)."""
        sql = "SELECT * FROM trials WHERE run_id=?"
        args: list[Any] = [run_id]
        for k, v in where.items():
            sql += f" AND {k}=?"
            args.append(v)
        return self._guard(lambda: [dict(r) for r in self.conn.execute(sql + " ORDER BY trial_id", args)])

    def series(self, trial_ids: list[int]) -> dict[int, list[tuple]]:
        """The ``metrics`` rows of each trial id, by step: ``{trial_id: [(step, seconds, train_loss, value), ...]}``."""
        out: dict[int, list[tuple]] = {t: [] for t in trial_ids}
        def go():
            for chunk in _chunks(trial_ids, 500):
                q = ",".join("?" * len(chunk))
                for r in self.conn.execute(
                        f"SELECT trial_id, step, seconds, train_loss, value FROM metrics "
                        f"WHERE trial_id IN ({q}) ORDER BY trial_id, step", chunk):
                    out[r[0]].append((r[1], r[2], r[3], r[4]))
            return out
        return self._guard(go)

    def finished_specs(self, run_id: int) -> Iterator[tuple[TrialSpec, dict]]:
        """Finished trials of a run as ``(spec, result summary)``, in completion order."""
        for row in self.trials(run_id):
            spec = TrialSpec(workload=row["workload"], optimizer=row["optimizer"], name=row["name"],
                             hparams={k: tuple(v) if isinstance(v, list) else v
                                      for k, v in json.loads(row["hparams"]).items()},
                             seed=row["seed"], steps=row["step_budget"], eval_every=row["eval_every"],
                             target=row["target"], track=row["track"], phase=row["phase"],
                             stop_at_target=row["phase"] == "tune")
            yield spec, row


def _jsonable(hp: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(hp.items())}


def _default_lr(name: str):
    try:
        import optimkit

        lr = optimkit.info(name).defaults.get("lr")
        return float(lr) if lr is not None else None
    except Exception:
        return None


def _chunks(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]
