r"""Stochastic gradient descent with momentum, dampening, Nesterov momentum and the three kinds
of weight decay (SGDW).

SGD (Robbins & Monro, 1951) with heavy-ball momentum (Polyak, 1964) or Nesterov momentum
(Nesterov, 1983; Sutskever et al., 2013), in the form torch.optim.SGD uses.  For step
t = 1, 2, ... with stochastic gradient g_t = grad f_t(theta_{t-1}), learning rate eta_t,
momentum mu and dampening tau:

    b_1 = g_1                                          (momentum buffer, mu > 0)
    b_t = mu * b_{t-1} + (1 - tau) * g_t               (t > 1)
    d_t = g_t + mu * b_t     if nesterov
          b_t                if mu > 0, not nesterov
          g_t                if mu = 0
    theta_t = theta_{t-1} - eta_t * d_t

Weight decay lambda (``wd_mode``, see `optimlab._common`):

* ``"l2"`` (torch.optim.SGD): g_t <- g_t + lambda * theta_{t-1} before the buffer, so the
  decay term is carried by the momentum.
* ``"decoupled"``: theta_{t-1} <- (1 - eta_t * lambda) * theta_{t-1} before the step, outside
  the buffer.
* ``"independent"``: theta_{t-1} <- (1 - (eta_t / eta_0) * lambda) * theta_{t-1}: SGDW,
  Loshchilov & Hutter (2019), Algorithm 1, where the decay follows the schedule multiplier
  but not the peak lr; Composer's DecoupledSGDW.

Departures from the papers (all are torch.optim.SGD's choices):

* The learning rate multiplies the buffer when it is used (theta -= eta_t * b_t) instead of
  being accumulated into it (Sutskever et al.'s v_t = mu v_{t-1} - eta_t g_t, SGDW's
  m_t = beta1 m_{t-1} + eta_t alpha g_t).  The two agree for a constant lr and differ once the
  lr changes: here a change of lr rescales the whole accumulated velocity at once.
* The buffer starts at b_1 = g_1 rather than b_0 = 0 (which would give b_1 = (1 - tau) g_1).
* Nesterov momentum is the look-ahead-free reformulation (Bengio et al., 2013) with the
  gradient evaluated at theta_{t-1}, not at theta_{t-1} + mu v_{t-1}.
* SGDW's Algorithm 1 also adds an L2 term lambda' theta to the gradient; here the optimizer
  has one ``weight_decay`` and ``wd_mode`` picks which kind it is.

References:
    H. Robbins, S. Monro. A Stochastic Approximation Method. Ann. Math. Stat., 1951.
    B. T. Polyak. Some methods of speeding up the convergence of iteration methods. 1964.
    I. Sutskever, J. Martens, G. Dahl, G. Hinton. On the importance of initialization and
    momentum in deep learning. ICML 2013.
    I. Loshchilov, F. Hutter. Decoupled Weight Decay Regularization. ICLR 2019.
"""

from __future__ import annotations

import torch

from . import _ext
from ._common import (NoFusedKernel, Optimizer, check_range, check_weight_decay,
                      decay_after_update, foreach_decay_after_update, foreach_grads_with_decay,
                      fused_decay_scalars, grad_with_decay)

__all__ = ["SGD", "sgd_update", "sgd_update_foreach"]


def sgd_update(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None, *, lr: float,
               momentum: float, dampening: float, nesterov: bool, first_step: bool) -> None:
    """One SGD step on one tensor, in place, in torch.optim's single-tensor operation order.

    ``g`` already contains any L2 term (and the sign flip of ``maximize``); ``buf`` is the
    momentum buffer, None when momentum is 0.  On the buffer's first step it is set to g."""
    if buf is not None:
        if first_step:
            buf.copy_(g)                                        # b_1 = g_1
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)     # b_t = mu b_{t-1} + (1-tau) g_t
        if nesterov:
            g = g.add(buf, alpha=momentum)                      # d_t = g_t + mu b_t
        else:
            g = buf                                             # d_t = b_t
    p.add_(g, alpha=-lr)                                        # theta_t = theta_{t-1} - eta d_t


