"""State codecs: how one optimizer state tensor is stored between steps.

A codec turns an fp32 state tensor ``x`` (any shape) into a dict of storage
tensors and back. The optimizer decodes each state before the update rule and
encodes it after, so the rule only ever sees fp32 tensors::

    storage = codec.empty(shape, device, signed)       # zero-filled, decodes to zeros
    x = codec.decode(storage, shape, signed)           # fp32 working tensor
    ... update x ...
    codec.encode_(x, storage, signed)                  # write back in place

``signed`` says whether the state can be negative (Adam's first moment) or
is known to be non-negative (Adam's second moment); the quantized codecs use
a different map for each. An unsigned codec must only be given values
``>= 0``, and it keeps the code of zero for exact zeros: a positive value
never decodes to 0 (it takes the smallest positive code instead), because
update rules divide by such states.

Every operation is written with plain tensor ops (no Python loops over
blocks, no ``.item()``, no data-dependent Python branches), so the same code
runs on CPU and CUDA and traces under ``torch.compile``; the only Python
branches depend on shapes and on the codec's settings.

Formats (``B`` = block size, ``n`` = numel, ``nb = ceil(n / B)``), storage
keys and bytes per element:

* ``fp32``: ``value`` float32 (shape); 4.
* ``bf16``: ``value`` bfloat16 (shape); 2.
* ``q8``: ``codes`` uint8 (shape), ``absmax`` float32 (nb), B = 256; 1 + 4/256.
* ``q4``: ``codes`` uint8 (ceil(n/2), two per byte), ``absmax`` float32 (nb),
  B = 128; 0.5 + 4/128.
* ``fp8``: ``codes`` float8_e4m3fn (shape), ``absmax`` float32 (nb), B = 256,
  plus ``expand`` float32 (nb) with ``dre=True``; 1 + 4/256 (+ 4/256).

A tensor whose numel is not a multiple of ``B`` is zero-padded to whole
blocks while it is encoded; the padding is never stored (the last block's
absmax is taken over its real elements only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .maps import device_table, dynamic_map

__all__ = [
    "Codec", "FP32", "BF16", "Q8", "Q4", "FP8", "CODECS", "get_codec", "available_codecs",
    "stochastic_round_bf16",
]

_TINY = torch.finfo(torch.float32).tiny
E4M3_MAX = 448.0
#: Smallest normal float8_e4m3fn number (2**-6).
E4M3_MIN_NORMAL = 2.0 ** -6
#: Smallest positive (subnormal) float8_e4m3fn number (2**-9).
E4M3_MIN_SUBNORMAL = 2.0 ** -9


def _numel(shape) -> int:
    return math.prod(shape)


def _blocks(x: Tensor, block: int) -> Tensor:
    """``x`` flattened to fp32, zero-padded to whole blocks, as ``(nb, block)``."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, block)


def _unblock(blocks: Tensor, shape, out: Tensor | None) -> Tensor:
    """Inverse of :func:`_blocks`: drop the padding and restore ``shape``."""
    n = _numel(shape)
    flat = blocks.reshape(-1)
    if flat.numel() != n:
        flat = flat[:n]
    res = flat.view(shape)
    if out is not None:
        out.copy_(res)
        return out
    return res


def _pad_to(flat: Tensor, size: int) -> Tensor:
    return F.pad(flat, (0, size - flat.numel())) if flat.numel() != size else flat


