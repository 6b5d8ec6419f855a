r"""AdaGrad (Duchi, Hazan & Singer, 2011), diagonal version, as torch.optim.Adagrad runs it.

For step t = 1, 2, ... with gradient g_t, learning rate eta, learning-rate decay gamma,
initial accumulator value s_0 and delta = eps:

    s_t = s_{t-1} + g_t^2                          (per coordinate; s_0 = initial_accumulator_value)
    eta_t = eta / (1 + (t - 1) * gamma)            (torch's lr_decay; gamma = 0 gives eta)
    theta_t = theta_{t-1} - eta_t * g_t / (sqrt(s_t) + delta)

The paper's diagonal algorithm (its Figure 1: H_t = delta I + diag(s_t) with
s_{t,i} = ||g_{1:t,i}||_2, composite mirror descent with no regularizer) is
theta_{t+1} = theta_t - eta * H_t^{-1} g_t, i.e. g_{t,i} / (delta + sqrt(sum_tau g_{tau,i}^2))
per coordinate i: delta sits outside the root, as here.

Weight decay lambda (``wd_mode``, see `optimlab._common`): ``"l2"`` adds lambda * theta_{t-1}
to g_t before it is squared and summed (torch.optim.Adagrad); ``"decoupled"`` and
``"independent"`` shrink theta_{t-1} by eta * lambda or (eta / eta_0) * lambda, where eta is
the group's ``lr`` (not the lr_decay-reduced eta_t); ``"lr_squared"``, ``"absolute"`` and
``"timescale"`` by the factors of `optimlab._common`'s table, with that eta.

Departures from the paper: ``lr_decay`` (a 1/t learning-rate schedule applied by the
optimizer itself) and ``initial_accumulator_value`` (s_0 > 0, which also keeps the first
steps bounded) are torch.optim's additions; the paper's composite-mirror-descent form with a
regularizer phi is not implemented (use ``weight_decay`` for an L2 term).

Reference:
    J. Duchi, E. Hazan, Y. Singer. Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization. JMLR 12, 2011.
"""

from __future__ import annotations

import dataclasses

import torch

from . import _ext
from ._common import WeightDecay, check_range, check_weight_decay, scalar, signed
from ._optimizer import Optimizer

__all__ = ["AdaGrad", "AdaGradHyper", "AdaGradStep", "adagrad_update"]


@dataclasses.dataclass(frozen=True)
class AdaGradHyper:
    """One group's AdaGrad hyper-parameters for a step (the C struct ``AdaGradHyper``)."""
    lr: float                 # eta
    lr_decay: float           # gamma
    eps: float                # delta
    maximize: bool
    decay: WeightDecay

    @classmethod
    def of(cls, group: dict, params=None) -> "AdaGradHyper":
        return cls(lr=scalar(group["lr"]), lr_decay=scalar(group["lr_decay"]),
                   eps=scalar(group["eps"]), maximize=group["maximize"],
                   decay=WeightDecay.of(group))


@dataclasses.dataclass(frozen=True)
class AdaGradStep:
    """eta_t = eta / (1 + (t - 1) gamma), the step size of step t."""
    eta_t: float


def adagrad_step(hp: AdaGradHyper, t: int) -> AdaGradStep:
    return AdaGradStep(eta_t=hp.lr / (1 + (t - 1) * hp.lr_decay))


def adagrad_update(p, g, state: dict, hp: AdaGradHyper, s: AdaGradStep) -> None:
    """One AdaGrad step, in place, in torch.optim's single-tensor operation order: the
    reference kernel (on `optimlab._foreach.TensorList` s, the multi-tensor one).  ``state``
    holds ``sum`` (s_t)."""
    g = hp.decay.grad(p, signed(g, hp.maximize))            # g (+ lambda theta for L2)
    state_sum = state["sum"]
    state_sum.addcmul_(g, g, value=1)                       # s_t = s_{t-1} + g_t^2
    std = state_sum.sqrt().add_(hp.eps)                     # sqrt(s_t) + delta
    q = hp.decay.begin(p)                                   # theta_{t-1}, decoupled decay
    q.addcdiv_(g, std, value=-s.eta_t)                      # theta_t
    hp.decay.end(p, q)                                      # decay of the updated weights


_F32, _F64 = torch.float32, torch.float64

class AdaGrad(Optimizer):
    r"""AdaGrad with torch.optim.Adagrad's lr decay and accumulator start (see the module
    docstring for the math and the departures from the paper).

    Args:
        params: parameters or parameter groups.
        lr: eta >= 0 (default 1e-2).
        lr_decay: gamma >= 0; the step size at step t is lr / (1 + (t - 1) * lr_decay).
        weight_decay: lambda >= 0 (tau >= 0, in updates, with ``wd_mode="timescale"``).
        initial_accumulator_value: s_0 >= 0, the starting value of every coordinate's sum of
            squared gradients.
        eps: delta >= 0, added to sqrt(s_t) (outside the root, as in the paper and torch).
        wd_mode: ``"l2"`` (default, torch.optim.Adagrad), ``"decoupled"``, ``"independent"``,
            ``"lr_squared"``, ``"absolute"`` or ``"timescale"`` (the table in `optimlab._common`).
        wd_after_update: decoupled/independent decay of the updated weights instead of
            theta_{t-1}.
        maximize: ascend instead of descend.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see `optimlab._optimizer.Optimizer`).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (see `optimlab._optimizer`;
            fused: optimlab's CPU kernel, fp32/fp64).

    State per parameter: ``step`` (int) and ``sum`` (s_t): torch.optim's keys.  The state is
    created on a parameter's first step (torch creates it in the constructor); each group's
    own ``initial_accumulator_value`` is used.

    Example:
        >>> opt = optimlab.AdaGrad(model.parameters(), lr=1e-2, initial_accumulator_value=0.1)
    """

    Hyper = AdaGradHyper
    fused = _ext.declare(_ext.FusedKernel(
        name="adagrad", hyper=AdaGradHyper, state=("sum",), scalars=AdaGradStep,
        dtypes=frozenset({(_F32, _F32, _F32), (_F64, _F64, _F64)})))
    _kernel = staticmethod(adagrad_update)

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, *, wd_mode: str = "l2", wd_after_update: bool = False,
                 wd_form: str | None = None,
                 maximize: bool = False, nonfinite: str = "skip", impl: str = "auto"):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps,
                        wd_mode=wd_mode, wd_after_update=bool(wd_after_update), wd_form=wd_form,
                        maximize=bool(maximize))
        self._check_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite, impl=impl)

    def _check_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("lr_decay", group["lr_decay"], 0.0)
        check_weight_decay(group["weight_decay"], group["wd_mode"],
                           group.setdefault("wd_form", None))
        check_range("initial_accumulator_value", group["initial_accumulator_value"], 0.0)
        check_range("eps", group["eps"], 0.0)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        return {"step": 0,
                "sum": torch.full_like(p, group["initial_accumulator_value"],
                                       memory_format=torch.preserve_format)}

    def _step_scalars(self, hp: AdaGradHyper, p, state) -> AdaGradStep:
        return adagrad_step(hp, state["step"] + 1)
