"""SAM in the Hugging Face ``Trainer``, right under gradient accumulation.

Every optimlab optimizer is a ``torch.optim.Optimizer``: hand it to the Trainer as
``Trainer(optimizers=(optimizer, scheduler))`` or ``optimizer_cls_and_kwargs=(optimlab.AdamW,
{...})``, and the Trainer's checkpoints (``optimizer.pt``) resume it exactly.

SAM is different: each update needs the gradient at w over the *whole* batch, a step to
w + e(w), and the gradient there over the whole batch again.  The Trainer calls one
forward/backward per micro-batch and ``optimizer.step()`` once per update, so a SAM dropped in
as is either fails (no closure) or, wired up naively, takes its second pass over the last
micro-batch only (seed 004's bug).  `SAMTrainerMixin` makes the Trainer's loop SAM's:

    micro-batches 1..k:  forward/backward at w (the Trainer's own training_step; the gradient
                         reduction under DDP on the last one only, as the Trainer does)
    after the k-th:      sam.first_step()            w -> w + e(w), from the whole batch
                         micro-batches 1..k again:   forward/backward at w + e(w), each loss
                                                     scaled exactly as in the first pass
    the Trainer:         clips (max_grad_norm) the second-pass gradient, then optimizer.step()
                         = sam.second_step(): w restored, base step

So clipping acts on the gradient the base optimizer applies (the documented point, as
`optimlab.accumulate_and_step` does), and an update over k micro-batches equals
`optimlab.accumulate_and_step` over the same batch (a test: 4 micro-batches, 1e-6).
Mixed precision: ``bf16=True`` (autocast) needs nothing more.  ``fp16=True`` runs with a loss
scaler (accelerate makes one on GPUs): the first-pass gradient is used scaled (e(w) does not
change when g is multiplied by a constant); a non-finite first pass is left in ``.grad`` for
the scaler, which then skips ``step()`` and backs off (no second pass); a non-finite second
pass makes the scaler skip ``step()`` too, and the mixin puts w back.  Without a scaler a
non-finite first pass follows SAM's ``nonfinite`` policy (``"skip"``: warned, no step).

Usage, one line::

    from optimlab.integrations.huggingface import SAMTrainer
    sam = optimlab.SAM(model.parameters(), optimlab.AdamW, rho=0.05, lr=2e-5, weight_decay=0.01)
    trainer = SAMTrainer(model=model, args=args, train_dataset=ds, optimizers=(sam, None))

or ``class MyTrainer(SAMTrainerMixin, SomeTrainer)`` for another Trainer subclass.  With a
non-SAM optimizer the mixin changes nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .._common import all_finite
from ..sam import find_sam

__all__ = ["SAMTrainer", "SAMTrainerMixin", "find_sam"]


class _RestoreAfterSkippedStep(TrainerCallback):
    """After the optimizer step: a SAM still at w + e(w) had its ``step()`` skipped (a loss
    scaler found inf/NaN in the second pass); put w back."""

    def __init__(self, trainer: "SAMTrainerMixin"):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        sam = find_sam(self.trainer.optimizer)
        if sam is not None and sam.perturbed:
            sam.restore()


class SAMTrainerMixin:
    """Runs SAM's two passes over every micro-batch of an update inside a Hugging Face
    ``Trainer`` (see the module docstring).  Put it first among the bases."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sam_batches: list[tuple[Any, Any]] = []
        self.add_callback(_RestoreAfterSkippedStep(self))

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None,
                      *args, **kwargs) -> torch.Tensor:
        sam = find_sam(self.optimizer)
        if sam is None:
            return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        self._sam_batches.append((inputs, num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        # (the Trainer sets this per update: fewer micro-batches in an epoch's last one)
        k = getattr(self, "current_gradient_accumulation_steps",
                    self.args.gradient_accumulation_steps)
        if len(self._sam_batches) < k:
            return loss
        batches, self._sam_batches = self._sam_batches, []
        if getattr(self.accelerator, "scaler", None) is not None and not all_finite(
                [p.grad for g in sam.param_groups for p in g["params"] if p.grad is not None]):
            return loss       # the scaler finds the inf when it unscales: no step, it backs off
        if sam.first_step(zero_grad=True):
            for i, (batch, n_items) in enumerate(batches):
                last = i == len(batches) - 1
                ctx = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with ctx:
                    super().training_step(model, batch, n_items, *args, **kwargs)
        return loss


class SAMTrainer(SAMTrainerMixin, Trainer):
    """``transformers.Trainer`` with `SAMTrainerMixin`: SAM right under gradient
    accumulation; any other optimizer as the Trainer runs it."""
