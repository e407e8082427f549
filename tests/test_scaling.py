"""optimkit.scaling: batch-size, EMA and width rules (closed forms), ok.param_groups by module type."""
import math

import pytest
import torch
from torch import nn

import optimkit as ok
from optimkit import scaling as K


# --------------------------------------------------------------------------- rules
def test_batch_lr_rules():
    assert K.batch_lr(0.1, 1024, 256, rule="linear") == pytest.approx(0.4)
    assert K.batch_lr(3e-4, 1024, 256, rule="sqrt") == pytest.approx(6e-4)
    assert K.batch_lr(0.1, 512, 256, optimizer="sgd") == pytest.approx(0.2)
    assert K.batch_lr(0.1, 512, 256, optimizer=torch.optim.SGD) == pytest.approx(0.2)
    assert K.batch_lr(0.1, 512, 256, optimizer=ok.SGD) == pytest.approx(0.2)
    assert K.batch_lr(1e-3, 1024, 256, optimizer="adamw") == pytest.approx(2e-3)
    p = nn.Parameter(torch.zeros(1))
    assert K.batch_lr(1e-3, 64, 256, optimizer=ok.AdamW([p])) == pytest.approx(5e-4)


def test_surge_lr():
    assert K.surge_lr(1e-3, 400, 400) == pytest.approx(1e-3)  # the peak, at B = B_noise
    small, big = K.surge_lr(1e-3, 100, 400), K.surge_lr(1e-3, 1600, 400)
    assert small == pytest.approx(1e-3 / (0.5 * (2 + 0.5))) and big == pytest.approx(small)
    assert K.surge_lr(1e-3, 1, 1e6) == pytest.approx(2e-3 * math.sqrt(1e-6), rel=1e-3)  # ~ sqrt(B) regime


def test_ema_and_scale_batch():
    assert K.ema_momentum(0.99, 4) == pytest.approx(0.99 ** 4)
    assert K.ema_momentum(0.996, 1) == 0.996
    out = K.scale_batch(4, lr=1e-3, rule="sqrt", betas=(0.9, 0.999), ema=0.99)
    assert out["lr"] == pytest.approx(2e-3)
    assert out["betas"] == pytest.approx((0.6, 0.996)) and out["ema"] == pytest.approx(0.99 ** 4)
    assert K.scale_batch(16, lr=1e-3, betas=(0.9,))["betas"] == (0.0,)  # clamped
    sgd = K.scale_batch(2, lr=0.1, rule="linear", ema=0.9)
    assert sgd == pytest.approx({"lr": 0.2, "ema": 0.81})


def test_width_rules():
    assert K.width_lr(1e-2, 1024, 256) == pytest.approx(2.5e-3)
    assert K.width_lr(1e-2, 1024, 256, kind="norm") == 1e-2
    assert K.width_lr(1e-2, 1024, 256, kind="embedding") == 1e-2
    assert K.width_weight_decay(0.1, 1024, 256) == pytest.approx(0.4)
    assert K.width_weight_decay(0.1, 1024, 256, kind="bias") == 0.0
    # the product lr * weight decay (AdamW's per-step shrink) is width independent
    assert K.width_lr(1e-2, 4096, 256) * K.width_weight_decay(0.1, 4096, 256) == pytest.approx(1e-3)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: K.batch_lr(0.1, 0, 256, rule="linear"), ValueError, "batch_size"),
    (lambda: K.batch_lr(0.1, 64, 256, rule="cubic"), ValueError, "rule"),
    (lambda: K.batch_lr(0.1, 64, 256), ValueError, "rule"),
    (lambda: K.batch_lr(-1.0, 64, 256, rule="sqrt"), ValueError, "lr"),
    (lambda: K.batch_lr(0.1, 64.0, 256, rule="sqrt"), TypeError, "batch_size"),
    (lambda: K.ema_momentum(1.5, 2), ValueError, "rho"),
    (lambda: K.ema_momentum(0.9, 0), ValueError, "kappa"),
    (lambda: K.scale_batch(2, lr=0.1, betas=(1.0,)), ValueError, r"betas\[0\]"),
    (lambda: K.width_lr(0.1, 0, 256), ValueError, "width"),
    (lambda: K.width_lr(0.1, 512, 256, kind="conv"), ValueError, "kind"),
    (lambda: K.surge_lr(0.1, 1, 0), ValueError, "noise_batch_size"),
])
def test_rule_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------- param_groups
class RMSNormLike(nn.Module):  # a user norm: recognised by its class name
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))


class Tiny(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.pos = nn.Parameter(torch.zeros(4, 8))
        self.gate = nn.Parameter(torch.ones(8))  # a 1-D non-norm, non-bias vector
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8, bias=False))
        self.bn = nn.BatchNorm1d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.rms = RMSNormLike(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 16)
        if tie:
            self.head.weight = self.emb.weight


def _names(model, group):
    ids = {id(p): n for n, p in model.named_parameters()}
    return sorted(ids[id(p)] for p in group["params"])


def test_param_kinds():
    m = Tiny()
    kinds = K.param_kinds(m)
    assert kinds == {
        "emb.weight": "embedding", "pos": "matrix", "gate": "vector",
        "block.0.weight": "norm", "block.0.bias": "norm", "block.1.weight": "matrix", "block.1.bias": "bias",
        "block.3.weight": "matrix", "bn.weight": "norm", "bn.bias": "norm", "gn.weight": "norm",
        "gn.bias": "norm", "rms.scale": "norm", "head.bias": "bias"}  # tied head weight once, frozen skipped


