"""State placement: keep optimizer state next to the parameters, in host
memory, or in memory-mapped files on disk.

* ``"device"``: state tensors live where the parameters live.
* ``"cpu"``: state tensors live in host memory (pinned when CUDA is
  available). With parameters on an accelerator the facade steps the group
  one parameter at a time: that parameter's state is copied to the device,
  updated and copied back, so the device never holds more than one tensor's
  state. With parameters on the CPU it is the same as ``"device"``.
* ``"disk"``: every state tensor is a file-backed tensor
  (``torch.from_file(shared=True)``) in a private directory under the
  user's ``state_dir``: the operating system pages it in and out, so state
  larger than RAM trains. The facade steps such a group one parameter at a
  time and pages in the next parameter's state on a background thread
  (:func:`prefetch`) while the current one updates.

Step counters and other 0-d scalars stay in memory.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import os
import shutil
import tempfile
import threading
import weakref

import torch
from torch import Tensor


def check_state_dir(group: dict, state_dir) -> None:
    if group.get("state_placement") == "disk":
        if state_dir is None:
            raise ValueError("Invalid state_dir: state_placement='disk' needs state_dir=<a directory>")
        if not isinstance(state_dir, (str, os.PathLike)):
            raise TypeError(f"state_dir must be a path, got {type(state_dir).__name__}")
        if not os.path.isdir(state_dir):
            raise ValueError(f"Invalid state_dir: {os.fspath(state_dir)!r} is not a directory")
        if not os.access(state_dir, os.W_OK):
            raise ValueError(f"Invalid state_dir: {os.fspath(state_dir)!r} is not writable")


class Placement:
    """Moves freshly created (or loaded) state to its home."""

    def __init__(self, root):
        self.root = root
        self._dir: str | None = None
        self._count = itertools.count()
        self.disk_tensors: dict[int, str] = {}

    def _directory(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="optimkit-state-", dir=self.root)
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def place(self, state: dict, where: str) -> None:
        if where == "device":
            return
        for key, value in list(state.items()):
            if not isinstance(value, Tensor) or value.dim() == 0 or key == "step":
                continue
            if where == "cpu":
                if value.device.type != "cpu":
                    host = value.to("cpu")
                    state[key] = host.pin_memory() if torch.cuda.is_available() else host
            elif not self.on_disk(value):
                state[key] = self._to_disk(value)

    def on_disk(self, value: Tensor) -> bool:
        """Is ``value`` one of this placement's memory-mapped tensors? The id alone does
        not say: a mapped tensor that was replaced (e.g. moved to a device by a framework
        after loading) and freed leaves its id to new tensors, so the storage must still
        be a mapped file too."""
        return (id(value) in self.disk_tensors and value.device.type == "cpu"
                and getattr(value.untyped_storage(), "filename", None) is not None)

    def _to_disk(self, value: Tensor) -> Tensor:
        path = os.path.join(self._directory(), f"{next(self._count)}.bin")
        n = value.numel()
        storage_dtype = value.dtype
        try:
            t = torch.from_file(path, shared=True, size=n, dtype=storage_dtype)
        except (RuntimeError, TypeError):  # dtypes from_file cannot map: store raw bytes
            raw = torch.from_file(path, shared=True, size=n * value.element_size(), dtype=torch.uint8)
            t = raw.view(storage_dtype)
        t = t.view(value.shape)
        t.copy_(value.detach().to("cpu"))
        self.disk_tensors[id(t)] = path
        return t


def streams(where: str, device: torch.device) -> bool:
    """Whether a group with this placement is stepped one parameter at a time
    (parameters on ``device``): always on disk, in host memory when the
    parameters live elsewhere (their state visits the device one tensor at a time)."""
    return where == "disk" or (where == "cpu" and device.type != "cpu")


def needs_transfer(entries: dict, device: torch.device) -> bool:
    for row in entries.values():
        for e in row:
            t = e if isinstance(e, Tensor) else next(iter(e.values()))
            return t.device != device
    return False


def _map(entries: dict, fn) -> dict:
    return {name: [fn(e) if isinstance(e, Tensor) else {k: fn(v) for k, v in e.items()} for e in row]
            for name, row in entries.items()}


def to_device(entries: dict, device) -> dict:
    return _map(entries, lambda t: t.to(device, non_blocking=True))


def copy_back(working: dict, home: dict) -> None:
    for name, row in home.items():
        for h, w in zip(row, working[name]):
            if isinstance(h, Tensor):
                h.copy_(w)
            else:
                for k in h:
                    h[k].copy_(w[k])


def _touch(tensors: list[Tensor]) -> None:
    for t in tensors:
        flat = t.reshape(-1).view(torch.uint8)
        flat[:: 4096].sum()  # one read per page brings the file's pages in


_worker: concurrent.futures.ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def _executor():
    """One small background thread for all prefetching (created once, with a
    small stack: thread stacks count against a process's data limit)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            old = threading.stack_size(1 << 20)
            try:
                _worker = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                thread_name_prefix="optimkit-prefetch")
                _worker.submit(lambda: None).result()  # start the thread now, with this stack size
            finally:
                threading.stack_size(old)
        return _worker


class _Pending:
    def __init__(self, future):
        self.future = future

    def join(self) -> None:
        self.future.result()


def prefetch(state: dict) -> _Pending:
    """Page in ``state``'s tensors on the background thread (torch releases the GIL)."""
    tensors = [v for k, v in state.items() if isinstance(v, Tensor) and v.dim() > 0]
    return _Pending(_executor().submit(_touch, tensors))
