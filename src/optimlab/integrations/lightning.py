"""optimlab in PyTorch Lightning, SAM with micro-batches included.

Every optimlab optimizer and scheduler can be returned by ``configure_optimizers`` as torch's
can; Lightning's checkpoints save and load their state, and a run resumed with
``trainer.fit(..., ckpt_path=...)`` ends with the weights of an uninterrupted one.

SAM under Lightning's automatic optimization works as it is when each update is one batch:
Lightning calls ``optimizer.step(closure)`` and SAM calls the closure (training_step and
backward) at w and at w + e(w); Lightning clips after each closure, so the second-pass gradient
is the one clipped.  With ``accumulate_grad_batches > 1`` it does not: Lightning runs the
earlier micro-batches outside the step, and SAM's second closure sees only the last one (seed
004's bug).  `SAMLightningMixin` is the fix, with manual optimization:

    training_step(batch):   the batch is cut into micro-batches of ``sam_micro_batch_size``
                            examples (tensors, tuples/lists and dicts of them, along dim 0)
    optimizer.step(closure) with closure = zero the gradients, then for each micro-batch
                            i of n_i examples (N in all): manual_backward(n_i / N * sam_loss(i)),
                            then clip to ``sam_max_grad_norm``
                            -> SAM calls it at w and at w + e(w): both passes over every
                               micro-batch, the second-pass gradient clipped

so an update equals `optimlab.accumulate_and_step` over the same micro-batches.  The lr
schedulers are stepped as Lightning steps them under automatic optimization (after an update
for ``interval="step"``, after an epoch's last one for ``"epoch"``, every ``frequency``).  Any other optimizer runs the
same closure once: plain accumulation.

Usage::

    class Model(SAMLightningMixin, pl.LightningModule):
        sam_micro_batch_size = 8              # examples per forward (None: the whole batch)
        sam_max_grad_norm = 1.0               # None: no clipping

        def sam_loss(self, batch):            # the mean loss over one micro-batch
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return optimlab.SAM(self.parameters(), optimlab.AdamW, rho=0.05, lr=1e-3)

Supported: one device (CPU or GPU), ``precision="32-true"`` or ``"bf16-mixed"``.  Refused,
with the reason: several devices (Lightning calls training_step through its DDP wrapper once
per batch; the mixin's extra forwards would bypass it), ``"16-mixed"`` (Lightning's loss
scaler steps the optimizer without the closure: use `optimlab.accumulate_and_step` with its
``scaler=`` in your own loop) and more than one optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..sam import _batch_size

__all__ = ["SAMLightningMixin", "split_batch"]


def split_batch(batch: Any, size: int | None) -> list[Any]:
    """``batch`` cut along dim 0 into micro-batches of ``size`` examples (the last may be
    smaller); tensors, and tuples/lists/dicts of them (non-tensor leaves are shared).  None:
    ``[batch]``.  The examples are counted as `optimlab.accumulate_and_step` counts them."""
    if size is None:
        return [batch]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"Invalid sam_micro_batch_size: {size!r}; expected an int >= 1 or None")
    n = _batch_size(batch)
    return [_slice(batch, s, min(s + size, n)) for s in range(0, n, size)]


def _slice(batch: Any, s: int, e: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[s:e] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, s, e) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, s, e) for v in batch)
    return batch


class SAMLightningMixin:
    """Manual optimization for a LightningModule whose update is SAM's two passes over every
    micro-batch of a batch (see the module docstring).  Put it first among the bases and
    define ``sam_loss(batch)``."""

    sam_micro_batch_size: int | None = None
    sam_max_grad_norm: float | None = None

    @property
    def automatic_optimization(self) -> bool:
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise ValueError("SAMLightningMixin runs manual optimization: "
                             "automatic_optimization cannot be switched on")

    def sam_loss(self, batch: Any) -> torch.Tensor:
        """The mean loss over one micro-batch."""
        raise NotImplementedError(f"{type(self).__name__} must define sam_loss(batch)")

    def _check_sam_setup(self, optimizer) -> None:
        trainer = self.trainer
        if trainer.world_size > 1:
            raise RuntimeError(
                f"SAMLightningMixin runs on one device (this Trainer has {trainer.world_size} "
                "processes): Lightning calls training_step through its DDP wrapper once per "
                "batch, and the mixin's further forwards would bypass it")
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise RuntimeError(
                "SAMLightningMixin does not support a loss scaler (precision='16-mixed'): "
                "Lightning's scaler steps the optimizer without the closure; use "
                "precision='bf16-mixed', or optimlab.accumulate_and_step(..., scaler=...) in "
                "your own loop")
        if isinstance(optimizer, (list, tuple)):
            raise RuntimeError("SAMLightningMixin drives one optimizer; configure_optimizers "
                               f"returned {len(optimizer)}")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        self._check_sam_setup(opt)
        micro = split_batch(batch, self.sam_micro_batch_size)
        sizes = [_batch_size(b) for b in micro]
        total = sum(sizes)

        raw = getattr(opt, "optimizer", opt)     # (Lightning's wrapper holds no state)

        def closure() -> torch.Tensor:
            raw.zero_grad()
            mean = torch.zeros(())
            for b, n in zip(micro, sizes):
                loss = self.sam_loss(b)
                self.manual_backward(loss * (n / total))
                mean = mean + loss.detach().float().cpu() * (n / total)
            if self.sam_max_grad_norm is not None:
                params = [p for g in raw.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, self.sam_max_grad_norm)
            return mean

        loss = opt.step(closure=closure)
        # Lightning steps no scheduler under manual optimization: its rule, here
        self._step_schedulers("step", batch_idx)
        if self.trainer.is_last_batch:
            self._step_schedulers("epoch", self.trainer.current_epoch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _step_schedulers(self, interval: str, index: int) -> None:
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == interval and index % config.frequency == 0:
                config.scheduler.step()
