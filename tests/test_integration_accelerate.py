"""optimkit optimizers and schedules through Hugging Face accelerate (CPU).

``accelerator.prepare`` wraps the optimizer in ``AcceleratedOptimizer`` and the
scheduler in ``AcceleratedScheduler``. References: the same optimizer in a
hand-written loop (accelerate must add nothing), an uninterrupted run (a run
resumed with ``save_state``/``load_state`` must end bit-identical), and for
gradient accumulation the hand loop on the summed batch.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import optimkit as ok
from helpers import digits_split

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.scheduler import AcceleratedScheduler  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

N_TRAIN, BATCH = 256, 64          # 4 batches per epoch
STEPS, SAVE_AT = 12, 6            # 3 epochs; saved in the middle of epoch 2


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons (device, gradient accumulation): reset
    them around every test so that each Accelerator starts from its own arguments."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def loader(batch: int = BATCH) -> torch.utils.data.DataLoader:
    x, y, _, _ = digits_split()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), batch_size=batch)


def schedule(opt):
    return ok.schedules.cosine(STEPS, 2).scheduler(opt)


CASES = {
    "adamw": lambda params: ok.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adamw_q8": lambda params: ok.AdamW(params, lr=1e-2, weight_decay=0.1, state_precision="q8",
                                        min_quant_size=0),
    # rank-4 subspaces of the two matrices, refreshed at steps 1, 5, 9: the save at step 6
    # falls inside an interval, so the saved basis and the projected moments both matter
    "adamw_galore": lambda params: ok.AdamW(params, lr=1e-2, weight_decay=0.1,
                                            projection=ok.GaLore(rank=4, interval=4)),
}


def run_accelerated(make_opt, steps: int = STEPS, save_dir=None, resume_dir=None, seed: int = 0):
    """Train with accelerate: ``save_state(save_dir)`` after step SAVE_AT, or start with
    ``load_state(resume_dir)`` (a differently initialized model) and skip the batches
    of the current epoch that were already trained on."""
    accelerator = Accelerator(cpu=True)
    net = make_net(seed)
    opt = make_opt(net.parameters())
    model, aopt, dl, sched = accelerator.prepare(net, opt, loader(), schedule(opt))
    done = 0
    if resume_dir is not None:
        accelerator.load_state(resume_dir)
        done = SAVE_AT
    while done < steps:
        skip = done % len(dl)
        for x, y in (accelerator.skip_first_batches(dl, skip) if skip else dl):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            aopt.step()
            sched.step()
            aopt.zero_grad()
            done += 1
            if done == SAVE_AT and save_dir is not None:
                accelerator.save_state(save_dir)
            if done == steps:
                break
    return model, aopt, sched


def hand_loop(make_opt, steps: int = STEPS):
    net = make_net(0)
    opt = make_opt(net.parameters())
    sched = schedule(opt)
    done = 0
    while done < steps:
        for x, y in loader():
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    return net, opt


def assert_same_weights(a, b) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def assert_same_state(sa: dict, sb: dict) -> None:
    assert sa["param_groups"] == sb["param_groups"]
    assert sa.keys() == sb.keys() and sa["state"].keys() == sb["state"].keys()
    for pid, st in sa["state"].items():
        assert st.keys() == sb["state"][pid].keys()
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb["state"][pid][key]), (pid, key)
            else:
                assert value == sb["state"][pid][key], (pid, key)


def test_prepared_optimizer_and_schedule_train_like_a_hand_loop():
    """prepare() wraps the optimkit optimizer and schedule; step/zero_grad/state_dict
    pass through and the weights equal the hand loop's bit for bit."""
    model, aopt, sched = run_accelerated(CASES["adamw"])
    assert isinstance(aopt, AcceleratedOptimizer) and isinstance(aopt.optimizer, ok.AdamW)
    assert isinstance(sched, AcceleratedScheduler)
    net, opt = hand_loop(CASES["adamw"])
    assert_same_weights(model, net)
    assert_same_state(aopt.state_dict(), opt.state_dict())
    assert aopt.state_dict()["param_groups"] == aopt.optimizer.state_dict()["param_groups"]
    assert aopt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] < 1e-2   # scheduled
    assert all(p.grad is None for p in model.parameters())                  # zero_grad reached it


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_state_load_state_resume_is_bit_exact(case, tmp_path):
    """save_state at step 6 (mid-epoch), load_state into a differently initialized model
    and fresh optimizer (accelerate reads optimizer.bin with weights_only=True), skip
    the trained batches: final weights and optimizer state equal the uninterrupted run."""
    make_opt = CASES[case]
    full_model, full_opt, full_sched = run_accelerated(make_opt, save_dir=tmp_path)
    saved = torch.load(tmp_path / "optimizer.bin", weights_only=True)
    assert {s["step"] for s in saved["state"].values()} == {SAVE_AT}
    if case == "adamw_q8":
        assert all(s["exp_avg:codes"].dtype == torch.uint8 for s in saved["state"].values())
    if case == "adamw_galore":
        assert saved["param_groups"][0]["projection"]["type"] == "GaLore"
        assert sum(s["exp_avg"].shape[0] == 4 for s in saved["state"].values()) == 2   # projected moments
    model, opt, sched = run_accelerated(make_opt, resume_dir=tmp_path, seed=1)
    assert_same_weights(model, full_model)
    assert_same_state(opt.state_dict(), full_opt.state_dict())
    assert sched.scheduler.last_epoch == full_sched.scheduler.last_epoch == STEPS


