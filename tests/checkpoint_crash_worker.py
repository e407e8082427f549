"""Training loop for tests/test_checkpoint_crash.py, and the fork server that runs it.

``python checkpoint_crash_worker.py serve`` imports torch and optimkit once, then
reads one JSON request per line from stdin, ``{"dir": ..., "delay": seconds}``
(``"broken": true`` runs the deliberately broken :class:`PublishesFirst` writer):
it forks a child that resumes training from the latest checkpoint in ``dir``
(or starts from scratch) and saves asynchronously after every step, sleeps
``delay`` seconds, SIGKILLs the child, reaps it and answers one JSON line
(``{"killed": true}``, or how the child ended if it ended first). Forking a
warm interpreter keeps a trial at a few milliseconds of start-up instead of a
fresh import of torch.

The training is deterministic (the batch of step ``t`` is drawn from a generator
seeded with ``t``), so the parent recomputes, uninterrupted, the state any
checkpoint claims to hold (:func:`reference_states`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
import time

import torch

import optimkit as ok
from optimkit import checkpoint_io as cio

WIDTH = 512  # ~0.8M parameters: ~9.5 MB of model + AdamW state per checkpoint


def build():
    """The model and optimizer every trial trains: AdamW, one fp32 group, one q8 group."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, WIDTH),
                                torch.nn.Tanh(), torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(),
                                torch.nn.Linear(WIDTH, 4))
    params = list(model.parameters())
    opt = ok.AdamW([{"params": params[:4]},
                    {"params": params[4:], "state_precision": "q8", "min_quant_size": 1}], lr=1e-3)
    return model, opt


def train_step(model, opt, t: int) -> None:
    """Step ``t`` (1-based) on its own deterministic batch."""
    g = torch.Generator().manual_seed(t)
    x = torch.randn(16, 32, generator=g)
    y = torch.randn(16, 4, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def state(model, opt, step: int) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}


def digest(obj) -> str:
    """SHA-256 of every value in ``obj`` (tensors by dtype, shape and raw bytes)."""
    h = hashlib.sha256()

    def walk(x, where):
        if isinstance(x, torch.Tensor):
            t = x.detach().contiguous()
            h.update(f"{where}:{t.dtype}:{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=repr):
                walk(x[k], f"{where}/{k!r}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{where}/{i}")
        else:
            h.update(f"{where}={x!r};".encode())
    walk(obj, "")
    return h.hexdigest()


def reference_states(steps):
    """``{step: digest}`` of the uninterrupted run's state after each step in ``steps``."""
    wanted = sorted(set(steps))
    model, opt = build()
    out, t = {}, 0
    for s in wanted:
        while t < s:
            t += 1
            train_step(model, opt, t)
        out[s] = digest(state(model, opt, t))
    return out


class PublishesFirst(cio.AsyncCheckpointer):
    """The crash test's control, deliberately broken: it names a checkpoint in the
    manifest before writing the file, and writes the file in place (fsync'd chunk
    by chunk, so that kills land in the write). The test must catch it."""

    def _write(self, step: int, payload: dict) -> None:
        if self._entries is None:
            self._entries = cio._read_manifest(self.directory)
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        name = f"step-{step:010d}.pt"
        entry = {"step": step, "file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                 "time": time.time()}
        kept = (self._entries + [entry])[-self.keep:]
        manifest = json.dumps({"format": cio.FORMAT, "checkpoints": kept}).encode()
        cio._write_atomic(os.path.join(self.directory, cio.MANIFEST), lambda w: w.write(manifest))
        with open(os.path.join(self.directory, name), "wb") as f:
            for i in range(0, len(data), 1 << 20):
                f.write(data[i:i + (1 << 20)])
                f.flush()
                os.fsync(f.fileno())
        self._entries = kept


def child(directory: str, broken: bool = False) -> None:
    """Resume from the latest checkpoint (if any) and train forever, saving after every step."""
    torch.set_num_threads(1)
    model, opt = build()
    ckpt = (PublishesFirst if broken else cio.AsyncCheckpointer)(directory, keep=2)
    found = ckpt.load_latest()
    step = 0
    if found is not None:
        step, saved = found
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
    while step < 1_000_000:
        step += 1
        train_step(model, opt, step)
        ckpt.save(step, state(model, opt, step))


def serve() -> None:
    torch.set_num_threads(1)
    model, opt = build()  # warm up once (lazy imports, the q8 kernel), so that children start in ms
    train_step(model, opt, 1)
    del model, opt
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child(req["dir"], req.get("broken", False))
            except BaseException:  # noqa: BLE001  (reported through the exit status)
                import traceback

                traceback.print_exc()
                code = 3
            finally:
                os._exit(code)
        deadline = time.monotonic() + req["delay"]
        ended = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                ended = status
                break
            time.sleep(0.002)
        if ended is None:
            os.kill(pid, signal.SIGKILL)  # our own child, not yet reaped: the pid cannot be reused
            os.waitpid(pid, 0)
            reply = {"killed": True}
        else:
            reply = {"killed": False, "status": ended}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve()
