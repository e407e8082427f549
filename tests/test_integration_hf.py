"""optimkit.integrations.hf against transformers itself: the Trainer's own param grouping and
schedules as references, a tiny GPT-2 trained by ``transformers.Trainer`` with optimkit
optimizers, and ``resume_from_checkpoint`` against an uninterrupted run (bit-identical weights)."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import optimkit as ok  # noqa: E402
from optimkit.integrations import hf  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

transformers.utils.logging.set_verbosity_error()

SEQ = 32
HIDDEN = {f"transformer.h.{i}.{m}.weight" for i in range(2)
          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """2 layers, width 64, byte vocabulary, no dropout (resume must not depend on RNG draws)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def byte_dataset(rows: int = 48) -> list[dict]:
    """Byte-level language modelling rows from the standard library's own source text."""
    data = inspect.getsource(textwrap).encode()
    ids = torch.tensor(list(data[: rows * SEQ]), dtype=torch.long).view(rows, SEQ)
    return [{"input_ids": r, "labels": r} for r in ids]


def training_args(out, max_steps: int = 10, save_steps: int | None = None, **kw) -> TrainingArguments:
    base = dict(learning_rate=3e-3, weight_decay=0.1, max_steps=max_steps, warmup_steps=2,
                lr_scheduler_type="cosine", per_device_train_batch_size=8, use_cpu=True, report_to=[],
                dataloader_num_workers=0, seed=0, data_seed=0, logging_steps=1, disable_tqdm=True,
                save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    base.update(kw)
    return TrainingArguments(str(out), **base)


def ids(params) -> set[int]:
    return {id(p) for p in params}


# --------------------------------------------------------------------------- import and names
def test_importing_optimkit_does_not_import_transformers():
    code = ("import sys, optimkit, optimkit.integrations, optimkit.integrations.hf as h; "
            "assert 'transformers' not in sys.modules, 'imported'; assert optimkit.integrations.hf is h")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("name, base, precision, projection", [
    ("adamw", "adamw", None, None), ("AdamW-Q8", "adamw", "q8", None), ("adamw_galore", "adamw", None, ok.GaLore),
    ("adamw_q8_galore", "adamw", "q8", ok.GaLore), ("adamw_galore_q8", "adamw", "q8", ok.GaLore),
    ("lion_bf16", "lion", "bf16", None), ("adamw_apollo_mini", "adamw", None, ok.APOLLOMini),
    ("galore_adamw_8bit", "adamw", "q8", ok.GaLore), ("adamw_torch", "adamw", None, None),
    ("lion_8bit", "lion", "q8", None), ("muon", "muon", None, None)])
def test_resolve_name(name, base, precision, projection):
    assert hf.resolve_name(name) == (base, precision, projection)


def test_unknown_name_lists_close_names(tmp_path):
    model, args = tiny_gpt2(), training_args(tmp_path)
    with pytest.raises(ValueError, match=r"Invalid name.*'adamx'.*closest:.*adamw"):
        hf.create_optimizer(model, args, "adamx")
    with pytest.raises(ValueError, match=r"closest:.*adamw_q8"):
        hf.create_optimizer(model, args, "adamw_q9")
    with pytest.raises(TypeError, match="name must be a str"):
        hf.create_optimizer(model, args, 3)
    assert set(ok.available()) <= set(hf.names())


@pytest.mark.parametrize("name", ["sps", "mezo", "adahessian"])
def test_optimizers_the_trainer_cannot_drive_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="Trainer"):
        hf.create_optimizer(tiny_gpt2(), training_args(tmp_path), name)


