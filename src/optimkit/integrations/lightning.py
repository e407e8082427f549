"""PyTorch Lightning helpers for optimkit optimizers.

optimkit optimizers are ``torch.optim.Optimizer`` objects: ``configure_optimizers``
returns them (and their schedulers) as it would return ``torch.optim`` ones,
and Lightning checkpoints (``ckpt_path=``, ``weights_only=True`` included)
restore their state bit for bit. The one thing Lightning cannot know about is
the train/eval switch of schedule-free optimizers; :class:`ScheduleFreeCallback`
makes it. After loading a checkpoint Lightning moves all optimizer state to the
module's device, which undoes ``state_placement="cpu"``/``"disk"`` on an
accelerator; :class:`StatePlacementCallback` puts the state back where its
group says (see docs/integrations_lightning.md).

Importing :mod:`optimkit` never imports Lightning; importing this module does
(``lightning.pytorch``, or the older ``pytorch_lightning`` package).
"""
from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the older package name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as err:
        raise ImportError("optimkit.integrations.lightning needs PyTorch Lightning: "
                          "pip install lightning") from err

__all__ = ["ScheduleFreeCallback", "StatePlacementCallback", "restore_state_placement",
           "schedule_free_optimizers"]


def schedule_free_optimizers(optimizers) -> list[Any]:
    """The optimizers of ``optimizers`` (e.g. ``trainer.optimizers``) that have a
    train/eval switch: a callable ``train()`` and ``eval()`` (optimkit's
    schedule-free optimizers and :class:`optimkit.ScheduleFreeWrapper`, the
    ``schedulefree`` package's optimizers, and wrappers that forward them, such as
    Lightning's ``LightningOptimizer``)."""
    return [opt for opt in optimizers
            if callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))]


class ScheduleFreeCallback(pl.Callback):
    """Switch schedule-free optimizers between their training iterate ``y`` and
    their evaluation point ``x`` around Lightning's loops.

    * before every training batch: ``opt.train()`` (parameters hold ``y``, the point
      the gradients are taken at);
    * at the start of validation, testing and prediction: ``opt.eval()``
      (parameters hold ``x``, the averaged weights meant for evaluation); they stay
      there until the next training batch, so a checkpoint written after
      validation (``ModelCheckpoint`` with a ``monitor``) holds ``x`` as its
      weights;
    * at the end of ``fit`` (with ``eval_at_end=True``, the default): ``opt.eval()``,
      so that the trained module, and a checkpoint saved afterwards, hold ``x``.

    Either way a checkpoint resumes bit for bit: an optimkit schedule-free
    optimizer in eval mode keeps ``y`` in its state (``sf_y``) and restores it
    exactly at the next ``train()``. Optimizers without ``train``/``eval`` are left
    alone, so the callback can stay in a Trainer whatever ``configure_optimizers``
    returns.

    Args:
        eval_at_end: put the optimizers in eval mode when ``fit`` ends.
    """

    def __init__(self, eval_at_end: bool = True):
        if not isinstance(eval_at_end, bool):
            raise TypeError(f"eval_at_end must be a bool, got {type(eval_at_end).__name__}")
        self.eval_at_end = eval_at_end

    @staticmethod
    def _switch(trainer: "pl.Trainer", mode: str) -> None:
        for opt in schedule_free_optimizers(trainer.optimizers):
            getattr(opt, mode)()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Training iterate ``y`` in the parameters before the batch's forward pass."""
        self._switch(trainer, "train")

    def on_validation_start(self, trainer, pl_module) -> None:
        """Evaluation point ``x`` in the parameters for validation (and the sanity check)."""
        self._switch(trainer, "eval")

    def on_test_start(self, trainer, pl_module) -> None:
        """Evaluation point ``x`` in the parameters for testing."""
        self._switch(trainer, "eval")

    def on_predict_start(self, trainer, pl_module) -> None:
        """Evaluation point ``x`` in the parameters for prediction."""
        self._switch(trainer, "eval")

    def on_train_end(self, trainer, pl_module) -> None:
        """Evaluation point ``x`` in the parameters once ``fit`` is done (``eval_at_end``)."""
        if self.eval_at_end:
            self._switch(trainer, "eval")


def restore_state_placement(optimizer) -> int:
    """Put every parameter's state of an optimkit optimizer back where its group's
    ``state_placement`` says (host memory, memory-mapped files), e.g. after a framework
    moved it to the device; values are kept. Other optimizers (and groups placed on
    the device) are left alone. Returns how many parameter states were looked at."""
    from ..core.optimizer import Optimizer

    inner = getattr(optimizer, "_optimizer", optimizer)   # a LightningOptimizer's optimizer
    if not isinstance(inner, Optimizer):
        return 0
    seen = 0
    for group in inner.param_groups:
        where = group.get("state_placement", "device")
        for p in group["params"]:
            state = inner.state.get(p)
            if state and where != "device":
                inner._placement.place(state, where)
                seen += 1
    inner._fast_cache.clear()   # fast paths may cache pointers into the replaced tensors
    return seen


class StatePlacementCallback(pl.Callback):
    """Re-place optimkit optimizer state after Lightning restored a checkpoint.

    Lightning moves every optimizer state tensor to the module's device after
    ``optimizer.load_state_dict`` (``ckpt_path=``). For groups with
    ``state_placement="cpu"`` or ``"disk"`` on an accelerator that puts the state
    the placement keeps off the device onto it (results stay right, the memory
    saving is lost). At the start of training this callback moves it back with
    :func:`restore_state_placement`. On the CPU nothing is moved in the first place.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        """Runs after the checkpoint's optimizer state was loaded and moved."""
        for opt in trainer.optimizers:
            restore_state_placement(opt)
