r"""RAdam: Adam with the variance of the adaptive learning rate rectified (Liu et al., 2020,
"On the Variance of the Adaptive Learning Rate and Beyond", Algorithm 2).

For step t = 1, 2, ... with gradient g_t, step size alpha_t, betas (beta1, beta2):

    m_t = beta1 * m_{t-1} + (1 - beta1) * g_t ;   m^_t = m_t / (1 - beta1^t)
    v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2
    rho_inf = 2 / (1 - beta2) - 1                           (max. length of the approximated SMA)
    rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)
    if rho_t > rho_threshold:                                (variance of l_t is tractable)
        l_t = sqrt((1 - beta2^t) / v_t)                      (adaptive learning rate; eps below)
        r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
        theta_t = theta_{t-1} - alpha_t * r_t * m^_t * l_t
    else:
        theta_t = theta_{t-1} - alpha_t * m^_t               (degenerate_to_sgd=True)
        theta_t = theta_{t-1}                                (degenerate_to_sgd=False)

The moments are updated on every step, whichever branch is taken.  rho_t grows roughly like t
for small t and tends to rho_inf: with beta2 = 0.999, rho_1..rho_5 = 1.0, 2.0, 3.0, 4.0, 4.996
and rho_6 = 5.994, so the first five steps are un-adapted.  When beta2 <= 0.6, rho_inf <= 4
and the rectified branch is never taken.

Epsilon (``eps_placement``; Algorithm 2 has none):

* ``"sqrt_v"`` (default; torch.optim.RAdam and the authors' code):
  l_t = sqrt(1 - beta2^t) / (sqrt(v_t) + eps), eps on the uncorrected root.
* ``"sqrt_v_hat"``: l_t = 1 / (sqrt(v_t / (1 - beta2^t)) + eps), as labml.ai's RAdam with
  ``optimized_update=False`` and as Adam's default.

The threshold (``rho_threshold``): Algorithm 2 tests rho_t > 4 (r_t is real exactly when
rho_t > 4); torch.optim.RAdam tests rho_t > 5 (the default here); the authors' code and
labml.ai test rho_t >= 5 ("more conservative since it's an approximated value"), which
differs from > 5 only if rho_t lands exactly on 5.

Weight decay lambda (``wd_mode``, see `optimlab._common`): ``"l2"`` adds lambda * theta_{t-1}
to g_t (torch.optim.RAdam's default); ``"decoupled"`` shrinks theta_{t-1} by alpha_t * lambda
before the step on every step (torch.optim.RAdam with ``decoupled_weight_decay=True``);
``"independent"`` by (alpha_t / alpha_0) * lambda.

Departures from the paper: eps (above); the threshold is a parameter whose default is torch's
5, not the paper's 4; ``degenerate_to_sgd=False`` (the authors' code's
``degenerated_to_sgd=False``) is not in Algorithm 2; the authors' code applies its decoupled
decay only on steps that move the parameters, torch (and this class) on every step.

Reference:
    L. Liu, H. Jiang, P. He, W. Chen, X. Liu, J. Gao, J. Han. On the Variance of the
    Adaptive Learning Rate and Beyond. ICLR 2020.
"""

from __future__ import annotations

import torch

from . import _ext
from ._common import (EPS_PLACEMENTS, Optimizer, check_betas, check_choice,
                      check_range, check_weight_decay, decay_after_update,
                      foreach_decay_after_update, foreach_grads_with_decay, fused_decay_scalars,
                      grad_with_decay)

__all__ = ["RAdam", "radam_update", "radam_update_foreach", "radam_rho"]


def radam_rho(step: int, beta2: float) -> tuple[float, float]:
    """(rho_inf, rho_t): the maximum and the step-t length of the approximated SMA."""
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** step) / (1 - beta2 ** step)
    return rho_inf, rho_t


