"""The one training loop: `Fit`.  ``optimlab train`` and every ``optimlab lab`` experiment run it.

Top to bottom, for each epoch::

    batches = plan(epoch)                      # seeded: the same order on every run and resume
    for each batch:
        micro, n = micro_batches(batch)        # this process's share, cut into micro-batches
        loss = step(model, optimizer, micro)   # default: accumulate_and_step (SAM or not)
        scheduler.step()                       # one lr multiplier per update
        wd_scheduler.step()                    # and one weight-decay multiplier, if given
        should_stop(fit, loss)                 # signals, a limit (every process agrees)
        after_update(fit)                      # checkpoints every N updates
    on_epoch_end(fit, record)                  # evaluation, best weights, metrics

Its `Position` (epoch, update within it, the epoch's batch order, the loss sum, examples and
seconds so far) is what a checkpoint holds to resume in the middle of an epoch exactly.

The schedule: `lr_multiplier` (linear warmup over `warmup_updates`, then linear or cosine
decay or constant) as a LambdaLR (`schedule`).  Batches: `length_grouped_batches`, one
epoch's order from a generator seeded by (seed, epoch) (`epoch_batches`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .sam import accumulate_and_step

__all__ = ["Fit", "Position", "EpochRecord", "length_grouped_batches", "epoch_batches",
           "updates_per_epoch", "lr_multiplier", "warmup_updates", "schedule", "SCHEDULES"]

SCHEDULES = ("linear", "cosine", "constant")


# --------------------------------------------------------------------------- batches
def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                           group_by_length: bool = True, mega: int = 50) -> list[list[int]]:
    """One epoch's batches (lists of example indices), every example once.

    A random permutation; with ``group_by_length``, chunks of ``mega`` batches are each sorted
    by length (longest first), cut into batches, and the batches shuffled, so a batch holds
    examples of similar length but the order of batches is random (as transformers'
    LengthGroupedSampler, plus the shuffle of batches).  Only the last batch may be smaller.
    """
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        chunk = batch_size * mega
        perm = [i for s in range(0, len(perm), chunk)
                for i in sorted(perm[s:s + chunk], key=lambda i: -lengths[i])]
    batches = [perm[s:s + batch_size] for s in range(0, len(perm), batch_size)]
    if group_by_length:
        last = batches.pop() if len(batches[-1]) < batch_size else None
        batches = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
        if last is not None:
            batches.append(last)
    return batches


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s batch order."""
    return torch.Generator().manual_seed(((seed & 0xFFFFFFFF) << 20) + epoch)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, *,
                  group_by_length: bool = True, world: int = 1) -> list[list[int]]:
    """Epoch ``epoch``'s batches; with ``world`` processes a last batch smaller than the world
    is dropped (every process needs an example)."""
    plan = length_grouped_batches(lengths, batch_size, epoch_generator(seed, epoch),
                                  group_by_length)
    if world > 1 and len(plan[-1]) < world:
        plan.pop()
    return plan


def updates_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """How many batches `epoch_batches` makes of ``n`` examples."""
    updates = math.ceil(n / batch_size)
    if world > 1 and n % batch_size and n % batch_size < world:
        updates -= 1
    return updates


# --------------------------------------------------------------------------- the schedule
def warmup_updates(warmup: float, total: int) -> int:
    """``warmup`` < 1: that fraction of ``total`` updates (rounded); else a number of updates."""
    return round(warmup * total) if warmup < 1 else int(warmup)


