"""DiLoCo (optimkit.DiLoCo) on 2 gloo ranks against references written from the equations.

What is proven here:
* H=1, outer SGD(lr=1, no momentum), inner SGD (with momentum and weight decay, all
  linear in the gradient): DiLoCo is synchronous data parallel, i.e. equal to one
  process stepping on the global batch (float64: to 1e-12; float32: fp32 tolerances).
  With an Adam inner optimizer that identity does NOT hold (averaging parameters after
  local Adam steps is not a step on the averaged gradient): for it we prove equality
  with a simulation of DiLoCo's equations, and show it differs from the DDP run.
* The outer Nesterov step equals torch.optim.SGD(nesterov=True) on the mean outer
  gradient, in a simulation of M workers written from the paper's equations
  (bit-exact on 2 ranks: the mean of two numbers has one rounding whatever the order).
* Streaming DiLoCo: fragments sync at their staggered steps (checked step by step,
  ranks agree on a fragment right after its sync) and overlap + mixing match the
  simulation.
* bf16/q8 outer gradients: within the quantization bound of each rank's own outer
  gradient, and a real task (digits MLP, 2 ranks on different shards) still trains
  to a loss close to DDP's.
* Resume mid-run (with an outer gradient in flight) is bit-exact.
"""
from __future__ import annotations

import functools
import io

import pytest
import torch
from torch import nn

import optimkit as ok
from dist_helpers import one_thread, run_ranks
from helpers import digits_split

WORLD = 2


# ----------------------------------------------------------------- shared problem
def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)


def _layers(model):
    """Three fragments: first layer, second weight, second bias."""
    ps = list(model.parameters())
    return [ps[:2], ps[2:3], ps[3:]]


def _shard(rank, n, dtype=torch.float32):
    x, y, _, _ = digits_split()
    return x[rank * n:(rank + 1) * n].to(dtype), y[rank * n:(rank + 1) * n]


def _batch(shard, t, bs):
    x, y = shard
    k = len(x) // bs
    i = t % k
    return x[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs]


def _loss(model, xy):
    return nn.functional.cross_entropy(model(xy[0]), xy[1])


def _train(opt, model, shard, steps, bs, hook=None):
    for t in range(steps):
        opt.zero_grad()
        _loss(model, _batch(shard, t, bs)).backward()
        opt.step()
        if hook is not None:
            hook(t + 1)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# Each scenario: (inner factory, DiLoCo keywords, dtype, steps, batch size, examples per rank)
def _sgd(ps):
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3)


def _adamw(ps):
    return ok.AdamW(ps, lr=1e-2)


def _outer_sgd1(ps):
    return torch.optim.SGD(ps, lr=1.0)


SCENARIOS = {
    "ddp_sgd64": (_sgd, dict(outer=_outer_sgd1, sync_every=1), torch.float64, 20, 32, 64),
    "ddp_sgd32": (_sgd, dict(outer=_outer_sgd1, sync_every=1), torch.float32, 20, 32, 64),
    "adam_h1": (_adamw, dict(outer=_outer_sgd1, sync_every=1), torch.float32, 10, 32, 64),
    "nesterov": (_adamw, dict(sync_every=5), torch.float32, 15, 32, 64),
    "streaming": (_adamw, dict(sync_every=6, fragments="layers"), torch.float32, 14, 32, 64),
    "overlap": (_adamw, dict(sync_every=6, fragments="layers", overlap_steps=2, alpha=0.5), torch.float32,
                14, 32, 64),
    "cpu_outer": (_adamw, dict(sync_every=5, outer_placement="cpu"), torch.float32, 10, 32, 64),
}


def _diloco(model, inner_fn, kw):
    kw = dict(kw)
    if kw.get("fragments") == "layers":
        kw["fragments"] = _layers(model)
    return ok.DiLoCo(inner_fn(list(model.parameters())), **kw)