def sgd_update_foreach(params: list[torch.Tensor], grads: list[torch.Tensor],
                       bufs: list[torch.Tensor] | None, first_steps: list[bool], *, lr: float,
                       momentum: float, dampening: float, nesterov: bool) -> None:
    """`sgd_update` on lists of tensors that share a device and dtypes (``torch._foreach_*``
    kernels in the reference's operation order); ``first_steps`` per tensor."""
    if bufs is not None:
        first = [i for i, f in enumerate(first_steps) if f]
        later = [i for i, f in enumerate(first_steps) if not f]
        if first:
            torch._foreach_copy_([bufs[i] for i in first], [grads[i] for i in first])
        if later:
            b = [bufs[i] for i in later]
            torch._foreach_mul_(b, momentum)
            torch._foreach_add_(b, [grads[i] for i in later], alpha=1 - dampening)
        grads = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(params, grads, alpha=-lr)


class SGD(Optimizer):
    r"""SGD with momentum, dampening, Nesterov momentum and L2, decoupled or independent
    weight decay (see the module docstring for the math and departures from the papers).

    Args:
        params: parameters or parameter groups.
        lr: eta >= 0 (default 1e-3, torch.optim.SGD's default).
        momentum: mu in [0, 1) (0 disables the buffer).  torch only requires mu >= 0; mu >= 1
            makes the buffer a non-decaying sum and is rejected here.
        dampening: tau in [0, 1]; the buffer adds (1 - tau) * g_t.
        nesterov: Nesterov momentum; requires momentum > 0 and dampening == 0 (as torch).
        weight_decay: lambda >= 0.
        wd_mode: ``"l2"`` (default, torch.optim.SGD), ``"decoupled"`` (decay eta_t * lambda) or
            ``"independent"`` (decay (eta_t / eta_0) * lambda: SGDW, Composer's DecoupledSGDW).
        wd_after_update: decoupled/independent decay of the updated weights instead of
            theta_{t-1}.
        maximize: ascend instead of descend.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see `optimlab._common.Optimizer`).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (see `optimlab._common`;
            fused: optimlab's CPU kernel, fp32/fp64).

    State per parameter: ``step`` (int, steps taken) and, when momentum > 0,
    ``momentum_buffer`` (torch's name).  The buffer exists from the start, zero, and is set to
    the first gradient on step 1; ``step`` is what tells an unused buffer from a used one, so
    a state dict saved before any step round-trips.  A torch.optim.SGD state dict (a
    ``momentum_buffer`` and no ``step``) loads as a buffer that is already in use.

    Example:
        >>> opt = optimlab.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
        ...                    weight_decay=5e-4)
        >>> sgdw = optimlab.SGD(model.parameters(), lr=0.1, momentum=0.9,
        ...                     weight_decay=1e-4, wd_mode="independent")
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, *, wd_mode: str = "l2",
                 wd_after_update: bool = False, maximize: bool = False,
                 nonfinite: str = "skip", impl: str = "auto"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=bool(nesterov),
                        weight_decay=weight_decay, wd_mode=wd_mode,
                        wd_after_update=bool(wd_after_update), maximize=bool(maximize))
        self._check_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite, impl=impl)

    def _check_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        momentum = check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        dampening = check_range("dampening", group["dampening"], 0.0, 1.0)
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError(f"Invalid nesterov=True: Nesterov momentum requires momentum > 0 "
                             f"and dampening == 0 (got momentum={group['momentum']!r}, "
                             f"dampening={group['dampening']!r})")
        check_weight_decay(group["weight_decay"], group["wd_mode"])

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = {"step": 0}
        if group["momentum"] != 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _update_param(self, p, grad, state, group) -> None:
        grad = grad_with_decay(p, grad, group)
        state["step"] += 1
        first_step = state["step"] == 1
        buf = None
        if group["momentum"] != 0:
            if "momentum_buffer" not in state:      # momentum switched on after step 1
                state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
                first_step = True
            buf = state["momentum_buffer"]
        sgd_update(p, grad, buf, lr=group["lr"], momentum=group["momentum"],
                   dampening=group["dampening"], nesterov=group["nesterov"],
                   first_step=first_step)
        decay_after_update(p, group)

    @staticmethod
    def _buffers(params, states, momentum: bool) -> tuple[list | None, list[bool]]:
        """Increment the steps; return the momentum buffers (None without momentum; created
        when momentum was switched on after step 1) and which of them start this step."""
        for state in states:
            state["step"] += 1
        first = [state["step"] == 1 for state in states]
        if not momentum:
            return None, first
        bufs = []
        for i, (p, state) in enumerate(zip(params, states)):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
                first[i] = True
            bufs.append(state["momentum_buffer"])
        return bufs, first

    def _foreach_update(self, group, params, states) -> None:
        grads = foreach_grads_with_decay(params, [p.grad for p in params], group)
        bufs, first = self._buffers(params, states, group["momentum"] != 0)
        sgd_update_foreach(params, grads, bufs, first, lr=group["lr"],
                           momentum=group["momentum"], dampening=group["dampening"],
                           nesterov=group["nesterov"])
        foreach_decay_after_update(params, group)

    def _fused_update(self, group, params, states) -> str:
        p0 = params[0]
        code = {torch.float32: 0, torch.float64: 2}.get(p0.dtype)
        keys = ("momentum_buffer",) if group["momentum"] != 0 else ()
        if p0.device.type != "cpu" or code is None or not _ext.available():
            raise NoFusedKernel(f"no fused SGD kernel for {p0.dtype} on {p0.device.type} "
                                f"(optimlab's CPU kernels, fp32/fp64; available: "
                                f"{_ext.available()})")
        if self._flat_bucket:    # bucketed together: same state keys and dtypes, same layout
            have = [k for k in keys if k in states[0]]
            bad = any(states[0][k].dtype != p0.dtype for k in have)
        else:
            have = [k for k in keys if all(k in s for s in states)]
            bad = any(s[k].dtype != p0.dtype for s in states for k in have) or \
                not _ext.same_layout(params, states, have)
        if bad:
            raise NoFusedKernel("SGD state in another dtype or layout than the parameters")
        slots = []
        if have or not keys:     # every buffer exists (or no momentum): one loop
            for p, st in zip(params, states):
                st["step"] += 1
                slots += (p.data_ptr(), p.grad.data_ptr(),
                          st["momentum_buffer"].data_ptr() if keys else 0, p.numel(),
                          st["step"] == 1)
        else:
            bufs, first = self._buffers(params, states, True)
            for i, p in enumerate(params):
                slots += (p.data_ptr(), p.grad.data_ptr(), bufs[i].data_ptr(), p.numel(),
                          first[i])
        wd_l2, pre, post = fused_decay_scalars(group)
        _ext.call("sgd", code, slots, 5, (group["lr"], group["momentum"], group["dampening"],
                                          group["nesterov"], wd_l2, pre, post,
                                          group["maximize"]))
        return "fused-cpu"

    def load_state_dict(self, state_dict: dict) -> None:
        """As `optimlab._common.Optimizer.load_state_dict`; additionally accepts
        torch.optim.SGD's format, whose per-parameter state is only a ``momentum_buffer``
        (present once the buffer is in use): it loads with ``step = 1``."""
        state = state_dict["state"]
        if any("step" not in s and "momentum_buffer" in s for s in state.values()):
            state_dict = dict(state_dict)
            state_dict["state"] = {pid: ({**s, "step": 1} if "step" not in s else s)
                                   for pid, s in state.items()}
        super().load_state_dict(state_dict)
