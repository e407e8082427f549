"""QK-clip (the "Clip" of MuonClip, Kimi K2): cap the attention logits after each step.

``QKClip`` watches the largest pre-softmax attention logit of every head and,
after the optimizer's step, rescales the query and key projection rows of the
heads whose logit went above a threshold, so that their logits are back at it.
It only reads activations (forward hooks) and rescales weights in place, so it
works with any optimizer; the optimizer's state is left as it is (as in Kimi K2).
See docs/qk_clip.md.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .core import validation as v

__all__ = ["QKClip"]

#: attribute names read from an attention module (the first one present wins)
FUSED_NAMES = ("qkv", "qkv_proj", "Wqkv", "wqkv", "c_attn", "in_proj")
SEPARATE_NAMES = (("q_proj", "k_proj"), ("wq", "wk"), ("to_q", "to_k"), ("query", "key"))
HEADS_NAMES = ("num_heads", "n_heads", "n_head", "heads", "num_attention_heads")
KV_HEADS_NAMES = ("num_kv_heads", "num_key_value_heads", "n_kv_heads", "n_kv_head", "kv_heads")
SCALE_NAMES = ("scale", "scaling", "softmax_scale")
CAUSAL_NAMES = ("causal", "is_causal")
SPEC_KEYS = ("qkv", "q", "k", "num_heads", "num_kv_heads", "head_dim", "scale", "causal", "rotary",
             "qkv_layout")

#: largest logits block computed at once (batch chunks), in elements
_CHUNK = 1 << 24


@dataclass
class _Attention:
    """The resolved head layout of one attention module."""

    name: str
    kind: str                         # "fused", "separate" or "mha"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    rotary: Callable | None
    q_weight: Tensor
    k_weight: Tensor
    q_bias: Tensor | None
    k_bias: Tensor | None
    q_rows: list[tuple[int, int]]     # per query head: rows [start, stop) of q_weight (and q_bias)
    k_rows: list[tuple[int, int]]     # per key head: rows of k_weight (and k_bias)
    module: nn.Module
    q_module: nn.Module | None = None
    k_module: nn.Module | None = None
    batch_first: bool = True
    k_bias_rows: list[tuple[int, int]] | None = None   # rows of k_bias when they differ from k_rows
    hooks: list = field(default_factory=list)
    pending: dict = field(default_factory=dict)
    index_cache: dict = field(default_factory=dict)

    def index(self, which: str, device) -> Tensor:
        key = (which, device)
        if key not in self.index_cache:
            rows = self.q_rows if which == "q" else self.k_rows
            idx = torch.cat([torch.arange(a, b) for a, b in rows])
            self.index_cache[key] = idx.to(device)
        return self.index_cache[key]


def _attr(module: nn.Module, names: Iterable[str]):
    for n in names:
        if hasattr(module, n):
            return n, getattr(module, n)
    return None, None


def _int(name: str, value: Any) -> int:
    return v.positive_int(name, value)


def _submodule(root: nn.Module, where: str, value, what: str) -> nn.Linear:
    if isinstance(value, str):
        try:
            value = root.get_submodule(value)
        except AttributeError:
            raise ValueError(f"Invalid {what} for attention module {where!r}: no submodule {value!r}") from None
    if not isinstance(value, nn.Linear):
        raise TypeError(f"{what} of attention module {where!r} must be an nn.Linear (weight rows = output "
                        f"features), got {type(value).__name__}")
    return value


def _resolve(name: str, module: nn.Module, spec: dict, causal_default: bool,
             rotary_default: Callable | None) -> _Attention:
    """The head layout of ``module`` from its attributes, overridden by ``spec``."""
    for key in spec:
        if key not in SPEC_KEYS:
            raise TypeError(f"unknown key {key!r} in the spec of attention module {name!r} "
                            f"(known: {', '.join(SPEC_KEYS)})")
    causal = spec.get("causal")
    if causal is None:
        _, causal = _attr(module, CAUSAL_NAMES)
        causal = causal_default if not isinstance(causal, bool) else causal
    causal = v.boolean(f"causal of {name!r}", causal)
    rotary = spec.get("rotary", rotary_default)
    if rotary is not None and not callable(rotary):
        raise TypeError(f"rotary of {name!r} must be a callable (q, k) -> (q, k), got {type(rotary).__name__}")

    if isinstance(module, nn.MultiheadAttention) and not ({"qkv", "q", "k"} & set(spec)):
        if module.bias_k is not None:
            raise ValueError(f"Invalid attention module {name!r}: nn.MultiheadAttention with add_bias_kv=True "
                             "(a learned key outside the projection) is not supported")
        h = _int(f"num_heads of {name!r}", spec.get("num_heads", module.num_heads))
        e = module.embed_dim
        hd = e // h
        if module._qkv_same_embed_dim:
            qw = kw = module.in_proj_weight
            k_off = e
        else:
            qw, kw = module.q_proj_weight, module.k_proj_weight
            k_off = 0
        b = module.in_proj_bias
        att = _Attention(name, "mha", h, h, hd, float(spec.get("scale", hd ** -0.5)), causal, rotary,
                         qw, kw, None if b is None else b, None if b is None else b,
                         [(i * hd, (i + 1) * hd) for i in range(h)],
                         [(k_off + i * hd, k_off + (i + 1) * hd) for i in range(h)], module,
                         batch_first=module.batch_first)
        att.k_bias_rows = [(e + i * hd, e + (i + 1) * hd) for i in range(h)]  # in_proj_bias: [q | k | v]
        return att

    heads = spec.get("num_heads")
    if heads is None:
        attr, heads = _attr(module, HEADS_NAMES)
        if heads is None:
            raise ValueError(f"Invalid attention module {name!r} ({type(module).__name__}): it has no head "
                             f"count attribute ({', '.join(HEADS_NAMES)}); give num_heads in its spec")
    h = _int(f"num_heads of {name!r}", heads)
    kv = spec.get("num_kv_heads")
    if kv is None:
        _, kv = _attr(module, KV_HEADS_NAMES)
    g = h if kv is None else _int(f"num_kv_heads of {name!r}", kv)
    if h % g:
        raise ValueError(f"Invalid num_kv_heads of {name!r}: {g} does not divide num_heads {h}")

    if "qkv" in spec:
        fused = _submodule(module, name, spec["qkv"], "qkv")
    elif "q" in spec or "k" in spec:
        fused = None
    else:
        _, fused = _attr(module, FUSED_NAMES)
        fused = fused if isinstance(fused, nn.Linear) else None
    if fused is not None:
        hd = spec.get("head_dim") or getattr(module, "head_dim", None) or fused.out_features // (h + 2 * g)
        hd = _int(f"head_dim of {name!r}", hd)
        layout = spec.get("qkv_layout", "blocks")
        if layout not in ("blocks", "heads"):
            raise ValueError(f"Invalid qkv_layout of {name!r}: {layout!r} (expected 'blocks': rows "
                             "[q of all heads | k | v], or 'heads': [q k v] per head)")
        if fused.out_features != (h + 2 * g) * hd:
            raise ValueError(f"Invalid attention module {name!r}: its fused projection has {fused.out_features} "
                             f"output rows, expected (num_heads + 2 num_kv_heads) head_dim = "
                             f"({h} + 2*{g}) * {hd}")
        if layout == "heads":
            if g != h:
                raise ValueError(f"Invalid qkv_layout of {name!r}: 'heads' needs num_kv_heads == num_heads")
            q_rows = [(3 * i * hd, (3 * i + 1) * hd) for i in range(h)]
            k_rows = [((3 * i + 1) * hd, (3 * i + 2) * hd) for i in range(h)]
        else:
            q_rows = [(i * hd, (i + 1) * hd) for i in range(h)]
            k_rows = [(h * hd + j * hd, h * hd + (j + 1) * hd) for j in range(g)]
        _, scale = _attr(module, SCALE_NAMES)
        scale = spec.get("scale", scale if isinstance(scale, numbers.Real) else hd ** -0.5)
        return _Attention(name, "fused", h, g, hd, float(v.positive(f"scale of {name!r}", scale)), causal,
                          rotary, fused.weight, fused.weight, fused.bias, fused.bias, q_rows, k_rows, module,
                          q_module=fused, k_module=fused)

    if "q" in spec or "k" in spec:
        if not ("q" in spec and "k" in spec):
            raise ValueError(f"the spec of {name!r} must give both q and k (or qkv)")
        qm, km = _submodule(module, name, spec["q"], "q"), _submodule(module, name, spec["k"], "k")
    else:
        qm = km = None
        for qn, kn in SEPARATE_NAMES:
            a, b = getattr(module, qn, None), getattr(module, kn, None)
            if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
                qm, km = a, b
                break
        if qm is None:
            raise ValueError(f"Invalid attention module {name!r} ({type(module).__name__}): no fused "
                             f"projection ({', '.join(FUSED_NAMES)}) and no q/k projection pair "
                             f"({', '.join('/'.join(p) for p in SEPARATE_NAMES)}) of type nn.Linear; "
                             "name them in its spec (qkv=..., or q=... and k=...)")
    hd = spec.get("head_dim") or getattr(module, "head_dim", None) or qm.out_features // h
    hd = _int(f"head_dim of {name!r}", hd)
    if qm.out_features != h * hd or km.out_features != g * hd:
        raise ValueError(f"Invalid attention module {name!r}: q and k projections have {qm.out_features} and "
                         f"{km.out_features} output rows, expected num_heads * head_dim = {h} * {hd} and "
                         f"num_kv_heads * head_dim = {g} * {hd}")
    _, scale = _attr(module, SCALE_NAMES)
    scale = spec.get("scale", scale if isinstance(scale, numbers.Real) else hd ** -0.5)
    return _Attention(name, "separate", h, g, hd, float(v.positive(f"scale of {name!r}", scale)), causal,
                      rotary, qm.weight, km.weight, qm.bias, km.bias,
                      [(i * hd, (i + 1) * hd) for i in range(h)], [(j * hd, (j + 1) * hd) for j in range(g)],
                      module, q_module=qm, k_module=km)


def _recognized(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    if _attr(module, HEADS_NAMES)[1] is None:
        return False
    if isinstance(_attr(module, FUSED_NAMES)[1], nn.Linear):
        return True
    return any(isinstance(getattr(module, a, None), nn.Linear) and isinstance(getattr(module, b, None), nn.Linear)
               for a, b in SEPARATE_NAMES)


def head_max_logits(q: Tensor, k: Tensor, scale: float, causal: bool = False,
                    excluded: Tensor | None = None) -> Tensor:
    """Per query head, the largest ``scale * q_h . k_h`` over batch and positions.

    ``q``: ``(B, H, L, D)``, ``k``: ``(B, G, S, D)`` with ``G`` dividing ``H``
    (query head ``h`` reads key head ``h // (H // G)``, as grouped-query
    attention repeats key heads). ``causal`` excludes keys after the query
    (top-left aligned, as ``scaled_dot_product_attention(is_causal=True)``);
    ``excluded`` is a boolean mask broadcastable to ``(B, H, L, S)`` (True: not
    attended). Computed in float32 (float64 for float64 inputs), in batch chunks.
    """
    b, h, length, d = q.shape
    g, s = k.shape[1], k.shape[2]
    r = h // g
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.full((h,), -math.inf, dtype=dtype, device=q.device)
    if b == 0:
        return out
    step = max(1, _CHUNK // max(1, h * length * s))
    causal_mask = None
    if causal:
        causal_mask = torch.ones(length, s, dtype=torch.bool, device=q.device).triu(1)
    for i in range(0, b, step):
        qc = q[i:i + step].to(dtype).reshape(-1, g, r, length, d)
        kc = k[i:i + step].to(dtype).unsqueeze(2)
        logits = (qc @ kc.transpose(-1, -2)).reshape(-1, h, length, s) * scale
        if causal_mask is not None:
            logits = logits.masked_fill(causal_mask, -math.inf)
        if excluded is not None:
            ex = excluded if excluded.shape[0] == 1 else excluded[i:i + step]
            logits = logits.masked_fill(ex, -math.inf)
        out = torch.maximum(out, logits.amax(dim=(0, 2, 3)))
    return out


class QKClip:
    r"""QK-clip: after each optimizer step, rescale query/key rows of heads whose
    attention logits exceeded ``threshold`` (the clip of MuonClip, Kimi K2).

    Per query head ``h`` the largest pre-softmax logit since the last
    :meth:`step` is tracked, ``S_h = max scale * q_h . k_h`` over the batch and the
    attended positions (forward hooks, or values given to :meth:`report`).
    :meth:`step` then, for each head with ``S_h > threshold``, with
    ``eta = threshold / S_h``, multiplies that head's query rows (weight rows and
    bias) by ``eta ** alpha`` and its key rows by ``eta ** (1 - alpha)``: the head's
    logits are multiplied by ``eta`` and its largest one becomes ``threshold``.
    Heads at or below the threshold are not touched (bit-identical). With grouped-
    query attention a key head shared by several query heads takes the largest
    ``S`` of its query heads (its ``eta`` from that maximum); each query head uses
    its own. Value and output projections are never touched.

    Args:
        model: the model (an ``nn.Module``).
        threshold: the logit cap ``tau`` (Kimi K2: 100), > 0.
        alpha: the share of the correction put on the query side, in [0, 1]
            (0.5: both sides by ``sqrt(eta)``, as Kimi K2 for multi-head attention).
        modules: the attention modules: ``None`` (every module of the model
            recognized below), a module name or a list of names, or a dict
            ``{name: spec}`` whose spec dict overrides what is read from the
            module (keys ``qkv``, ``q``, ``k``: submodule names or ``nn.Linear``;
            ``num_heads``, ``num_kv_heads``, ``head_dim``, ``scale``, ``causal``,
            ``rotary``, ``qkv_layout``).
        causal: default for modules that do not say (an attribute ``causal`` or
            ``is_causal``): exclude keys after the query from the maximum.
            Without it the maximum is taken over all pairs: an upper bound of
            a causal model's logits (it clips at least as much as needed).
        rotary: default ``rotary(q, k) -> (q, k)`` applied to ``(B, H, L, D)``
            queries and ``(B, G, S, D)`` keys before the product, for modules that
            rotate them inside (RoPE): a rotation is linear, so clipping stays exact.
        hooks: install forward hooks (default); ``False``: only :meth:`report`.

    What an attention module must expose (or its spec give):

    * ``nn.MultiheadAttention`` (``in_proj_weight`` or ``q_proj_weight`` /
      ``k_proj_weight``, ``in_proj_bias``, ``num_heads``, ``batch_first``; the
      ``attn_mask``, ``key_padding_mask`` and ``is_causal`` of each call are used).
      ``add_bias_kv=True`` is refused.
    * a fused projection, an ``nn.Linear`` named one of ``qkv``, ``qkv_proj``,
      ``Wqkv``, ``wqkv``, ``c_attn``, ``in_proj``, with rows ``[q of all heads |
      k of all key heads | v]`` (``qkv_layout="blocks"``, default) or ``[q k v]``
      per head (``"heads"``);
    * or separate ``nn.Linear`` query and key projections (``q_proj``/``k_proj``,
      ``wq``/``wk``, ``to_q``/``to_k``, ``query``/``key``);
    * and a head count (``num_heads``, ``n_heads``, ``n_head``, ``heads``,
      ``num_attention_heads``), optionally ``num_kv_heads`` (or
      ``num_key_value_heads``, ``n_kv_heads``, ``n_kv_head``, ``kv_heads``),
      ``head_dim`` (default: rows / heads) and ``scale`` (or ``scaling``,
      ``softmax_scale``; default ``head_dim ** -0.5``).

    The hooks read the projections' outputs (their last dim is the feature
    dim, the one before it the sequence; everything before it is batch), so
    the logits are those of the model as long as nothing but ``rotary`` acts
    on ``q`` and ``k`` between the projection and the product (a per-head norm
    on ``q``/``k``, "QK-norm", would make the recomputed logits wrong: report
    them instead). Logits are only recorded while autograd is on (training
    forwards; ``torch.no_grad()`` evaluation is not counted, except inside
    :meth:`recording`). Under
    ``torch.distributed`` the maxima are all-reduced (max) across ranks in
    :meth:`step`, so replicas stay equal.
    """

    def __init__(self, model: nn.Module, threshold: float = 100.0, alpha: float = 0.5,
                 modules: str | Iterable[str] | dict | None = None, *, causal: bool = False,
                 rotary: Callable | None = None, hooks: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.threshold = v.positive("threshold", threshold)
        if not math.isfinite(self.threshold):
            raise ValueError(f"Invalid threshold: {self.threshold} (must be finite)")
        self.alpha = v.closed_unit("alpha", alpha)
        v.boolean("causal", causal)
        v.boolean("hooks", hooks)
        if rotary is not None and not callable(rotary):
            raise TypeError(f"rotary must be a callable (q, k) -> (q, k), got {type(rotary).__name__}")
        named = dict(model.named_modules())
        if modules is None:
            specs = {n: {} for n, m in named.items() if n and _recognized(m)}
            if not specs and _recognized(model):
                specs = {"": {}}
            if not specs:
                raise ValueError("Invalid modules: no attention module recognized in the model; name them "
                                 "(modules=[...] or {name: spec}), see QKClip's docstring")
        elif isinstance(modules, str):
            specs = {modules: {}}
        elif isinstance(modules, dict):
            specs = {}
            for n, s in modules.items():
                if s is not None and not isinstance(s, dict):
                    raise TypeError(f"modules[{n!r}] must be a spec dict or None, got {type(s).__name__}")
                specs[n] = dict(s or {})
        else:
            specs = {}
            for n in modules:
                specs[n] = {}
        attentions: dict[str, _Attention] = {}
        for n, s in specs.items():
            if not isinstance(n, str):
                raise TypeError(f"modules must be named by str, got {type(n).__name__} {n!r}")
            if n not in named:
                raise ValueError(f"Invalid modules: {n!r} is not a module of the model")
            attentions[n] = _resolve(n, named[n], s, causal, rotary)
        if not attentions:
            raise ValueError("Invalid modules: empty")
        self._attentions = attentions
        self._running: dict[str, Tensor | None] = {n: None for n in attentions}
        #: per attention module: the per-head maxima used by the last step() (None: none recorded)
        self.last_max_logits: dict[str, list[float] | None] = {n: None for n in attentions}
        #: per attention module: how many times each query head was clipped
        self.clip_counts: dict[str, list[int]] = {n: [0] * a.num_heads for n, a in attentions.items()}
        self.steps = 0
        self._forced = 0
        self._hooked = False
        if hooks:
            for att in attentions.values():
                self._install(att)
            self._hooked = True

    # ------------------------------------------------------------------ names
    @property
    def names(self) -> list[str]:
        """The attention modules watched, by name."""
        return list(self._attentions)

    def heads(self, name: str) -> tuple[int, int]:
        """``(num_heads, num_kv_heads)`` of attention module ``name``."""
        a = self._get(name)
        return a.num_heads, a.num_kv_heads

    def _get(self, name: str) -> _Attention:
        if name not in self._attentions:
            raise ValueError(f"Invalid name: {name!r} is not an attention module of this QKClip "
                             f"(known: {', '.join(self._attentions)})")
        return self._attentions[name]

    # ------------------------------------------------------------------ recording
    def report(self, name: str, max_logits_per_head) -> None:
        """Record per-query-head maximum logits of attention module ``name`` (a
        tensor or a sequence of ``num_heads`` numbers); kept as the running max
        with other reports and hook values until :meth:`step`."""
        att = self._get(name)
        t = torch.as_tensor(max_logits_per_head).detach()
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"max_logits_per_head must be real, got {t.dtype}")
        if t.shape != (att.num_heads,):
            raise ValueError(f"Invalid max_logits_per_head for {name!r}: shape {tuple(t.shape)}, expected "
                             f"({att.num_heads},) (one value per query head)")
        self._record(att, t.to(torch.float64 if t.dtype == torch.float64 else torch.float32))

    def _recording(self) -> bool:
        return self._forced > 0 or torch.is_grad_enabled()

    @contextlib.contextmanager
    def recording(self):
        """Record logits in forwards run inside this context even without autograd, e.g. ::

            opt.step(); clip.reset()
            with torch.no_grad(), clip.recording():
                model(batch)            # the logits of the updated weights
            clip.step()
        """
        self._forced += 1
        try:
            yield self
        finally:
            self._forced -= 1

    def reset(self) -> None:
        """Forget the maxima recorded since the last :meth:`step`."""
        for n in self._running:
            self._running[n] = None
        for att in self._attentions.values():
            att.pending.clear()

    def _record(self, att: _Attention, maxima: Tensor) -> None:
        prev = self._running[att.name]
        if prev is not None:
            maxima = torch.maximum(prev, maxima.to(prev.device, prev.dtype))
        self._running[att.name] = maxima

    def _install(self, att: _Attention) -> None:
        if att.kind == "mha":
            att.hooks.append(att.module.register_forward_pre_hook(self._mha_hook(att), with_kwargs=True))
        elif att.kind == "fused":
            att.hooks.append(att.q_module.register_forward_hook(self._fused_hook(att)))
        else:
            att.hooks.append(att.q_module.register_forward_hook(self._proj_hook(att, "q")))
            att.hooks.append(att.k_module.register_forward_hook(self._proj_hook(att, "k")))

    def _observe(self, att: _Attention, q: Tensor, k: Tensor, excluded: Tensor | None = None,
                 causal: bool | None = None) -> None:
        """``q``: ``(..., L, H*D)``, ``k``: ``(..., S, G*D)`` projection outputs."""
        with torch.no_grad():
            q = q.detach().reshape(-1, q.shape[-2], att.num_heads, att.head_dim).transpose(1, 2)
            k = k.detach().reshape(-1, k.shape[-2], att.num_kv_heads, att.head_dim).transpose(1, 2)
            if att.rotary is not None:
                q, k = att.rotary(q, k)
            m = head_max_logits(q, k, att.scale, att.causal if causal is None else causal, excluded)
            self._record(att, m)

    def _fused_hook(self, att: _Attention):
        def hook(module, args, out):
            if not self._recording():
                return
            self._observe(att, out.index_select(-1, att.index("q", out.device)),
                          out.index_select(-1, att.index("k", out.device)))
        return hook

    def _proj_hook(self, att: _Attention, which: str):
        def hook(module, args, out):
            if not self._recording():
                return
            if att.q_module is att.k_module:  # one Linear for both (unusual): fused behaviour
                self._observe(att, out, out)
                return
            att.pending[which] = out
            if "q" in att.pending and "k" in att.pending:
                q, k = att.pending.pop("q"), att.pending.pop("k")
                self._observe(att, q, k)
        return hook

    def _mha_hook(self, att: _Attention):
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal")

        def hook(module, args, kwargs):
            if not self._recording():
                return
            a = dict(zip(names, args))
            a.update(kwargs)
            query, key = a["query"], a["key"]
            batched = query.dim() == 3
            if not batched:
                query, key = query.unsqueeze(0), key.unsqueeze(0)
            elif not module.batch_first:
                query, key = query.transpose(0, 1), key.transpose(0, 1)
            e = module.embed_dim
            qb = kb = None
            if module.in_proj_bias is not None:
                qb, kb = module.in_proj_bias[:e], module.in_proj_bias[e:2 * e]
            if module._qkv_same_embed_dim:
                qw, kw = module.in_proj_weight[:e], module.in_proj_weight[e:2 * e]
            else:
                qw, kw = module.q_proj_weight, module.k_proj_weight
            with torch.no_grad():
                q = nn.functional.linear(query, qw, qb)
                k = nn.functional.linear(key, kw, kb)
                excluded = _mha_excluded(a.get("attn_mask"), a.get("key_padding_mask"), q.shape[0],
                                         att.num_heads, q.shape[1], k.shape[1])
            causal = bool(a.get("is_causal")) and a.get("attn_mask") is None
            self._observe(att, q, k, excluded, causal=causal or att.causal)
        return hook

    # ------------------------------------------------------------------ clipping
    def _maxima(self) -> dict[str, Tensor | None]:
        out = dict(self._running)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank reduces the same tensor (missing maxima as -inf), so replicas clip alike
            names = list(self._attentions)
            dev = next((t.device for t in out.values() if t is not None), self._attentions[names[0]].q_weight.device)
            flat = torch.cat([(out[n] if out[n] is not None else
                               torch.full((self._attentions[n].num_heads,), -math.inf)).to(dev, torch.float64)
                              for n in names])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX)
            parts = flat.split([self._attentions[n].num_heads for n in names])
            out = {n: (None if bool((p == -math.inf).all()) else p) for n, p in zip(names, parts)}
        return out

    @torch.no_grad()
    def step(self) -> int:
        """Clip the heads above the threshold (call after ``optimizer.step()``);
        returns how many query heads were clipped. The recorded maxima are then
        cleared (a step without recorded logits clips nothing)."""
        maxima = self._maxima()
        tau, alpha = self.threshold, self.alpha
        clipped = 0
        for name, att in self._attentions.items():
            m = maxima[name]
            self._running[name] = None
            att.pending.clear()
            if m is None:
                self.last_max_logits[name] = None
                continue
            s = [float(x) for x in m.tolist()]
            self.last_max_logits[name] = s
            r = att.num_heads // att.num_kv_heads
            for h, sh in enumerate(s):
                if sh > tau:
                    clipped += 1
                    self.clip_counts[name][h] += 1
                    if alpha > 0:
                        self._scale(att, "q", h, (tau / sh) ** alpha)
            if alpha < 1:
                for j in range(att.num_kv_heads):
                    sj = max(s[j * r:(j + 1) * r])
                    if sj > tau:
                        self._scale(att, "k", j, (tau / sj) ** (1 - alpha))
        self.steps += 1
        return clipped

    @staticmethod
    def _scale(att: _Attention, which: str, head: int, factor: float) -> None:
        if factor == 1.0:
            return
        weight = att.q_weight if which == "q" else att.k_weight
        bias = att.q_bias if which == "q" else att.k_bias
        a, b = (att.q_rows if which == "q" else att.k_rows)[head]
        _mul_rows(weight, a, b, factor)
        if bias is not None:
            if which == "k" and att.k_bias_rows is not None:
                a, b = att.k_bias_rows[head]
            _mul_rows(bias, a, b, factor)

    # ------------------------------------------------------------------ lifecycle and state
    def remove(self) -> None:
        """Remove the forward hooks (``report`` and ``step`` keep working)."""
        for att in self._attentions.values():
            for hnd in att.hooks:
                hnd.remove()
            att.hooks.clear()
            att.pending.clear()
        self._hooked = False

    def __enter__(self) -> "QKClip":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def state_dict(self) -> dict:
        """Plain values: settings, step count, clip counts and any maxima recorded
        since the last :meth:`step` (lists of floats)."""
        return {"threshold": self.threshold, "alpha": self.alpha, "steps": self.steps,
                "clip_counts": {n: list(c) for n, c in self.clip_counts.items()},
                "pending": {n: (None if t is None else [float(x) for x in t.tolist()])
                            for n, t in self._running.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Load a :meth:`state_dict` of a QKClip over the same attention modules
        (checked before anything changes)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = {"threshold", "alpha", "steps", "clip_counts", "pending"} - set(state)
        if missing:
            raise ValueError(f"Invalid state: missing {', '.join(sorted(missing))}")
        threshold = v.positive("threshold", state["threshold"])
        alpha = v.closed_unit("alpha", state["alpha"])
        steps = v.nonneg_int("steps", state["steps"])
        for key in ("clip_counts", "pending"):
            if not isinstance(state[key], dict) or set(state[key]) != set(self._attentions):
                raise ValueError(f"Invalid state: {key} is for attention modules "
                                 f"{sorted(state[key]) if isinstance(state[key], dict) else state[key]!r}, "
                                 f"this QKClip has {sorted(self._attentions)}")
        for n, att in self._attentions.items():
            c, p = state["clip_counts"][n], state["pending"][n]
            if not isinstance(c, (list, tuple)) or len(c) != att.num_heads:
                raise ValueError(f"Invalid state: clip_counts[{n!r}] must list {att.num_heads} counts")
            if p is not None and (not isinstance(p, (list, tuple)) or len(p) != att.num_heads):
                raise ValueError(f"Invalid state: pending[{n!r}] must be None or {att.num_heads} numbers")
        self.threshold, self.alpha, self.steps = threshold, alpha, steps
        for n, att in self._attentions.items():
            self.clip_counts[n] = [int(x) for x in state["clip_counts"][n]]
            p = state["pending"][n]
            self._running[n] = None if p is None else torch.tensor(p, dtype=torch.float64,
                                                                   device=att.q_weight.device)

    def __repr__(self) -> str:
        heads = ", ".join(f"{n}: {a.num_heads}/{a.num_kv_heads}" for n, a in self._attentions.items())
        return f"QKClip(threshold={self.threshold:g}, alpha={self.alpha:g}, heads (q/kv) {{{heads}}})"


def _mul_rows(t: Tensor, a: int, b: int, factor: float) -> None:
    rows = t.data[a:b]
    if rows.dtype in (torch.float32, torch.float64):
        rows.mul_(factor)
    else:  # low precision: multiply in fp32, round once
        rows.copy_(rows.float() * factor)


def _mha_excluded(attn_mask, key_padding_mask, b: int, h: int, length: int, s: int) -> Tensor | None:
    """nn.MultiheadAttention's masks as one boolean (True: not attended), broadcastable to (B, H, L, S)."""
    ex = None
    if attn_mask is not None:
        m = attn_mask if attn_mask.dtype == torch.bool else attn_mask == -math.inf
        m = m.view(1, 1, length, s) if m.dim() == 2 else m.view(b, h, length, s)
        ex = m
    if key_padding_mask is not None:
        kp = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask == -math.inf
        kp = kp.view(-1, 1, 1, s)
        ex = kp if ex is None else (ex | kp)
    return ex
