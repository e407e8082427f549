"""Asynchronous, atomic checkpoints (optimkit.checkpoint): every optimizer's state
round-trips bit-exactly through a background write, the snapshot is the state at
save() time, atomic publication, pruning, errors, policies and bad input."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import threading
import time

import pytest
import torch

import optimkit as ok
from optimkit import checkpoint_io as cio
from optimizer_cases import contract_hp

K, M = 3, 3  # steps before the save, steps after it


# --------------------------------------------------------------------------- cases
def _problem(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, generator=g)
    y = torch.randn(32, 2, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(dtype)
    return model, lambda m: torch.nn.functional.mse_loss(m(x.to(dtype)).float(), y)


def _step(model, opt, loss_fn):
    cls = type(opt)
    if getattr(cls, "gradient_free", False):
        return opt.step(lambda: loss_fn(model))

    def closure():
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward(create_graph=getattr(cls, "requires_create_graph", False))
        return loss
    return opt.step(closure)


def _registry_case(name):
    return lambda ps, d: ok.create(name, ps, **contract_hp(name)), torch.float32


CASES = {name: _registry_case(name) for name in ok.available()}
for _prec in ("bf16", "q8", "q4", "fp8"):
    CASES[f"adamw/{_prec}"] = (lambda ps, d, p=_prec: ok.AdamW(ps, lr=1e-2, state_precision=p, min_quant_size=1),
                               torch.float32)
CASES.update({
    "lion/q4+stochastic": (lambda ps, d: ok.Lion(ps, state_precision="q4", min_quant_size=1,
                                                  state_rounding="stochastic"), torch.float32),
    "adamw/q8+cpu": (lambda ps, d: ok.AdamW(ps, state_precision="q8", min_quant_size=1, state_placement="cpu"),
                     torch.float32),
    "adamw/disk": (lambda ps, d: ok.AdamW(ps, state_placement="disk", state_dir=d), torch.float32),
    "adamw/q4+disk": (lambda ps, d: ok.AdamW(ps, state_precision="q4", min_quant_size=1, state_placement="disk",
                                             state_dir=d), torch.float32),
    "adamw/galore": (lambda ps, d: ok.AdamW(ps, projection=ok.GaLore(rank=2, interval=2)), torch.float32),
    "adamw/galore+q8": (lambda ps, d: ok.AdamW(ps, projection=ok.GaLore(rank=2, interval=2), state_precision="q8",
                                               min_quant_size=1), torch.float32),
    "adamw/apollo": (lambda ps, d: ok.AdamW(ps, projection=ok.APOLLO(rank=2, interval=2)), torch.float32),
    "adamw/apollo_mini": (lambda ps, d: ok.AdamW(ps, projection=ok.APOLLOMini(interval=2)), torch.float32),
    "adamw/frugal": (lambda ps, d: ok.AdamW(ps, projection=ok.FRUGAL(rank=2, interval=2)), torch.float32),
    "adamw/bf16-params+kahan": (lambda ps, d: ok.AdamW(ps, bf16_compensation="kahan"), torch.bfloat16),
    "sgd/bf16-params+stochastic": (lambda ps, d: ok.SGD(ps, lr=0.05, momentum=0.9,
                                                        bf16_compensation="stochastic_rounding"), torch.bfloat16),
    "prodigy/q8": (lambda ps, d: ok.Prodigy(ps, state_precision="q8", min_quant_size=1), torch.float32),
    "wrapper/torch-sgd": (lambda ps, d: ok.ScheduleFreeWrapper(torch.optim.SGD(ps, lr=0.05)), torch.float32),
})


class _Gate:
    """Holds the background write until released (the test steps meanwhile)."""

    def __init__(self, real):
        self.real, self.open, self.entered = real, threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self.open.wait(60), "gate never opened"
        return self.real(*args, **kwargs)


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case trained K steps and saved in one asynchronous checkpoint whose write
    is held until every case has stepped M more times (in place, after save())."""
    state_dir = str(tmp_path_factory.mktemp("state"))
    directory = str(tmp_path_factory.mktemp("ckpt"))
    runs, payload, reference = {}, {}, {}
    for i, (case, (make, dtype)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        model, loss_fn = _problem(dtype=dtype)
        opt = make(model.parameters(), state_dir)
        for _ in range(K):
            _step(model, opt, loss_fn)
        payload[case] = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
        reference[case] = _bytes(payload[case])  # the state at save() time, serialized independently
        runs[case] = (model, opt, loss_fn)
    with pytest.MonkeyPatch.context() as mp:
        gate = _Gate(cio._write_atomic)
        mp.setattr(cio, "_write_atomic", gate)
        ckpt = cio.AsyncCheckpointer(directory)
        assert ckpt.save(K, payload)
        assert gate.entered.wait(60) and ckpt.busy  # the writer is parked before writing anything
        for case, (model, opt, loss_fn) in runs.items():
            torch.set_rng_state(payload[case]["rng"])
            for _ in range(M):
                _step(model, opt, loss_fn)
        gate.open.set()
        ckpt.close()
    step, loaded = cio.AsyncCheckpointer(directory).load_latest()
    assert step == K
    return dict(runs=runs, loaded=loaded, reference=reference, state_dir=state_dir)


def _assert_same(a, b, where="state", ordered=True):
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert (list(a) == list(b)) if ordered else (set(a) == set(b)), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]", ordered)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]", ordered)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_snapshot_is_the_state_at_save_time_and_resumes_bit_exactly(case, saved):
    model_a, opt_a, loss_fn = saved["runs"][case]
    got = saved["loaded"][case]
    want = torch.load(io.BytesIO(saved["reference"][case]))
    _assert_same(got, want)  # the M in-place steps after save() did not leak into the file
    assert any(not torch.equal(p, got["model"][k]) for k, p in model_a.state_dict().items()), \
        f"{case}: the live model did not move after the save (the leak check would be vacuous)"

    make, dtype = CASES[case]
    model_b, _ = _problem(seed=123, dtype=dtype)  # other weights, then loaded
    model_b.load_state_dict(got["model"])
    opt_b = make(model_b.parameters(), saved["state_dir"])
    opt_b.load_state_dict(got["optimizer"])
    torch.set_rng_state(got["rng"])
    for _ in range(M):
        _step(model_b, opt_b, loss_fn)
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), f"{case}: {k} differs from the uninterrupted run"
    _assert_same(torch.load(io.BytesIO(_bytes(opt_b.state_dict()))),
                 torch.load(io.BytesIO(_bytes(opt_a.state_dict()))), f"{case} optimizer state", ordered=False)