def radam_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *,
                 step: int, lr: float, beta1: float, beta2: float, eps: float,
                 eps_placement: str, rho_threshold: float, degenerate_to_sgd: bool) -> None:
    """One RAdam step on one tensor, in place, in torch.optim's single-tensor operation order
    (bit-identical to it for ``eps_placement="sqrt_v"``, ``rho_threshold=5``,
    ``degenerate_to_sgd=True``).  ``g`` already contains any L2 term.  The moments are
    computed in the state's dtype (fp32 state of bf16 parameters stays fp32)."""
    g = g.to(m.dtype)                                           # no-op when dtypes agree
    m.lerp_(g, 1 - beta1)                                       # m_t
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)               # v_t
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    m_hat = m / bias_correction1                                # m^_t
    rho_inf, rho_t = radam_rho(step, beta2)
    if rho_t > rho_threshold:
        r_t = ((rho_t - 4) * (rho_t - 2) * rho_inf
               / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        if eps_placement == "sqrt_v":                           # sqrt(1-beta2^t) / (sqrt(v)+eps)
            l_t = bias_correction2 ** 0.5 / v.sqrt().add_(eps)
        else:                                                   # 1 / (sqrt(v^) + eps)
            l_t = (v.sqrt() / bias_correction2 ** 0.5).add_(eps).reciprocal_()
        p.add_(m_hat * lr * l_t * r_t, alpha=-1.0)              # theta -= alpha r m^ l
    elif degenerate_to_sgd:
        p.add_(m_hat * lr, alpha=-1.0)                          # theta -= alpha m^


def radam_update_foreach(params: list[torch.Tensor], grads: list[torch.Tensor],
                         ms: list[torch.Tensor], vs: list[torch.Tensor], *, steps: list[int],
                         lr: float, beta1: float, beta2: float, eps: float, eps_placement: str,
                         rho_threshold: float, degenerate_to_sgd: bool) -> None:
    """`radam_update` on lists of tensors that share a device and dtypes; each tensor takes
    the branch its own step selects."""
    if grads[0].dtype != ms[0].dtype:
        grads = [g.to(ms[0].dtype) for g in grads]
    torch._foreach_lerp_(ms, grads, 1 - beta1)                                 # m_t
    torch._foreach_mul_(vs, beta2)                                             # v_t
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    bc1 = [1 - beta1 ** t for t in steps]
    bc2 = [1 - beta2 ** t for t in steps]
    m_hat = torch._foreach_div(ms, bc1)                                        # m^_t
    rect, plain, r_t = [], [], []
    for i, t in enumerate(steps):
        rho_inf, rho_t = radam_rho(t, beta2)
        if rho_t > rho_threshold:
            rect.append(i)
            r_t.append(((rho_t - 4) * (rho_t - 2) * rho_inf
                        / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5)
        elif degenerate_to_sgd:
            plain.append(i)
    if rect:
        l_t = torch._foreach_sqrt([vs[i] for i in rect])
        if eps_placement == "sqrt_v":                   # sqrt(1-beta2^t) / (sqrt(v)+eps)
            torch._foreach_add_(l_t, eps)
            torch._foreach_reciprocal_(l_t)
            torch._foreach_mul_(l_t, [bc2[i] ** 0.5 for i in rect])
        else:                                           # 1 / (sqrt(v^) + eps)
            torch._foreach_div_(l_t, [bc2[i] ** 0.5 for i in rect])
            torch._foreach_add_(l_t, eps)
            torch._foreach_reciprocal_(l_t)
        step = torch._foreach_mul([m_hat[i] for i in rect], lr)
        torch._foreach_mul_(step, l_t)
        torch._foreach_mul_(step, r_t)
        torch._foreach_add_([params[i] for i in rect], step, alpha=-1.0)       # theta -= a r m^ l
    if plain:
        step = torch._foreach_mul([m_hat[i] for i in plain], lr)
        torch._foreach_add_([params[i] for i in plain], step, alpha=-1.0)      # theta -= a m^


class RAdam(Optimizer):
    r"""Rectified Adam (see the module docstring for the math, the thresholds and eps
    placements of the paper, torch and the authors' code, and the departures).

    Args:
        params: parameters or parameter groups.
        lr: alpha >= 0 (default 1e-3).
        betas: (beta1, beta2), each in [0, 1).
        eps: >= 0, added where ``eps_placement`` says.
        weight_decay: lambda >= 0.
        wd_mode: ``"l2"`` (default, torch.optim.RAdam), ``"decoupled"`` (torch's
            ``decoupled_weight_decay=True``) or ``"independent"``.
        wd_after_update: decoupled/independent decay of the updated weights instead of
            theta_{t-1}.
        rho_threshold: >= 4; the rectified step is taken when rho_t > rho_threshold (default
            5, torch; the paper uses 4; r_t is not real for rho_t < 4).
        degenerate_to_sgd: when rho_t <= rho_threshold, take the un-adapted momentum step
            theta -= alpha * m^_t (True, default) or leave theta unchanged (False).
        eps_placement: ``"sqrt_v"`` (default, torch and the authors' code) or
            ``"sqrt_v_hat"``.
        maximize: ascend instead of descend.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see `optimlab._common.Optimizer`).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (see `optimlab._common`;
            fused: optimlab's CPU kernel, fp32/fp64).

    State per parameter (torch.optim's keys): ``step`` (int), ``exp_avg`` (m), ``exp_avg_sq`` (v).

    Example:
        >>> opt = optimlab.RAdam(model.parameters(), lr=1e-3, weight_decay=1e-2,
        ...                      wd_mode="decoupled")
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, wd_mode: str = "l2",
                 wd_after_update: bool = False, rho_threshold: float = 5.0,
                 degenerate_to_sgd: bool = True, eps_placement: str = "sqrt_v",
                 maximize: bool = False, nonfinite: str = "skip", impl: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        wd_mode=wd_mode, wd_after_update=bool(wd_after_update),
                        rho_threshold=rho_threshold, degenerate_to_sgd=bool(degenerate_to_sgd),
                        eps_placement=eps_placement, maximize=bool(maximize))
        self._check_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite, impl=impl)

    def _check_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        group["betas"] = check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_weight_decay(group["weight_decay"], group["wd_mode"])
        check_range("rho_threshold", group["rho_threshold"], 4.0)
        check_choice("eps_placement", group["eps_placement"], EPS_PLACEMENTS)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        return {"step": 0,
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def _update_param(self, p, grad, state, group) -> None:
        grad = grad_with_decay(p, grad, group)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        radam_update(p, grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"],
                     lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                     eps_placement=group["eps_placement"],
                     rho_threshold=group["rho_threshold"],
                     degenerate_to_sgd=group["degenerate_to_sgd"])
        decay_after_update(p, group)

    def _foreach_update(self, group, params, states) -> None:
        grads = foreach_grads_with_decay(params, [p.grad for p in params], group)
        for state in states:
            state["step"] += 1
        beta1, beta2 = group["betas"]
        radam_update_foreach(params, grads, [s["exp_avg"] for s in states],
                             [s["exp_avg_sq"] for s in states],
                             steps=[s["step"] for s in states], lr=group["lr"], beta1=beta1,
                             beta2=beta2, eps=group["eps"], eps_placement=group["eps_placement"],
                             rho_threshold=group["rho_threshold"],
                             degenerate_to_sgd=group["degenerate_to_sgd"])
        foreach_decay_after_update(params, group)

    def _fused_update(self, group, params, states) -> str:
        code = self._fused_cpu_code(params, states, ("exp_avg", "exp_avg_sq"))
        slots = []
        for p, state in zip(params, states):
            state["step"] += 1
            slots += (p.data_ptr(), p.grad.data_ptr(), state["exp_avg"].data_ptr(),
                      state["exp_avg_sq"].data_ptr(), p.numel(), state["step"])
        beta1, beta2 = group["betas"]
        wd_l2, pre, post = fused_decay_scalars(group)
        _ext.call("radam", code, slots, 6,
                  (group["lr"], beta1, beta2, group["eps"], group["eps_placement"] == "sqrt_v_hat",
                   group["rho_threshold"], group["degenerate_to_sgd"], wd_l2, pre, post,
                   group["maximize"]))
        return "fused-cpu"