@dataclass(frozen=True)
class Codec:
    """Base class. Subclasses set ``name`` and implement the three methods.

    Codecs are immutable value objects (hashable, comparable), so they can be
    part of a compiled kernel's cache key.
    """

    name: ClassVar[str] = ""
    #: elements sharing one scale (0 when there is no scale)
    block: ClassVar[int] = 0

    # ---- interface
    def empty(self, shape, device=None, signed: bool = True) -> dict[str, Tensor]:
        """Storage for a state of ``shape``; zero-filled, so it decodes to zeros."""
        raise NotImplementedError

    def encode_(self, x: Tensor, storage: dict[str, Tensor], signed: bool = True) -> None:
        """Write ``x`` (any float dtype, ``storage``'s shape) into ``storage`` in place."""
        raise NotImplementedError

    def decode(self, storage: dict[str, Tensor], shape, signed: bool = True,
               out: Tensor | None = None) -> Tensor:
        """The fp32 tensor of ``shape`` stored in ``storage`` (written to ``out`` if given)."""
        raise NotImplementedError

    # ---- accounting
    @property
    def bytes_per_element(self) -> float:
        """Storage bytes per state element for large tensors, scales included."""
        raise NotImplementedError

    def nbytes(self, shape, signed: bool = True) -> int:
        """Exact storage bytes for one state of ``shape`` (padding included)."""
        return sum(t.numel() * t.element_size()
                   for t in self.empty(shape, "meta", signed).values())

    # ---- conveniences
    def encode(self, x: Tensor, signed: bool = True) -> dict[str, Tensor]:
        """New storage holding ``x``."""
        storage = self.empty(x.shape, x.device, signed)
        self.encode_(x, storage, signed)
        return storage

    def roundtrip(self, x: Tensor, signed: bool = True) -> Tensor:
        """``decode(encode(x))``: what the optimizer sees after one store."""
        return self.decode(self.encode(x, signed), x.shape, signed)


# --------------------------------------------------------------------------- fp32 / bf16
@dataclass(frozen=True)
class FP32(Codec):
    """Plain float32 storage (the identity codec).

    ``decode`` returns the storage tensor itself (no copy) when ``out`` is not
    given, and ``encode_`` of that same tensor is a no-op, so an update rule
    that works in place on the decoded tensor costs nothing extra.
    """

    name: ClassVar[str] = "fp32"

    def empty(self, shape, device=None, signed=True):
        return {"value": torch.zeros(shape, dtype=torch.float32, device=device)}

    def encode_(self, x, storage, signed=True):
        value = storage["value"]
        if x is not value:
            value.copy_(x)

    def decode(self, storage, shape, signed=True, out=None):
        value = storage["value"]
        if out is not None:
            out.copy_(value)
            return out
        return value

    @property
    def bytes_per_element(self):
        return 4.0