# --------------------------------------------------------------------------- save_atomic
def test_save_atomic_publishes_whole_files_and_returns_their_hash(tmp_path):
    path = tmp_path / "x.pt"
    obj = {"w": torch.arange(6.0).reshape(2, 3).T, "n": 3, "s": "text"}
    sha = cio.save_atomic(path, obj)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert os.listdir(tmp_path) == ["x.pt"]
    _assert_same(torch.load(path), obj)  # torch's weights_only default reads it
    _assert_same(cio.load_atomic(path, sha256=sha), obj)
    with pytest.raises(cio.CheckpointError, match="SHA-256"):
        cio.load_atomic(path, sha256="0" * 64)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    cio.save_atomic(path, {"v": torch.ones(3)})
    before = path.read_bytes()
    real = torch.save

    def dies_halfway(obj, f, *a, **kw):
        buf = io.BytesIO()
        real(obj, buf)
        f.write(buf.getvalue()[:100])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="space"):
        cio.save_atomic(path, {"v": torch.zeros(1000)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.pt"]


@pytest.mark.parametrize("bad,words", [
    ({"f": lambda: 0}, r"obj\['f'\] is a builtins.function"),
    ({"a": [1, object()]}, r"obj\['a'\]\[1\] is a builtins.object"),
    ({"d": collections.defaultdict(int)}, "defaultdict"),
    ({"m": {torch.ones(1): 1}}, r"a key of obj\['m'\] is a tensor"),
    ({"p": [int]}, r"obj\['p'\]\[0\] is a builtins.type"),
])
def test_non_plain_values_are_refused_naming_where(bad, words, tmp_path):
    with pytest.raises(TypeError, match=words):
        cio.save_atomic(tmp_path / "x.pt", bad)
    ckpt = cio.AsyncCheckpointer(tmp_path / "c")
    with pytest.raises(TypeError, match=words):
        ckpt.save(1, bad)
    ckpt.close()
    assert os.listdir(tmp_path) == ["c"] and os.listdir(tmp_path / "c") == []


def test_bad_arguments(tmp_path):
    (tmp_path / "file").write_text("x")
    for kwargs, err, words in [
        (dict(directory=3), TypeError, "directory"),
        (dict(directory=tmp_path / "file"), ValueError, "directory"),
        (dict(directory=tmp_path, keep=0), ValueError, "keep"),
        (dict(directory=tmp_path, keep=True), TypeError, "keep"),
        (dict(directory=tmp_path, keep=1.0), TypeError, "keep"),
        (dict(directory=tmp_path, if_busy="queue"), ValueError, "if_busy"),
        (dict(directory=tmp_path, reuse_buffers=1), TypeError, "reuse_buffers"),
        (dict(directory=tmp_path, pin_memory="yes"), TypeError, "pin_memory"),
    ]:
        with pytest.raises(err, match=words):
            cio.AsyncCheckpointer(**kwargs)
    ckpt = cio.AsyncCheckpointer(tmp_path / "c")
    for step, err in [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("3", TypeError)]:
        with pytest.raises(err, match="step"):
            ckpt.save(step, {})
    with pytest.raises(TypeError, match="info"):
        ckpt.load(3)
    assert ckpt.latest() is None and ckpt.load_latest() is None
    ckpt.close()
    with pytest.raises(RuntimeError, match="closed"):
        ckpt.save(1, {})
    assert os.listdir(tmp_path / "c") == []


# --------------------------------------------------------------------------- the checkpointer
def _state(v):
    return {"w": torch.full((4, 5), float(v)), "step": v}


def test_keep_prunes_after_publishing_and_any_reader_sees_the_manifest(tmp_path):
    with cio.AsyncCheckpointer(tmp_path, keep=2) as ckpt:
        for s in range(5):
            ckpt.save(s, _state(s))
        ckpt.wait()
        assert [c.step for c in ckpt.checkpoints()] == [3, 4]
        reader = cio.AsyncCheckpointer(tmp_path)  # another process would see the same
        assert reader.latest() == ckpt.latest()
        for info in ckpt.checkpoints():
            _assert_same(ckpt.load(info), _state(info.step))
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "step-0000000003.pt", "step-0000000004.pt"]
    step, obj = reader.load_latest()
    assert step == 4
    _assert_same(obj, _state(4))


def test_the_same_step_saved_again_gets_a_new_file(tmp_path):
    with cio.AsyncCheckpointer(tmp_path, keep=3) as ckpt:
        ckpt.save(7, _state(1))
        ckpt.save(7, _state(2))
        ckpt.save(3, _state(3))  # steps may go back (a restarted run): latest is the last published
    infos = cio.AsyncCheckpointer(tmp_path).checkpoints()
    assert [(c.step, os.path.basename(c.path)) for c in infos] == [
        (7, "step-0000000007.pt"), (7, "step-0000000007-1.pt"), (3, "step-0000000003.pt")]
    reader = cio.AsyncCheckpointer(tmp_path)
    _assert_same(reader.load(infos[0]), _state(1))
    _assert_same(reader.load(infos[1]), _state(2))
    _assert_same(reader.load_latest()[1], _state(3))


def test_a_background_error_is_raised_by_the_next_call_and_publishes_nothing(tmp_path, monkeypatch):
    ckpt = cio.AsyncCheckpointer(tmp_path, keep=1)
    ckpt.save(1, _state(1))
    ckpt.wait()
    real = cio._write_atomic

    def full_disk(path, fill):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cio, "_write_atomic", full_disk)
    assert ckpt.save(2, _state(2))
    with pytest.raises(cio.CheckpointError, match="step 2") as info:
        ckpt.wait()
    assert isinstance(info.value.__cause__, OSError)
    ckpt.wait()  # raised once
    assert ckpt.latest().step == 1

    calls = []

    def manifest_fails(path, fill):  # the checkpoint file is written, its manifest is not
        calls.append(os.path.basename(path))
        if path.endswith(cio.MANIFEST):
            raise OSError(5, "I/O error")
        return real(path, fill)
    monkeypatch.setattr(cio, "_write_atomic", manifest_fails)
    ckpt.save(3, _state(3))
    while ckpt.busy:
        time.sleep(0.005)
    with pytest.raises(cio.CheckpointError, match="I/O"):
        ckpt.latest()  # any call after the failure raises it
    assert calls == ["step-0000000003.pt", "manifest.json"]
    assert ckpt.latest().step == 1  # keep=1, yet the old file stays: pruning waits for a published manifest
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "step-0000000001.pt"]
    _assert_same(ckpt.load_latest()[1], _state(1))
    monkeypatch.setattr(cio, "_write_atomic", real)
    ckpt.save(4, _state(4))
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "step-0000000004.pt"]  # 3 was never published
    assert cio.AsyncCheckpointer(tmp_path).latest().step == 4


