"""CPU fast paths: AdamW with q8 (block-wise dynamic 8-bit) moments in one pass,
and (for ``compile=True``) with float32 moments.

The tensor-op path (decode -> AdamW transforms -> encode) needs several
passes over memory and a binary search per element. This kernel, written in
C and compiled once per machine with the system C compiler (OpenMP,
auto-vectorized), does the whole step per block of 256 elements while the
block is in cache: decode, update, absmax, nearest-code encode (the map's
region from the float's exponent and one comparison, the cell from an affine
function of the value; a table of midpoints only where the value lies within
a tolerance of one), or the reference's stochastic rounding (same dither, same
encode counter) for ``state_rounding="stochastic"``. It reproduces the
reference path's float32 operations in the same order; tests check that
parameters and decoded states agree.

Used by Adam/AdamW when every condition in :func:`eligible` holds; otherwise
the facade takes the reference path. ``OPTIMKIT_NO_FAST_PATH=1`` (or
:func:`disabled`) turns it off.
"""
from __future__ import annotations

import array
import contextlib
import ctypes
import hashlib
import itertools
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
            f.argtypes = [I64, P, P, P, P, P, P, P, P, F, F, F, I, F, F, F, F, F, P, P, P, P, F, P, P]
            enc = lib.q8_encode
            enc.restype = None
            enc.argtypes = [P, I64, F, P, P, I, I]
            sr = lib.q8_encode_sr
            sr.restype = None
            sr.argtypes = [P, I64, F, P, P, P, I, I64, I64, I]
            f32 = lib.adamw_f32_step
            f32.restype = None
            f32.argtypes = [I64, P, P, P, P, P, P, F, F, F, I, F, F, F, F, F]
            _lib = lib
        except (OSError, subprocess.SubprocessError) as e:  # no compiler or no OpenMP: reference path
            warnings.warn(f"optimkit: q8 CPU fast path unavailable ({e}); using the tensor-op path")
            _failed = True
        return _lib


# Layout of an encoder table: see ENC_* in q8_adamw.c.
_THR, _BASE, _INV, _BIAS, _CMAX, _NEAR, _VBIAS, _VCLAMP, _MID, _SIZE = 0, 32, 64, 80, 96, 112, 128, 160, 192, 448
_NEAR_TOL = 1e-4  # how far from an integer t must be for floor(t) to be trusted (in cells)


