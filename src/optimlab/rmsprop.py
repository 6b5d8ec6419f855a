r"""RMSProp (Tieleman & Hinton, 2012, lecture 6.5), its centered variant (Graves, 2013) and
momentum, as torch.optim.RMSprop runs them.

For step t = 1, 2, ... with gradient g_t, learning rate eta, smoothing constant alpha,
momentum mu and eps:

    v_t = alpha * v_{t-1} + (1 - alpha) * g_t^2                 (mean square; v_0 = 0)
    centered:  a_t = alpha * a_{t-1} + (1 - alpha) * g_t        (mean gradient; a_0 = 0)
               d_t = sqrt(v_t - a_t^2) + eps                    (a running standard deviation)
    otherwise: d_t = sqrt(v_t) + eps
    mu > 0:    b_t = mu * b_{t-1} + g_t / d_t ;  theta_t = theta_{t-1} - eta * b_t   (b_0 = 0)
    mu = 0:    theta_t = theta_{t-1} - eta * g_t / d_t

Lecture 6.5 divides the gradient by sqrt(MeanSquare(w, t)) with
MeanSquare(w, t) = 0.9 MeanSquare(w, t-1) + 0.1 g_t^2 (alpha = 0.9 there; torch's default is
0.99).  Graves (2013, the RMSProp variant used to train its networks) subtracts the
squared running mean of the gradient:

    n_i = aleph n_i + (1 - aleph) e_i^2,   g_i = aleph g_i + (1 - aleph) e_i,
    Delta_i = beth Delta_i - gimel e_i / sqrt(n_i - g_i^2 + daleth),   w_i = w_i + Delta_i.

Weight decay lambda (``wd_mode``, see `optimlab._common`): ``"l2"`` adds lambda * theta_{t-1}
to g_t before the averages (torch.optim.RMSprop); ``"decoupled"`` and ``"independent"``
shrink theta_{t-1} by eta * lambda or (eta / eta_0) * lambda.

Departures from the sources (torch.optim's choices): eps is added outside the square root
(Graves and TensorFlow's ApplyRMSProp add it inside: sqrt(v - a^2 + eps)); with momentum the
learning rate multiplies the buffer when it is used instead of being accumulated into it
(Graves' Delta_i = beth Delta_i - gimel e_i / ..., ApplyRMSProp's mom = mu mom + lr g / ...),
which differs once the lr changes; the lecture has no eps, no momentum and no weight decay.

References:
    T. Tieleman, G. Hinton. Lecture 6.5 - rmsprop: Divide the gradient by a running average
    of its recent magnitude. COURSERA: Neural Networks for Machine Learning, 2012.
    A. Graves. Generating Sequences With Recurrent Neural Networks. arXiv:1308.0850, 2013.
"""

from __future__ import annotations

import torch

from . import _ext
from ._common import (Optimizer, check_range, check_weight_decay,
                      decay_after_update, foreach_decay_after_update, foreach_grads_with_decay,
                      fused_decay_scalars, grad_with_decay)

__all__ = ["RMSProp", "rmsprop_update", "rmsprop_update_foreach"]


def rmsprop_update(p: torch.Tensor, g: torch.Tensor, square_avg: torch.Tensor,
                   grad_avg: torch.Tensor | None, buf: torch.Tensor | None, *, lr: float,
                   alpha: float, eps: float, momentum: float) -> None:
    """One RMSProp step on one tensor, in place, in torch.optim's single-tensor operation
    order.  ``g`` already contains any L2 term (and the sign flip of ``maximize``);
    ``grad_avg`` is None unless centered, ``buf`` None unless momentum > 0.  The averages
    are computed in the state's dtype (fp32 state of bf16 parameters stays fp32)."""
    g = g.to(square_avg.dtype)                                  # no-op when dtypes agree
    square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)     # v_t
    if grad_avg is not None:
        grad_avg.lerp_(g, 1 - alpha)                            # a_t
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()   # sqrt(v_t - a_t^2)
    else:
        avg = square_avg.sqrt()                                 # sqrt(v_t)
    avg = avg.add_(eps)                                         # d_t
    if buf is not None:
        buf.mul_(momentum).addcdiv_(g, avg)                     # b_t = mu b_{t-1} + g_t / d_t
        p.add_(buf, alpha=-lr)
    else:
        p.addcdiv_(g, avg, value=-lr)


