"""A weight-decay schedule independent of the learning-rate schedule.

torch schedules the lr (``torch.optim.lr_scheduler``) but not the weight decay (pytorch#22343,
open since 2019); a recipe that raises the decay over training (DINO: 0.04 -> 0.4, cosine),
lowers it, or turns it off for the last updates needs a second schedule.  `WeightDecayScheduler`
is one, with the lr schedulers' protocol (``step()`` after each ``optimizer.step()``,
``state_dict``/``load_state_dict``, ``last_epoch``, ``get_last_wd()``), so it goes wherever an
lr scheduler goes, beside it.

What it changes, at update t, for a multiplier m_t >= 0 (``wd_lambda(t)``):

* optimlab optimizers (and `optimlab.SAM` around one): the group's ``wd_multiplier`` = m_t,
  which every weight-decay mode reads once (`optimlab._common.WeightDecay.of`): lambda_t =
  m_t lambda, so the shrink of each ``wd_mode`` is m_t times its own (``l2``: the L2
  coefficient is m_t lambda; ``timescale``: the timescale is tau / m_t).  The group's
  ``weight_decay`` is never rewritten: a state dict keeps the value the user chose.
* any other ``torch.optim.Optimizer``: the group's ``weight_decay`` = m_t x its value when the
  scheduler was built (kept in the group as ``initial_weight_decay``, as lr schedulers keep
  ``initial_lr``), which is what "weight decay times m_t" means for torch's optimizers.

The lr schedule and this one compose: with ``wd_mode="decoupled"`` the shrink at t is
eta_t m_t lambda, with ``"independent"`` (eta_t / eta_0) m_t lambda.  m_t = 0 turns the decay
off.
"""

from __future__ import annotations

import math
import types
from typing import Callable, Sequence

import torch

from .loop import lr_multiplier

__all__ = ["WeightDecayScheduler", "LambdaWD", "wd_schedule", "wd_multiplier", "WD_SCHEDULES"]

WD_SCHEDULES = ("constant", "linear", "cosine")


def wd_multiplier(step: int, *, total: int, kind: str = "constant", final: float = 1.0) -> float:
    """m at update ``step`` (0-based) of ``total``: 1 (``constant``), or from 1 to ``final`` at
    ``total`` along a straight line (``linear``) or half a cosine (``cosine``), the shapes of
    the lr schedule (`optimlab.loop.lr_multiplier`, without warmup); ``final`` > 1 raises the
    decay (DINO's 0.04 -> 0.4 is ``final=10``), < 1 lowers it."""
    if kind == "constant":
        return 1.0
    shape = lr_multiplier(step, total=total, warmup=0, schedule=kind)
    return final + (1.0 - final) * shape


class _Multiplier:
    """`wd_multiplier` as a picklable callable."""

    def __init__(self, total: int, kind: str, final: float):
        self.total, self.kind, self.final = total, kind, final

    def __call__(self, step: int) -> float:
        return wd_multiplier(step, total=self.total, kind=self.kind, final=self.final)