def lr_multiplier(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """The factor on the peak lr for update ``step`` (0-based): linear warmup over ``warmup``
    updates ((step + 1) / (warmup + 1), as nanoGPT: the first update does move), then
    ``linear`` (to 0 at ``total``), ``cosine`` (half a cosine to 0) or ``constant``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


class _Multiplier:
    """`lr_multiplier` as a picklable callable for LambdaLR."""

    def __init__(self, total: int, warmup: int, schedule: str):
        self.total, self.warmup, self.schedule = total, warmup, schedule

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, total=self.total, warmup=self.warmup, schedule=self.schedule)


def schedule(optimizer, *, total: int, warmup: int, kind: str = "linear"):
    """The LambdaLR of `lr_multiplier` (``warmup`` in updates, see `warmup_updates`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Multiplier(total, warmup, kind))


# --------------------------------------------------------------------------- the loop
@dataclass
class Position:
    """Where a `Fit` is: a checkpoint saves it (`asdict`) and a resumed `Fit` starts from it.
    ``loss_sum`` is this process's (sum of loss x examples, examples) over the epoch so far;
    ``seen`` counts the epoch's examples over all processes; ``batches`` is the epoch's order
    (None between epochs: the next epoch makes its own)."""
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    batches: list | None = None
    loss_sum: list = field(default_factory=lambda: [0.0, 0.0])
    seen: int = 0
    seconds: float = 0.0


@dataclass
class EpochRecord:
    """What an epoch's training came to (the caller adds its evaluation)."""
    epoch: int                 # 1-based
    train_loss: float          # mean over the epoch's examples (all processes)
    train_seconds: float
    examples: int
    updates: int               # in all, after this epoch
    diverged: bool


class Fit:
    """One training loop (see the module docstring).

    Args:
        model, optimizer, scheduler: what is trained; ``scheduler.step()`` after each update.
        wd_scheduler: an `optimlab.WeightDecayScheduler` stepped after each update too, or
            None.
        epochs: the number of epochs.
        plan: ``plan(epoch)`` -> that epoch's batches (lists of example indices).
        micro_batches: ``micro_batches(batch)`` -> (micro-batches for ``step``, the number of
            examples this process trains on).
        loss_fn: ``loss_fn(model, micro_batch)``, the mean loss (for the default step).
        step: ``step(model, optimizer, micro)`` -> the update's loss; default
            `accumulate_and_step` with ``max_grad_norm`` and ``autocast``.
        position: where to start (a checkpoint's `Position`); default the beginning.
        world: processes (their stop decisions and loss sums are all-reduced).
        stop_on_nonfinite: end the run at an update whose loss is not finite (``diverged``).
        progress: ``progress(epoch, total, initial)`` -> a tqdm-like bar, or None.
    """

    def __init__(self, model, optimizer, scheduler, *, epochs: int,
                 plan: Callable[[int], list], micro_batches: Callable[[list], tuple],
                 loss_fn: Callable | None = None, step: Callable | None = None,
                 max_grad_norm: float | None = None, autocast: torch.dtype | None = None,
                 position: Position | None = None, world: int = 1,
                 stop_on_nonfinite: bool = False, progress: Callable | None = None,
                 wd_scheduler=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.wd_scheduler = wd_scheduler
        self.epochs, self.plan, self.micro_batches = epochs, plan, micro_batches
        if step is None:
            def step(model, optimizer, micro):
                return accumulate_and_step(model, optimizer, micro, loss_fn,
                                           max_grad_norm=max_grad_norm, autocast=autocast)
        self.step = step
        self.pos = position or Position()
        self.world = world
        self.stop_on_nonfinite = stop_on_nonfinite
        self.progress = progress
        self.diverged = False
        self._tick = 0.0

    # the epoch so far, as a checkpoint records it
    def position(self) -> dict:
        """The `Position` now (the seconds of the epoch so far included), as a dict."""
        pos = asdict(self.pos)
        if pos["batches"] is not None:
            pos["seconds"] = time.perf_counter() - self._tick
        return pos

    def run(self, *, should_stop: Callable[["Fit", float], bool] | None = None,
            after_update: Callable[["Fit"], None] | None = None,
            on_epoch_end: Callable[["Fit", EpochRecord], None] | None = None) -> str:
        """Train to the end, or until ``should_stop(fit, loss)`` returns True on any process
        (asked after every update; all processes stop together) or, with
        ``stop_on_nonfinite``, a loss is not finite.  ``after_update(fit)`` runs after each
        update the loop goes on from; ``on_epoch_end(fit, record)`` after each complete epoch,
        with the position already at the next one.  Returns ``"finished"``, ``"stopped"``
        (inside an epoch, or at the end of one before the last) or ``"diverged"`` (at once:
        no ``on_epoch_end``; the position is that of the update that diverged, and
        `epoch_record` says what the epoch came to).  ``should_stop`` may also set
        ``fit.diverged``."""
        pos = self.pos
        self.model.train()
        while pos.epoch < self.epochs:
            if pos.batches is None:
                pos.batches = self.plan(pos.epoch)
                pos.loss_sum, pos.seen, pos.seconds = [0.0, 0.0], 0, 0.0
            batches = pos.batches
            loss_sum = torch.tensor(pos.loss_sum, dtype=torch.float64)   # sum loss*n, n
            self._tick = time.perf_counter() - pos.seconds
            bar = self.progress(pos.epoch, len(batches), pos.step_in_epoch) \
                if self.progress is not None else None
            stop = False
            try:
                while pos.step_in_epoch < len(batches):
                    batch = batches[pos.step_in_epoch]
                    micro, n = self.micro_batches(batch)
                    loss = self.step(self.model, self.optimizer, micro)
                    self.scheduler.step()
                    if self.wd_scheduler is not None:
                        self.wd_scheduler.step()
                    pos.step_in_epoch += 1
                    pos.step += 1
                    loss_sum += torch.tensor([loss * n, n], dtype=torch.float64)
                    pos.loss_sum = loss_sum.tolist()
                    pos.seen += len(batch)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(
                            loss=f"{loss_sum[0].item() / max(1.0, loss_sum[1].item()):.4f}",
                            ex_per_s=f"{pos.seen / (time.perf_counter() - self._tick):.1f}",
                            lr=f"{self.scheduler.get_last_lr()[0]:.2e}", refresh=False)
                    if self.stop_on_nonfinite and not math.isfinite(loss):
                        self.diverged = True
                    if should_stop is not None and should_stop(self, loss):
                        stop = True
                    stop, self.diverged = self._together(stop, self.diverged)
                    if stop or self.diverged:
                        break
                    if after_update is not None:
                        after_update(self)
            finally:
                if bar is not None:
                    bar.close()
            pos.seconds = time.perf_counter() - self._tick
            if self.diverged:
                return "diverged"
            if pos.step_in_epoch < len(batches):
                return "stopped"                 # inside an epoch: its position is kept
            record = self.epoch_record()
            pos.epoch, pos.step_in_epoch, pos.batches = pos.epoch + 1, 0, None
            pos.loss_sum, pos.seen, pos.seconds = [0.0, 0.0], 0, 0.0
            if on_epoch_end is not None:
                on_epoch_end(self, record)
            if stop and pos.epoch < self.epochs:
                return "stopped"
        return "finished"

    def epoch_record(self) -> EpochRecord:
        """What the current epoch came to so far (its loss summed over all processes)."""
        pos = self.pos
        loss_sum = torch.tensor(pos.loss_sum, dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(loss_sum)
        return EpochRecord(epoch=pos.epoch + 1,
                           train_loss=loss_sum[0].item() / max(1.0, loss_sum[1].item()),
                           train_seconds=pos.seconds, examples=pos.seen, updates=pos.step,
                           diverged=self.diverged)

    def _together(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag set if any process set it (one all-reduce)."""
        if self.world == 1:
            return flags
        device = next(iter(self.model.parameters())).device
        t = torch.tensor([float(f) for f in flags], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return tuple(bool(x) for x in t.tolist())

    def state_dict(self) -> dict:
        """Everything of the loop a checkpoint needs to resume it: the position and the
        model's, optimizer's and scheduler's states."""
        return {"position": self.position(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.pos = Position(**state["position"])
