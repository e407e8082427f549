"""Asynchronous, atomic checkpoints for single-process training (``optimkit.checkpoint``).

    import optimkit as ok

    with ok.checkpoint.AsyncCheckpointer("ckpts", keep=2) as ckpt:
        found = ckpt.load_latest()
        if found is not None:
            step, state = found
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        for step in range(start, steps):
            ...
            ckpt.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict()})

(The module is ``optimkit.checkpoint_io``; the package exposes it as
``optimkit.checkpoint``. ``optimkit.core.checkpoint`` is another module: what
an optimizer's ``state_dict()`` holds and how ``load_state_dict()`` checks it.)

:meth:`AsyncCheckpointer.save` copies every tensor of the object to host
memory (pinned when the tensor lives on an accelerator) and returns; the
training loop waits only for that copy. A background thread then writes the
copy with :func:`save_atomic` (temporary file in the same directory, flush,
``os.fsync``, ``os.replace`` onto the final name, ``fsync`` of the directory)
and publishes it by replacing the manifest (``manifest.json``, written the same
way), which names the checkpoints in publish order with the SHA-256 of each
file. Checkpoints older than the newest ``keep`` are deleted only after the
manifest that drops them is published. So at every moment, including after a
``SIGKILL`` in the middle of a write, the manifest names complete files whose
contents are those of the ``save()`` calls that produced them.

Objects are tensors and plain Python values (what ``torch.load``'s default
``weights_only=True`` reads back): dicts, lists, tuples, sets, numbers,
strings, bytes, ``None``, dtypes, devices, ``torch.Size``, and the types
registered with ``torch.serialization.add_safe_globals``. Anything else is a
``TypeError`` at ``save()`` naming where it is, before anything is copied.
"""
from __future__ import annotations

import collections
import concurrent.futures
import copy
import hashlib
import io
import json
import operator
import os
import re
import threading
import time
import uuid
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["AsyncCheckpointer", "CheckpointError", "CheckpointInfo", "fsync_directory", "load_atomic",
           "save_atomic", "snapshot"]

#: the format name written in every manifest and checkpoint payload
FORMAT = "optimkit-checkpoint/1"
#: the manifest's file name inside a checkpoint directory
MANIFEST = "manifest.json"
_TMP = ".tmp-"  # marks a temporary file: "<final name>.tmp-<unique>"
_CKPT_RE = re.compile(r"^step-\d{10,}(?:-\d+)?\.pt$")
_TMP_RE = re.compile(r"^(?:manifest\.json|step-\d{10,}(?:-\d+)?\.pt)\.tmp-\d+-[0-9a-f]{12}$")
_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                 torch.layout, torch.memory_format)


class CheckpointError(RuntimeError):
    """A background write failed (raised, with the original error as its cause, by
    the next call on the checkpointer), or a checkpoint on disk does not match its
    manifest."""


class CheckpointInfo(NamedTuple):
    """One published checkpoint, as the manifest records it."""

    step: int
    path: str
    sha256: str
    bytes: int


# --------------------------------------------------------------------------- atomic files
def fsync_directory(directory: str) -> None:
    """``fsync`` a directory, so that renames and deletions in it are durable (a
    no-op where the platform cannot open directories, e.g. Windows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except (PermissionError, IsADirectoryError):  # Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        n = self._f.write(data)
        self.bytes += n
        return n

    def flush(self) -> None:
        self._f.flush()


def _write_atomic(path: str, fill: Callable[[Any], object]) -> tuple[str, int]:
    """Write ``path`` atomically with ``fill(writer)``; returns (sha256 hex, bytes)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            fill(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)
    return writer.sha256.hexdigest(), writer.bytes


def _check_plain(obj: Any, where: str = "obj") -> None:
    """Raise ``TypeError`` naming the first value ``torch.load(weights_only=True)``
    could not read back."""
    if isinstance(obj, Tensor):
        if type(obj) not in (Tensor, torch.nn.Parameter):
            raise TypeError(f"{where} is a {type(obj).__name__} (a tensor subclass); checkpoints take "
                            "plain tensors (for DTensors use torch.distributed.checkpoint, or "
                            ".full_tensor() / .to_local())")
        return
    if isinstance(obj, (dict, list, tuple, set, frozenset)) and type(obj) in _CONTAINERS:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(k, Tensor):
                    raise TypeError(f"a key of {where} is a tensor; use plain keys (str, int, ...)")
                _check_plain(k, f"a key of {where}")
                _check_plain(v, f"{where}[{k!r}]")
            if type(obj) is collections.OrderedDict:
                for k, v in vars(obj).items():  # e.g. the _metadata of a module's state_dict()
                    _check_plain(v, f"{where}.{k}")
        else:
            for i, v in enumerate(obj):
                _check_plain(v, f"{where}[{i}]")
        return
    if type(obj) in _PLAIN_LEAVES or type(obj) is torch.Size or type(obj) in _safe_globals():
        return
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: checkpoints hold "
                    "tensors and plain Python values only (what torch.load(weights_only=True) reads; "
                    "see torch.serialization.add_safe_globals)")


