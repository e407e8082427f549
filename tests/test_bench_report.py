"""Bench report: Markdown + self-contained HTML + valid, non-trivial PNG plots."""
from __future__ import annotations

import re

import pytest

from optimkit.bench.engine import run_bench
from optimkit.bench.protocol import BenchConfig, OptimizerSpec
from optimkit.bench.report import format_summary_table, summarize, write_report
from optimkit.bench.store import Store

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def bench_db(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench") / "r.sqlite")
    cfg = BenchConfig(suite="test", workloads=["quadratic", "logreg_cancer"],
                      optimizers=[OptimizerSpec.parse(o) for o in ("adamw", "sgd:momentum=0.9", "lion")],
                      n_trials=3, eval_seeds=(1000, 1001), skipped=["notyet"])
    with Store(path) as store:
        run_bench(cfg, store, progress=False)
    return path


def test_summary(bench_db):
    with Store(bench_db) as store:
        s = summarize(store)
    assert s["optimizers"] == ["adamw", "sgd:momentum=0.9", "lion"]
    assert s["workloads"] == ["quadratic", "logreg_cancer"]
    for track in ("external", "self"):
        scores = s["tracks"][track]["scores"]
        assert [r["score_steps"] for r in scores] == sorted((r["score_steps"] for r in scores), reverse=True)
        assert all(0.0 <= r["score_steps"] <= 1.0 and 0.0 <= r["score_seconds"] <= 1.0 for r in scores)
    ext = s["tracks"]["external"]
    # somebody is fastest on every workload that anybody reached: its ratio is 1
    for w in s["workloads"]:
        if w not in ext["excluded_steps"]:
            assert min(ext["ratios_steps"][o][w] for o in s["optimizers"]) == 1.0
    table = format_summary_table(s)
    assert "adamw" in table and "score(steps)" in table


def _png_ok(path):
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= 300 and h >= 150
        rgb = im.convert("RGB")
        small = rgb.resize((w // 2, h // 2))
        colors = small.getcolors(maxcolors=1 << 20)
        assert len(colors) > 30, f"{path}: only {len(colors)} colours"
        non_white = sum(n for n, c in colors if sum(c) < 740)
        assert non_white > 0.02 * (w // 2) * (h // 2), f"{path}: nearly blank"


def test_report_files_and_plots(bench_db, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("PIL")
    out = tmp_path / "report"
    with Store(bench_db) as store:
        rep = write_report(store, str(out))
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert (out / "summary.json").exists()
    names = {p.split("/")[-1] for p in rep["figures"]}
    assert {"profile_external.png", "profile_self.png", "time_to_target_external.png",
            "time_to_target_self.png", "curves_quadratic.png", "curves_logreg_cancer.png",
            "state_memory.png"} <= names
    for p in rep["figures"]:
        _png_ok(p)
        assert f"figures/{p.split('/')[-1]}" in md  # Markdown links each plot
    assert "## Scores, external tuning track" in md and "`notyet`" in md
    # HTML: everything inline, no external reference of any kind
    assert html.count("<img") == len(rep["figures"])
    for attr in re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', html, flags=re.I):
        assert attr.startswith("data:") or attr.startswith("#"), attr
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/|url\(|@import|<link|<script", html, flags=re.I)


def test_report_flags_results_from_different_corpora(bench_db, tmp_path):
    import shutil
    import sqlite3

    db = tmp_path / "mixed.sqlite"
    shutil.copy(bench_db, db)
    con = sqlite3.connect(db)
    con.execute("UPDATE trials SET data_hash='0123456789abcdef' WHERE workload='logreg_cancer' AND seed=1001")
    con.commit()
    con.close()
    with Store(str(db)) as store:
        s = summarize(store)
        assert len(s["data_hashes"]["logreg_cancer"]) == 2
        rep = write_report(store, str(tmp_path / "r"))
    md = open(rep["markdown"]).read()
    assert "**Warning**: `logreg_cancer` results in this run come from 2 different" in md