def stochastic_round_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round float32 ``x`` to bfloat16 stochastically (unbiased).

    A float32 whose low 16 bits (the part bfloat16 drops) are ``f`` rounds
    away from zero with probability ``f / 2**16`` and towards zero otherwise,
    so ``E[round(x)] = x`` for every finite ``x`` in bfloat16's range. This is
    done on the bit pattern: add a uniform random integer in ``[0, 2**16)``
    and clear the low 16 bits. Infinities stay infinite and NaN stays NaN.
    """
    x = x.float()
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # -65536 == 0xFFFF0000
    rounded = torch.where(torch.isnan(x), x, rounded)
    return rounded.to(torch.bfloat16)


@dataclass(frozen=True)
class BF16(Codec):
    """bfloat16 storage: round to nearest even, or stochastic rounding when
    ``stochastic=True`` (unbiased; draws from the global generator, so a
    compiled step does not reproduce an eager one bit for bit)."""

    name: ClassVar[str] = "bf16"
    stochastic: bool = False

    def empty(self, shape, device=None, signed=True):
        return {"value": torch.zeros(shape, dtype=torch.bfloat16, device=device)}

    def encode_(self, x, storage, signed=True):
        if self.stochastic:
            storage["value"].copy_(stochastic_round_bf16(x))
        else:
            storage["value"].copy_(x)

    def decode(self, storage, shape, signed=True, out=None):
        value = storage["value"]
        if out is not None:
            out.copy_(value)
            return out
        return value.float()

    @property
    def bytes_per_element(self):
        return 2.0


# --------------------------------------------------------------------------- q8 / q4
#: tensors with fewer elements encode with ``torch.bucketize`` (see :func:`_nearest_codes`)
STRUCTURAL_MIN_NUMEL = 1 << 16
_LOG10_2 = math.log10(2.0)
_LOG2_10 = math.log2(10.0)


def _candidate_codes(y: Tensor, kind: str, signed: bool, bits: int) -> Tensor:
    """An index within one of the nearest map entry, from the map's structure
    (elementwise arithmetic only, so it fuses into the step's kernel).

    Dynamic map with ``D = bits - 1`` decades: decade ``i`` holds ``c_i`` equal
    cells of ``[10^(i-D), 10^(i-D+1)]`` (``c_i = 2^i`` signed, ``2^(i+1)``
    unsigned), one entry at each cell's centre, sorted after ``0`` (unsigned:
    ``[0, decade 0, ..., decade D-1, 1]``; signed: negatives mirrored below 0).
    ``|y|``'s decade comes from ``log2`` and its cell from an affine map; a
    rounding slip near an edge moves the result to the adjacent entry, which
    the midpoint compare of :func:`_nearest_codes` corrects. Linear map
    ``{k / n}``, ``k = 1..n``: ``round(y n) - 1``.
    """
    if kind == "linear":
        n = 2 ** bits
        return (y * n).round().sub(1).clamp(0, n - 1).to(torch.int64)
    d = bits - 1
    a = y.abs()
    i = (torch.floor(torch.log2(a) * _LOG10_2) + d).clamp(0, d - 1)  # decade (a = 0 -> -inf -> 0)
    cells = torch.exp2(i) if signed else torch.exp2(i + 1)
    start = torch.exp2((i - d) * _LOG2_10)                             # decade i spans [start, 10 start]
    j = torch.minimum(torch.floor((a / start - 1.0) * (cells / 9.0)).clamp_min(0), cells - 1)
    if not signed:
        return (cells - 1 + j).to(torch.int64)                   # 1 + sum_{i' < i} 2^(i'+1) = 2^(i+1) - 1
    zero = 2 ** d - 1                                            # index of the 0 entry
    k = cells + j                                                # rank among the positives, from 1
    return torch.where(y >= 0, zero + k, zero - k).to(torch.int64)


def _nearest_codes(y: Tensor, kind: str, signed: bool, bits: int) -> Tensor:
    """Index of the nearest map entry for each element of ``y`` (int64), exactly
    what ``torch.bucketize(y, midpoints, right=True)`` gives (a value on a
    midpoint goes to the upper entry). Large tensors, compiled or (8-bit maps)
    eager, take :func:`_structural_codes`: aten's CPU bucketize took 90% of a
    compiled q8 step (AdamW q8 compiled, 4M params: 39 -> 7.5 ns/param; q4
    14.5 -> 10.2; eager q8 47 -> 30). Small tensors and eager 4-bit codes keep
    ``bucketize``: one op, faster there and ~40% less to compile."""
    if y.numel() < STRUCTURAL_MIN_NUMEL or (bits < 8 and not torch.compiler.is_compiling()):
        return torch.bucketize(y, device_table(kind + "_mid", signed, bits, y.device), right=True)
    return _structural_codes(y, kind, signed, bits)


def _structural_codes(y: Tensor, kind: str, signed: bool, bits: int) -> Tensor:
    """The nearest codes as :func:`_nearest_codes`: the structural candidate,
    moved by one where a compare with its neighbouring midpoints says so
    (elementwise, plus two lookups in the small midpoint table)."""
    mids = device_table(kind + "_mid", signed, bits, y.device)
    last = mids.numel()  # entries - 1
    c = _candidate_codes(y, kind, signed, bits).clamp(0, last)  # NaN: any valid code, never a bad index
    up = (y >= mids[c.clamp(max=last - 1)]) & (c < last)
    down = (y < mids[(c - 1).clamp(min=0)]) & (c > 0)
    return c + up.long() - down.long()


#: smallest positive entry of the unsigned dynamic map, by bits (a Python float, computed
#: at import so that a compiled step never traces the map's construction)
_SMALLEST_UNSIGNED = {bits: dynamic_map(False, bits)[1] for bits in (4, 8)}


def _keep_positive(y: Tensor, smallest: float) -> Tensor:
    """Scaled values of a non-negative state, each strictly positive one raised to at
    least ``smallest``, the smallest positive entry of the map (or format), so that
    rounding (nearest or stochastic) can never give it the code of zero.

    The zero code is thereby reserved for exact zeros (a zero element, an all-zero
    block). Optimizers divide by such states (Adam's ``m / (sqrt(v) + eps)``): an
    element whose ``v`` is tiny next to its block's absmax would otherwise decode
    to ``v = 0`` while its first moment keeps a non-zero code, and its next step
    would be ``m / eps`` (on digits, weights of rarely lit pixels ended up to 100
    away from an fp32 run). For the maps this gives the codes of rounding first
    and then moving a positive value's zero code to the next one; it is done on
    the values because Inductor (torch 2.13, CPU) dropped the zero-padded last
    block's stores when the codes themselves were adjusted after the structural
    encoder. NaN stays NaN (``NaN > 0`` is false). Elementwise."""
    return torch.where(y > 0, y.clamp_min(smallest), y)


def _absmax_scaled(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Blocks of ``x`` divided by their absmax (all-zero blocks stay zero), and the absmax."""
    xb = _blocks(x, block)
    absmax = xb.abs().amax(dim=1)
    y = xb / absmax.clamp_min(_TINY).unsqueeze(1)
    return y, absmax


def _dither(n: int, seed: Tensor, device) -> Tensor:
    """``n`` uniforms in [0, 1) for the encode number ``seed`` (an int64 0-d tensor).

    Element ``i`` gets ``u_i(t) = frac(h(i) + t * phi)``: a fixed pseudo-random
    offset ``h(i)`` (an integer hash of the index) advanced by the golden ratio
    ``phi`` at each encode ``t`` (a Weyl sequence, in 32-bit fixed point). Over
    the offsets every ``u_i(t)`` is uniform, so rounding with it is unbiased;
    along ``t`` the sequence is low-discrepancy, so an element's rounding errors
    over consecutive steps cancel instead of accumulating like independent
    noise in an EMA (measured: Lion q4 on digits +7.1% -> +2.1% held-out loss
    over fp32). Integer int64 arithmetic that never overflows: identical on every
    device and under torch.compile."""
    mask = 0xFFFFFFFF
    x = (torch.arange(n, dtype=torch.int64, device=device) * 1103515245 + 0x5BD1E995) & mask
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & mask
    x = x ^ (x >> 16)
    x = (x + (seed & 0xFFFFFF) * 0x9E3779B9) & mask  # + t * phi * 2**32 (t modulo 2**24)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


@dataclass(frozen=True)
class _Blockwise(Codec):
    """Shared machinery of the map-based block-wise formats (q8, q4).

    ``stochastic=True`` rounds each value to one of its two neighbouring map
    entries with probabilities that make the decoded value unbiased, instead of
    to the nearest: an exponential moving average whose per-step increment is
    below half a code step then still moves in expectation (nearest rounding
    loses such increments every step). The dither is a function of the element
    index and an encode counter kept in the storage (``seed``), low-discrepancy
    in time (see :func:`_dither`), so runs are deterministic and resume bit-exactly.
    """

    bits: ClassVar[int] = 8
    stochastic: bool = False

    def _kind(self, signed: bool) -> str:
        return "dynamic"

    def _warm(self, device, signed: bool) -> None:
        """Create the map tables on ``device`` now (eagerly), not inside a compiled step."""
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:<current>"
        if device.type != "meta":
            kind = self._kind(signed)
            device_table(kind, signed, self.bits, device)
            device_table(kind + "_mid", signed, self.bits, device)

    def empty(self, shape, device=None, signed=True):
        self._warm(device, signed)
        nb = -(-_numel(shape) // self.block)
        out = {"codes": torch.zeros(shape, dtype=torch.uint8, device=device),
               "absmax": torch.zeros(nb, dtype=torch.float32, device=device)}
        if self.stochastic:
            out["seed"] = torch.zeros((), dtype=torch.int64, device=device)
        return out

    def _codes(self, x: Tensor, signed: bool, storage: dict | None = None) -> tuple[Tensor, Tensor]:
        y, absmax = _absmax_scaled(x, self.block)
        if not signed and self._kind(signed) == "dynamic":  # the unsigned dynamic map starts at 0
            y = _keep_positive(y, _SMALLEST_UNSIGNED[self.bits])
        return self._rounded_codes(y, signed, storage), absmax

    def _rounded_codes(self, y: Tensor, signed: bool, storage: dict | None) -> Tensor:
        """Codes of the scaled blocks ``y``: nearest, or stochastic."""
        if not self.stochastic:
            return _nearest_codes(y, self._kind(signed), signed, self.bits)
        values = device_table(self._kind(signed), signed, self.bits, y.device)
        top = values.numel() - 1
        # The last entry <= y by binary search: deriving it from the structural nearest
        # code (one more table lookup) miscompiled under Inductor on CPU for the
        # elements of a zero-padded last block (torch 2.13; they came out as code 0).
        lower = (torch.bucketize(y, values, right=True) - 1).clamp(0, top - 1)
        lo, hi = values[lower], values[lower + 1]
        p_up = ((y - lo) / (hi - lo)).clamp(0.0, 1.0)
        seed = storage["seed"]
        u = _dither(y.numel(), seed, y.device).view_as(y)
        seed.add_(1)
        return lower + (u < p_up).long()

    def _values(self, codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
        """Blocks of decoded values from unpacked int codes ``(nb * block,)``."""
        qmap = device_table(self._kind(signed), signed, self.bits, codes.device)
        return qmap[codes].view(-1, self.block) * absmax.unsqueeze(1)

    def encode_(self, x, storage, signed=True):
        codes, absmax = self._codes(x, signed, storage)
        n = x.numel()
        storage["codes"].view(-1).copy_(codes.view(-1)[:n])
        storage["absmax"].copy_(absmax)

    def decode(self, storage, shape, signed=True, out=None):
        absmax = storage["absmax"]
        codes = _pad_to(storage["codes"].reshape(-1), absmax.numel() * self.block)
        return _unblock(self._values(codes.long(), absmax, signed), shape, out)

    @property
    def bytes_per_element(self):
        return self.bits / 8 + 4 / self.block


@dataclass(frozen=True)
class Q8(_Blockwise):
    """Block-wise dynamic 8-bit quantization ("8-bit Optimizers via Block-wise
    Quantization", Dettmers et al. 2022; the ``bitsandbytes`` format with
    block size 256).

    Per block of 256 elements: ``absmax = max|x|`` (float32) and, per element,
    the index of the dynamic-map entry nearest to ``x / absmax`` (signed map
    for signed states, unsigned map otherwise). Decoding is
    ``map[code] * absmax``. Zeros and a positive block maximum are stored
    exactly; the signed map has no ``-1``, so a negative block maximum comes
    back as ``0.993 * absmax``. Unsigned states: a positive value below half the
    smallest positive entry (``3.25e-7``) is stored as that entry, not as 0
    (bitsandbytes' and torchao's nearest code), see :func:`_keep_positive`.
    """

    name: ClassVar[str] = "q8"
    block: ClassVar[int] = 256
    bits: ClassVar[int] = 8


@dataclass(frozen=True)
class Q4(_Blockwise):
    """4-bit states ("Memory Efficient Optimizers with 4-bit States", Li et al.
    2023; the ``torchao.optim.AdamW4bit`` format), block size 128, two codes
    per byte (the even-indexed element in the high nibble).

    Signed states use the 4-bit dynamic map (3 exponent bits:
    ``0, ±0.0055, ±0.0325, ±0.0775, ±0.2125, ±0.4375, ±0.6625, ±0.8875, 1``);
    unsigned states use the zero-free linear map ``{1/16, ..., 16/16}``,
    so a non-negative state never decodes to zero unless its whole block is
    zero (then absmax is 0 and the block decodes to exact zeros).
    """

    name: ClassVar[str] = "q4"
    block: ClassVar[int] = 128
    bits: ClassVar[int] = 4

    def _kind(self, signed: bool) -> str:
        return "dynamic" if signed else "linear"

    def empty(self, shape, device=None, signed=True):
        self._warm(device, signed)
        n = _numel(shape)
        nb = -(-n // self.block)
        out = {"codes": torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device),
               "absmax": torch.zeros(nb, dtype=torch.float32, device=device)}
        if self.stochastic:
            out["seed"] = torch.zeros((), dtype=torch.int64, device=device)
        return out

    def encode_(self, x, storage, signed=True):
        codes, absmax = self._codes(x, signed, storage)  # (nb, block), block is even
        pairs = codes.view(-1, 2)
        packed = (pairs[:, 0] << 4) | pairs[:, 1]
        dst = storage["codes"]
        dst.copy_(packed[:dst.numel()])
        storage["absmax"].copy_(absmax)

    def decode(self, storage, shape, signed=True, out=None):
        absmax = storage["absmax"]
        packed = _pad_to(storage["codes"], absmax.numel() * self.block // 2).long()
        codes = torch.stack((packed >> 4, packed & 15), dim=1).view(-1)
        return _unblock(self._values(codes, absmax, signed), shape, out)


# --------------------------------------------------------------------------- fp8
@dataclass(frozen=True)
class FP8(Codec):
    """float8 (E4M3, ``float8_e4m3fn``) storage with a per-block scale, block 256.

    Plain (``dre=False``, the ``torchao.optim.AdamWFp8`` format):
    ``code = fp8(448 * x / absmax)``, decoded as ``code / 448 * absmax``.

    Dynamic range expansion (``dre=True``, "COAT: Compressing Optimizer states
    and Activation for Memory-Efficient FP8 Training", Xi et al. 2024): per
    block, with ``mx``/``mn`` the largest/smallest *non-zero* magnitude and
    ``R = mx / mn``, the exponent ``k = log(dre_range) / log(R)`` stretches
    (``k > 1``) or squeezes (``k < 1``) the block's range onto the FP8 range
    ``dre_range``. COAT stores ``f(x) = sign(x) (|x| / sqrt(mx mn))**k``
    scaled by its block max; the centring factor cancels in that scaling, so
    this codec stores the equivalent ``code = fp8(448 sign(x) (|x|/mx)**k)``
    with two scalars per block (``absmax = mx`` and ``expand = k``) and
    decodes ``sign(code) mx (|code|/448)**(1/k)``. The smallest non-zero
    magnitude lands on ``448 / dre_range``.

    Choices where the paper is silent (documented, tested):

    * ``dre_range`` defaults to ``448 / 2**-6`` (the normal E4M3 range), so
      every non-zero element is stored as a normal FP8 number (COAT's kernel
      uses ``448**2 / 2``, which puts the block minimum among subnormals).
    * ``k`` is not rounded (COAT's kernel floors it to multiples of 1/16) and
      is capped at ``max_expand`` (64) so that ``R`` close to 1 stays finite.
    * Zeros are left out of ``mn`` (COAT includes them with a 1e-20 floor);
      zeros are stored exactly.
    * All-zero block: ``absmax = 0``, ``k = 1``; decodes to zeros.
      ``R == 1`` (all non-zero magnitudes equal): ``k = 1``; exact.
      ``R`` beyond float32's range: ``log R`` is taken as ``log mx - log mn``.
    * The FP8 sign bit is spent even for unsigned states.
    * Unsigned states: a positive value that would round to the FP8 zero is
      stored as the smallest subnormal, ``2**-9`` (so it decodes to
      ``2**-9 / 448 * absmax``, or with DRE ``mx (2**-9 / 448)**(1/k)``); zero
      is reserved for exact zeros, as in the q8 unsigned map.
    """

    name: ClassVar[str] = "fp8"
    block: ClassVar[int] = 256
    dre: bool = False
    dre_range: float = E4M3_MAX / E4M3_MIN_NORMAL
    max_expand: float = 64.0

    def __post_init__(self):
        if not self.dre_range > 1.0:
            raise ValueError(f"dre_range must be > 1, got {self.dre_range}")
        if not self.max_expand > 0.0:
            raise ValueError(f"max_expand must be > 0, got {self.max_expand}")

    def empty(self, shape, device=None, signed=True):
        nb = -(-_numel(shape) // self.block)
        st = {"codes": torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device),
              "absmax": torch.zeros(nb, dtype=torch.float32, device=device)}
        if self.dre:
            st["expand"] = torch.ones(nb, dtype=torch.float32, device=device)
        return st

    def encode_(self, x, storage, signed=True):
        xb = _blocks(x, self.block)
        ax = xb.abs()
        absmax = ax.amax(dim=1)
        r = ax / absmax.clamp_min(_TINY).unsqueeze(1)  # in [0, 1]
        if self.dre:
            nonzero_min = torch.where(ax > 0, ax, torch.full_like(ax, math.inf)).amin(dim=1)
            ratio = absmax / nonzero_min  # 0 for all-zero blocks, >= 1 otherwise
            # a ratio past float32's range (a subnormal next to ~1e-6 or more) would give
            # log = inf, k = 0 and r**0 = 1: every element, zeros too, decoded as absmax
            log_ratio = torch.where(torch.isinf(ratio), torch.log(absmax) - torch.log(nonzero_min),
                                    torch.log(ratio.clamp_min(1.0)))
            k = torch.where(log_ratio > 0,
                            math.log(self.dre_range) / log_ratio.clamp_min(_TINY),
                            torch.ones_like(log_ratio))
            k = k.clamp(max=self.max_expand)
            r = r.pow(k.unsqueeze(1))  # 0 ** k == 0 for k > 0
            storage["expand"].copy_(k)
        z = torch.copysign(r * E4M3_MAX, xb)
        if not signed:
            # a positive value below half the smallest subnormal would cast to 0: keep it
            # positive (code 0 stays for exact zeros; see _keep_positive)
            z = _keep_positive(z, E4M3_MIN_SUBNORMAL)
        n = x.numel()
        storage["codes"].view(-1).copy_(z.view(-1)[:n])
        storage["absmax"].copy_(absmax)

    def decode(self, storage, shape, signed=True, out=None):
        absmax = storage["absmax"]
        nb = absmax.numel()
        z = _pad_to(storage["codes"].reshape(-1).float(), nb * self.block).view(nb, self.block)
        r = z.abs() / E4M3_MAX
        if self.dre:
            r = r.pow(storage["expand"].reciprocal().unsqueeze(1))
        vals = torch.copysign(r * absmax.unsqueeze(1), z)
        return _unblock(vals, shape, out)

    @property
    def bytes_per_element(self):
        return 1.0 + (8 if self.dre else 4) / self.block


#: The codecs by name, with default settings.
CODECS: dict[str, Codec] = {c.name: c for c in (FP32(), BF16(), Q8(), Q4(), FP8())}


def available_codecs() -> list[str]:
    return sorted(CODECS)


def get_codec(spec, **options) -> Codec:
    """A codec from a name (``"fp32"``, ``"bf16"``, ``"q8"``, ``"q4"``, ``"fp8"``,
    ``"fp8_dre"``), optionally with settings (``get_codec("fp8", dre=True)``),
    or a :class:`Codec` instance (returned as is)."""
    if isinstance(spec, Codec):
        if options:
            raise TypeError("options cannot be combined with a Codec instance")
        return spec
    if spec is None:
        spec = "fp32"
    if not isinstance(spec, str):
        raise TypeError(f"state precision must be a codec name or a Codec, got {type(spec).__name__}")
    name = spec.lower()
    if name == "fp8_dre":
        name, options = "fp8", {"dre": True, **options}
    if name not in CODECS:
        raise ValueError(f"unknown state precision {spec!r}; expected one of {', '.join(available_codecs())}")
    codec = CODECS[name]
    return type(codec)(**options) if options else codec
