"""optimkit optimizers and schedules inside PyTorch Lightning (``lightning.pytorch``).

A small MLP on scikit-learn's digits, trained by a ``Trainer`` on the CPU.
References: the same optimizer stepped by a hand-written loop over the same
batches (Lightning must add nothing), and an uninterrupted ``Trainer`` run
(a run resumed from a Lightning checkpoint, ``ckpt_path=``, must end with
bit-identical weights and optimizer state).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import optimkit as ok
from helpers import digits_split

pl = pytest.importorskip("lightning.pytorch")
from optimkit.integrations.lightning import (ScheduleFreeCallback, StatePlacementCallback,  # noqa: E402
                                             restore_state_placement)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers", "ignore:.*isinstance\\(treespec, LeafSpec\\)",
    "ignore:.*GPU available but not used", "ignore:.*exists and is not empty",
    # Lightning's notes on the setups used here on purpose (no validation loop in most runs;
    # the saving callback absent from the resuming Trainer; post-step manual checkpoints)
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
    "ignore:Be aware that when using `ckpt_path`",
    "ignore:Using ModelCheckpoint with manual optimization")

N_TRAIN, BATCH = 256, 64          # 4 batches per epoch
BATCHES_PER_EPOCH = N_TRAIN // BATCH
STEPS = 3 * BATCHES_PER_EPOCH     # 3 epochs


def make_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


class EpochShuffle(torch.utils.data.Sampler):
    """A new permutation every epoch, a function of the epoch alone (``set_epoch``,
    which Lightning calls as for ``DistributedSampler``): resumable at epoch ends."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def train_loader(batch: int = BATCH) -> torch.utils.data.DataLoader:
    x, y, _, _ = digits_split()
    data = torch.utils.data.TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    return torch.utils.data.DataLoader(data, batch_size=batch, sampler=EpochShuffle(N_TRAIN))


def val_loader() -> torch.utils.data.DataLoader:
    _, _, x, y = digits_split()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:128], y[:128]), batch_size=128)


def schedule(opt):
    return ok.schedules.cosine(STEPS, 2).scheduler(opt)


class DigitsModule(pl.LightningModule):
    """``configure_optimizers`` returns ``make_opt(net)`` and, with ``scheduled``, a
    per-step cosine schedule; ``manual`` switches to manual optimization;
    ``nan_at``: the loss of that (0-based) training batch is multiplied by NaN."""

    def __init__(self, make_opt, seed: int = 0, scheduled: bool = True, manual: bool = False,
                 nan_at: int | None = None):
        super().__init__()
        self.net = make_net(seed)
        self.make_opt, self.scheduled, self.nan_at = make_opt, scheduled, nan_at
        self.automatic_optimization = not manual
        self.val_losses: list[float] = []
        self.seen = 0
        self.skipped_seen: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.seen == self.nan_at:
            loss = loss * float("nan")
        self.seen += 1
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()            # a LightningOptimizer around the optimkit optimizer
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.skipped_seen.append(opt.skipped_steps)   # optimkit attributes reach through it
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if not self.trainer.sanity_checking:
            self.val_losses.append(float(loss))
        self.log("val_loss", loss)

    def configure_optimizers(self):
        opt = self.make_opt(self.net)
        if not self.scheduled:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule(opt), "interval": "step"}}


def trainer(max_steps: int = STEPS, **kwargs) -> "pl.Trainer":
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, enable_progress_bar=False,
                      logger=False, enable_model_summary=False, **kwargs)