def _encoder(signed: bool) -> tuple[Tensor, Tensor]:
    """(map values, encoder table) for the 8-bit dynamic map.

    The half map (zero, then the non-negative codes) splits into regions: the
    zero code, one per decade (a uniform grid of cells), and 1. Region r
    starts at the midpoint below its first code, and every binade ``[2**e,
    2**(e+1))`` holds at most one region start, so one comparison finds the
    region. In a decade, ``t = a * inv + bias`` is ``first + (a - start) /
    width``: code ``first + j`` sits at ``t = first + j + 0.5`` and the
    midpoints between codes at integers (the map's float32 values are within
    about 1e-5 of that grid, checked here), so ``floor(t)`` (clamped to the
    region) is the nearest code unless ``t`` is within ``_NEAR_TOL`` of an
    integer. The one-code regions have ``t`` fixed at ``code + 0.25``.

    The vector encoder computes ``y * inv + vbias`` on the signed ``y``:
    ``127 + t`` for ``y >= 0`` and ``128 - t`` for ``y < 0`` with the signed
    map (codes of the full map, checked here the same way), plus
    ``_NEAR_TOL``, bounded by ``vclamp``."""
    values = maps.dynamic_map(signed, 8)
    half = [v for v in values if v >= 0.0]                      # 0, decades ..., 1
    mids = maps.midpoints(tuple(half))
    decades = 7
    tiny = 2.0 ** -40                                           # a * tiny vanishes next to the bias
    regions = [(0, 1, 0.0, 0.0)]                                # (first code, cells, start, width)
    first = 1
    for d in range(decades):
        cells = 2 ** d if signed else 2 ** (d + 1)
        scale = 10.0 ** (d - decades + 1)
        regions.append((first, cells, 0.1 * scale, 0.9 * scale / cells))
        first += cells
    if first != len(half) - 1:  # pragma: no cover - a property of the map
        raise AssertionError("unexpected map layout")
    regions.append((first, 1, 0.0, 0.0))
    starts = [mids[f - 1] for f, *_ in regions[1:]]           # region r + 1 starts here
    table = torch.zeros(_SIZE, dtype=torch.float32)
    ints = table.view(torch.int32)
    for i in range(32):
        lo, hi = (0.0 if i == 0 else 2.0 ** (i - 31)), 2.0 ** (i - 30)
        inside = [t for t in starts if lo <= t < hi]
        if len(inside) > 1:  # pragma: no cover - a property of the map
            raise AssertionError("a binade holds two region starts")
        ints[_BASE + i] = sum(t < lo for t in starts)
        table[_THR + i] = inside[0] if inside else float("nan")
    for r in range(16):  # regions past the last repeat it
        f, cells, start, width = regions[min(r, len(regions) - 1)]
        if width:
            inv = torch.tensor(1.0 / width, dtype=torch.float32)
            bias = torch.tensor(f - start * float(inv), dtype=torch.float32)
        else:
            inv, bias = torch.tensor(tiny), torch.tensor(f + 0.25)
        cmax = f + cells - 1
        table[_INV + r], table[_BIAS + r], ints[_CMAX + r] = inv, bias, cmax
        zero = 127 if signed else 0
        # (sign of y, bias, bound); the bias includes the shift by the tolerance (see codes16)
        vbias = [(1.0, float(bias) + zero + _NEAR_TOL, zero + cmax)]
        if signed:
            vbias.append((-1.0, 128.0 - float(bias) + _NEAR_TOL, zero - min(cmax, zero)))
        for half_index, (sign, vb, bound) in enumerate(vbias):
            vb = torch.tensor(vb, dtype=torch.float32)
            table[_VBIAS + 16 * half_index + r], ints[_VCLAMP + 16 * half_index + r] = vb, bound
            if width:  # where the kernels put this region's inner midpoints: integers, within the tolerance
                m = torch.tensor(mids[f:f + cells - 1], dtype=torch.float64)
                k = torch.arange(f + 1, f + cells)
                for sg, b, at in ((1.0, bias, k), (sign, vb, zero + sign * k + (sign < 0) + _NEAR_TOL)):
                    t = (sg * m * float(inv) + float(b)).to(torch.float32).double()
                    if t.numel() and float((t - at).abs().max()) > _NEAR_TOL / 4:  # pragma: no cover
                        raise AssertionError("map values too far from their grid")
    table[_NEAR] = _NEAR_TOL
    table[_MID:_MID + len(mids)] = torch.tensor(mids, dtype=torch.float32)
    table[_MID + len(mids):] = float("nan")
    return torch.tensor(values, dtype=torch.float32), table


_TABLES: dict = {}


def _tables():
    if not _TABLES:
        _TABLES["s"] = _encoder(True)
        _TABLES["u"] = _encoder(False)
    return _TABLES["s"], _TABLES["u"]


def _encoder_io(y: Tensor) -> tuple[Tensor, Tensor]:
    """Flat contiguous float32 input and a uint8 output for the encoder entry points."""
    if _compile() is None:
        raise RuntimeError("the q8 kernel is not available")
    y = y.detach().to(torch.float32).contiguous().view(-1)
    return y, torch.empty(y.numel(), dtype=torch.uint8)


def encode_codes(y: Tensor, signed: bool, scale: float = 1.0, simd: bool = True) -> Tensor:
    """The kernel's nearest-code encoder alone: uint8 codes of ``y / scale`` (for tests)."""
    y, out = _encoder_io(y)
    (_, senc), (_, uenc) = _tables()
    _lib.q8_encode(y.data_ptr(), y.numel(), scale, out.data_ptr(), (senc if signed else uenc).data_ptr(),
                   int(signed), int(simd))
    return out


def encode_codes_stochastic(y: Tensor, signed: bool, seed: int, scale: float = 1.0, index0: int = 0,
                            simd: bool = True) -> Tensor:
    """The kernel's stochastic encoder alone: uint8 codes of ``y / scale``, ``y[k]`` being
    element ``index0 + k`` of its tensor, at encode number ``seed`` (for tests)."""
    y, out = _encoder_io(y)
    (smap, senc), (umap, uenc) = _tables()
    _lib.q8_encode_sr(y.data_ptr(), y.numel(), scale, out.data_ptr(), (smap if signed else umap).data_ptr(),
                      (senc if signed else uenc).data_ptr(), int(signed), seed, index0, int(simd))
    return out


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


