"""``optimkit speed --geometry``: Muon, Shampoo (and SOAP, PSGD-Kron once registered)
timed against AdamW and torch.optim.Muon, amortized over the refresh interval.
Structure only: timing figures are never asserted (shared, noisy machines)."""
import json
from types import SimpleNamespace

import pytest
import torch

import optimkit as ok
from optimkit.bench import speed
from optimkit.cli import main

TINY = dict(d_model=16, n_layers=1, vocab=32, interval=2, windows=2)


def test_geometry_shapes_roles():
    shaped = speed.geometry_shapes(d_model=8, n_layers=2, vocab=20)
    assert shaped[0] == ((20, 8), "embedding")
    matrices = [s for s, role in shaped if role == "matrix"]
    assert matrices == [(24, 8), (8, 8), (32, 8), (8, 32)] * 2
    assert all(len(s) == 1 for s, role in shaped if role == "vector")
    assert len(shaped) == 1 + 12 * 2 + 2


def test_interval_hyperparameters():
    hp, note = speed.interval_hyperparameters("shampoo", 10)
    assert hp == {"precondition_frequency": 10} and "precondition_frequency=10" in note


def test_interval_hyperparameters_probability_and_none(monkeypatch):
    monkeypatch.setattr(speed.ok, "info", lambda name: SimpleNamespace(
        defaults={"lr": 1.0, "preconditioner_update_probability": 1.0} if name == "p" else {"lr": 1.0}))
    hp, note = speed.interval_hyperparameters("p", 10)
    assert hp == {"preconditioner_update_probability": 0.1} and "1/10" in note
    hp, note = speed.interval_hyperparameters("q", 10)
    assert hp == {} and "defaults" in note


def test_run_geometry_structure():
    notes = []
    contenders = speed.geometry_contenders(
        TINY["interval"], compile_muon=False, notes=notes,
        names=(("shampoo", "Shampoo"), ("not_registered_here", "Missing")))
    assert notes == ["Missing ('not_registered_here'): skipped, not registered in this optimkit"]
    report = speed.run_geometry(contenders=contenders, **TINY)
    names = [r["name"] for r in report["results"]]
    assert names == ["torch AdamW fused", "torch AdamW foreach", "optimkit AdamW eager", "optimkit Shampoo",
                     "optimkit Shampoo blocks 256",
                     "torch Muon", "torch AdamW fused (matrices)", "optimkit Muon eager"]
    sh = report["shapes"]
    assert sh["params"] == sum(torch.Size(s).numel() for s, _ in speed.geometry_shapes(16, 1, 32))
    assert sh["matrix_params"] == 16 * 16 * (3 + 1 + 4 + 4)
    assert report["window_steps"] == 2 and report["interval"] == 2 and report["windows"] == 2
    for r in report["results"]:
        assert r["params"] == (sh["params"] if r["param_set"] == "all" else sh["matrix_params"])
        assert list(r["ratios"]) == list(speed.GEOMETRY_BASELINES[r["param_set"]])
        for key in ("ratios", "refresh_ratio", "typical_ratio"):
            assert all(x > 0 for x in r[key].values())
        assert r["amortized_step_s"] > 0 and r["warmup_s"] >= 0
        if r["name"] in r["ratios"]:
            assert r["ratios"][r["name"]] == 1.0
    assert "precondition_frequency=2" in report["results"][3]["note"]
    table = speed.format_geometry_table(report)
    assert "vs torch Muon" in table and "vs torch AdamW fused" in table and "optimkit Shampoo" in table


def test_run_geometry_reports_failing_contender():
    def broken(ps):
        raise RuntimeError("cannot run here")

    good = speed.GeometryContender("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True))
    report = speed.run_geometry(contenders=[good, speed.GeometryContender("broken", broken)], **TINY)
    assert [r["name"] for r in report["results"]] == ["torch AdamW fused"]
    assert report["notes"] == ["broken: skipped (RuntimeError: cannot run here)"]


def test_cli_geometry_json(capsys):
    rc = main(["speed", "--geometry", "--json", "--no-compile", "--d-model", "16", "--layers", "1",
               "--vocab", "32", "--interval", "2", "--windows", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out)
    got = {r["name"] for r in report["results"]}
    assert {"torch AdamW fused", "optimkit Shampoo", "torch Muon", "optimkit Muon eager"} <= got
    assert "optimkit Muon compiled" not in got
    for reg_name, label in speed.SECOND_ORDER:  # registered ones are timed, the others named in a note
        if reg_name in ok.available():
            assert f"optimkit {label}" in got
        else:
            assert any(n.startswith(f"{label} ({reg_name!r}): skipped") for n in report["notes"])


@pytest.mark.slow
def test_geometry_compiled_muon_row():
    contenders = [c for c in speed.geometry_contenders(2, second_order=False) if "Muon" in c.name]
    report = speed.run_geometry(contenders=contenders, **TINY)
    assert "optimkit Muon compiled" in [r["name"] for r in report["results"]]
