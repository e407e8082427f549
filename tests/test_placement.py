"""State placement: host memory and memory-mapped files on disk."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import optimkit as ok
from helpers import grad_stream, make_params, run_with_grads


@pytest.mark.parametrize("precision", ["fp32", "q8"])
@pytest.mark.parametrize("name", ["adamw", "sgd", "lion", "adafactor", "psgd_kron", "adahessian", "sophia_h",
                                  "sophia_g"])
def test_disk_and_cpu_placement_match_device_bit_exactly(tmp_path, name, precision):
    if name not in ok.available():
        pytest.skip(f"{name} not registered")
    shapes = [(64, 80), (80,), (3, 50, 40)]
    stream = grad_stream(make_params(shapes), 6)
    results = []
    for where in ["device", "cpu", "disk"]:
        params = make_params(shapes)
        extra = dict(state_dir=str(tmp_path)) if where == "disk" else {}
        opt = ok.create(name, params, state_placement=where, state_precision=precision, min_quant_size=1024,
                        **extra)
        run_with_grads(opt, params, stream[:3])
        # checkpoint and resume into a fresh optimizer with the same placement
        sd = copy.deepcopy(opt.state_dict())
        fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt2 = ok.create(name, fresh, state_placement=where, state_precision=precision, min_quant_size=1024,
                         **extra)
        opt2.load_state_dict(sd)
        run_with_grads(opt2, fresh, stream[3:])
        results.append((fresh, ok.state_bytes(opt2, by_placement=True)))
    (ref, ref_bytes), *others = results
    for params, _ in others:
        for p, q in zip(ref, params):
            assert torch.equal(p, q)
    disk_bytes = results[2][1]
    assert sum(disk_bytes.values()) == sum(ref_bytes.values())
    assert set(disk_bytes) <= {"disk"}  # every state tensor is on disk
    assert bool(disk_bytes) == bool(sum(ref_bytes.values()))


def test_host_placement_streams_only_for_accelerator_parameters(monkeypatch):
    """"cpu" placement steps one parameter at a time when the parameters live on an
    accelerator (so the device holds one tensor's state at a time); forcing that
    per-parameter route on CPU parameters still matches device placement bit-exactly."""
    from optimkit.core import placement

    assert placement.streams("disk", torch.device("cpu"))
    assert placement.streams("cpu", torch.device("meta"))  # any non-CPU device
    assert not placement.streams("cpu", torch.device("cpu"))
    assert not placement.streams("device", torch.device("meta"))
    shapes = [(64, 80), (80,), (3, 50, 40)]
    stream = grad_stream(make_params(shapes), 4)
    ref = make_params(shapes)
    run_with_grads(ok.AdamW(ref, state_precision="q8", min_quant_size=1024), ref, stream)
    calls = []
    real = placement.streams
    monkeypatch.setattr(placement, "streams", lambda where, device: calls.append(where) or where == "cpu")
    got = make_params(shapes)
    opt = ok.AdamW(got, state_precision="q8", min_quant_size=1024, state_placement="cpu")
    run_with_grads(opt, got, stream)
    assert calls and real("cpu", torch.device("cpu")) is False
    for p, q in zip(ref, got):
        assert torch.equal(p, q)


def test_disk_placement_requires_a_writable_state_dir(tmp_path):
    with pytest.raises(ValueError, match="state_dir"):
        ok.AdamW(make_params(), state_placement="disk")
    with pytest.raises(ValueError, match="state_dir"):
        ok.AdamW(make_params(), state_placement="disk", state_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="state_placement"):
        ok.AdamW(make_params(), state_placement="nvme")


SCRIPT = textwrap.dedent("""
    import resource, sys, torch, optimkit as ok
    torch.set_num_threads(1)
    where, state_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    n_tensors, size = 16, 1 << 18                  # 4M parameters: 16 MiB of weights, 16 MiB of grads
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size, generator=gen)) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(size, generator=gen)
    def vm_data():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    extra = dict(state_dir=state_dir) if where == "disk" else {}
    warm = [torch.nn.Parameter(torch.zeros(8)) for _ in range(2)]  # import what a step needs before the cap
    for w in warm:
        w.grad = torch.zeros(8)
    ok.AdamW(warm, state_placement=where, **extra).step()
    cap = vm_data() + (16 << 20)                   # 16 MiB more: AdamW's 32 MiB of state cannot fit
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    opt = ok.AdamW(params, lr=1e-3, state_placement=where, **extra)
    for step in range(3):
        opt.step()
    assert ok.state_bytes(opt, by_placement=True).get("disk", 0) >= 32 << 20 or where != "disk"
    resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
    torch.save([p.detach() for p in params], out)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA accounting is Linux's")
def test_disk_state_larger_than_the_memory_cap_trains_and_matches(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    # glibc settings for a memory-capped process: one malloc arena (a helper thread's own
    # arena reserves address space the cap counts) and large blocks always mapped, so that
    # freed per-tensor temporaries go back to the system instead of fragmenting the heap
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MALLOC_ARENA_MAX": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}

    def run(where):
        out = tmp_path / f"{where}.pt"
        proc = subprocess.run([sys.executable, str(script), where, str(tmp_path), str(out)],
                              capture_output=True, text=True, env=env, timeout=300)
        return proc, out

    proc, out = run("disk")
    assert proc.returncode == 0, proc.stderr[-2000:]
    capped_device, _ = run("device")
    assert capped_device.returncode != 0, "the cap should not leave room for the state in memory"
    # the same run without a cap, state on the device, gives the same weights
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1 << 18, generator=gen)) for _ in range(16)]
    for p in params:
        p.grad = torch.randn(1 << 18, generator=gen)
    opt = ok.AdamW(params, lr=1e-3)
    for _ in range(3):
        opt.step()
    disk = torch.load(out)
    for p, q in zip(params, disk):
        assert torch.equal(p.detach(), q)
