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
the group's ``lr`` (not the lr_decay-reduced eta_t).

Departures from the paper: ``lr_decay`` (a 1/t learning-rate schedule applied by the
optimizer itself) and ``initial_accumulator_value`` (s_0 > 0, which also keeps the first
steps bounded) are torch.optim's additions; the paper's composite-mirror-descent form with a
regularizer phi is not implemented (use ``weight_decay`` for an L2 term).

Reference:
    J. Duchi, E. Hazan, Y. Singer. Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization. JMLR 12, 2011.
"""

from __future__ import annotations

import torch

from . import _ext
from ._common import (Optimizer, check_range, check_weight_decay,
                      decay_after_update, foreach_decay_after_update, foreach_grads_with_decay,
                      fused_decay_scalars, grad_with_decay)

__all__ = ["AdaGrad", "adagrad_update", "adagrad_update_foreach"]


def adagrad_update(p: torch.Tensor, g: torch.Tensor, state_sum: torch.Tensor, *, step: int,
                   lr: float, lr_decay: float, eps: float) -> None:
    """One AdaGrad step on one tensor, in place, in torch.optim's single-tensor operation
    order.  ``g`` already contains any L2 term (and the sign flip of ``maximize``)."""
    clr = lr / (1 + (step - 1) * lr_decay)                      # eta_t
    state_sum.addcmul_(g, g, value=1)                           # s_t = s_{t-1} + g_t^2
    std = state_sum.sqrt().add_(eps)                            # sqrt(s_t) + delta
    p.addcdiv_(g, std, value=-clr)                              # theta_t


def adagrad_update_foreach(params: list[torch.Tensor], grads: list[torch.Tensor],
                           sums: list[torch.Tensor], *, steps: list[int], lr: float,
                           lr_decay: float, eps: float) -> None:
    """`adagrad_update` on lists of tensors that share a device and dtypes."""
    clr = [lr / (1 + (t - 1) * lr_decay) for t in steps]
    torch._foreach_addcmul_(sums, grads, grads, value=1)
    std = torch._foreach_sqrt(sums)
    torch._foreach_add_(std, eps)
    torch._foreach_addcdiv_(params, grads, std, [-c for c in clr])


class AdaGrad(Optimizer):
    r"""AdaGrad with torch.optim.Adagrad's lr decay and accumulator start (see the module
    docstring for the math and the departures from the paper).

    Args:
        params: parameters or parameter groups.
        lr: eta >= 0 (default 1e-2).
        lr_decay: gamma >= 0; the step size at step t is lr / (1 + (t - 1) * lr_decay).
        weight_decay: lambda >= 0.
        initial_accumulator_value: s_0 >= 0, the starting value of every coordinate's sum of
            squared gradients.
        eps: delta >= 0, added to sqrt(s_t) (outside the root, as in the paper and torch).
        wd_mode: ``"l2"`` (default, torch.optim.Adagrad), ``"decoupled"`` or ``"independent"``.
        wd_after_update: decoupled/independent decay of the updated weights instead of
            theta_{t-1}.
        maximize: ascend instead of descend.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see `optimlab._common.Optimizer`).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (see `optimlab._common`;
            fused: optimlab's CPU kernel, fp32/fp64).

    State per parameter: ``step`` (int) and ``sum`` (s_t): torch.optim's keys.  The state is
    created on a parameter's first step (torch creates it in the constructor); each group's
    own ``initial_accumulator_value`` is used.

    Example:
        >>> opt = optimlab.AdaGrad(model.parameters(), lr=1e-2, initial_accumulator_value=0.1)
    """

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, *, wd_mode: str = "l2", wd_after_update: bool = False,
                 maximize: bool = False, nonfinite: str = "skip", impl: str = "auto"):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps,
                        wd_mode=wd_mode, wd_after_update=bool(wd_after_update),
                        maximize=bool(maximize))
        self._check_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite, impl=impl)

    def _check_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("lr_decay", group["lr_decay"], 0.0)
        check_weight_decay(group["weight_decay"], group["wd_mode"])
        check_range("initial_accumulator_value", group["initial_accumulator_value"], 0.0)
        check_range("eps", group["eps"], 0.0)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        return {"step": 0,
                "sum": torch.full_like(p, group["initial_accumulator_value"],
                                       memory_format=torch.preserve_format)}

    def _update_param(self, p, grad, state, group) -> None:
        grad = grad_with_decay(p, grad, group)
        state["step"] += 1
        adagrad_update(p, grad, state["sum"], step=state["step"], lr=group["lr"],
                       lr_decay=group["lr_decay"], eps=group["eps"])
        decay_after_update(p, group)

    def _foreach_update(self, group, params, states) -> None:
        grads = foreach_grads_with_decay(params, [p.grad for p in params], group)
        for state in states:
            state["step"] += 1
        adagrad_update_foreach(params, grads, [s["sum"] for s in states],
                               steps=[s["step"] for s in states], lr=group["lr"],
                               lr_decay=group["lr_decay"], eps=group["eps"])
        foreach_decay_after_update(params, group)

    def _fused_update(self, group, params, states) -> str:
        code = self._fused_cpu_code(params, states, ("sum",))
        slots = []
        for p, state in zip(params, states):
            state["step"] += 1
            slots += (p.data_ptr(), p.grad.data_ptr(), state["sum"].data_ptr(), p.numel(),
                      state["step"])
        wd_l2, pre, post = fused_decay_scalars(group)
        _ext.call("adagrad", code, slots, 5, (group["lr"], group["lr_decay"], group["eps"],
                                              wd_l2, pre, post, group["maximize"]))
        return "fused-cpu"