def rmsprop_update_foreach(params: list[torch.Tensor], grads: list[torch.Tensor],
                           square_avgs: list[torch.Tensor], grad_avgs: list[torch.Tensor] | None,
                           bufs: list[torch.Tensor] | None, *, lr: float, alpha: float,
                           eps: float, momentum: float) -> None:
    """`rmsprop_update` on lists of tensors that share a device and dtypes."""
    if grads[0].dtype != square_avgs[0].dtype:
        grads = [g.to(square_avgs[0].dtype) for g in grads]
    torch._foreach_mul_(square_avgs, alpha)                                    # v_t
    torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
    if grad_avgs is not None:
        torch._foreach_lerp_(grad_avgs, grads, 1 - alpha)                      # a_t
        avg = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1)
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(square_avgs)
    torch._foreach_add_(avg, eps)                                              # d_t
    if bufs is not None:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_addcdiv_(bufs, grads, avg)
        torch._foreach_add_(params, bufs, alpha=-lr)
    else:
        torch._foreach_addcdiv_(params, grads, avg, value=-lr)


class RMSProp(Optimizer):
    r"""RMSProp, optionally centered and with momentum (see the module docstring for the math
    and the departures from the sources).

    Args:
        params: parameters or parameter groups.
        lr: eta >= 0 (default 1e-2).
        alpha: smoothing constant in [0, 1) (default 0.99).  torch only requires alpha >= 0;
            alpha >= 1 would keep v_t at 0 (or grow it) and is rejected here.
        eps: >= 0, added to the root (outside it).
        weight_decay: lambda >= 0.
        momentum: mu in [0, 1) (0: no buffer).  torch only requires mu >= 0.
        centered: divide by the running standard deviation sqrt(v_t - a_t^2) (Graves).
        wd_mode: ``"l2"`` (default, torch.optim.RMSprop), ``"decoupled"`` or ``"independent"``.
        wd_after_update: decoupled/independent decay of the updated weights instead of
            theta_{t-1}.
        maximize: ascend instead of descend.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see `optimlab._common.Optimizer`).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (see `optimlab._common`;
            fused: optimlab's CPU kernel, fp32/fp64).

    State per parameter (torch.optim's keys): ``step`` (int), ``square_avg`` (v_t),
    ``momentum_buffer`` (b_t) when momentum > 0, ``grad_avg`` (a_t) when centered.

    Example:
        >>> opt = optimlab.RMSProp(model.parameters(), lr=1e-3, alpha=0.95, momentum=0.9,
        ...                        centered=True)
    """

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *,
                 wd_mode: str = "l2", wd_after_update: bool = False, maximize: bool = False,
                 nonfinite: str = "skip", impl: str = "auto"):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=bool(centered), wd_mode=wd_mode,
                        wd_after_update=bool(wd_after_update), maximize=bool(maximize))
        self._check_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite, impl=impl)

    def _check_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("alpha", group["alpha"], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)
        check_weight_decay(group["weight_decay"], group["wd_mode"])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = {"step": 0,
                 "square_avg": torch.zeros_like(p, memory_format=torch.preserve_format)}
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _update_param(self, p, grad, state, group) -> None:
        grad = grad_with_decay(p, grad, group)
        state["step"] += 1
        rmsprop_update(p, grad, state["square_avg"],
                       state["grad_avg"] if group["centered"] else None,
                       state["momentum_buffer"] if group["momentum"] > 0 else None,
                       lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                       momentum=group["momentum"])
        decay_after_update(p, group)

    def _foreach_update(self, group, params, states) -> None:
        grads = foreach_grads_with_decay(params, [p.grad for p in params], group)
        for state in states:
            state["step"] += 1
        rmsprop_update_foreach(
            params, grads, [s["square_avg"] for s in states],
            [s["grad_avg"] for s in states] if group["centered"] else None,
            [s["momentum_buffer"] for s in states] if group["momentum"] > 0 else None,
            lr=group["lr"], alpha=group["alpha"], eps=group["eps"], momentum=group["momentum"])
        foreach_decay_after_update(params, group)

    def _fused_update(self, group, params, states) -> str:
        keys = ("square_avg",) + (("grad_avg",) if group["centered"] else ()) + \
            (("momentum_buffer",) if group["momentum"] > 0 else ())
        code = self._fused_cpu_code(params, states, keys)
        slots = []
        for p, state in zip(params, states):
            state["step"] += 1
            slots += (p.data_ptr(), p.grad.data_ptr(), state["square_avg"].data_ptr(),
                      state["grad_avg"].data_ptr() if group["centered"] else 0,
                      state["momentum_buffer"].data_ptr() if group["momentum"] > 0 else 0,
                      p.numel())
        wd_l2, pre, post = fused_decay_scalars(group)
        _ext.call("rmsprop", code, slots, 6, (group["lr"], group["alpha"], group["eps"],
                                              group["momentum"], group["centered"], wd_l2, pre,
                                              post, group["maximize"]))
        return "fused-cpu"
