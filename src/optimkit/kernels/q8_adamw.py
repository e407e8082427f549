"""CPU fast paths: AdamW with q8 (block-wise dynamic 8-bit) moments in one pass,
and (for ``compile=True``) with float32 moments.

The tensor-op path (decode -> AdamW transforms -> encode) needs several
passes over memory and a binary search per element. This kernel, written in
C and compiled once per machine with the system C compiler (OpenMP,
auto-vectorized), does the whole step per block of 256 elements while the
block is in cache: decode, update, absmax, nearest-code encode (a lookup
table on the float's top 16 bits plus one comparison). It reproduces the
reference path's float32 operations in the same order; tests check that
parameters and decoded states agree.

Used by Adam/AdamW when every condition in :func:`eligible` holds; otherwise
the facade takes the reference path. ``OPTIMKIT_NO_FAST_PATH=1`` (or
:func:`disabled`) turns it off.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..state import maps

_SOURCE = Path(__file__).with_name("q8_adamw.c")
_FLAGS = ["-O3", "-march=native", "-mtune=generic", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
_lock = threading.Lock()
_lib = None
_failed = False
_enabled = True
_TINY = None


def _cache_dir() -> Path:
    root = os.environ.get("OPTIMKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "optimkit")
    return Path(root)


def _cpu_signature() -> bytes:
    """The machine type and, on Linux, the CPU feature flags."""
    sig = os.uname().machine
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    sig += line
                    break
    except OSError:
        pass
    return sig.encode()


def _compile() -> ctypes.CDLL | None:
    global _lib, _failed
    with _lock:
        if _lib is not None or _failed:
            return _lib
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            _failed = True
            return None
        src = _SOURCE.read_bytes()
        # -march=native: the library is only valid on CPUs with the same features
        key = hashlib.sha256(src + " ".join([cc] + _FLAGS).encode() + _cpu_signature()).hexdigest()[:16]
        target = _cache_dir() / f"q8_adamw_{key}.so"
        try:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    out = Path(tmp) / target.name
                    subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", str(out), "-lm"], check=True,
                                   capture_output=True, timeout=120)
                    os.replace(out, target)
            lib = ctypes.CDLL(str(target))
            f = lib.adamw_q8_step
            f.restype = None
            P, I64, F, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
            f.argtypes = [I64, P, P, P, P, P, P, P, P, F, F, F, I, F, F, F, F, F, P, P, P, P, P, P, F]
            f32 = lib.adamw_f32_step
            f32.restype = None
            f32.argtypes = [I64, P, P, P, P, P, P, F, F, F, I, F, F, F, F, F]
            _lib = lib
        except (OSError, subprocess.SubprocessError) as e:  # no compiler or no OpenMP: reference path
            warnings.warn(f"optimkit: q8 CPU fast path unavailable ({e}); using the tensor-op path")
            _failed = True
        return _lib


#: Keys are the top 16 bits of |y| (8 exponent + 7 mantissa bits), clamped to
#: [KEY_LO, KEY_HI]: |y| < 2**-24 shares the lowest key (no midpoint lies
#: below 2**-24 in either map), |y| <= 1 by construction.
KEY_LO, KEY_HI = (127 - 24) << 7, 127 << 7
SPAN = KEY_HI - KEY_LO + 1


def _lut(signed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(map values, midpoints padded to 256, lower-candidate table of 2 * SPAN entries).

    Entry ``sign * SPAN + key - KEY_LO`` holds the code of the smallest value
    with that sign and key; the nearest code of any ``y`` with that sign and
    key is that code or the next one (checked here)."""
    values = torch.tensor(maps.dynamic_map(signed, 8), dtype=torch.float32)
    mids = torch.tensor(maps.midpoints(maps.dynamic_map(signed, 8)), dtype=torch.float32)
    keys = torch.arange(KEY_LO, KEY_HI + 1, dtype=torch.int64)
    lo = (keys << 16).to(torch.int32).view(torch.float32).clone()
    lo[0] = 0.0
    hi = ((keys << 16) | 0xFFFF).to(torch.int32).view(torch.float32).clamp_max(1.0)
    cands = []
    for low_end, high_end in ((lo, hi), (-hi, -lo)):  # positive, then negative values
        cand = torch.bucketize(low_end, mids, right=True)
        top = torch.bucketize(high_end, mids, right=True)
        if not bool(((top - cand) <= 1).all()):  # pragma: no cover - a property of the map
            raise AssertionError("a lookup bucket spans two midpoints")
        cands.append(cand)
    padded = torch.cat([mids, torch.tensor([float("inf")])])  # mid[255] = inf: never step past 255
    return values, padded, torch.cat(cands).to(torch.int32)