class Packed:
    """The C-side view of a fixed list of state tensors (data pointers, sizes, block
    offsets), built once and reused while the same tensors are stepped: the
    pointer packing cost about 0.1 ms a step on 87 tensors.

    ``tensors`` holds every tensor whose address is packed, so none can be freed
    (and its address reused) while the plan lives."""

    def __init__(self, sizes: list[int], lists: list[list[Tensor]], seeds: list[list[Tensor | None]] = ()):
        self.n = len(sizes)
        self._sizes = array.array("q", sizes)
        self._offsets = array.array("q", itertools.accumulate((-(-n // 256) for n in sizes), initial=0))
        self._arrays = [array.array("Q", [t.data_ptr() for t in ts]) for ts in lists]
        self._seeds = [array.array("Q", [0 if t is None else t.data_ptr() for t in ts])
                       if any(t is not None for t in ts) else None for ts in seeds]
        self.tensors = [t for ts in (*lists, *seeds) for t in ts if t is not None]
        self.sizes, self.offsets = self._sizes.buffer_info()[0], self._offsets.buffer_info()[0]
        self.pointers = [a.buffer_info()[0] for a in self._arrays]
        self.seed_pointers = [None if a is None else a.buffer_info()[0] for a in self._seeds]


def _pointers(tensors: list[Tensor]):
    a = array.array("Q", [t.data_ptr() for t in tensors])
    return a, a.buffer_info()[0]


def pack_q8(params: list[Tensor], ms: list[dict], vs: list[dict]) -> Packed:
    """A :class:`Packed` of q8 moment storages (dicts with ``codes``, ``absmax`` and,
    for stochastic rounding, ``seed``) for :func:`step`."""
    return Packed([p.numel() for p in params],
                  [[m["codes"] for m in ms], [m["absmax"] for m in ms], [v["codes"] for v in vs],
                   [v["absmax"] for v in vs]],
                  [[m.get("seed") for m in ms], [v.get("seed") for v in vs]])


def pack_fp32(params: list[Tensor], ms: list[Tensor], vs: list[Tensor]) -> Packed:
    """A :class:`Packed` of float32 moments for :func:`step_fp32`."""
    return Packed([p.numel() for p in params], [ms, vs])


def step(params: list[Tensor], grads: list[Tensor], ms: list[dict] | Packed, vs: list[dict] | None = None, *,
         lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, bc1: float,
         bc2_sqrt: float) -> None:
    """One fused AdamW step on CPU float32 tensors with q8 moments, all in one call.

    ``ms``/``vs``: the moments' storage dicts, or ``ms`` a :class:`Packed` of them
    (:func:`pack_q8`) and ``vs`` None. A storage dict with a ``seed`` (an int64 0-d
    CPU tensor) is rounded stochastically at that encode number, as the reference
    codec does, and its seed is advanced by one."""
    global _TINY
    if _TINY is None:
        from ..state import codecs

        _TINY = float(getattr(codecs, "_TINY", torch.finfo(torch.float32).tiny))
    packed = ms if isinstance(ms, Packed) else pack_q8(params, ms, vs)
    (smap, senc), (umap, uenc) = _tables()
    pa, pp = _pointers(params)
    ga, gp = _pointers(grads)
    _lib.adamw_q8_step(packed.n, pp, gp, *packed.pointers, packed.sizes, packed.offsets,
                       *_hyper(lr, beta1, beta2, eps, weight_decay, bc1, bc2_sqrt),
                       smap.data_ptr(), umap.data_ptr(), senc.data_ptr(), uenc.data_ptr(), _TINY,
                       *packed.seed_pointers)


def step_fp32(params: list[Tensor], grads: list[Tensor], ms: list[Tensor] | Packed, vs: list[Tensor] | None = None,
              *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, bc1: float,
              bc2_sqrt: float) -> None:
    """The same fused AdamW step with float32 moments (or a :func:`pack_fp32` of them), all in one call."""
    packed = ms if isinstance(ms, Packed) else pack_fp32(params, ms, vs)
    pa, pp = _pointers(params)
    ga, gp = _pointers(grads)
    _lib.adamw_f32_step(packed.n, pp, gp, *packed.pointers, packed.sizes, packed.offsets,
                        *_hyper(lr, beta1, beta2, eps, weight_decay, bc1, bc2_sqrt))


def _hyper(lr, beta1, beta2, eps, weight_decay, bc1, bc2_sqrt) -> tuple:
    """The per-step scalars both kernels take, computed as the reference path does."""
    w = 1 - beta1
    return (1 - lr * weight_decay, w, beta1, int(w < 0.5), beta2, 1 - beta2, bc2_sqrt, eps, -lr * (1 / bc1))