_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set, frozenset)


def _safe_globals() -> set:
    return {g for g in torch.serialization.get_safe_globals() if isinstance(g, type)}


def save_atomic(path: str | os.PathLike, obj: Any) -> str:
    """Save ``obj`` with ``torch.save`` to ``path`` atomically and durably.

    The bytes go to a temporary file in the same directory, which is flushed,
    ``os.fsync``'d and renamed onto ``path`` (``os.replace``); then the
    directory is ``fsync``'d. A reader sees the old file or the complete new
    one, never a partial write, even if the process dies meanwhile. ``obj``
    must hold tensors and plain Python values only (``TypeError`` naming the
    first other value, before anything is written). Returns the SHA-256 (hex)
    of the written file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    _check_plain(obj)
    sha, _ = _write_atomic(os.fspath(path), lambda w: torch.save(obj, w))  # w: a write-only file
    return sha


def load_atomic(path: str | os.PathLike, map_location=None, sha256: str | None = None) -> Any:
    """Load a file written by :func:`save_atomic` with ``torch.load(weights_only=True)``;
    with ``sha256`` the file's hash is checked first (:class:`CheckpointError` if
    it differs)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    with open(path, "rb") as f:
        data = f.read()
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise CheckpointError(f"checkpoint {os.fspath(path)!r} has SHA-256 {got}, its manifest says "
                                  f"{sha256} (the file was changed after it was published)")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


# --------------------------------------------------------------------------- snapshots
def _accelerator_available() -> bool:
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6
    return acc.is_available() if acc is not None else torch.cuda.is_available()


