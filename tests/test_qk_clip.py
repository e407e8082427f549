"""QK-clip (MuonClip's clip, Kimi K2): per-head logits recorded by hooks equal the
logits recomputed here from the weights; after a clip the recomputed maxima of
clipped heads equal the threshold and everything else is bit-identical; grouped-
query attention; nn.MultiheadAttention; reports; state; bad input; training with a
large learning rate (torch AdamW and ok.Muon).

The reference logits are written out from the definitions in this file (views
of the projection outputs in each module's own layout, an explicit causal
mask), not with the helper the hooks use.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import optimkit as ok

RTOL = 1e-5  # the bar: recomputed maxima <= threshold * (1 + 1e-5)


# --------------------------------------------------------------------------- test modules
class Fused(nn.Module):
    """Causal self-attention with one fused qkv Linear, rows [q | k | v] (nanoGPT style)."""

    causal = True

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.num_heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def qk(self, x):
        b, t, d = x.shape
        q, k, _ = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return q, k

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class GQA(nn.Module):
    """Grouped-query causal attention with separate projections (Llama style, no rotary)."""

    causal = True

    def __init__(self, d=32, heads=4, kv_heads=2, bias=True):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=False)

    def qk(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)

    def forward(self, x):
        b, t, d = x.shape
        q, k = self.qk(x)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


def ref_max_logits(q, k, scale, causal=True, pad=None):
    """Per head: max of scale * q k^T over batch and attended (query, key) pairs."""
    s = torch.einsum("bhld,bhsd->bhls", q.double(), k.double()) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    if pad is not None:
        s = s.masked_fill(pad[:, None, None, :], -math.inf)
    return s.amax(dim=(0, 2, 3))


def module_max_logits(m, x):
    with torch.no_grad():
        q, k = m.qk(x)
        return ref_max_logits(q, k, q.shape[-1] ** -0.5)


def mha_max_logits(m: nn.MultiheadAttention, x, pad=None):
    """x batch-first (B, L, E); q, k from in_proj as nn.MultiheadAttention computes them."""
    e, h = m.embed_dim, m.num_heads
    with torch.no_grad():
        q = F.linear(x, m.in_proj_weight[:e], m.in_proj_bias[:e])
        k = F.linear(x, m.in_proj_weight[e:2 * e], m.in_proj_bias[e:2 * e])
        b, t, _ = x.shape
        q, k = (y.view(b, t, h, e // h).transpose(1, 2) for y in (q, k))
        return ref_max_logits(q, k, (e // h) ** -0.5, causal=False, pad=pad)


def _boost(weight, rows, factor):
    with torch.no_grad():
        weight[rows].mul_(factor)


def _threshold_between(s):
    """A threshold with about half the heads above it."""
    v = sorted(s.tolist())
    i = len(v) // 2
    return 0.5 * (v[i - 1] + v[i])


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fused_clip_brings_clipped_heads_to_the_threshold(alpha):
    torch.manual_seed(0)
    m = Fused()
    d, hd = 32, 8
    _boost(m.qkv.weight, slice(0, hd), 5.0)            # q of head 0
    _boost(m.qkv.weight, slice(d + 2 * hd, d + 3 * hd), 4.0)  # k of head 2
    x = torch.randn(3, 12, d)
    s0 = module_max_logits(m, x)
    tau = _threshold_between(s0)
    clip = ok.QKClip(m, threshold=tau, alpha=alpha)
    assert clip.names == [""] and clip.heads("") == (4, 4)
    before = _snapshot(m)
    m(x).sum().backward()                               # a training forward: hooks record
    torch.testing.assert_close(clip._running[""].double(), s0, rtol=1e-5, atol=1e-5)
    n = clip.step()
    above = s0 > tau
    assert n == int(above.sum()) and 0 < n < 4
    s1 = module_max_logits(m, x)
    for h in range(4):
        if above[h]:
            assert s1[h] == pytest.approx(tau, rel=RTOL)
        else:
            assert s1[h] == s0[h]                        # bit-identical logits
    w0, w1 = before["qkv.weight"], m.qkv.weight.detach()
    b0, b1 = before["qkv.bias"], m.qkv.bias.detach()
    for h in range(4):
        q, k = slice(h * hd, (h + 1) * hd), slice(d + h * hd, d + (h + 1) * hd)
        eta = tau / float(s0[h])
        if not above[h]:
            assert torch.equal(w1[q], w0[q]) and torch.equal(w1[k], w0[k])
            assert torch.equal(b1[q], b0[q]) and torch.equal(b1[k], b0[k])
            continue
        for rows, power in ((q, alpha), (k, 1 - alpha)):
            if power == 0:
                assert torch.equal(w1[rows], w0[rows]) and torch.equal(b1[rows], b0[rows])
            else:
                torch.testing.assert_close(w1[rows], w0[rows] * eta ** power, rtol=1e-6, atol=0)
                torch.testing.assert_close(b1[rows], b0[rows] * eta ** power, rtol=1e-6, atol=0)
    assert torch.equal(w1[2 * d:], w0[2 * d:]) and torch.equal(b1[2 * d:], b0[2 * d:])  # values
    for name in ("out.weight", "out.bias"):
        assert torch.equal(before[name], dict(m.named_parameters())[name].detach())
    # the maxima were used up: a second step changes nothing
    assert clip.step() == 0 and torch.equal(m.qkv.weight, w1)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_gqa_key_head_takes_the_max_of_its_query_heads(alpha):
    torch.manual_seed(1)
    m = GQA(heads=4, kv_heads=2)
    hd = 8
    _boost(m.q_proj.weight, slice(0, hd), 6.0)          # query head 0 (key group 0 = heads 0, 1)
    _boost(m.q_proj.weight, slice(hd, 2 * hd), 3.0)     # query head 1, same group
    x = torch.randn(2, 10, 32)
    s0 = module_max_logits(m, x)
    tau = float(s0[1]) * 0.9        # heads 0 and 1 above; the other group (heads 2, 3) below
    assert s0[0] > s0[1] > tau > max(s0[2], s0[3])
    clip = ok.QKClip(m, threshold=tau, alpha=alpha)
    assert clip.heads("") == (4, 2)
    before = _snapshot(m)
    m(x).sum().backward()
    assert clip.step() == 2
    s1 = module_max_logits(m, x)
    assert s1[0] == pytest.approx(tau, rel=RTOL)        # the group's max head lands on tau
    assert s1[1] <= tau * (1 + RTOL)                    # the other clipped head: at or below
    assert torch.equal(s1[2:], s0[2:])                  # the untouched group
    eta0, eta1 = tau / float(s0[0]), tau / float(s0[1])
    qw0, qw1 = before["q_proj.weight"], m.q_proj.weight.detach()
    kw0, kw1 = before["k_proj.weight"], m.k_proj.weight.detach()
    for h, eta in ((0, eta0), (1, eta1)):
        rows = slice(h * hd, (h + 1) * hd)
        torch.testing.assert_close(qw1[rows], qw0[rows] * eta ** alpha, rtol=1e-6, atol=0)
    torch.testing.assert_close(kw1[:hd], kw0[:hd] * eta0 ** (1 - alpha), rtol=1e-6, atol=0)  # group max
    torch.testing.assert_close(m.k_proj.bias[:hd].detach(), before["k_proj.bias"][:hd] * eta0 ** (1 - alpha),
                               rtol=1e-6, atol=0)
    assert torch.equal(qw1[2 * hd:], qw0[2 * hd:]) and torch.equal(kw1[hd:], kw0[hd:])
    for name in ("v_proj.weight", "v_proj.bias", "o_proj.weight"):
        assert torch.equal(before[name], dict(m.named_parameters())[name].detach())


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_with_padding_mask(batch_first):
    torch.manual_seed(2)
    m = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    _boost(m.in_proj_weight, slice(0, 16), 6.0)          # q of heads 0, 1
    x = torch.randn(3, 9, 32)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[:, -3:] = True
    s0 = mha_max_logits(m, x, pad)
    assert not torch.equal(s0, mha_max_logits(m, x))     # the mask matters here
    tau = _threshold_between(s0)
    clip = ok.QKClip(m, threshold=tau)
    before = _snapshot(m)
    xin = x if batch_first else x.transpose(0, 1)
    m(xin, xin, xin, key_padding_mask=pad)[0].sum().backward()
    torch.testing.assert_close(clip._running[""].double(), s0, rtol=1e-5, atol=1e-5)
    clip.step()
    s1 = mha_max_logits(m, x, pad)
    above = s0 > tau
    torch.testing.assert_close(s1[above], torch.full_like(s1[above], tau), rtol=RTOL, atol=0)
    assert torch.equal(s1[~above], s0[~above])
    assert torch.equal(m.in_proj_weight[64:], before["in_proj_weight"][64:])   # values
    assert torch.equal(m.out_proj.weight, before["out_proj.weight"])


def test_named_blocks_of_the_bench_transformer_and_eval_forwards_not_recorded():
    from optimkit.bench.workloads import CharTransformer

    torch.manual_seed(0)
    model = CharTransformer(d=32, heads=4, layers=2, context=16)
    clip = ok.QKClip(model, threshold=1.0, modules=["blocks.0", "blocks.1"], causal=True)
    assert clip.names == ["blocks.0", "blocks.1"]
    auto = ok.QKClip(model, threshold=1.0, hooks=False)   # auto-detection finds the same blocks
    assert auto.names == clip.names
    idx = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        model(idx)
    assert clip._running == {"blocks.0": None, "blocks.1": None}
    with torch.no_grad(), clip.recording():
        model(idx)
    assert all(t is not None for t in clip._running.values())
    clip.reset()
    assert clip.step() == 0
    clip.remove()
    model(idx).sum().backward()
    assert all(t is None for t in clip._running.values())


def test_reported_maxima_drive_the_clip():
    torch.manual_seed(3)
    m = GQA(heads=4, kv_heads=4, bias=False)
    clip = ok.QKClip(m, threshold=10.0, alpha=0.5, hooks=False)
    w0 = m.q_proj.weight.detach().clone()
    k0 = m.k_proj.weight.detach().clone()
    m(torch.randn(1, 4, 32)).sum().backward()            # no hooks: nothing recorded
    clip.report("", [40.0, 5.0, 10.0, 20.0])
    clip.report("", torch.tensor([30.0, 1.0, 1.0, 30.0]))  # running max: [40, 5, 10, 30]
    assert clip.step() == 2
    assert clip.last_max_logits[""] == [40.0, 5.0, 10.0, 30.0]
    assert clip.clip_counts[""] == [1, 0, 0, 1]
    for h, eta in ((0, 0.25), (3, 1 / 3)):
        rows = slice(8 * h, 8 * h + 8)
        torch.testing.assert_close(m.q_proj.weight[rows], w0[rows] * math.sqrt(eta), rtol=1e-6, atol=0)
        torch.testing.assert_close(m.k_proj.weight[rows], k0[rows] * math.sqrt(eta), rtol=1e-6, atol=0)
    assert torch.equal(m.q_proj.weight[8:24], w0[8:24])  # at the threshold (10) is not above it
    assert torch.equal(m.k_proj.weight[8:24], k0[8:24])


def test_bf16_weights_are_scaled_in_fp32_and_rounded_once():
    torch.manual_seed(4)
    m = GQA(heads=2, kv_heads=2, bias=False).to(torch.bfloat16)
    clip = ok.QKClip(m, threshold=1.0, alpha=1.0, hooks=False)
    w0 = m.q_proj.weight.detach().clone()
    clip.report("", [3.0, 0.5])
    clip.step()
    assert m.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(m.q_proj.weight[:16], (w0[:16].float() / 3.0).bfloat16())
    assert torch.equal(m.q_proj.weight[16:], w0[16:])


def test_rotary_callable_is_applied_before_the_product():
    torch.manual_seed(5)
    m = Fused()
    calls = []

    def swap_halves(q, k):  # a rotation of each head's coordinates (orthogonal, linear)
        calls.append((q.shape, k.shape))
        return q.roll(4, dims=-1), k.flip(-1)

    x = torch.randn(2, 6, 32)
    clip = ok.QKClip(m, threshold=1e-3, rotary=swap_halves)
    m(x).sum().backward()
    assert calls == [((2, 4, 6, 8), (2, 4, 6, 8))]
    q, k = m.qk(x)
    expect = ref_max_logits(q.roll(4, dims=-1).detach(), k.flip(-1).detach(), 8 ** -0.5)
    torch.testing.assert_close(clip._running[""].double(), expect, rtol=1e-5, atol=1e-5)
    clip.step()
    q, k = m.qk(x)
    torch.testing.assert_close(ref_max_logits(q.roll(4, dims=-1).detach(), k.flip(-1).detach(), 8 ** -0.5),
                               torch.full((4,), 1e-3, dtype=torch.float64), rtol=RTOL, atol=0)


# --------------------------------------------------------------------------- state and input
def test_state_dict_is_plain_and_round_trips_through_torch_load():
    torch.manual_seed(6)
    m = Fused()
    clip = ok.QKClip(m, threshold=0.5)
    m(torch.randn(2, 5, 32)).sum().backward()
    clip.step()
    m(torch.randn(2, 5, 32)).sum().backward()            # pending maxima, saved too
    buf = io.BytesIO()
    torch.save(clip.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)                               # weights_only default
    other = ok.QKClip(Fused(), threshold=7.0, alpha=0.1, hooks=False)
    other.load_state_dict(state)
    assert (other.threshold, other.alpha, other.steps) == (0.5, 0.5, 1)
    assert other.clip_counts == clip.clip_counts
    torch.testing.assert_close(other._running[""].float(), clip._running[""].float())
    with pytest.raises(ValueError, match="clip_counts"):
        ok.QKClip(GQA(), hooks=False, modules={"": None}).load_state_dict(
            {**state, "clip_counts": {"x": [0]}})
    with pytest.raises(ValueError, match="threshold"):
        other.load_state_dict({**state, "threshold": -1.0})
    assert other.threshold == 0.5


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(threshold=0.0), ValueError, "threshold"),
    (dict(threshold=-5.0), ValueError, "threshold"),
    (dict(threshold=math.inf), ValueError, "threshold"),
    (dict(threshold="100"), TypeError, "threshold"),
    (dict(alpha=-0.1), ValueError, "alpha"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(modules=["nope"]), ValueError, "'nope' is not a module"),
    (dict(modules=["out"]), ValueError, "head count"),
    (dict(modules={"": dict(num_heads=3)}), ValueError, "output rows"),
    (dict(modules={"": dict(colour=1)}), TypeError, "colour"),
    (dict(modules={"": dict(qkv="out", num_heads=4)}), ValueError, "output rows"),
    (dict(rotary=3), TypeError, "rotary"),
])
def test_bad_arguments_raise_before_any_hook(kwargs, exc, match):
    m = Fused()
    with pytest.raises(exc, match=match):
        ok.QKClip(m, **kwargs)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


def test_bad_layouts_and_reports():
    with pytest.raises(ValueError, match="does not divide"):
        ok.QKClip(GQA(heads=4, kv_heads=2), modules={"": dict(num_kv_heads=3)})
    with pytest.raises(ValueError, match="no attention module"):
        ok.QKClip(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="nn.Module"):
        ok.QKClip([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="add_bias_kv"):
        ok.QKClip(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    clip = ok.QKClip(GQA(heads=4, kv_heads=2), hooks=False)
    with pytest.raises(ValueError, match="not an attention module"):
        clip.report("blocks.0", [1.0] * 4)
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        clip.report("", [1.0, 2.0])
    assert clip._running[""] is None


def test_works_under_a_single_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        m = GQA(heads=4, kv_heads=2, bias=False)
        clip = ok.QKClip(m, threshold=2.0, hooks=False)
        clip.report("", [8.0, 1.0, 1.0, 1.0])
        assert clip.step() == 1 and clip.last_max_logits[""][0] == 8.0
        assert clip.step() == 0  # nothing recorded on any rank: nothing clipped
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- training
def _tiny_lm(layers=1):
    from optimkit.bench.workloads import CharTransformer

    torch.manual_seed(0)
    return CharTransformer(d=32, heads=4, layers=layers, context=32)


def _batches(steps, seed=1):
    from optimkit.bench.workloads import stdlib_corpus

    text = stdlib_corpus().train.long()
    g = torch.Generator().manual_seed(seed)
    off = torch.arange(33)
    for _ in range(steps):
        w = text[torch.randint(0, len(text) - 34, (16,), generator=g)[:, None] + off]
        yield w[:, :-1], w[:, 1:]


def _make_opt(kind, model, lr):
    if kind == "muon":
        return ok.Muon(ok.muon_param_groups(model, muon=dict(lr=lr), adamw=dict(lr=lr / 10)))
    return torch.optim.AdamW(model.parameters(), lr=lr)


def _measure(clip, model, x):
    clip.reset()
    with torch.no_grad(), clip.recording():
        model(x)
    return max(max(t.tolist()) for t in clip._running.values())


@pytest.mark.parametrize("kind, lr", [("adamw", 0.1), ("muon", 0.3)])
def test_training_with_a_large_lr_keeps_logits_capped(kind, lr):
    """Kimi K2's use (logits of the training forward, clip after the step) bounds
    the logits that blow up without it; re-measuring after the update before
    the clip (``reset`` + ``recording``) keeps them at or below the threshold."""
    tau, steps = 20.0, 40
    peaks = {}
    for mode in ("off", "kimi", "exact"):
        model = _tiny_lm()
        opt = _make_opt(kind, model, lr)
        clip = ok.QKClip(model, threshold=tau, causal=True)
        peak, losses = 0.0, []
        for x, y in _batches(steps):
            loss = F.cross_entropy(model(x).reshape(-1, 128), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if mode == "exact":
                _measure(clip, model, x)      # the updated weights' logits on this batch
            if mode != "off":
                clip.step()
            s = _measure(clip, model, x)
            clip.reset()
            if mode == "exact":
                assert s <= tau * (1 + RTOL)
            peak = max(peak, s)
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
        peaks[mode] = peak
    assert peaks["off"] > 4 * tau                 # the logits do blow up without the clip
    assert peaks["kimi"] < 2 * tau                # one update of lag above the cap
    assert peaks["exact"] <= tau * (1 + RTOL)