def test_bad_arguments(tmp_path):
    model = tiny_gpt2()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="num_training_steps"):
        hf.create_optimizer(model, training_args(tmp_path, max_steps=-1))
    with pytest.raises(ValueError, match="learning_rate"):
        hf.create_optimizer(model, training_args(tmp_path, learning_rate=-1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        hf.create_optimizer(model, types.SimpleNamespace(learning_rate=1e-3, weight_decay=-0.1, max_steps=5))
    with pytest.raises(TypeError, match="learning_rate"):
        hf.create_optimizer(model, types.SimpleNamespace(max_steps=5))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        hf.create_optimizer([torch.zeros(2)], training_args(tmp_path))
    with pytest.raises(ValueError, match="refuses projections"):
        hf.create_optimizer(model, training_args(tmp_path), "muon_galore")
    with pytest.raises(TypeError, match="adamw= is for name='muon'"):
        hf.create_optimizer(model, training_args(tmp_path), "adamw", adamw=dict(lr=1.0))
    with pytest.raises(ValueError, match="Invalid adamw: 'use_muon'"):
        hf.create_optimizer(model, training_args(tmp_path), "muon", adamw=dict(use_muon=True))
    with pytest.raises(TypeError, match="weight_decay"):
        hf.create_optimizer(model, training_args(tmp_path), "sm3", weight_decay=0.1)
    with pytest.warns(UserWarning, match="no weight decay"):
        hf.create_optimizer(model, training_args(tmp_path, weight_decay=0.1), "sm3")
    with pytest.raises(ValueError, match="state_precision"):
        hf.create_optimizer(model, training_args(tmp_path), "adamw_q8", state_precision="bf16")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    # max_steps <= 0: the length comes from the keyword
    _, sched = hf.create_optimizer(model, training_args(tmp_path, max_steps=-1, lr_scheduler_type="linear",
                                                        warmup_steps=0), num_training_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs == pytest.approx([3e-3, 2.25e-3, 1.5e-3, 0.75e-3, 0.0])


# --------------------------------------------------------------------------- groups and hyperparameters
def test_groups_match_the_trainers_own(tmp_path):
    """Decay / no-decay split as the Trainer's own AdamW, the tied embedding/head once."""
    model, args = tiny_gpt2(), training_args(tmp_path, optim="adamw_torch")
    assert model.lm_head.weight is model.transformer.wte.weight
    trainer = Trainer(model, args)
    trainer.create_optimizer()
    theirs = {g["weight_decay"]: ids(g["params"]) for g in trainer.optimizer.param_groups}
    opt, _ = hf.create_optimizer(model, args, "adamw")
    ours = {g["weight_decay"]: ids(g["params"]) for g in opt.param_groups}
    assert len(opt.param_groups) == 2 and ours == theirs
    flat = [p for g in opt.param_groups for p in g["params"]]
    assert len(flat) == len(set(map(id, flat))) == len(list(model.parameters()))
    assert id(model.transformer.wte.weight) in ours[0.1]
    assert set(hf.decay_parameter_names(model)) == HIDDEN | {"transformer.wte.weight", "transformer.wpe.weight"}


def test_vectors_and_frozen_parameters(tmp_path):
    """1-D parameters that are neither biases nor norms get no decay here (the Trainer decays
    them); frozen parameters are left out, as the Trainer does."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.gate = torch.nn.Parameter(torch.ones(4))
            self.final_norm = torch.nn.LayerNorm(4)
            self.frozen = torch.nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    net = Net()
    args = training_args(tmp_path)
    trainer = Trainer(net, args)
    theirs = set(trainer.get_decay_parameter_names(net))
    ours = set(hf.decay_parameter_names(net))
    assert ours == {"proj.weight"}
    assert theirs - ours == {"gate", "frozen.weight"}  # the Trainer then drops the frozen one
    opt, _ = hf.create_optimizer(net, args)
    assert [ids(g["params"]) for g in opt.param_groups] == [
        ids([net.proj.weight]), ids([net.proj.bias, net.gate, net.final_norm.weight, net.final_norm.bias])]


def test_hyperparameters_from_args(tmp_path):
    model = tiny_gpt2()
    args = training_args(tmp_path, learning_rate=2e-3, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95,
                         adam_epsilon=1e-6)
    opt, _ = hf.create_optimizer(model, args, "adamw")
    assert isinstance(opt, ok.AdamW)
    assert [(g["initial_lr"], g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups] == [
        (2e-3, (0.8, 0.95), 1e-6, 0.05), (2e-3, (0.8, 0.95), 1e-6, 0.0)]
    lion, _ = hf.create_optimizer(model, args, "lion", betas=(0.95, 0.98), weight_decay=0.5)
    assert isinstance(lion, ok.Lion)
    assert [(g["betas"], g["weight_decay"]) for g in lion.param_groups] == [((0.95, 0.98), 0.5), ((0.95, 0.98), 0.0)]
    lion, _ = hf.create_optimizer(model, args, "lion")  # args' betas were set: they apply
    assert lion.param_groups[0]["betas"] == (0.8, 0.95)
    # with TrainingArguments' default betas/eps every optimizer keeps its own defaults
    default_args = training_args(tmp_path)
    for name in ("lion", "soap", "adabelief", "adam"):
        opt, _ = hf.create_optimizer(model, default_args, name)
        cls_defaults = ok.info(name).defaults
        assert opt.param_groups[0]["betas"] == cls_defaults["betas"]
        assert opt.param_groups[0].get("eps") == cls_defaults.get("eps")
    muon, _ = hf.create_optimizer(model, default_args, "muon")
    assert muon.param_groups[-1]["adamw_betas"] == (0.9, 0.95)
    muon, _ = hf.create_optimizer(model, args, "muon")
    assert (muon.param_groups[-1]["adamw_betas"], muon.param_groups[-1]["adamw_eps"]) == ((0.8, 0.95), 1e-6)
    q8, _ = hf.create_optimizer(model, args, "adamw_q8", compile=False)
    assert all(g["state_precision"] == "q8" for g in q8.param_groups)
    plain = types.SimpleNamespace(learning_rate=1e-3, max_steps=5)  # TrainingArguments' defaults for the rest
    opt, sched = hf.create_optimizer(model, plain, "adam")
    assert [(g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups] == [
        ((0.9, 0.999), 1e-8, 0.0), ((0.9, 0.999), 1e-8, 0.0)]


def test_galore_on_hidden_matrices_only(tmp_path):
    model = tiny_gpt2()
    names = {id(p): n for n, p in model.named_parameters()}
    opt, _ = hf.create_optimizer(model, training_args(tmp_path), "adamw_galore", projection=dict(rank=8))
    projected, other, plain = opt.param_groups
    assert isinstance(projected["projection"], ok.GaLore) and projected["projection"].rank == 8
    assert {names[id(p)] for p in projected["params"]} == HIDDEN
    assert other["projection"] is None and plain["projection"] is None
    assert {names[id(p)] for p in other["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    custom = ok.APOLLO(rank=4)
    opt, _ = hf.create_optimizer(model, training_args(tmp_path), "adamw", projection=custom)
    assert opt.param_groups[0]["projection"] is custom


def test_muon_split(tmp_path):
    """Muon on what ok.muon_param_groups gives Muon, AdamW (decay / no decay) on the rest."""
    model = tiny_gpt2()
    names = {id(p): n for n, p in model.named_parameters()}
    args = training_args(tmp_path, learning_rate=1e-3, weight_decay=0.1)
    opt, _ = hf.create_optimizer(model, args, "muon", adamw=dict(lr=3e-4))
    assert isinstance(opt, ok.Muon)
    reference = ok.muon_param_groups(model)
    muon_groups = [g for g in opt.param_groups if g["use_muon"]]
    adamw_groups = [g for g in opt.param_groups if not g["use_muon"]]
    assert set().union(*(ids(g["params"]) for g in muon_groups)) == set().union(
        *(ids(g["params"]) for g in reference if g["use_muon"]))
    assert {names[id(p)] for g in muon_groups for p in g["params"]} == HIDDEN
    assert all(g["initial_lr"] == 1e-3 and g["weight_decay"] == 0.1 and g["adjust_lr_fn"] == "match_rms_adamw"
               for g in muon_groups)
    decay, plain = adamw_groups
    assert {names[id(p)] for p in decay["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert (decay["initial_lr"], decay["weight_decay"], plain["initial_lr"], plain["weight_decay"]) == (3e-4, 0.1, 3e-4, 0.0)
    assert all(p.dim() == 1 for p in plain["params"])
    assert decay["adamw_betas"] == (0.9, 0.95) and decay["adamw_eps"] == 1e-8  # Muon's own


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind, extra", [("linear", {}), ("cosine", {}), ("constant", {}),
                                         ("constant_with_warmup", {}), ("inverse_sqrt", {}),
                                         ("polynomial", {"power": 2.0}), ("cosine_with_restarts", {"num_cycles": 2}),
                                         ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
                                         ("warmup_stable_decay", {"num_decay_steps": 4})])
def test_scheduler_without_transformers_equals_transformers(tmp_path, monkeypatch, kind, extra):
    """The optimkit.schedules fallback gives transformers.get_scheduler's learning rates."""
    def lrs(sched):
        out = []
        for _ in range(14):
            out.append(sched.get_last_lr()[0])
            sched.optimizer.step()
            sched.step()
        return out

    args = training_args(tmp_path, max_steps=12, warmup_steps=3, lr_scheduler_type=kind, lr_scheduler_kwargs=extra)
    model = torch.nn.Linear(2, 2)
    _, with_hf = hf.create_optimizer(model, args)
    assert type(with_hf).__module__.startswith("torch.optim")
    expected = lrs(with_hf)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `from transformers import ...` fails
    _, fallback = hf.create_optimizer(model, args)
    assert isinstance(fallback.lr_lambdas[0], ok.schedules.Schedule)
    assert lrs(fallback) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_warmup_ratio(tmp_path):
    assert hf._lengths(types.SimpleNamespace(max_steps=40, warmup_steps=0.1), None) == (40, 4)
    assert hf._lengths(types.SimpleNamespace(max_steps=40, warmup_ratio=0.25), None) == (40, 10)
    args = training_args(tmp_path, max_steps=40, warmup_steps=0.1)
    if int(transformers.__version__.split(".")[0]) >= 5:  # warmup_steps < 1 is a ratio there
        assert hf._lengths(args, None) == (40, args.get_warmup_steps(40))
    with pytest.raises(ValueError, match="warmup_steps"):
        hf._lengths(types.SimpleNamespace(max_steps=40, warmup_steps=-1), None)


# --------------------------------------------------------------------------- Trainer runs
def _train(out, name, max_steps, save_steps=None, resume=None, perturb=False, args_kw=None, **kw):
    model = tiny_gpt2()
    if perturb:  # the resumed run must get its weights from the checkpoint
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    args = training_args(out, max_steps=max_steps, save_steps=save_steps, **(args_kw or {}))
    opt, sched = hf.create_optimizer(model, args, name, **kw)
    evaluating = args.eval_strategy != "no"
    trainer = Trainer(model, args, train_dataset=byte_dataset(), optimizers=(opt, sched),
                      eval_dataset=byte_dataset(16) if evaluating else None)
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, opt, losses


def assert_same_run(model_a, opt_a, model_b, opt_b):
    """Bit-identical weights and optimizer state (every tensor, every plain value)."""
    reference = dict(model_a.named_parameters())
    for n, p in model_b.named_parameters():
        assert torch.equal(p, reference[n]), n
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups):
        for a, b in zip(group_a["params"], group_b["params"]):
            sa, sb = opt_a.state[a], opt_b.state[b]
            assert sa.keys() == sb.keys()
            for key in sa:
                if isinstance(sa[key], torch.Tensor):
                    assert torch.equal(sa[key], sb[key]), key
                else:
                    assert sa[key] == sb[key], key


@pytest.fixture
def one_thread():
    """Tiny models run fastest single-threaded (and the suite shares its cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


RESUME_CASES = {
    "adamw": {},
    "adamw_q8": {},
    # rank 8, a new basis every 3 steps: the resumed run (steps 5..10) crosses refreshes at 7 and 10
    "adamw_galore": dict(projection=dict(rank=8, interval=3)),
    "muon": {},
    "schedulefree_adamw": {},  # the Trainer calls optimizer.train() before training
}


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_trainer_trains_and_resumes_bit_exactly(tmp_path, name, one_thread):
    """10 steps uninterrupted (6 per epoch, shuffled; checkpoint at step 4) against a new model,
    optimizer and Trainer resumed from that checkpoint: identical final weights."""
    kw = RESUME_CASES[name]
    full, opt, losses = _train(tmp_path, name, max_steps=10, save_steps=4, **kw)
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5, losses
    states = [s for s in opt.state.values()]
    if name == "adamw_q8":
        assert any(s["_layout"]["exp_avg"][0] == "q8" for s in states if "_layout" in s)
    if name == "adamw_galore":
        assert sum(any(k.startswith("proj:") for k in s) for s in states) == len(HIDDEN)
    ckpt = tmp_path / "checkpoint-4"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)  # what the Trainer reads back
    assert len(saved["state"]) == len(states)

    resumed, opt2, losses2 = _train(tmp_path, name, max_steps=10, save_steps=4, resume=str(ckpt),
                                    perturb=True, **kw)
    assert losses2 == losses  # the log history comes back with the checkpoint, then the same losses
    assert_same_run(full, opt, resumed, opt2)

    if name == "adamw":  # control: without the optimizer state the same resume does not match
        os.remove(ckpt / "optimizer.pt")
        fresh, _, _ = _train(tmp_path, name, max_steps=10, save_steps=4, resume=str(ckpt), perturb=True)
        reference = dict(full.named_parameters())
        assert not all(torch.equal(p, reference[n]) for n, p in fresh.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw_q8", "schedulefree_adamw", "muon"])
def test_resume_with_accumulation_autocast_and_evaluation(tmp_path, name, one_thread):
    """Gradient accumulation (2), bf16 autocast and an evaluation every 2 steps (the Trainer
    switches schedule-free optimizers to eval() and back): resume at step 3 of 8 still bit-exact."""
    setting = dict(gradient_accumulation_steps=2, bf16=True, eval_strategy="steps", eval_steps=2,
                   per_device_eval_batch_size=8)
    full, opt, losses = _train(tmp_path, name, max_steps=8, save_steps=3, args_kw=setting)
    assert losses[-1] < losses[0] - 0.5, losses
    resumed, opt2, losses2 = _train(tmp_path, name, max_steps=8, save_steps=3, args_kw=setting,
                                    resume=str(tmp_path / "checkpoint-3"), perturb=True)
    assert losses2 == losses
    assert_same_run(full, opt, resumed, opt2)


def test_optimkit_trainer_derives_the_length_from_the_data(tmp_path, one_thread):
    """OptimkitTrainer with max_steps=-1 (2 epochs of 6 steps) equals Trainer(optimizers=
    create_optimizer(..., num_training_steps=12)), and builds the same optimizer."""
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=2)
    model = tiny_gpt2()
    trainer = hf.OptimkitTrainer(model, args, train_dataset=byte_dataset(), optimizer_name="adamw_q8",
                                 optimizer_kwargs=dict(betas=(0.9, 0.95)))
    trainer.train()
    assert trainer.state.global_step == 12
    opt = trainer.optimizer.optimizer  # accelerate's wrapper around it
    assert isinstance(opt, ok.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert all(g["state_precision"] == "q8" for g in opt.param_groups)
    reference = tiny_gpt2()
    ref_opt = hf.create_optimizer(reference, args, "adamw_q8", betas=(0.9, 0.95), num_training_steps=12)
    Trainer(reference, args, train_dataset=byte_dataset(), optimizers=ref_opt).train()
    expected = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, expected[n]), n
    with pytest.raises(ValueError, match="Invalid name"):
        hf.OptimkitTrainer(tiny_gpt2(), args, optimizer_name="adamq")
