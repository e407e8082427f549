"""State layout: how each state tensor of each parameter is stored.

The update rule always sees plain float32 (or parameter-dtype) tensors. This
module decides, per parameter and per state name, the storage precision
(``fp32``, ``bf16``, ``q8``, ``q4``, ``fp8``: see :mod:`optimkit.state`) and
converts between storage and working tensors around the rule:

* a plain state is stored under its name, as created by the transform;
* an encoded state ``name`` is stored as the codec's storage tensors under
  ``"name:part"`` keys, and ``state["_layout"][name] = (precision, signed,
  shape, stochastic)`` records how to decode and re-encode it (so checkpoints
  are self-describing).

The kernel receives, for every state name, one entry per parameter (a tensor
or a storage dict) plus a static layout signature, decodes before the rule and
encodes after it; in compiled mode the three are one graph.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .tensorlist import TensorList

PRECISIONS = ("fp32", "bf16", "q8", "q4", "fp8")
QUANTIZED = ("q8", "q4", "fp8")
#: precisions whose codes can be rounded stochastically (``state_rounding``)
STOCHASTIC = ("q8", "q4")
LAYOUT_KEY = "_layout"


def state_dtype(dtype):
    """The dtype of the state created for a parameter of ``dtype``: its own, except
    float16, whose range (largest 65504, smallest normal 6e-5) cannot hold second
    moments or an ``eps`` of 1e-8: float16 parameters get float32 state and are
    stepped in float32 (rounded back to float16 once per step)."""
    import torch

    return torch.float32 if dtype == torch.float16 else dtype


_CODECS: dict = {}


def codec(name: str, stochastic: bool = False):
    key = (name, stochastic)
    c = _CODECS.get(key)
    if c is None:
        from ..state import get_codec

        c = _CODECS[key] = get_codec(name, stochastic=True) if stochastic else get_codec(name)
    return c


def _codec_of(meta: tuple):
    """The codec a layout entry was stored with ((precision, signed, shape[, stochastic]))."""
    return codec(meta[0], len(meta) > 3 and meta[3])


def validate_precision(name: str, value: Any):
    """``state_precision``: a precision name, or a dict {state name or "default": precision}."""
    if isinstance(value, str):
        if value not in PRECISIONS:
            raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(PRECISIONS)})")
        return value
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{name} keys must be state names (str), got {k!r}")
            validate_precision(f"{name}[{k!r}]", v)
        return dict(value)
    raise TypeError(f"{name} must be a str or a dict, got {type(value).__name__} {value!r}")


def choose(spec, state_name: str, numel: int, min_quant_size: int, override: str | None) -> str:
    if override is not None:
        prec = override
    elif isinstance(spec, dict):
        prec = spec.get(state_name, spec.get("default", "fp32"))
    else:
        prec = spec
    if prec in QUANTIZED and numel < min_quant_size:
        return "fp32"
    return prec


def store(state: dict, name: str, value: Tensor, prec: str, signed: bool, rounding: str = "nearest") -> None:
    """Put a freshly created state tensor into ``state`` with precision ``prec``
    (``rounding="stochastic"`` applies to the map-based q8/q4 codes)."""
    if prec == "fp32" or not value.is_floating_point():
        state[name] = value
        return
    stochastic = rounding == "stochastic" and prec in STOCHASTIC
    c = codec(prec, stochastic)
    storage = c.empty(tuple(value.shape), value.device, signed)
    c.encode_(value.float(), storage, signed)
    for part, t in storage.items():
        state[f"{name}:{part}"] = t
    state.setdefault(LAYOUT_KEY, {})[name] = (prec, signed, tuple(value.shape), stochastic)


def rewrite(state: dict, name: str, value: Tensor) -> None:
    """Encode ``value`` into the existing storage of the encoded state ``name`` (in place)."""
    meta = state[LAYOUT_KEY][name]
    prefix = name + ":"
    storage = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    device = max(storage.values(), key=lambda t: t.numel()).device
    _codec_of(meta).encode_(value.float().to(device), storage, meta[1])


def state_names(state: dict, exclude) -> list[str]:
    """Logical state names of one parameter's state, in a stable order."""
    layout = state.get(LAYOUT_KEY, {})
    names = [k for k, v in state.items()
             if isinstance(v, Tensor) and ":" not in k and k not in exclude]
    return names + [k for k in layout if k not in names]


def gather(states: list[dict], names: list[str]) -> tuple[dict, tuple]:
    """Kernel inputs for a bucket: {name: [tensor or storage dict per param]} and
    the static layout signature ((name, (layout or None per param)), ...)."""
    entries: dict[str, list] = {}
    signature = []
    for name in names:
        row, lay = [], []
        for s in states:
            meta = s.get(LAYOUT_KEY, {}).get(name)
            if meta is None:
                row.append(s[name])
            else:
                prefix = name + ":"
                row.append({k[len(prefix):]: v for k, v in s.items() if k.startswith(prefix)})
            lay.append(meta)
        entries[name] = row
        signature.append((name, tuple(lay)))
    return entries, tuple(signature)


def decode(entries: dict, signature: tuple, upcast: bool = False) -> dict[str, TensorList]:
    """Working tensors of every state; ``upcast``: plain (as created) states of
    another floating dtype are given as fp32 copies too, written back by :func:`encode`."""
    out = {}
    for name, lay in signature:
        row = entries[name]
        out[name] = TensorList([(e.float() if upcast and e.is_floating_point() else e) if meta is None
                                else _codec_of(meta).decode(e, meta[2], meta[1])
                                for e, meta in zip(row, lay)])
    return out


def encode(state: dict[str, TensorList], entries: dict, signature: tuple) -> None:
    for name, lay in signature:
        for x, e, meta in zip(state[name], entries[name], lay):
            if meta is not None:
                _codec_of(meta).encode_(x, e, meta[1])
            elif x is not e:  # an upcast copy of a plain state
                e.copy_(x)


def is_encoded(signature: tuple) -> bool:
    return any(meta is not None for _, lay in signature for meta in lay)