def test_leftovers_of_a_dead_writer_are_removed_on_the_first_write(tmp_path):
    with cio.AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(1))
    stale = ["step-0000000002.pt.tmp-99-0123456789ab", "manifest.json.tmp-99-abcdef012345", "step-0000000002.pt"]
    for name in stale + ["notes.txt", "step-2.pt", "step-0000000002.pt.tmp-1-mine"]:
        (tmp_path / name).write_bytes(b"partial")
    reader = cio.AsyncCheckpointer(tmp_path)
    assert reader.latest().step == 1  # reading changes nothing
    assert all((tmp_path / n).exists() for n in stale)
    with cio.AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(3, _state(3))
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "notes.txt", "step-0000000001.pt",
                                            "step-0000000002.pt.tmp-1-mine", "step-0000000003.pt", "step-2.pt"]
    fresh = tmp_path / "no-manifest"  # without a manifest, nothing but our temporaries is removed
    fresh.mkdir()
    for name in ["step-0000000004.pt", "step-0000000004.pt.tmp-7-0123456789ab"]:
        (fresh / name).write_bytes(b"x")
    with cio.AsyncCheckpointer(fresh) as ckpt:
        ckpt.save(5, _state(5))
    assert sorted(os.listdir(fresh)) == ["manifest.json", "step-0000000004.pt", "step-0000000005.pt"]