_TABLES: dict = {}


def _tables():
    if not _TABLES:
        _TABLES["s"] = _lut(True)
        _TABLES["u"] = _lut(False)
    return _TABLES["s"], _TABLES["u"]


@contextlib.contextmanager
def disabled():
    """Temporarily use the reference path (for tests and comparisons)."""
    global _enabled
    old, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = old


def available() -> bool:
    if not _enabled or os.environ.get("OPTIMKIT_NO_FAST_PATH"):
        return False
    return _compile() is not None


def step(params: list[Tensor], grads: list[Tensor], ms: list[dict], vs: list[dict], *, lr: float, beta1: float,
         beta2: float, eps: float, weight_decay: float, bc1: float, bc2_sqrt: float) -> None:
    """One fused AdamW step on CPU float32 tensors with q8 moments (storage dicts), all in one call."""
    global _TINY
    if _TINY is None:
        from ..state import codecs

        _TINY = float(getattr(codecs, "_TINY", torch.finfo(torch.float32).tiny))
    (smap, smid, slut), (umap, umid, ulut) = _tables()
    arrays, sizes, offsets = _pack(params, [params, grads, [m["codes"] for m in ms], [m["absmax"] for m in ms],
                                            [v["codes"] for v in vs], [v["absmax"] for v in vs]])
    _lib.adamw_q8_step(len(params), *arrays, sizes, offsets, *_hyper(lr, beta1, beta2, eps, weight_decay, bc1,
                                                                      bc2_sqrt),
                       smap.data_ptr(), umap.data_ptr(), slut.data_ptr(), smid.data_ptr(),
                       ulut.data_ptr(), umid.data_ptr(), _TINY)


def step_fp32(params: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], *, lr: float,
              beta1: float, beta2: float, eps: float, weight_decay: float, bc1: float, bc2_sqrt: float) -> None:
    """The same fused AdamW step with float32 moments, all tensors in one call."""
    arrays, sizes, offsets = _pack(params, [params, grads, ms, vs])
    _lib.adamw_f32_step(len(params), *arrays, sizes, offsets,
                        *_hyper(lr, beta1, beta2, eps, weight_decay, bc1, bc2_sqrt))


def _pack(params: list[Tensor], lists: list[list[Tensor]]):
    """C arrays for the kernels: one array of data pointers per tensor list,
    the element counts, and each tensor's first block in the global block range."""
    k = len(params)
    arrays = []
    for tensors in lists:
        arr = (ctypes.c_void_p * k)(*[t.data_ptr() for t in tensors])
        arrays.append(arr)
    sizes = (ctypes.c_int64 * k)(*[p.numel() for p in params])
    offsets = (ctypes.c_int64 * (k + 1))()
    total = 0
    for i, n in enumerate(sizes):
        offsets[i] = total
        total += -(-n // 256)
    offsets[k] = total
    return arrays, sizes, offsets


def _hyper(lr, beta1, beta2, eps, weight_decay, bc1, bc2_sqrt) -> tuple:
    """The per-step scalars both kernels take, computed as the reference path does."""
    w = 1 - beta1
    return (1 - lr * weight_decay, w, beta1, int(w < 0.5), beta2, 1 - beta2, bc2_sqrt, eps, -lr * (1 / bc1))