def _sync_stream(device: torch.device) -> None:
    """Wait for the work queued so far on ``device``'s current stream."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None:
        acc.current_stream(device).synchronize()
    else:  # torch < 2.6
        getattr(torch, device.type).current_stream(device).synchronize()


class _Pool:
    """Host buffers of a finished snapshot, handed out again by layout."""

    def __init__(self, buffers: list[Tensor] | None = None):
        self._free: dict[tuple, list[Tensor]] = {}
        for b in buffers or ():
            self._free.setdefault(self._key(b.size(), b.stride(), b.dtype, b.is_pinned()), []).append(b)

    @staticmethod
    def _key(size, stride, dtype, pinned) -> tuple:
        return tuple(size), tuple(stride), dtype, bool(pinned)

    def _free_all(self) -> list[Tensor]:
        return [b for free in self._free.values() for b in free]

    def take(self, size, stride, dtype, pinned) -> Tensor | None:
        free = self._free.get(self._key(size, stride, dtype, pinned))
        return free.pop() if free else None


def _dense(t: Tensor) -> bool:
    """Strided, and its elements fill its memory exactly once (empty_strided can copy it)."""
    if t.layout != torch.strided or t.is_quantized:
        return False
    if t.is_contiguous() or t.numel() <= 1:
        return True
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.size()) if sz != 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


def snapshot(obj: Any, *, pin_memory: bool | None = None, _pool: _Pool | None = None,
             _buffers: list | None = None, _checked: bool = False) -> Any:
    """A copy of ``obj`` whose tensors are host-memory copies taken now.

    Containers are copied (``OrderedDict`` attributes such as a module state
    dict's ``_metadata`` too), plain values kept; a tensor (or the same view of
    the same memory, as tied weights in a ``state_dict()``) that appears several
    times is copied once, and the copy appears at each place. Tensors on an
    accelerator are copied into pinned host memory (``pin_memory=None``: when
    an accelerator is available) with non-blocking copies, and the streams are
    synchronized before returning, so in-place updates issued afterwards never
    reach the copy. ``TypeError`` naming the first value that is neither a
    tensor nor a plain value, before anything is copied."""
    if not _checked:
        _check_plain(obj)
    memo: dict[int, Tensor] = {}
    devices: set = set()
    if pin_memory is None:
        pin_memory = _accelerator_available()

    def tensor(t: Tensor) -> Tensor:
        src = t.detach()
        key: Any = id(t)
        if src.layout == torch.strided and src.device.type != "meta" and src.untyped_storage().data_ptr():
            # the same view of the same memory (e.g. tied weights in a state_dict()) is copied once
            key = (src.untyped_storage().data_ptr(), src.device, src.storage_offset(), tuple(src.size()),
                   tuple(src.stride()), src.dtype)
        got = memo.get(key)
        if got is not None:
            return got
        on_host = src.device.type == "cpu"
        out: Tensor | None
        if src.device.type == "meta":
            out = src.clone()
        elif _dense(src):
            pinned = bool(pin_memory) and not on_host
            out = _pool.take(src.size(), src.stride(), src.dtype, pinned) if _pool is not None else None
            if out is None:
                out = torch.empty_strided(src.size(), src.stride(), dtype=src.dtype, device="cpu",
                                          pin_memory=pinned)
            out.copy_(src, non_blocking=not on_host)
            if _buffers is not None:
                _buffers.append(out)
        else:  # sparse, quantized, overlapping strides: a plain copy
            out = src.to("cpu", copy=True)
        if not on_host and src.device.type != "meta":
            devices.add(src.device)
        memo[key] = out
        return out

    def walk(x: Any) -> Any:
        if isinstance(x, Tensor):
            return tensor(x)
        if isinstance(x, dict):
            out = type(x)((k, walk(v)) for k, v in x.items())
            if type(x) is collections.OrderedDict:
                for k, v in vars(x).items():
                    setattr(out, k, copy.deepcopy(v))
            return out
        if isinstance(x, (list, tuple, set, frozenset)) and type(x) in _CONTAINERS:
            return type(x)(walk(v) for v in x)
        if type(x) in _PLAIN_LEAVES or type(x) is torch.Size:
            return x
        return copy.deepcopy(x)  # a registered safe global

    out = walk(obj)
    for device in devices:  # the non-blocking copies were queued on each device's current stream
        _sync_stream(device)
    return out


# --------------------------------------------------------------------------- manifests
def _read_manifest(directory: str) -> list[dict]:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return []
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"manifest {path!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("checkpoints"), list):
        raise CheckpointError(f"manifest {path!r} is not an {FORMAT} manifest")
    for entry in data["checkpoints"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("step"), int)
                and isinstance(entry.get("file"), str) and _CKPT_RE.match(entry["file"])
                and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
            raise CheckpointError(f"manifest {path!r} has an invalid entry {entry!r}")
    return data["checkpoints"]


def _info(directory: str, entry: dict) -> CheckpointInfo:
    return CheckpointInfo(entry["step"], os.path.join(directory, entry["file"]), entry["sha256"], entry["bytes"])


def _optimizers(until: Any) -> list:
    """``until`` of :meth:`AsyncCheckpointer.save` as a list of optimizers (TypeError otherwise)."""
    if until is None:
        return []
    items = list(until) if isinstance(until, (list, tuple)) else [until]
    for o in items:
        if not callable(getattr(o, "register_step_pre_hook", None)):
            raise TypeError("until must be an optimizer (with register_step_pre_hook) or a list of them, "
                            f"got {type(o).__name__}")
    return items


class _Job(NamedTuple):
    step: int
    future: concurrent.futures.Future
    buffers: list


class AsyncCheckpointer:
    """Checkpoints written in the background and published atomically.

    ``directory`` is created if missing; one checkpointer writes to a directory
    at a time (readers may be many). ``keep`` (>= 1) is how many published
    checkpoints stay on disk. ``if_busy`` says what :meth:`save` does while the
    previous write is still in flight: ``"wait"`` (default) waits for it, then
    snapshots (so at most one snapshot is held and every save is written);
    ``"skip"`` returns ``False`` at once without taking a snapshot (the loop
    never waits on the disk; some steps are not checkpointed).
    ``reuse_buffers`` (default) keeps the host buffers of the last written
    snapshot and copies the next snapshot into them (warm pages: about half
    the copy time), at the cost of holding one snapshot's memory between
    saves; ``pin_memory`` as in :func:`snapshot`.

    An error in the background write (a full disk, say) is raised, as
    :class:`CheckpointError` caused by the original error, by the next call
    of :meth:`save`, :meth:`wait`, :meth:`latest`, :meth:`load_latest` or
    :meth:`close`; the manifest then still names the checkpoints published
    before it. The write thread is not a daemon: a write in flight when the
    interpreter exits is completed. Use as a context manager, or call
    :meth:`close`.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2, *, if_busy: str = "wait",
                 reuse_buffers: bool = True, pin_memory: bool | None = None):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise TypeError(f"keep must be an int, got {type(keep).__name__}")
        if keep < 1:
            raise ValueError(f"Invalid keep: {keep} (must be >= 1)")
        if if_busy not in ("wait", "skip"):
            raise ValueError(f"Invalid if_busy: {if_busy!r} (expected 'wait' or 'skip')")
        if not isinstance(reuse_buffers, bool):
            raise TypeError(f"reuse_buffers must be a bool, got {type(reuse_buffers).__name__}")
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory must be None or a bool, got {type(pin_memory).__name__}")
        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"Invalid directory: {directory!r} exists and is not a directory")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.keep = keep
        self.if_busy = if_busy
        self.reuse_buffers = reuse_buffers
        self.pin_memory = pin_memory
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._job: _Job | None = None
        self._pool: _Pool | None = None
        self._entries: list[dict] | None = None  # the manifest as this writer last published it
        self._closed = False
        self._copied: threading.Event | None = None  # set when the host copy of save(until=...) is done
        #: seconds the last optimizer step guarded by ``save(until=...)`` waited for the host copy
        self.snapshot_wait_seconds = 0.0

    # ------------------------------------------------------------------ writing
    def save(self, step: int, obj: Any, *, until: Any = None) -> bool:
        """Snapshot ``obj`` (tensors copied to host memory now) and write it as the
        checkpoint of ``step`` in the background; returns ``True``, or ``False``
        when ``if_busy="skip"`` and the previous write is still in flight (nothing
        is copied then). Raises the previous write's error, if it failed.

        ``until``: an optimizer (or a list of them) whose next ``step()`` is the
        first thing that changes ``obj``'s tensors in place. The host copy then
        also runs in the background, overlapping the next forward and backward
        passes (which only read the parameters and write gradients), and that
        ``step()`` waits until the copy is complete (a one-shot step pre-hook):
        the training loop waits only for what the copy has left when it reaches
        the step. Anything else that writes those tensors in place before that
        step (an EMA of the weights, a manual ``p.data`` update) must call
        :meth:`wait_snapshot` first. ``snapshot_wait_seconds`` is how long the
        last such step waited."""
        if self._closed:
            raise RuntimeError("save() on a closed AsyncCheckpointer")
        guards = _optimizers(until)
        if isinstance(step, bool):
            raise TypeError("step must be an int, got bool")
        try:
            step = operator.index(step)
        except TypeError:
            raise TypeError(f"step must be an int, got {type(step).__name__}") from None
        if step < 0:
            raise ValueError(f"Invalid step: {step} (must be >= 0)")
        _check_plain(obj)
        if self._job is not None and not self._job.future.done() and self.if_busy == "skip":
            return False
        self._finish()
        buffers: list[Tensor] = []
        pool, self._pool = self._pool, None  # buffers not taken are freed; the taken ones belong to the snapshot
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="optimkit-checkpoint")
        if guards:
            copied = threading.Event()
            self._copied = copied
            hooks: list = []

            def hold(optimizer, args, kwargs):  # the first in-place change waits for the copy
                start = time.perf_counter()
                copied.wait()
                self.snapshot_wait_seconds = time.perf_counter() - start
                for h in hooks:
                    h.remove()
                hooks.clear()

            hooks.extend(o.register_step_pre_hook(hold) for o in guards)

            def copy_then_write() -> None:
                try:
                    snap = snapshot(obj, pin_memory=self.pin_memory, _pool=pool, _buffers=buffers, _checked=True)
                finally:
                    copied.set()
                self._write(step, {"format": FORMAT, "step": step, "state": snap})

            future = self._executor.submit(copy_then_write)
        else:
            snap = snapshot(obj, pin_memory=self.pin_memory, _pool=pool, _buffers=buffers, _checked=True)
            future = self._executor.submit(self._write, step, {"format": FORMAT, "step": step, "state": snap})
        self._job = _Job(step, future, buffers if self.reuse_buffers else [])
        return True

    def wait_snapshot(self) -> None:
        """Block until the host copy of the last :meth:`save` with ``until=`` is complete
        (the tensors it read may then be changed); the write may still be in flight."""
        if self._copied is not None:
            self._copied.wait()

    def _finish(self) -> None:
        """Wait for the write in flight; raise its error; recycle its buffers."""
        job, self._job = self._job, None
        if job is None:
            return
        error = job.future.exception()
        if error is not None:
            raise CheckpointError(f"writing the checkpoint of step {job.step} in {self.directory!r} "
                                  f"failed: {error!r}") from error
        if self.reuse_buffers:
            self._pool = _Pool(job.buffers)

    def _write(self, step: int, payload: dict) -> None:  # on the write thread
        if self._entries is None:
            self._entries = _read_manifest(self.directory)
            self._clean()
        taken = {e["file"] for e in self._entries}
        name, k = f"step-{step:010d}.pt", 0
        while name in taken or os.path.exists(os.path.join(self.directory, name)):
            k += 1
            name = f"step-{step:010d}-{k}.pt"
        sha, nbytes = _write_atomic(os.path.join(self.directory, name), lambda w: torch.save(payload, w))
        entries = self._entries + [{"step": step, "file": name, "sha256": sha, "bytes": nbytes,
                                    "time": time.time()}]
        kept, dropped = entries[-self.keep:], entries[:-self.keep]
        manifest = json.dumps({"format": FORMAT, "checkpoints": kept}, indent=1).encode("utf-8")
        try:
            _write_atomic(os.path.join(self.directory, MANIFEST), lambda w: w.write(manifest))
        except BaseException:  # never published: the file goes
            try:
                os.unlink(os.path.join(self.directory, name))
            except OSError:
                pass
            raise
        self._entries = kept  # published: only now may older files go
        for e in dropped:
            try:
                os.unlink(os.path.join(self.directory, e["file"]))
            except FileNotFoundError:
                pass
        if dropped:
            fsync_directory(self.directory)

    def _clean(self) -> None:
        """Remove what a writer that died left behind: its temporary files, and
        (when there is a manifest) checkpoint files it does not name (written,
        never published). Files of other names are never touched."""
        entries = self._entries or []
        listed = {e["file"] for e in entries}
        for name in os.listdir(self.directory):
            if _TMP_RE.match(name) or (entries and _CKPT_RE.match(name) and name not in listed):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass

    def wait(self) -> None:
        """Block until the write in flight (if any) is published; raise its error."""
        self._finish()

    @property
    def busy(self) -> bool:
        """Whether a write is in flight."""
        return self._job is not None and not self._job.future.done()

    def close(self) -> None:
        """Finish the write in flight, stop the write thread, free the buffers
        (raises the last write's error, if it failed). Reading still works."""
        if self._closed:
            return
        try:
            self._finish()
        finally:
            self._closed = True
            self._pool = None
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> "AsyncCheckpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:  # the body's error wins; a write error is attached to it
            try:
                self.close()
            except CheckpointError as e:
                note = f"(also: {e})"
                if hasattr(exc, "add_note"):
                    exc.add_note(note)
                else:  # Python 3.10: the same attribute, not printed by the traceback
                    exc.__notes__ = [*getattr(exc, "__notes__", []), note]

    # ------------------------------------------------------------------ reading
    def _raise_pending(self) -> None:
        if self._job is not None and self._job.future.done():
            self._finish()

    def checkpoints(self) -> list[CheckpointInfo]:
        """The published checkpoints, oldest first (as the manifest on disk says:
        a write in flight is not among them until it is published)."""
        self._raise_pending()
        return [_info(self.directory, e) for e in _read_manifest(self.directory)]

    def latest(self) -> CheckpointInfo | None:
        """The most recently published checkpoint, or ``None``."""
        found = self.checkpoints()
        return found[-1] if found else None

    def load(self, info: CheckpointInfo, map_location=None) -> Any:
        """The object saved as checkpoint ``info`` (from :meth:`checkpoints`), read
        with ``torch.load(weights_only=True)`` after checking its SHA-256."""
        if not isinstance(info, CheckpointInfo):
            raise TypeError(f"info must be a CheckpointInfo, got {type(info).__name__}")
        payload = load_atomic(info.path, map_location=map_location, sha256=info.sha256)
        if not (isinstance(payload, dict) and payload.get("format") == FORMAT and payload.get("step") == info.step):
            raise CheckpointError(f"{info.path!r} is not the {FORMAT} checkpoint of step {info.step}")
        return payload["state"]

    def load_latest(self, map_location=None) -> tuple[int, Any] | None:
        """``(step, object)`` of the most recently published checkpoint, or ``None``
        when there is none. ``map_location`` as in ``torch.load``. (A reader in
        another process whose checkpoint is pruned between reading the manifest
        and the file reads the manifest again.)"""
        for attempt in range(3):
            info = self.latest()
            if info is None:
                return None
            try:
                return info.step, self.load(info, map_location=map_location)
            except FileNotFoundError:  # a reader in another process: pruned since the manifest was read
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")