def hand_loop(make_opt, steps: int = STEPS, scheduled: bool = True, clip=None, nan_at=None):
    """The loop Lightning runs, written out: same batches, zero_grad/backward/clip/step/schedule."""
    net = make_net(0)
    opt = make_opt(net)
    sched = schedule(opt) if scheduled else None
    loader, done, epoch = train_loader(), 0, 0
    while done < steps:
        loader.sampler.set_epoch(epoch)
        epoch += 1
        for x, y in loader:
            if done == steps:
                break
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            if done == nan_at:
                loss = loss * float("nan")
            loss.backward()
            if clip is not None:
                algorithm, value = clip
                if algorithm == "norm":
                    torch.nn.utils.clip_grad_norm_(net.parameters(), value)
                else:
                    torch.nn.utils.clip_grad_value_(net.parameters(), value)
            opt.step()
            if sched is not None:
                sched.step()
            done += 1
    return net, opt


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa.keys() == sb.keys() and sa["state"].keys() == sb["state"].keys()
    for pid, st in sa["state"].items():
        assert st.keys() == sb["state"][pid].keys()
        for key, value in st.items():
            other = sb["state"][pid][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (pid, key)
            else:
                assert value == other, (pid, key)


CASES = {
    "adamw": lambda net: ok.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1),
    # min_quant_size=0: every moment tensor is stored as 8-bit codes (not only the large ones)
    "adamw_q8": lambda net: ok.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, state_precision="q8",
                                     min_quant_size=0),
    # the hidden matrix to Muon, head and biases to the auxiliary AdamW (two groups)
    "muon": lambda net: ok.Muon(ok.muon_param_groups(net, adamw=dict(lr=3e-3)), lr=0.02),
}


def test_trainer_steps_like_a_hand_loop():
    """An optimkit optimizer + optimkit schedule returned by configure_optimizers:
    Lightning's automatic optimization gives exactly the hand loop's weights."""
    module = DigitsModule(CASES["adamw"])
    trainer().fit(module, train_loader())
    net, opt = hand_loop(CASES["adamw"])
    assert_same_weights(module.net, net)
    assert_same_state(module.trainer.optimizers[0], opt)
    lr = module.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == opt.param_groups[0]["lr"] and lr < 1e-2  # the schedule ran, once per step


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_resume_is_bit_exact(case, tmp_path):
    """Save at the last batch of epoch 1 (step 4) with ModelCheckpoint, resume in a new
    Trainer from ``ckpt_path`` (``weights_only=True``) into a module initialized
    differently: the final weights and optimizer state equal the uninterrupted run's."""
    make_opt = CASES[case]
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{step}",
                                         every_n_train_steps=BATCHES_PER_EPOCH, save_top_k=-1)
    full = DigitsModule(make_opt)
    trainer(enable_checkpointing=True, callbacks=[saver]).fit(full, train_loader())
    path = tmp_path / f"step={BATCHES_PER_EPOCH}.ckpt"
    ckpt = torch.load(path, weights_only=True)  # plain values only: the safe loader reads it
    opt_state = ckpt["optimizer_states"][0]
    if case == "adamw_q8":
        assert all("exp_avg:codes" in s and s["exp_avg:codes"].dtype == torch.uint8
                   for s in opt_state["state"].values())
    if case == "muon":
        assert [g["use_muon"] for g in opt_state["param_groups"]] == [True, False]
    assert {s["step"] for s in opt_state["state"].values()} == {BATCHES_PER_EPOCH}

    resumed = DigitsModule(make_opt, seed=1)
    again = trainer()
    again.fit(resumed, train_loader(), ckpt_path=path, weights_only=True)
    assert again.global_step == STEPS
    assert_same_weights(resumed.net, full.net)
    assert_same_state(again.optimizers[0], full.trainer.optimizers[0])
    assert again.lr_scheduler_configs[0].scheduler.last_epoch == STEPS