# ----------------------------------------------------------------- the ranks' side
def _recording_outer(log, model):
    """Outer SGD(lr=1) that records the mean outer gradient and this rank's local params
    at each outer step (before the workers are reset)."""
    def make(ps):
        opt = torch.optim.SGD(ps, lr=1.0)

        def pre(o, args, kwargs):
            log.append({"mean": [p.grad.clone() if p.grad is not None else None for p in ps],
                        "global": [p.detach().clone() for p in ps], "local": _params(model)})
        opt.register_step_pre_hook(pre)
        return opt
    return make


def _resume_case(rank, kw, steps, cut):
    """(uninterrupted, resumed) final params + global params + counters."""
    shard = _shard(rank, 64)

    def fresh():
        model = _model()
        return model, _diloco(model, _adamw, kw)

    model, opt = fresh()
    _train(opt, model, shard, steps, 16)
    whole = (_params(model), [g.clone() for g in opt.global_params], opt.syncs, opt.communicated_bytes)

    model, opt = fresh()
    _train(opt, model, shard, cut, 16)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    del model, opt
    buf.seek(0)
    saved = torch.load(buf)  # weights_only default
    model, opt = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    for t in range(cut, steps):
        opt.zero_grad()
        _loss(model, _batch(shard, t, 16)).backward()
        opt.step()
    resumed = (_params(model), [g.clone() for g in opt.global_params], opt.syncs, opt.communicated_bytes)
    return whole, resumed, len(saved["opt"]["diloco"]["pending"])


def _train_task(rank, kw, steps):
    """Digits MLP, this rank's 600-example shard, minibatches of 50; final global params."""
    model = _model()
    opt = _diloco(model, lambda ps: ok.AdamW(ps, lr=3e-3), kw)
    _train(opt, model, _shard(rank, 600), steps, 50)
    return [g.clone() for g in opt.global_params]


def _rank_main(rank, world):
    out = {}
    for name, (inner_fn, kw, dtype, steps, bs, n) in SCENARIOS.items():
        model = _model(dtype)
        opt = _diloco(model, inner_fn, kw)
        history = []
        _train(opt, model, _shard(rank, n, dtype), steps, bs,
               hook=lambda t: history.append((list(opt.syncs), _params(model))))
        out[name] = {"params": _params(model), "global": [g.clone() for g in opt.global_params],
                     "history": history, "global_device": str(opt.global_params[0].device)}
    for prec in ("fp32", "bf16", "q8"):
        model = _model()
        log = []
        opt = ok.DiLoCo(_adamw(list(model.parameters())), outer=_recording_outer(log, model), sync_every=5,
                        outer_grad_precision=prec)
        _train(opt, model, _shard(rank, 64), 10, 32)
        out["quant_" + prec] = {"log": log, "bytes": opt.communicated_bytes}
    for prec in ("fp32", "bf16", "q8"):  # bf16 parameters: outer gradients summed in float32
        model = _model(torch.bfloat16)
        opt = ok.DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), sync_every=3, outer_grad_precision=prec)
        _train(opt, model, _shard(rank, 64, torch.bfloat16), 6, 32)
        out["bf16_params_" + prec] = [g.clone() for g in opt.global_params]
    for prec in ("fp32", "bf16", "q8"):
        out["train_" + prec] = _train_task(rank, dict(sync_every=10, outer_grad_precision=prec), 300)
    out["resume"] = _resume_case(rank, dict(sync_every=4, fragments=2, overlap_steps=1,
                                            outer_grad_precision="q8"), 11, 5)
    out["resume_fp32"] = _resume_case(rank, dict(sync_every=3), 8, 4)
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def ranks():
    """One 2-rank process group for the whole module: every scenario in one launch."""
    return run_ranks(_rank_main, WORLD, timeout=240)