def test_param_groups_default_split():
    m = Tiny()
    groups = ok.param_groups(m, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    decay, nd = groups
    assert decay["weight_decay"] == 0.1 and nd["weight_decay"] == 0.0
    assert _names(m, decay) == ["block.1.weight", "block.3.weight", "emb.weight", "gate", "pos"]
    assert "head.bias" in _names(m, nd) and "rms.scale" in _names(m, nd)
    total = sum(len(g["params"]) for g in groups)
    assert total == len(K.param_kinds(m))  # every trainable tensor exactly once
    assert len({id(p) for g in groups for p in g["params"]}) == total


def test_param_groups_embedding_split_overrides_and_optimizer():
    m = Tiny()
    groups = ok.param_groups(m, lr=1e-3, weight_decay=0.1, embedding=dict(lr=1e-2, weight_decay=0.0), split=True,
                             vector=dict(weight_decay=0.0),
                             overrides={"block.3.*": dict(lr=5e-4), "re:^head\\.": dict(lr=2e-4)})
    by = {g["name"]: g for g in groups}
    assert list(by) == ["matrix", "vector", "embedding", "no_decay", "override:block.3.*", "override:re:^head\\."]
    assert _names(m, by["matrix"]) == ["block.1.weight", "pos"]
    assert by["vector"]["weight_decay"] == 0.0 and _names(m, by["vector"]) == ["gate"]
    assert by["embedding"]["lr"] == 1e-2 and _names(m, by["embedding"]) == ["emb.weight"]
    assert by["override:block.3.*"]["lr"] == 5e-4 and by["override:block.3.*"]["weight_decay"] == 0.1
    head = by["override:re:^head\\."]
    assert _names(m, head) == ["head.bias"] and head["weight_decay"] == 0.0 and head["lr"] == 2e-4
    opt = ok.AdamW(groups, lr=3e-4)
    assert [g["name"] for g in opt.param_groups] == list(by)
    torch.optim.AdamW(groups)  # torch accepts the groups, "name" included
    loss = m.head(m.block(m.emb(torch.tensor([1, 2])))).sum() + m.gate.sum() + m.pos.sum()
    loss = loss + m.bn(torch.randn(4, 8)).sum() + m.gn(torch.randn(2, 8)).sum() + m.rms.scale.sum()
    loss.backward()
    opt.step()
    sd = opt.state_dict()
    assert [g["name"] for g in sd["param_groups"]] == list(by)


def test_param_groups_override_spanning_kinds_and_width():
    m = Tiny(tie=False)
    groups = ok.param_groups(m, lr=1e-2, weight_decay=0.1, overrides={"block.1.*": dict(lr=1.0)},
                             width=1024, base_width=256)
    by = {g["name"]: g for g in groups}
    assert list(by) == ["matrix", "vector", "embedding", "no_decay", "override:block.1.*:matrix",
                        "override:block.1.*:no_decay"]
    assert _names(m, by["embedding"]) == ["emb.weight"] and by["embedding"]["weight_decay"] == 0.0
    assert by["embedding"]["lr"] == 1e-2
    assert by["matrix"]["lr"] == pytest.approx(2.5e-3) and by["matrix"]["weight_decay"] == pytest.approx(0.4)
    assert _names(m, by["matrix"]) == ["block.3.weight", "head.weight", "pos"]
    assert by["vector"]["lr"] == 1e-2 and by["vector"]["weight_decay"] == 0.0 and _names(m, by["vector"]) == ["gate"]
    assert by["no_decay"]["lr"] == 1e-2 and by["no_decay"]["weight_decay"] == 0.0
    assert _names(m, by["override:block.1.*:matrix"]) == ["block.1.weight"]
    assert by["override:block.1.*:matrix"]["lr"] == 1.0
    assert by["override:block.1.*:matrix"]["weight_decay"] == pytest.approx(0.4)
    assert _names(m, by["override:block.1.*:no_decay"]) == ["block.1.bias"]
    assert by["override:block.1.*:no_decay"]["weight_decay"] == 0.0


@pytest.mark.parametrize("kw,exc,match", [
    (dict(overrides={"nothing.*": dict(lr=1.0)}), ValueError, "overrides"),
    (dict(overrides={"re:(": dict(lr=1.0)}), ValueError, "overrides"),
    (dict(overrides=[("a", {})]), TypeError, "overrides"),
    (dict(overrides={"emb.*": 1.0}), TypeError, "overrides"),
    (dict(embedding=dict(params=[])), ValueError, "embedding"),
    (dict(embedding=0.1), TypeError, "embedding"),
    (dict(no_decay=("weights",)), ValueError, "no_decay"),
    (dict(no_decay=("matrix",)), ValueError, "no_decay"),
    (dict(matrix=dict(lr=1.0)), ValueError, "matrix"),
    (dict(width=512), ValueError, "width"),
    (dict(width=512, base_width=256), ValueError, "lr"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
])
def test_param_groups_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        ok.param_groups(Tiny(), **kw)


def test_param_groups_not_a_module():
    with pytest.raises(TypeError, match="model"):
        ok.param_groups([nn.Parameter(torch.zeros(1))])


def test_param_groups_split_embeddings_with_matrices_and_no_decay_kinds():
    m = Tiny()
    by = {g["name"]: g for g in ok.param_groups(m, split=True, no_decay=("bias", "norm", "embedding", "vector"))}
    assert list(by) == ["matrix", "no_decay"] and "weight_decay" not in by["matrix"]
    assert _names(m, by["matrix"]) == ["block.1.weight", "block.3.weight", "pos"]
    assert {"emb.weight", "gate"} <= set(_names(m, by["no_decay"]))
    by = {g["name"]: g for g in ok.param_groups(m, split=True)}
    assert "emb.weight" in _names(m, by["matrix"])