def test_manual_optimization_resume_and_skipped_steps(tmp_path):
    """Manual optimization (``self.optimizers()``, ``manual_backward``, the module steps
    its scheduler) with ``nonfinite="skip"`` and a NaN loss on batch 1: equals the hand
    loop, ``skipped_steps`` is read through Lightning's ``LightningOptimizer``, and a
    resume from a checkpoint (default ``torch.load``, weights_only) is bit-exact."""
    def make_opt(net):
        return ok.AdamW(net.parameters(), lr=1e-2, nonfinite="skip")

    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{step}",
                                         every_n_train_steps=BATCHES_PER_EPOCH, save_top_k=-1)
    full = DigitsModule(make_opt, manual=True, nan_at=1)
    trainer(enable_checkpointing=True, callbacks=[saver]).fit(full, train_loader())
    net, opt = hand_loop(make_opt, nan_at=1)
    assert opt.skipped_steps == 1
    assert full.skipped_seen == [0] + [1] * (STEPS - 1)
    assert_same_weights(full.net, net)
    assert_same_state(full.trainer.optimizers[0], opt)

    # Lightning counts the skipped call as an optimizer step: the step-4 file is the epoch-1 end
    resumed = DigitsModule(make_opt, manual=True, seed=1)
    again = trainer()
    again.fit(resumed, train_loader(), ckpt_path=tmp_path / f"step={BATCHES_PER_EPOCH}.ckpt")
    assert again.optimizers[0].skipped_steps == 1   # saved in the optimizer's state dict
    assert_same_weights(resumed.net, full.net)
    assert_same_state(again.optimizers[0], full.trainer.optimizers[0])


@pytest.mark.parametrize("algorithm,value", [("norm", 0.05), ("value", 0.002)])
def test_gradient_clipping_is_applied(algorithm, value):
    """``gradient_clip_val`` clips the gradients the optimkit optimizer steps on:
    the run equals a hand loop with clip_grad_norm_/clip_grad_value_, and differs
    from the unclipped run (the threshold is below the gradients' size)."""
    def make_opt(net):
        return ok.SGD(net.parameters(), lr=0.1, momentum=0.9)

    clipped = DigitsModule(make_opt, scheduled=False)
    trainer(gradient_clip_val=value, gradient_clip_algorithm=algorithm).fit(clipped, train_loader())
    net, _ = hand_loop(make_opt, scheduled=False, clip=(algorithm, value))
    assert_same_weights(clipped.net, net)
    free, _ = hand_loop(make_opt, scheduled=False)
    assert not torch.equal(free[0].weight, net[0].weight)


def schedule_free_reference(make_opt, steps: int):
    """Hand loop of schedule-free training with an evaluation after every epoch:
    train() before each batch, eval() for validation, eval() at the end."""
    net = make_net(0)
    opt = make_opt(net)
    loader = train_loader()
    vx, vy = next(iter(val_loader()))
    val_losses = []
    for epoch in range(steps // BATCHES_PER_EPOCH):
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            opt.train()
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        opt.eval()
        with torch.no_grad():
            val_losses.append(float(F.cross_entropy(net(vx), vy)))
    opt.eval()
    return net, opt, val_losses



def _fit_with_schedule_free_callback(make_opt, tmp_path):
    """Fit with ScheduleFreeCallback, checkpointing at each validation, and check the
    validation losses against the hand loop; returns (module, reference net, reference
    opt, reference validation losses).

    save_on_train_epoch_end=False: written in on_validation_end. (Lightning 2.6 resumes a
    checkpoint written in on_train_epoch_end, the default here, with the sampler's epoch
    one ahead: other batches, whatever the optimizer; see docs/integrations_lightning.md.)"""
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{step}", monitor="val_loss",
                                         save_top_k=-1, save_on_train_epoch_end=False)
    full = DigitsModule(make_opt, scheduled=False)
    trainer(enable_checkpointing=True, callbacks=[ScheduleFreeCallback(), saver]).fit(
        full, train_loader(), val_loader())
    net, opt, val_losses = schedule_free_reference(make_opt, STEPS)
    assert full.val_losses == val_losses
    return full, net, opt, val_losses

def test_schedule_free_callback_evaluates_at_x_and_resumes(tmp_path):
    """ScheduleFreeCallback: validation (after a sanity check) runs at the evaluation
    point x, training at y, the module ends fit holding x: all equal to the hand loop.
    A checkpoint written after validation (ModelCheckpoint with a monitor) holds x and
    the optimizer's kept y; resuming from it is bit-exact."""
    def make_opt(net):
        return ok.ScheduleFreeAdamW(net.parameters(), lr=5e-3, warmup_steps=2, weight_decay=1e-3)

    full, net, opt, val_losses = _fit_with_schedule_free_callback(make_opt, tmp_path)
    assert_same_weights(full.net, net)               # x, the evaluation point
    sf = full.trainer.optimizers[0]
    assert not sf.param_groups[0]["train_mode"]
    y = sf.state[full.net[0].weight]["sf_y"]
    assert not torch.equal(y, full.net[0].weight)    # x and y differ: the switch matters

    path = tmp_path / f"step={BATCHES_PER_EPOCH}.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["train_mode"] is False   # saved in eval mode
    resumed = DigitsModule(make_opt, scheduled=False, seed=1)
    again = trainer(callbacks=[ScheduleFreeCallback()])
    again.fit(resumed, train_loader(), val_loader(), ckpt_path=path)
    assert_same_weights(resumed.net, full.net)
    assert resumed.val_losses == val_losses[1:]
    assert_same_state(again.optimizers[0], sf)


