"""examples/*.py run as a user runs them: a subprocess, exit 0, results that make sense.

Each example prints a last line ``RESULT {json}``; these tests parse it and check
it against what the algorithms imply independently of the script: the untrained
model's loss is ln(classes) (near-uniform predictions), the fp32 state of AdamW is
8 bytes per parameter (two moments), Lion's 4 (one momentum), Muon's 4 bytes per
element of its matrices plus AdamW's 8 for the rest; training lowers the loss; the
plot is a PNG. The quick settings run in the default suite; the defaults the docs
quote run in one slow test.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


def run_example(name: str, out: Path, *args: str, timeout: float = 300) -> dict:
    """Run ``examples/<name>.py`` in a fresh interpreter (one thread) and return its RESULT dict."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--threads", "1", "--out", str(out), *args],
                         capture_output=True, text=True, timeout=timeout, env=env, cwd=str(out))
    assert res.returncode == 0, f"{name} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1 and res.stdout.rstrip().splitlines()[-1] == lines[0], res.stdout[-2000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["example"] == name
    plot = Path(result["plot"])
    assert plot.parent == out and plot.is_file() and plot.stat().st_size > 5000
    assert plot.read_bytes()[:8] == PNG
    with open(out / f"{name}.json") as fh:
        saved = json.load(fh)
    assert [r["name"] for r in saved["runs"]] == [r["name"] for r in result["runs"]]
    result["stdout"] = res.stdout
    return result


def check_gpt(r: dict, quick: bool) -> None:
    fp32, q8 = r["runs"]
    assert fp32["name"] == "fp32 AdamW" and q8["name"].startswith("q8 AdamW + GaLore")
    assert fp32["params"] == q8["params"]
    # fp32 AdamW: exp_avg + exp_avg_sq, 4 bytes each per parameter (the step is a Python int)
    assert fp32["state_bytes"] == 8 * fp32["params"]
    # q8 moments of rank-r projected gradients (+ fp32 projectors): far below fp32
    assert q8["state_bytes"] < 0.3 * fp32["state_bytes"]
    for run in (fp32, q8):
        # same initial weights; std-0.02 init predicts near-uniform bytes: ln 256
        assert run["val_loss_first"] == fp32["val_loss_first"]
        assert abs(run["val_loss_first"] - math.log(256)) < 0.25
        assert run["val_loss_last"] < run["val_loss_first"] - (1.5 if quick else 2.5)
        assert run["train_loss_last"] < run["train_loss_first"] - (1.0 if quick else 1.5)
        assert all(math.isfinite(v) for _, v in run["val_curve"])
    assert "optimizer state (measured)" in r["stdout"] and "GaLore(rank=" in r["stdout"]


def check_cnn(r: dict, quick: bool) -> None:
    lion, adamw = r["runs"]
    assert lion["name"].startswith("Lion") and adamw["name"].startswith("AdamW")
    assert lion["state_bytes"] == 4 * lion["params"]     # Lion: one momentum buffer
    assert adamw["state_bytes"] == 8 * adamw["params"]   # AdamW: two moments
    for run in (lion, adamw):
        assert run["test_acc_first"] < 0.3                          # 10 classes, untrained
        assert abs(run["test_loss_first"] - math.log(10)) < 0.2
        assert run["test_acc"] > (0.5 if quick else 0.95)
        assert run["test_loss"] < run["test_loss_first"] * (0.9 if quick else 0.1)


def check_muon(r: dict, quick: bool) -> None:
    muon, adamw = r["runs"]
    split = r["split"]
    muon_names = [n for g in split if g["rule"] == "Muon" for n in g["names"]]
    adamw_names = [n for g in split if g["rule"] == "AdamW" for n in g["names"]]
    # hidden matrices to Muon (the fused QKV as 3 blocks); embeddings, head and vectors to AdamW
    hidden = ("qkv", "proj", "fc", "out")
    assert muon_names and all(n.split(".")[2] in hidden and n.endswith(".weight") for n in muon_names)
    assert {"tok.weight", "pos.weight", "head.weight"} <= set(adamw_names)
    assert all(n in ("tok.weight", "pos.weight", "head.weight") or n.endswith(".bias")
               or n.split(".")[-2].startswith("ln") for n in adamw_names)  # LayerNorm gains
    assert {g["split"] for g in split if g["rule"] == "Muon" and any(".qkv." in n for n in g["names"])} == {3}
    assert sum(g["elements"] for g in split) == muon["params"] == adamw["params"]
    n_muon = sum(g["elements"] for g in split if g["rule"] == "Muon")
    # Muon: a momentum buffer per matrix element; its AdamW rule: two moments
    assert muon["state_bytes"] == 4 * n_muon + 8 * (muon["params"] - n_muon)
    assert adamw["state_bytes"] == 8 * adamw["params"]
    for run in (muon, adamw):
        assert run["val_loss_first"] == adamw["val_loss_first"]
        assert run["val_loss_last"] < run["val_loss_first"] - (1.5 if quick else 2.5)
        assert run["train_loss_last"] < run["train_loss_first"] - (1.0 if quick else 1.5)


CHECKS = {"gpt_q8_galore": check_gpt, "cnn_lion": check_cnn, "muon_split": check_muon}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_quick(name, tmp_path):
    CHECKS[name](run_example(name, tmp_path, "--quick", timeout=240), quick=True)


def test_bad_steps_is_a_usage_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, str(EXAMPLES / "cnn_lion.py"), "--steps", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and "--steps must be >= 1" in res.stderr


@pytest.mark.slow
def test_examples_at_defaults(tmp_path):
    """The settings docs/examples.md quotes: about 80 s of one CPU core in all, two scripts at a time."""
    from concurrent.futures import ThreadPoolExecutor

    outs = {name: tmp_path / name for name in CHECKS}
    for out in outs.values():
        out.mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_example, name, out, timeout=600) for name, out in outs.items()}
        results = {name: f.result() for name, f in futures.items()}
    for name, check in CHECKS.items():
        check(results[name], quick=False)