class WeightDecayScheduler:
    """The base class: subclasses say the multiplier of each group at ``last_epoch``
    (`get_multipliers`); see the module docstring for what it changes."""

    def __init__(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        self.by_multiplier = _reads_multiplier(optimizer)
        for group in optimizer.param_groups:
            if "weight_decay" not in group:
                raise ValueError("a parameter group has no 'weight_decay': this optimizer does "
                                 "not decay weights")
            if not self.by_multiplier:
                group.setdefault("initial_weight_decay", group["weight_decay"])
        self.last_epoch = last_epoch
        self._last_multipliers: list[float] = []
        self.step()

    def get_multipliers(self) -> list[float]:
        raise NotImplementedError

    def step(self) -> None:
        """Advance to the next update and set each group's multiplier."""
        self.last_epoch += 1
        multipliers = [float(m) for m in self.get_multipliers()]
        for m in multipliers:
            if not (math.isfinite(m) and m >= 0):
                raise ValueError(f"Invalid weight-decay multiplier {m!r} at update "
                                 f"{self.last_epoch}; expected a finite number >= 0")
        for group, m in zip(self.optimizer.param_groups, multipliers):
            if self.by_multiplier:
                group["wd_multiplier"] = m
            else:
                group["weight_decay"] = group["initial_weight_decay"] * m
        self._last_multipliers = multipliers

    def get_last_multiplier(self) -> list[float]:
        """The multiplier of each group set by the last ``step()``."""
        return list(self._last_multipliers)

    def get_last_wd(self) -> list[float]:
        """The weight decay each group applies now, in its own units: m lambda (for
        ``timescale``, tau / m: the timescale; inf when m is 0)."""
        out = []
        for group, m in zip(self.optimizer.param_groups, self._last_multipliers):
            wd = float(group["weight_decay"])
            if not self.by_multiplier:
                out.append(wd)
            elif group.get("wd_mode") == "timescale":
                out.append(wd / m if m else math.inf)
            else:
                out.append(wd * m)
        return out

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)


class LambdaWD(WeightDecayScheduler):
    """m_t = ``wd_lambda(t)``, one function for every group or one per group (as LambdaLR).

    Example:
        >>> opt = optimlab.AdamW(model.parameters(), lr=1e-3, weight_decay=0.04)
        >>> lrs = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        >>> wds = optimlab.LambdaWD(opt, lambda t: 1 + 9 * t / 1000)   # 0.04 -> 0.4
        >>> for batch in data:
        ...     loss_fn(model, batch).backward(); opt.step(); opt.zero_grad()
        ...     lrs.step(); wds.step()
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 wd_lambda: Callable[[int], float] | Sequence[Callable[[int], float]],
                 last_epoch: int = -1):
        n = len(optimizer.param_groups)
        if callable(wd_lambda):
            self.wd_lambdas = [wd_lambda] * n
        else:
            if len(wd_lambda) != n:
                raise ValueError(f"Expected {n} wd_lambdas, got {len(wd_lambda)}")
            self.wd_lambdas = list(wd_lambda)
        super().__init__(optimizer, last_epoch)

    def get_multipliers(self) -> list[float]:
        return [f(self.last_epoch) for f in self.wd_lambdas]

    def state_dict(self) -> dict:
        """As LambdaLR: the multiplier functions are saved only when they are objects (their
        ``__dict__``), not functions or lambdas."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "wd_lambdas")}
        state["wd_lambdas"] = [None if isinstance(f, types.FunctionType) else dict(f.__dict__)
                               for f in self.wd_lambdas]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        fns = state.pop("wd_lambdas", [None] * len(self.wd_lambdas))
        self.__dict__.update(state)
        for f, saved in zip(self.wd_lambdas, fns):
            if saved is not None:
                f.__dict__.update(saved)


def wd_schedule(optimizer: torch.optim.Optimizer, *, total: int, kind: str = "constant",
                final: float = 1.0) -> LambdaWD:
    """A `LambdaWD` of `wd_multiplier`: from 1 to ``final`` over ``total`` updates."""
    if kind not in WD_SCHEDULES:
        raise ValueError(f"Invalid kind: {kind!r}; expected one of "
                         f"{', '.join(repr(k) for k in WD_SCHEDULES)}")
    if not (isinstance(final, (int, float)) and math.isfinite(final) and final >= 0):
        raise ValueError(f"Invalid final: {final!r}; expected a finite number >= 0")
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"Invalid total: {total!r}; expected a positive number of updates")
    return LambdaWD(optimizer, _Multiplier(total, kind, float(final)))


def _reads_multiplier(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimlab's optimizers (and SAM around one): they read ``wd_multiplier``."""
    from ._optimizer import Optimizer
    from .sam import SAM
    if isinstance(optimizer, SAM):
        optimizer = optimizer.base_optimizer
    return isinstance(optimizer, Optimizer)