def test_schedule_free_callback_leaves_other_optimizers_and_checks_arguments():
    """An optimizer without train()/eval() trains as without the callback; a non-bool
    ``eval_at_end`` is a TypeError naming it."""
    with pytest.raises(TypeError, match="eval_at_end"):
        ScheduleFreeCallback(eval_at_end=1)
    module = DigitsModule(CASES["adamw"], scheduled=False)
    trainer(max_steps=2, callbacks=[ScheduleFreeCallback()]).fit(module, train_loader())
    net, _ = hand_loop(CASES["adamw"], steps=2, scheduled=False)
    assert_same_weights(module.net, net)


def test_importing_optimkit_imports_no_framework():
    """``import optimkit`` loads neither Lightning nor accelerate (the integration module
    is imported on request only)."""
    code = ("import sys, optimkit; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'accelerate', 'optimkit.integrations.lightning') "
            "if m in sys.modules]; assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


class HookedScheduleFree(DigitsModule):
    """The switch written in the module's hooks, through ``self.optimizers()``
    (a LightningOptimizer), instead of the callback."""

    def on_train_batch_start(self, batch, batch_idx):
        self.optimizers().train()

    def on_validation_start(self):
        self.optimizers().eval()

    def on_train_end(self):
        self.optimizers().eval()


def test_schedule_free_switch_in_module_hooks():
    def make_opt(net):
        return ok.ScheduleFreeAdamW(net.parameters(), lr=5e-3, warmup_steps=2)

    module = HookedScheduleFree(make_opt, scheduled=False)
    trainer(max_steps=2 * BATCHES_PER_EPOCH).fit(module, train_loader(), val_loader())
    net, _, val_losses = schedule_free_reference(make_opt, 2 * BATCHES_PER_EPOCH)
    assert module.val_losses == val_losses
    assert_same_weights(module.net, net)


def test_disk_placed_state_resumes_and_stays_on_disk(tmp_path):
    """``state_placement="disk"``: a resumed run is bit-exact and its state is still
    memory-mapped after Lightning moved the loaded state to the (CPU) device."""
    dirs = iter([tmp_path / "full", tmp_path / "resumed"])

    def make_opt(net):
        state_dir = next(dirs)
        state_dir.mkdir()
        return ok.AdamW(net.parameters(), lr=1e-2, state_placement="disk", state_dir=str(state_dir))

    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{step}",
                                         every_n_train_steps=BATCHES_PER_EPOCH, save_top_k=-1)
    full = DigitsModule(make_opt)
    trainer(enable_checkpointing=True, callbacks=[saver]).fit(full, train_loader())
    resumed = DigitsModule(make_opt, seed=1)
    again = trainer(callbacks=[StatePlacementCallback()])
    again.fit(resumed, train_loader(), ckpt_path=tmp_path / f"step={BATCHES_PER_EPOCH}.ckpt")
    assert_same_weights(resumed.net, full.net)
    assert_same_state(again.optimizers[0], full.trainer.optimizers[0])
    opt = again.optimizers[0]
    moments = [v for st in opt.state.values() for k, v in st.items() if k != "step"]
    assert len(moments) == 8 and all(opt._placement.on_disk(v) for v in moments)