# ----------------------------------------------------------------- references
def _simulate(name, world=WORLD):
    """DiLoCo from its equations, ``world`` workers in one process: each worker its own
    model copy and inner optimizer on its own shard; outer gradient of a fragment
    ``mean_m (theta_g - theta_m)``, taken ``tau`` steps before its sync step
    ``floor((p + 1) H / P) mod H``; outer torch.optim.SGD on it; workers restart from the
    global fragment (mixed: lerp(theta_g, theta_m, alpha))."""
    inner_fn, kw, dtype, steps, bs, n = SCENARIOS[name]
    H, tau, alpha = kw["sync_every"], kw.get("overlap_steps", 0), kw.get("alpha", 0.0)
    models = [_model(dtype) for _ in range(world)]
    inners = [inner_fn(list(m.parameters())) for m in models]
    shards = [_shard(r, n, dtype) for r in range(world)]
    glob = [p.detach().clone() for p in models[0].parameters()]
    outer_kw = kw.get("outer", "nesterov")
    outer = (torch.optim.SGD(glob, lr=0.7, momentum=0.9, nesterov=True) if outer_kw == "nesterov"
             else outer_kw(glob))
    frags = ([[0, 1], [2], [3]] if kw.get("fragments") == "layers" else [[0, 1, 2, 3]])
    P = len(frags)
    sync_at = [((p + 1) * H // P) % H for p in range(P)]
    inflight = []
    for t in range(1, steps + 1):
        for m, inner, shard in zip(models, inners, shards):
            inner.zero_grad()
            _loss(m, _batch(shard, t - 1, bs)).backward()
            inner.step()
        for p in range(P):
            if (t + tau) % H == sync_at[p]:
                deltas = []
                for i in frags[p]:
                    total = None
                    for m in models:
                        d = glob[i] - list(m.parameters())[i].detach()
                        total = d if total is None else total + d
                    deltas.append(total / world)
                inflight.append((t + tau, p, deltas))
        for due, p, deltas in [f for f in inflight if f[0] == t]:
            for g in glob:
                g.grad = None
            for i, d in zip(frags[p], deltas):
                glob[i].grad = d
            outer.step()
            with torch.no_grad():
                for i in frags[p]:
                    glob[i].grad = None
                    for m in models:
                        w = list(m.parameters())[i]
                        w.copy_(glob[i] if alpha == 0 else torch.lerp(glob[i], w.detach(), alpha))
        inflight = [f for f in inflight if f[0] != t]
    return [_params(m) for m in models], glob


def _global_batch_run(name):
    """One process, the inner optimizer on the global batch (both shards) - what DDP computes."""
    inner_fn, kw, dtype, steps, bs, n = SCENARIOS[name]
    model = _model(dtype)
    opt = inner_fn(list(model.parameters()))
    shards = [_shard(r, n, dtype) for r in range(WORLD)]
    for t in range(steps):
        opt.zero_grad()
        xs, ys = zip(*(_batch(s, t, bs) for s in shards))
        _loss(model, (torch.cat(xs), torch.cat(ys))).backward()
        opt.step()
    return _params(model)


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ----------------------------------------------------------------- tests on the ranks' results
def test_ranks_agree(ranks):
    r0, r1 = ranks
    for name in SCENARIOS:
        _equal(r0[name]["global"], r1[name]["global"])
    for prec in ("fp32", "bf16", "q8"):
        _equal(r0["train_" + prec], r1["train_" + prec])
        _equal(r0["bf16_params_" + prec], r1["bf16_params_" + prec])
        assert all(g.dtype == torch.bfloat16 and g.isfinite().all() for g in r0["bf16_params_" + prec])
        assert not torch.equal(r0["bf16_params_" + prec][0], _model(torch.bfloat16)[0].weight.detach())


@pytest.mark.parametrize("name,tol", [("ddp_sgd64", 1e-12), ("ddp_sgd32", None)])
def test_h1_outer_sgd1_is_data_parallel_for_sgd(ranks, name, tol):
    ref = _global_batch_run(name)
    for r in ranks:
        for p, q in zip(r[name]["params"], ref):
            if tol is None:
                torch.testing.assert_close(p, q)  # fp32 tolerances
            else:
                torch.testing.assert_close(p, q, rtol=0, atol=tol)


def test_h1_with_adam_is_diloco_not_ddp(ranks):
    sim, _ = _simulate("adam_h1")
    for r, s in zip(ranks, sim):
        _equal(r["adam_h1"]["params"], s)
    ddp = _global_batch_run("adam_h1")
    gap = max(float((p - q).abs().max()) for p, q in zip(ranks[0]["adam_h1"]["params"], ddp))
    assert gap > 1e-4  # parameter averaging after local Adam steps is another algorithm


@pytest.mark.parametrize("name", ["nesterov", "streaming", "overlap", "cpu_outer"])
def test_matches_the_equations(ranks, name):
    sim, glob = _simulate(name)
    for r, s in zip(ranks, sim):
        _equal(r[name]["params"], s)
        _equal(r[name]["global"], glob)


def test_outer_copy_on_cpu(ranks):
    assert ranks[0]["cpu_outer"]["global_device"] == "cpu"


def test_streaming_schedule(ranks):
    """Fragments [first layer, second weight, second bias], H=6: fragment p syncs at
    t = floor((p+1)*6/3) mod 6 = 2, 4, 0 (mod 6); right after its sync a fragment is
    the same on both ranks, while the others (trained on different shards) differ."""
    h0, h1 = ranks[0]["streaming"]["history"], ranks[1]["streaming"]["history"]
    frags = [[0, 1], [2], [3]]
    prev = [0, 0, 0]
    for t, ((syncs, p0), (syncs1, p1)) in enumerate(zip(h0, h1), start=1):
        assert syncs == syncs1
        expected = [prev[p] + (t % 6 == (2, 4, 0)[p]) for p in range(3)]
        assert syncs == expected, t
        for p in range(3):
            same = all(torch.equal(p0[i], p1[i]) for i in frags[p])
            assert same == (syncs[p] != prev[p]), (t, p)
        prev = syncs
    assert prev == [3, 2, 2]  # fragment 0 at t = 2, 8, 14


def test_overlap_mixes_local_and_global(ranks):
    """alpha=0.5: after a sync the ranks still differ (each keeps half its own fragment)."""
    h0, h1 = ranks[0]["overlap"]["history"], ranks[1]["overlap"]["history"]
    assert h0[-1][0] == [2, 2, 2]
    assert not torch.equal(h0[-1][1][0], h1[-1][1][0])


def test_quantized_outer_gradient_within_codec_error(ranks):
    from optimkit.state.maps import dynamic_map

    qmap = torch.as_tensor(dynamic_map(True, 8))
    half_gap = float((qmap[1:] - qmap[:-1]).max()) / 2
    for k in range(2):  # both outer steps (t = 5, 10)
        locals_ = [[g - loc for g, loc in zip(r["quant_fp32"]["log"][k]["global"], r["quant_fp32"]["log"][k]["local"])]
                   for r in ranks]
        exact = [(a + b) / 2 for a, b in zip(*locals_)]
        fp32 = ranks[0]["quant_fp32"]["log"][k]["mean"]
        _equal(fp32, exact)
        for prec in ("bf16", "q8"):
            got = ranks[0]["quant_" + prec]["log"][k]["mean"]
            _equal(got, ranks[1]["quant_" + prec]["log"][k]["mean"])
            if k == 0:  # same start: the workers' outer gradients are the fp32 run's
                flat = [torch.cat([d.reshape(-1) for d in loc]) for loc in locals_]
                err = torch.cat([(g - e).reshape(-1) for g, e in zip(got, exact)]).abs()
                if prec == "bf16":
                    bound = sum(f.abs() for f in flat) / 2 * 2.0 ** -8
                else:
                    pad = (-flat[0].numel()) % 256
                    absmax = [torch.nn.functional.pad(f, (0, pad)).view(-1, 256).abs().amax(1)
                              .repeat_interleave(256)[:f.numel()] for f in flat]
                    bound = sum(absmax) / 2 * half_gap * (1 + 1e-5)
                assert (err <= bound + 1e-9).all(), prec
                assert err.max() > 0  # really quantized
    n = sum(p.numel() for p in _model().parameters())
    nb = -(-n // 256)
    assert ranks[0]["quant_fp32"]["bytes"] == 2 * 4 * n
    assert ranks[0]["quant_bf16"]["bytes"] == 2 * 2 * n
    assert ranks[0]["quant_q8"]["bytes"] == 2 * (n + 4 * nb)


def _eval_losses(params):
    model = _model()
    with torch.no_grad():
        for p, q in zip(model.parameters(), params):
            p.copy_(q)
        x, y, xv, yv = digits_split()
        return float(_loss(model, (x, y))), float(_loss(model, (xv, yv)))


def test_real_task_close_to_ddp(ranks):
    """Digits MLP, 300 steps, 2 ranks on disjoint 600-example shards (minibatch 50 each).
    DDP reference: AdamW on the global batch (both ranks' minibatches), 300 steps."""
    model = _model()
    opt = ok.AdamW(model.parameters(), lr=3e-3)
    shards = [_shard(r, 600) for r in range(WORLD)]
    for t in range(300):
        opt.zero_grad()
        xs, ys = zip(*(_batch(s, t, 50) for s in shards))
        _loss(model, (torch.cat(xs), torch.cat(ys))).backward()
        opt.step()
    ddp_train, ddp_val = _eval_losses(_params(model))
    init_train, _ = _eval_losses(_params(_model()))
    res = {prec: _eval_losses(ranks[0]["train_" + prec]) for prec in ("fp32", "bf16", "q8")}
    for prec, (tr, va) in res.items():
        assert tr < 0.15 * init_train, (prec, tr, init_train)
        assert va < ddp_val * 1.5 + 0.05, (prec, va, ddp_val)
        assert tr < ddp_train * 2.0 + 0.05, (prec, tr, ddp_train)
    for prec in ("bf16", "q8"):
        assert abs(res[prec][1] - res["fp32"][1]) < 0.05 * res["fp32"][1] + 0.01, res


@pytest.mark.parametrize("key", ["resume", "resume_fp32"])
def test_resume_bit_exact(ranks, key):
    for r in ranks:
        whole, resumed, pending = r[key]
        _equal(whole[0], resumed[0])
        _equal(whole[1], resumed[1])
        assert whole[2] == resumed[2] and whole[3] == resumed[3]
    if key == "resume":
        assert ranks[0][key][2] == 1  # the checkpoint held an outer gradient in flight


# ----------------------------------------------------------------- single process (world of 1)
def _local_run(steps=9, cut=None, **kw):
    model = _model()
    opt = ok.DiLoCo(ok.AdamW(model.parameters(), lr=1e-2), **kw)
    shard = _shard(0, 64)
    if cut is None:
        _train(opt, model, shard, steps, 16)
        return model, opt
    _train(opt, model, shard, cut, 16)
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    model = _model(seed=5)
    opt = ok.DiLoCo(ok.AdamW(model.parameters(), lr=1e-2), **kw)
    model.load_state_dict(saved["m"])
    opt.load_state_dict(saved["o"])
    for t in range(cut, steps):
        opt.zero_grad()
        _loss(model, _batch(shard, t, 16)).backward()
        opt.step()
    return model, opt


def test_world_of_one_resume_and_outer_factory():
    kw = dict(sync_every=3, outer=functools.partial(ok.AdamW, lr=0.1), fragments=2, overlap_steps=1, alpha=0.25,
              outer_grad_precision="bf16", outer_placement="cpu")
    m1, o1 = _local_run(**kw)
    m2, o2 = _local_run(cut=5, **kw)
    _equal(_params(m1), _params(m2))
    _equal(o1.global_params, o2.global_params)
    assert o1.syncs == o2.syncs == [2, 3]  # due at 4, 7 and at 3, 6, 9
    assert isinstance(o1.outer, ok.AdamW)


def test_world_of_one_h1_outer_sgd1_is_the_inner_run():
    model = _model()
    ref = _model()
    opt = ok.DiLoCo(ok.AdamW(model.parameters(), lr=1e-2), outer="sgd", outer_lr=1.0, outer_momentum=0.0,
                    sync_every=1)
    plain = ok.AdamW(ref.parameters(), lr=1e-2)
    shard = _shard(0, 64)
    _train(opt, model, shard, 6, 16)
    _train(plain, ref, shard, 6, 16)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_state_dict_mismatch_is_rejected():
    _, opt = _local_run(steps=2, sync_every=3)
    sd = opt.state_dict()
    other = ok.DiLoCo(ok.AdamW(_model().parameters(), lr=1e-2), sync_every=4)
    before = [g.clone() for g in other.global_params]
    with pytest.raises(ValueError, match="sync_every"):
        other.load_state_dict(sd)
    _equal(other.global_params, before)
    with pytest.raises(ValueError, match="expects"):
        other.load_state_dict({"inner": {}})


@pytest.mark.parametrize("kw,exc,match", [
    (dict(sync_every=0), ValueError, "sync_every"),
    (dict(sync_every=2.0), TypeError, "sync_every"),
    (dict(outer="adam"), ValueError, "outer"),
    (dict(outer=3), TypeError, "outer"),
    (dict(outer_lr=-1.0), ValueError, "outer_lr"),
    (dict(outer_momentum=1.0), ValueError, "outer_momentum"),
    (dict(outer_momentum=0.0), ValueError, "outer_momentum"),
    (dict(fragments=0), ValueError, "fragments"),
    (dict(fragments=5), ValueError, "fragments"),
    (dict(fragments=[[]]), ValueError, "fragments"),
    (dict(fragments="x"), TypeError, "fragments"),
    (dict(sync_every=2, fragments=3), ValueError, "fragments"),
    (dict(overlap_steps=500), ValueError, "overlap_steps"),
    (dict(overlap_steps=-1), ValueError, "overlap_steps"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(outer_grad_precision="q4"), ValueError, "outer_grad_precision"),
    (dict(outer_placement="disk"), ValueError, "outer_placement"),
])
def test_bad_arguments(kw, exc, match):
    model = _model()
    before = _params(model)
    with pytest.raises(exc, match=match):
        ok.DiLoCo(ok.AdamW(model.parameters()), **kw)
    _equal(_params(model), before)


def test_bad_inner_and_partial_fragments():
    with pytest.raises(TypeError, match="floating-point"):
        ok.DiLoCo(torch.optim.SGD([nn.Parameter(torch.zeros(2, dtype=torch.complex64))], lr=0.1))
    model = _model()
    with pytest.raises(TypeError, match="inner"):
        ok.DiLoCo(list(model.parameters()))
    ps = list(model.parameters())
    with pytest.raises(ValueError, match="partition"):
        ok.DiLoCo(ok.AdamW(ps), fragments=[ps[:2], ps[2:3]])
    with pytest.raises(ValueError, match="partition"):
        ok.DiLoCo(ok.AdamW(ps), fragments=[ps[:2], ps[1:]])


def test_fragments_split_by_size():
    ps = [nn.Parameter(torch.zeros(n)) for n in (100, 10, 10, 80, 5, 5)]
    opt = ok.DiLoCo(torch.optim.SGD(ps, lr=0.1), sync_every=10, fragments=3)
    sizes = [[p.numel() for p in f] for f in opt.fragments]
    assert sizes == [[100], [10, 10, 80], [5, 5]]
    assert [p for f in opt.fragments for p in f] == ps
    assert [opt.sync_steps(i) for i in range(3)] == [(3, 10), (6, 10), (10, 10)]


# ----------------------------------------------------------------- four ranks (slow: one more launch)
def _four_main(rank, world):
    out = {}
    for name in ("nesterov", "overlap"):
        inner_fn, kw, dtype, steps, bs, n = SCENARIOS[name]
        model = _model(dtype)
        opt = _diloco(model, inner_fn, kw)
        _train(opt, model, _shard(rank, n, dtype), steps, bs)
        out[name] = (_params(model), [g.clone() for g in opt.global_params])
    model = _model()
    opt = ok.DiLoCo(_adamw(list(model.parameters())), sync_every=5, fragments=2, outer_grad_precision="q8")
    _train(opt, model, _shard(rank, 64), 10, 32)
    out["q8"] = [g.clone() for g in opt.global_params]
    return out


@pytest.mark.slow
def test_four_ranks():
    """4 workers: the ranks agree bit for bit (also with q8 outer gradients) and match the
    simulation of the equations (to fp32 rounding: gloo sums four numbers in its own order)."""
    res = run_ranks(_four_main, 4, timeout=240)
    for r in res[1:]:
        for key in ("nesterov", "overlap"):
            _equal(r[key][1], res[0][key][1])
        _equal(r["q8"], res[0]["q8"])
    for key in ("nesterov", "overlap"):
        sim, glob = _simulate(key, world=4)
        for g, s in zip(res[0][key][1], glob):
            torch.testing.assert_close(g, s, rtol=1e-5, atol=1e-6)
        for r, s in zip(res, sim):
            for p, q in zip(r[key][0], s):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- parity with torchft (when installed)
class _OneReplicaManager:
    """The part of ``torchft.Manager`` that ``torchft.local_sgd.DiLoCo`` calls, for one
    replica: an all-reduce (mean over one replica) leaves its tensor as it is, every
    commit succeeds and counts a step."""
    _use_async_quorum = False

    def __init__(self):
        self.step = 0

    def allreduce(self, tensor, should_quantize=False):
        class _Done:
            def wait(self):
                return True

            def get_future(self):
                fut = torch.futures.Future()
                fut.set_result([tensor])
                return fut
        return _Done()

    def should_commit(self):
        self.step += 1
        return True

    def current_step(self):
        return self.step

    def start_quorum(self):
        pass

    def allow_state_dict_read(self):
        pass

    def disallow_state_dict_read(self):
        pass

    def register_state_dict_fn(self, *args, **kwargs):
        pass


@pytest.mark.parametrize("delay,alpha", [(0, 0.0), (1, 0.5)])
def test_torchft_parity_one_replica(delay, alpha):
    """``torchft.local_sgd.DiLoCo`` (the parity target named in the project's notes),
    two fragments, with a one-replica manager: the same parameters bit for bit. (Its
    multi-replica path needs torchft's lighthouse; the 2-rank tests above check the
    averaging against the equations.)"""
    local_sgd = pytest.importorskip("torchft.local_sgd")
    shard = _shard(0, 64)
    ours_model = _model()
    ours = ok.DiLoCo(_adamw(list(ours_model.parameters())), sync_every=6, overlap_steps=delay, alpha=alpha,
                     fragments=[list(ours_model[0].parameters()), list(ours_model[2].parameters())])
    _train(ours, ours_model, shard, 14, 16)

    model = _model()
    inner = _adamw(list(model.parameters()))
    outers = [torch.optim.SGD(model[i].parameters(), lr=0.7, momentum=0.9, nesterov=True) for i in (0, 2)]
    with local_sgd.DiLoCo(_OneReplicaManager(), [model[0], model[2]], inner, outers, sync_every=6,
                          pin_memory=False, fragment_sync_delay=delay, fragment_update_alpha=alpha):
        _train(inner, model, shard, 14, 16)
    _equal(_params(ours_model), _params(model))
    assert ours.syncs == [2, 2]
