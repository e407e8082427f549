"""The ``optimkit`` command line: list, bench, report, speed; bad input exits 2 with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import optimkit
from optimkit.cli import main

pytest.importorskip("sklearn")

TINY = ["--workloads", "quadratic", "--optimizers", "adamw,sgd:momentum=0.9", "--trials", "2",
        "--eval-seeds", "1", "--quiet"]


def _one_line_error(capsys, rc):
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("optimkit: error: ")
    assert "Traceback" not in err and out == ""
    return lines[0]


def test_list_json(capsys):
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in data["optimizers"]] == optimkit.available()
    assert {w["name"] for w in data["workloads"]} >= {"rosenbrock", "mlp_digits", "char_lm"}
    assert {s["name"] for s in data["suites"]} == {"quick", "standard"}


def test_list_text_and_help(capsys):
    assert main(["list", "workloads"]) == 0
    assert "noisy_quadratic" in capsys.readouterr().out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("list", "bench", "speed", "report"):
        assert cmd in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "--optimizers", "adamw,nosuchopt"], "unknown optimizer 'nosuchopt'"),
    (["bench", "--workloads", "mnist"], "unknown workload 'mnist'"),
    (["bench", "--optimizers", "sgd:momentum=-3"], "momentum"),
    (["bench", "--suite", "huge"], "invalid choice: 'huge'"),
    (["bench", "--trials", "many"], "invalid int value"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_names_exit_2_with_one_line(argv, message, capsys, tmp_path):
    rc = main(argv + ["--out", str(tmp_path)] if argv[0] == "bench" and "--suite" not in argv else argv)
    line = _one_line_error(capsys, rc)
    assert message in line


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = _one_line_error(capsys, main(["bench", *TINY, "--out", str(blocker / "sub")]))
    assert "output directory" in line
    line = _one_line_error(capsys, main(["bench", *TINY, "--out", str(blocker)]))
    assert "not a directory" in line
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            line = _one_line_error(capsys, main(["bench", *TINY, "--out", str(ro)]))
            assert "not writable" in line
        finally:
            ro.chmod(0o755)


def test_corrupt_database(capsys, tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(os.urandom(4096))
    line = _one_line_error(capsys, main(["bench", *TINY, "--out", str(tmp_path), "--db", str(bad)]))
    assert "bad.sqlite" in line and ("not a database" in line or "corrupt" in line)
    line = _one_line_error(capsys, main(["report", "--db", str(bad)]))
    assert "not a database" in line or "corrupt" in line
    line = _one_line_error(capsys, main(["report", "--db", str(tmp_path / "none.sqlite")]))
    assert "no results database" in line


def test_bad_input_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"\x00garbage" * 512)
    for argv in (["bench", "--optimizers", "nosuchopt", "--out", str(tmp_path)],
                 ["report", "--db", str(bad)]):
        res = subprocess.run([sys.executable, "-m", "optimkit.cli", *argv], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
        assert res.stderr.startswith("optimkit: error: ")


def test_bench_json_then_report(capsys, tmp_path):
    out = tmp_path / "res"
    assert main(["bench", *TINY, "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["how"] == "new" and data["ran"] == 2 * (2 + 1 + 1) and data["reused"] == 0
    assert data["db"] == os.path.join(str(out), "bench.sqlite") and os.path.exists(data["db"])
    assert os.path.exists(data["report"]["markdown"]) and os.path.exists(data["report"]["html"])
    assert {r["optimizer"] for r in data["scores"]["external"]} == {"adamw", "sgd:momentum=0.9"}
    # the same command again: nothing re-run
    assert main(["bench", *TINY, "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["how"], again["ran"], again["reused"], again["run_id"]) == ("complete", 0, data["ran"], data["run_id"])
    # text mode prints the table and where the report is
    assert main(["report", "--db", data["db"], "--out", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    assert "score(steps)" in text and f"report: {tmp_path / 'rep' / 'report.md'}" in text


def test_bench_skips_unregistered_suite_optimizers(capsys, tmp_path, monkeypatch):
    from optimkit.bench import protocol

    quick = protocol.SUITES["quick"]
    monkeypatch.setitem(protocol.SUITES, "quick", protocol.SuiteDefaults(
        workloads=("quadratic",), optimizers=("adamw", "not_an_optimizer_yet"), n_trials=1,
        eval_seeds=(1000,), tracks=("self",)))
    rc = main(["bench", "--suite", "quick", "--out", str(tmp_path), "--no-report"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "note: skipping not_an_optimizer_yet (not registered" in err
    assert "adamw" in out and quick is not protocol.SUITES["quick"]


def test_speed_delegates(capsys, monkeypatch):
    try:
        import optimkit.bench.speed  # noqa: F401
    except ImportError:
        pass
    else:
        assert main(["speed", "--help"]) == 0
        assert "usage" in capsys.readouterr().out.lower()
    import optimkit.bench as bench_pkg

    monkeypatch.delattr(bench_pkg, "speed", raising=False)
    monkeypatch.setitem(sys.modules, "optimkit.bench.speed", None)
    line = _one_line_error(capsys, main(["speed"]))
    assert "speed benchmark is not available" in line