def test_restore_state_placement_after_a_framework_moved_the_state(tmp_path):
    """What Lightning's post-load move does on an accelerator, simulated on the CPU: each
    disk-placed state tensor replaced by a plain copy. restore_state_placement (what
    StatePlacementCallback calls) maps them to files again, values kept, and training
    continues exactly as with state that never moved."""
    x, y, _, _ = digits_split()
    nets = [make_net(0), make_net(0)]
    opts = []
    for i, net in enumerate(nets):
        (tmp_path / str(i)).mkdir()
        opts.append(ok.AdamW(net.parameters(), lr=1e-2, state_placement="disk", state_dir=str(tmp_path / str(i))))

    def step(net, opt):
        opt.zero_grad()
        F.cross_entropy(net(x[:64]), y[:64]).backward()
        opt.step()

    for net, opt in zip(nets, opts):
        step(net, opt)
    moved = opts[1]
    for st in moved.state.values():
        for key in [k for k in st if k != "step"]:
            st[key] = st[key].clone()                       # no longer memory-mapped
    # (a copy may get the id of the mapped tensor it replaced: on_disk also checks the storage)
    assert not any(moved._placement.on_disk(v) for st in moved.state.values() for k, v in st.items()
                   if k != "step")
    total = ok.state_bytes(moved)
    assert ok.state_bytes(moved, by_placement=True) == {"cpu": total}   # the report agrees
    assert restore_state_placement(moved) == 4
    assert ok.state_bytes(moved, by_placement=True) == {"disk": total}
    assert all(moved._placement.on_disk(v) for st in moved.state.values() for k, v in st.items()
               if k != "step")
    assert restore_state_placement(torch.optim.SGD(nets[0].parameters(), lr=0.1)) == 0
    for _ in range(2):
        for net, opt in zip(nets, opts):
            step(net, opt)
    assert_same_weights(nets[1], nets[0])
    assert_same_state(opts[1], opts[0])


def test_schedule_free_wrapper_trains_checkpoints_and_resumes(tmp_path):
    """ok.ScheduleFreeWrapper around torch.optim.RMSprop (a torch.optim.Optimizer, so
    configure_optimizers accepts it): with ScheduleFreeCallback it equals the hand loop,
    and its state dict (base + schedule-free part) resumes bit-exactly from an
    eval-mode checkpoint read with weights_only=True."""
    def make_opt(net):
        return ok.ScheduleFreeWrapper(torch.optim.RMSprop(net.parameters(), lr=2.5e-3), momentum=0.9)

    full, net, opt, val_losses = _fit_with_schedule_free_callback(make_opt, tmp_path)
    assert_same_weights(full.net, net)
    path = tmp_path / f"step={BATCHES_PER_EPOCH}.ckpt"
    assert torch.load(path, weights_only=True)["optimizer_states"][0]["schedulefree"]["train_mode"] is False
    resumed = DigitsModule(make_opt, scheduled=False, seed=1)
    again = trainer(callbacks=[ScheduleFreeCallback()])
    again.fit(resumed, train_loader(), val_loader(), ckpt_path=path, weights_only=True)
    assert_same_weights(resumed.net, full.net)
    assert resumed.val_losses == val_losses[1:]


def test_accumulate_grad_batches_equals_hand_accumulation():
    """``accumulate_grad_batches=2`` over micro-batches of 32: one optimkit step and one
    schedule step per two micro-batches, bit-identical to a hand loop that
    accumulates ``loss / 2`` gradients over the same micro-batches."""
    module = DigitsModule(CASES["adamw_q8"])
    trainer(accumulate_grad_batches=2).fit(module, train_loader(BATCH // 2))
    net = make_net(0)
    opt = CASES["adamw_q8"](net)
    sched = schedule(opt)
    loader = train_loader(BATCH // 2)
    for epoch in range(STEPS // BATCHES_PER_EPOCH):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        for first, second in zip(batches[::2], batches[1::2]):
            opt.zero_grad()
            for x, y in (first, second):
                (F.cross_entropy(net(x), y) / 2).backward()
            opt.step()
            sched.step()
    assert {s["step"] for s in opt.state.values()} == {STEPS}
    assert_same_weights(module.net, net)
    assert_same_state(module.trainer.optimizers[0], opt)
