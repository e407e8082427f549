"""Benchmark workloads: determinism under a seed, targets reachable by tuned AdamW, the corpus."""
from __future__ import annotations

import os
import sysconfig

import pytest
import torch

from optimkit.bench import workloads as wl
from optimkit.bench.runner import TrialSpec, run_trial

pytest.importorskip("sklearn")

ALL = list(wl.WORKLOADS)


def _spec(name: str, seed: int, steps: int | None = None, lr: float | None = None, optimizer="adamw",
          **kw) -> TrialSpec:
    w = wl.get_workload(name)
    return TrialSpec(workload=name, optimizer=optimizer, name=optimizer, hparams={"lr": lr or w.reference_lr},
                     seed=seed, steps=steps or w.steps, eval_every=kw.pop("eval_every", w.eval_every),
                     target=w.target, **kw)


def _values(result):
    """The metric series without wall-clock times."""
    return [(s, loss, value) for s, _, loss, value in result["series"]]


@pytest.mark.parametrize("name", ALL)
def test_deterministic_under_seed(name):
    steps = 12 if name.startswith("char_lm") else 40
    a = run_trial(_spec(name, seed=3, steps=steps, eval_every=4))
    b = run_trial(_spec(name, seed=3, steps=steps, eval_every=4))
    assert a["status"] == b["status"] == "ok", (a["error"], b["error"])
    assert len(a["series"]) == steps // 4 + 1
    assert _values(a) == _values(b)  # bit-identical losses and metrics
    c = run_trial(_spec(name, seed=4, steps=steps, eval_every=4))
    assert _values(c) != _values(a)  # the seed matters (init, batches or noise)
    assert a["data_hash"] == c["data_hash"]  # the data does not depend on the seed


def test_seed_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    wl.get_workload("mlp_digits").make(seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", [n for n in ALL if n != "char_lm"]
                         + [pytest.param("char_lm", marks=pytest.mark.slow)])
def test_target_reachable_by_tuned_adamw(name):
    """AdamW at the workload's tuned learning rate reaches the target on a held-out seed."""
    w = wl.get_workload(name)
    r = run_trial(_spec(name, seed=1000, stop_at_target=True))
    assert r["status"] == "ok", r["error"]
    assert r["reached"], f"{name}: best {r['best_metric']} > target {w.target} in {w.steps} steps"
    assert r["steps_to_target"] <= w.steps
    assert r["seconds_to_target"] > 0
    # and the start is not already at the target: the workload needs training
    assert r["series"][0][3] > w.target


def test_metrics_and_budgets_are_sane():
    for w in wl.WORKLOADS.values():
        assert w.target > 0 and w.steps > 0 and 0 < w.eval_every <= w.steps
        assert w.kind in ("synthetic", "real")
        assert w.data_hash() and len(w.data_hash()) == 16
    with pytest.raises(KeyError, match="did you mean mlp_digits"):
        wl.get_workload("mlp_digit")


def test_stdlib_corpus_is_read_at_run_time():
    corpus = wl.stdlib_corpus()
    root = sysconfig.get_paths()["stdlib"]
    assert corpus.files and set(corpus.files) <= set(wl.CORPUS_FILES)
    for f in corpus.files:
        assert os.path.isfile(os.path.join(root, f))
    assert corpus.n_chars > 100_000
    assert int(corpus.train.max()) < 128 and int(corpus.val.max()) < 128
    assert len(corpus.val) < len(corpus.train)
    # the hash is a function of the text: recompute it independently
    import hashlib

    h = hashlib.sha256()
    for f in corpus.files:
        with open(os.path.join(root, f), "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read() + b"\0")
    assert corpus.hash == h.hexdigest()[:16]
    assert wl.get_workload("char_lm").data_hash() == corpus.hash


def test_corpus_hash_changes_with_the_text(monkeypatch, tmp_path):
    """Another Python (other stdlib text) gives another corpus hash."""
    real = wl.stdlib_corpus().hash
    for name in ("textwrap.py", "heapq.py"):
        (tmp_path / name).write_text(f"# a different {name}\n" * 2000)
    with monkeypatch.context() as m:
        m.setattr(wl, "_stdlib_dir", lambda: str(tmp_path))
        wl.stdlib_corpus.cache_clear()
        try:
            other = wl.stdlib_corpus()
            assert other.files == ("textwrap.py", "heapq.py")
        finally:
            wl.stdlib_corpus.cache_clear()
    assert other.hash != real
    assert wl.stdlib_corpus().hash == real


# --------------------------------------------------------------------------- optimizer hooks of the runner
def test_muon_gets_its_param_split_on_model_tasks():
    import optimkit as ok
    from optimkit.bench.runner import _param_groups

    task = wl.get_workload("char_lm_small").make(seed=0)
    groups = _param_groups(ok.Muon, task, {"lr": 0.05})
    assert [g["use_muon"] for g in groups] == [True, False]
    assert groups[1]["lr"] == pytest.approx(0.05 * ok.Muon.aux_lr_ratio) and "lr" not in groups[0]
    model = task.module
    muon_ids = {id(p) for p in groups[0]["params"]}
    assert id(model.tok.weight) not in muon_ids and id(model.head.weight) not in muon_ids
    assert id(model.blocks[0].qkv.weight) in muon_ids
    assert _param_groups(ok.AdamW, task, {}) is task.params          # the default: no split
    rosen = wl.get_workload("rosenbrock").make(seed=0)                # no model: plain parameters
    assert _param_groups(ok.Muon, rosen, {}) is rosen.params


def test_runner_keeps_the_graph_for_optimizers_that_need_it(monkeypatch):
    import optimkit as ok

    seen = []
    step = ok.AdamW.step

    def checking_step(self, closure=None):
        seen.append(all(p.grad.requires_grad for g in self.param_groups for p in g["params"]))
        return step(self, closure)

    monkeypatch.setattr(ok.AdamW, "step", checking_step)
    run_trial(_spec("mlp_digits", seed=0, steps=2))
    monkeypatch.setattr(ok.AdamW, "requires_create_graph", True)
    r = run_trial(_spec("mlp_digits", seed=0, steps=2))
    assert r["status"] == "ok", r["error"]
    assert seen == [False, False, True, True]


#: learning rates tuned on the bench's grid (default x 10^(k/2)) with seeds 0 and 1: docs/bench.md
TUNED_LM_LR = {"adamw": 1e-2, "muon": 0.0316}


@pytest.mark.slow  # about 10 s on one idle core
def test_muon_reaches_the_transformer_target_in_fewer_steps_than_tuned_adamw():
    """Issue 9's bar on the bench's transformer workload, at pre-tuned learning rates
    (the published figure at fixed architecture and data is about 0.6x)."""
    steps = {}
    for name, lr in TUNED_LM_LR.items():
        runs = [run_trial(_spec("char_lm_small", seed=s, lr=lr, optimizer=name, stop_at_target=True))
                for s in (1000, 1001, 1002)]
        assert all(r["reached"] for r in runs), [(r["error"], r["best_metric"]) for r in runs]
        steps[name] = sum(r["steps_to_target"] for r in runs) / len(runs)
    assert steps["muon"] / steps["adamw"] < 0.9, steps   # measured 0.78 (117 vs 150 steps)