def test_a_tampered_checkpoint_is_detected(tmp_path):
    with cio.AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(1))
    path = ckpt.latest().path
    data = bytearray(open(path, "rb").read())
    data[-30] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(cio.CheckpointError, match="SHA-256"):
        ckpt.load_latest()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(cio.CheckpointError, match="manifest"):
        ckpt.latest()


@pytest.mark.parametrize("policy", ["wait", "skip"])
def test_a_save_while_one_is_in_flight(policy, tmp_path, monkeypatch):
    gate = _Gate(cio._write_atomic)
    monkeypatch.setattr(cio, "_write_atomic", gate)
    ckpt = cio.AsyncCheckpointer(tmp_path, if_busy=policy)
    assert ckpt.save(1, _state(1))
    assert gate.entered.wait(30) and ckpt.busy
    if policy == "skip":
        assert ckpt.save(2, _state(2)) is False  # nothing copied, nothing written
        gate.open.set()
        ckpt.wait()
        assert [c.step for c in ckpt.checkpoints()] == [1]
    else:
        threading.Timer(0.2, gate.open.set).start()
        assert ckpt.save(2, _state(2))  # waits for the first write, then snapshots
        ckpt.wait()
        assert [c.step for c in ckpt.checkpoints()] == [1, 2]
    ckpt.close()