def test_optimkit_features_reachable_through_the_wrapper():
    """Schedule-free's eval()/train() pass through AcceleratedOptimizer (accelerate
    forwards them); optimkit's own attributes (skipped_steps) are on ``.optimizer``.
    A step skipped by ``nonfinite="skip"`` is not one accelerate's ``step_was_skipped``
    knows about (that reports GradScaler overflows only)."""
    accelerator = Accelerator(cpu=True)
    net, twin = make_net(0), make_net(0)
    opt = ok.ScheduleFreeAdamW(net.parameters(), lr=5e-3, nonfinite="skip")
    ref = ok.ScheduleFreeAdamW(twin.parameters(), lr=5e-3, nonfinite="skip")
    model, aopt, dl = accelerator.prepare(net, opt, loader())
    for i, (x, y) in enumerate(dl):
        loss = F.cross_entropy(model(x), y) * (float("nan") if i == 1 else 1.0)
        accelerator.backward(loss)
        aopt.step()
        aopt.zero_grad()
        ref.zero_grad()
        (F.cross_entropy(twin(x), y) * (float("nan") if i == 1 else 1.0)).backward()
        ref.step()
    assert aopt.optimizer is opt and opt.skipped_steps == ref.skipped_steps == 1
    assert not aopt.step_was_skipped
    y = [p.detach().clone() for p in model.parameters()]
    aopt.eval()
    ref.eval()
    assert not opt.param_groups[0]["train_mode"]
    assert_same_weights(model, twin)                       # the evaluation point x
    assert not torch.equal(y[0], model[0].weight)
    aopt.train()
    for p, q in zip(model.parameters(), y):
        assert torch.equal(p, q)                           # y restored bit for bit
    buf = io.StringIO()
    ok.memory_report(aopt, file=buf)                       # reads param_groups/state through it
    assert "optimizer state" in buf.getvalue()


def test_gradient_accumulation_equals_the_summed_batch():
    """``accelerator.accumulate`` over 2 micro-batches of 32: one optimizer and schedule
    step per 2 micro-batches, bit-identical to a hand loop accumulating (loss / 2)
    gradients, and equal (to float rounding) to a hand loop on the batches of 64."""
    steps = 8
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = make_net(0)
    opt = CASES["adamw"](net.parameters())
    model, aopt, dl, sched = accelerator.prepare(net, opt, loader(BATCH // 2), schedule(opt))
    done = 0
    while done < 2 * steps:
        for x, y in dl:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), y))
                aopt.step()
                sched.step()
                aopt.zero_grad()
            done += 1
    assert {s["step"] for s in opt.state.values()} == {steps}
    assert sched.scheduler.last_epoch == steps

    micro = make_net(0)
    opt_micro = CASES["adamw"](micro.parameters())
    sched_micro = schedule(opt_micro)
    whole = make_net(0)
    opt_whole = CASES["adamw"](whole.parameters())
    sched_whole = schedule(opt_whole)
    batches = [b for _ in range(2) for b in loader()]        # 2 epochs of batches of 64
    for x, y in batches[:steps]:
        opt_micro.zero_grad()
        for xs, ys in zip(x.split(BATCH // 2), y.split(BATCH // 2)):
            (F.cross_entropy(micro(xs), ys) / 2).backward()
        opt_micro.step()
        sched_micro.step()
        opt_whole.zero_grad()
        F.cross_entropy(whole(x), y).backward()
        opt_whole.step()
        sched_whole.step()
    assert_same_weights(model, micro)
    for p, q in zip(model.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_schedule_free_wrapper_is_prepared_like_an_optimizer():
    """ok.ScheduleFreeWrapper is a torch.optim.Optimizer: prepare() wraps it (so
    accumulate() can hold its steps back) and eval()/train() pass through; the
    weights equal the same wrapper stepped by hand, at y and at x."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    net, twin = make_net(0), make_net(0)
    opt = ok.ScheduleFreeWrapper(torch.optim.RMSprop(net.parameters(), lr=2.5e-3))
    ref = ok.ScheduleFreeWrapper(torch.optim.RMSprop(twin.parameters(), lr=2.5e-3))
    model, aopt, dl = accelerator.prepare(net, opt, loader(BATCH // 2))
    assert isinstance(aopt, AcceleratedOptimizer) and aopt.optimizer is opt
    for x, y in dl:
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            aopt.step()
            aopt.zero_grad()
    for x, y in loader():
        ref.zero_grad()
        for xs, ys in zip(x.split(BATCH // 2), y.split(BATCH // 2)):
            (F.cross_entropy(twin(xs), ys) / 2).backward()
        ref.step()
    assert [g["k"] for g in opt._groups] == [N_TRAIN // BATCH]        # one step per 2 micro-batches
    assert_same_weights(model, twin)
    aopt.eval()
    ref.eval()
    assert not opt.train_mode
    assert_same_weights(model, twin)
