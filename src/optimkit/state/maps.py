"""Quantization maps (code books) for the block-wise state codecs.

A map is a sorted tuple of ``2**bits`` floats in ``[-1, 1]`` (signed) or
``[0, 1]`` (unsigned). A block of state values is divided by its absolute
maximum and every value is replaced by the index of the nearest map entry.

* :func:`dynamic_map` -- the "dynamic" data type of "8-bit Optimizers via
  Block-wise Quantization" (Dettmers et al., 2022): a dynamic exponent
  followed by a linear fraction. With ``bits`` total bits it has
  ``E = bits - 1`` decades: decade ``i`` (``i = 0 .. E-1``) holds the
  midpoints of a uniform grid on ``[0.1, 1]`` with ``2**i`` cells (signed)
  or ``2**(i+1)`` cells (unsigned), scaled by ``10**(i - E + 1)``; the signed
  map mirrors them to negative values; ``0`` and ``1`` are added. The signed
  map therefore contains ``+1`` but not ``-1``. ``bits=8`` gives the
  bitsandbytes maps (``create_dynamic_map(signed)``), ``bits=4`` the first
  moment map of "Memory Efficient Optimizers with 4-bit States" (Li et al.,
  2023), i.e. 3 exponent bits.
* :func:`linear_map` -- the zero-free linear map ``{1/2**bits, ..., 1}`` used
  for the 4-bit second moment (a second moment decoded to zero would make the
  Adam step explode).

All values are computed in float32 arithmetic so that the tables equal the
ones the reference libraries build.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["dynamic_map", "linear_map", "midpoints", "table", "device_table"]


@lru_cache(maxsize=None)
def dynamic_map(signed: bool = True, bits: int = 8) -> tuple[float, ...]:
    """The dynamic quantization map with ``2**bits`` sorted entries."""
    if bits < 2:
        raise ValueError(f"bits must be at least 2, got {bits}")
    decades = bits - 1
    values: list[float] = [0.0, 1.0]
    for i in range(decades):
        cells = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, cells + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scaled = centres * (10.0 ** (i - decades + 1))
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    if len(values) != 2 ** bits:  # pragma: no cover - guarded by construction
        raise AssertionError(f"dynamic map has {len(values)} entries, expected {2 ** bits}")
    return tuple(sorted(values))


@lru_cache(maxsize=None)
def linear_map(bits: int = 4) -> tuple[float, ...]:
    """The zero-free unsigned linear map ``{1/n, 2/n, ..., 1}`` with ``n = 2**bits``."""
    n = 2 ** bits
    return tuple(float(v) for v in (torch.arange(1, n + 1, dtype=torch.float32) / n).tolist())


@lru_cache(maxsize=None)
def midpoints(values: tuple[float, ...]) -> tuple[float, ...]:
    """Decision boundaries between neighbouring entries (float32 midpoints)."""
    t = torch.tensor(values, dtype=torch.float32)
    return tuple(((t[:-1] + t[1:]) / 2).tolist())


def table(kind: str, signed: bool, bits: int) -> tuple[float, ...]:
    """A map by name: ``kind`` is ``"dynamic"`` or ``"linear"``; ``"<kind>_mid"`` gives its midpoints."""
    base, _, mid = kind.partition("_")
    if base == "dynamic":
        values = dynamic_map(signed, bits)
    elif base == "linear":
        values = linear_map(bits)
    else:
        raise ValueError(f"unknown map kind {kind!r}")
    return midpoints(values) if mid else values


# Tables as CPU tensors, built eagerly at import for the maps the codecs use, so
# that a compiled step never has to trace their construction.
_CPU_TABLES: dict = {}
_DEVICE_TABLES: dict = {}


def _cpu_table(kind: str, signed: bool, bits: int) -> Tensor:
    key = (kind, signed, bits)
    t = _CPU_TABLES.get(key)
    if t is None:
        t = _CPU_TABLES[key] = torch.tensor(table(kind, signed, bits), dtype=torch.float32)
    return t


for _kind, _signed, _bits in (("dynamic", True, 8), ("dynamic", False, 8), ("dynamic", True, 4),
                              ("linear", False, 4)):
    _cpu_table(_kind, _signed, _bits)
    _cpu_table(_kind + "_mid", _signed, _bits)


def device_table(kind: str, signed: bool, bits: int, device) -> Tensor:
    """:func:`table` as a float32 tensor on ``device``, created once per device and cached.

    Codecs call this from ``empty()`` (eagerly), so inside a compiled step the
    table is normally a cache hit; on a miss there it is copied from the CPU
    table without touching the cache.
    """
    device = torch.device(device)
    t = _DEVICE_TABLES.get((kind, signed, bits, device))
    if t is not None:
        return t
    cpu = _cpu_table(kind, signed, bits)
    if torch.compiler.is_compiling():
        return cpu.to(device)
    t = _DEVICE_TABLES[(kind, signed, bits, device)] = cpu.to(device)
    return t