def test_context_manager_keeps_the_body_error_and_notes_the_write_error(tmp_path, monkeypatch):
    def fails(path, fill):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cio, "_write_atomic", fails)
    with pytest.raises(KeyError) as info:
        with cio.AsyncCheckpointer(tmp_path) as ckpt:
            ckpt.save(1, _state(1))
            raise KeyError("body")
    assert any("No space" in n for n in info.value.__notes__)
    with pytest.raises(cio.CheckpointError, match="No space"):
        with cio.AsyncCheckpointer(tmp_path) as ckpt:
            ckpt.save(1, _state(1))


def test_reused_buffers_hold_the_new_values_and_structure_is_kept(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    sd = model.state_dict()
    t = torch.arange(12.0).reshape(3, 4).T  # non-contiguous
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,), check_invariants=True)
    obj = {"model": sd, "t": t, "again": t, "sparse": sparse, "dtype": torch.bfloat16, "size": torch.Size([2]),
           "set": {1, 2}, "tuple": (1, "a")}
    with cio.AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, obj)
        ckpt.wait()
        first = ckpt._pool  # the buffers of the written snapshot, to be reused
        ptrs = {b.data_ptr() for b in first._free_all()}
        assert len(ptrs) == 2  # the tied weight once, t once
        with torch.no_grad():
            model[0].weight.add_(1.0)
            t.mul_(2)
        bufs = []
        snap = cio.snapshot(obj, _pool=first, _buffers=bufs)
        assert {b.data_ptr() for b in bufs} == ptrs
        _assert_same(snap["model"], obj["model"])
        assert snap["t"].stride() == t.stride() and snap["again"] is snap["t"]
        ckpt.save(2, obj)
    step, got = cio.AsyncCheckpointer(tmp_path).load_latest()
    assert step == 2
    assert got["model"]._metadata == sd._metadata
    assert torch.equal(got["t"], t) and torch.equal(got["model"]["0.weight"], model[0].weight)
    assert got["again"] is got["t"] and got["model"]["0.weight"] is got["model"]["1.weight"]
    assert torch.equal(got["sparse"].to_dense(), sparse.to_dense())
    assert got["dtype"] is torch.bfloat16 and got["size"] == torch.Size([2]) and got["set"] == {1, 2}
    fresh = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    fresh[1].weight = fresh[0].weight
    fresh.load_state_dict(got["model"])
    assert torch.equal(fresh[1].weight, model[1].weight)


def test_manifest_is_json_naming_files_with_their_hashes(tmp_path):
    with cio.AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(5, _state(5))
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format"] == cio.FORMAT
    (entry,) = data["checkpoints"]
    assert entry["step"] == 5 and entry["file"] == "step-0000000005.pt"
    raw = (tmp_path / entry["file"]).read_bytes()
    assert entry["sha256"] == hashlib.sha256(raw).hexdigest() and entry["bytes"] == len(raw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_snapshot_is_pinned_and_taken_at_save_time(tmp_path):
    model = torch.nn.Linear(512, 512).cuda()
    opt = ok.AdamW(model.parameters(), state_precision="q8")
    x = torch.randn(64, 512, device="cuda")
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    obj = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    want = _bytes(obj)
    bufs = []
    snap = cio.snapshot(obj, _buffers=bufs)
    assert bufs and all(b.is_pinned() and b.device.type == "cpu" for b in bufs)
    with cio.AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(2, obj)
        for _ in range(20):  # queued right after save(): must not reach the snapshot
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    _assert_same(snap, torch.load(io.BytesIO(want), map_location="cpu"))
    step, got = ckpt.load_latest(map_location="cuda")
    _assert_same(got, torch.load(io.BytesIO(want)))


def test_public_name_and_a_reader_racing_the_pruner(tmp_path, monkeypatch):
    assert ok.checkpoint is cio and ok.core.checkpoint is not cio  # the state-dict format module is another
    with cio.AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(1))
    real, calls = cio.load_atomic, []

    def pruned_once(*args, **kwargs):  # the file named by the manifest just read was pruned meanwhile
        calls.append(args[0])
        if len(calls) == 1:
            raise FileNotFoundError(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(cio, "load_atomic", pruned_once)
    step, obj = cio.AsyncCheckpointer(tmp_path).load_latest()
    assert step == 1 and len(calls) == 2
    _assert_same(obj, _state(1))


@pytest.mark.parametrize("precision", ["fp32", "q8"])
def test_steps_racing_the_background_write_do_not_reach_it(precision, tmp_path):
    """No gate: the loop steps 20 times right after save() while the write runs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    opt = ok.AdamW(model.parameters(), lr=1e-2, state_precision=precision, min_quant_size=1)
    x = torch.randn(32, 64)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    with cio.AsyncCheckpointer(tmp_path) as ckpt:
        for s in range(1, 4):
            step()
            obj = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            want = _bytes(obj)
            ckpt.save(s, obj)
            for _ in range(20):
                step()
            ckpt.wait()
            _assert_same(ckpt.load_latest()[1], torch.load(io.BytesIO(want)))


@pytest.mark.parametrize("precision", ["fp32", "q8"])
def test_save_until_copies_in_the_background_and_the_next_step_waits_for_it(precision, tmp_path, monkeypatch):
    """``save(..., until=opt)``: save() returns before the copy; the copy overlaps
    the next forward/backward; the next opt.step() waits for it (the copy is held
    back here until that step has been called, to show the wait), and the written
    checkpoint is the state at save() time however many steps follow. The one-shot
    hook is gone after that step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    opt = ok.AdamW(model.parameters(), lr=1e-2, state_precision=precision, min_quant_size=1)
    x = torch.randn(32, 64)
    real_snapshot = cio.snapshot
    gate = threading.Event()

    def slow_snapshot(*args, **kwargs):
        gate.wait(10)  # until the main thread is inside opt.step()
        return real_snapshot(*args, **kwargs)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    step()
    monkeypatch.setattr(cio, "snapshot", slow_snapshot)
    with cio.AsyncCheckpointer(tmp_path) as ckpt:
        obj = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        want = _bytes(obj)
        assert ckpt.save(1, obj, until=opt)
        assert not ckpt._copied.is_set()  # nothing copied yet: save() did not wait for the copy
        opt.zero_grad()
        model(x).square().mean().backward()  # forward/backward overlap the copy
        threading.Timer(0.2, gate.set).start()
        opt.step()  # waits for the copy
        assert ckpt._copied.is_set() and ckpt.snapshot_wait_seconds > 0.1
        assert not opt._optimizer_step_pre_hooks
        for _ in range(5):
            step()
        ckpt.wait()
        _assert_same(ckpt.load_latest()[1], torch.load(io.BytesIO(want)))
        # wait_snapshot() for code that changes the tensors by other means
        gate.clear()
        obj = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        want = _bytes(obj)
        ckpt.save(2, obj, until=[opt])
        threading.Timer(0.1, gate.set).start()
        ckpt.wait_snapshot()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ckpt.wait()
        _assert_same(ckpt.load_latest()[1], torch.load(io.BytesIO(want)))
        step()  # the pending hook finds the copy done and removes itself
        assert not opt._optimizer_step_pre_hooks


def test_save_until_refuses_what_is_not_an_optimizer(tmp_path):
    with cio.AsyncCheckpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="until"):
            ckpt.save(1, {"a": torch.zeros(2)}, until=torch.zeros(2))
        assert not ckpt.busy and ckpt.latest() is None
