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
* ``"lr_squared"``, ``"absolute"``, ``"timescale"``: the same shrink of theta_{t-1} with the
  factor of `optimlab._common`'s table.

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

import dataclasses

import torch

from . import _ext
from ._common import WeightDecay, check_range, check_weight_decay, scalar, signed
from ._optimizer import Optimizer

__all__ = ["SGD", "SGDHyper", "SGDStep", "sgd_update"]


@dataclasses.dataclass(frozen=True)
class SGDHyper:
    """One group's SGD hyper-parameters for a step (the C struct ``SGDHyper``)."""
    lr: float                 # eta_t
    momentum: float           # mu
    dampening: float          # tau
    nesterov: bool
    maximize: bool
    decay: WeightDecay

    @classmethod
    def of(cls, group: dict, params=None) -> "SGDHyper":
        return cls(lr=scalar(group["lr"]), momentum=scalar(group["momentum"]),
                   dampening=scalar(group["dampening"]), nesterov=group["nesterov"],
                   maximize=group["maximize"], decay=WeightDecay.of(group))


@dataclasses.dataclass(frozen=True)
class SGDStep:
    """first: the momentum buffer starts this step (b_t = g_t): on step 1, or where momentum
    was switched on after step 1 (the buffer is created then)."""
    first: bool


def sgd_update(p, g, state: dict, hp: SGDHyper, s: SGDStep) -> None:
    """One SGD step, in place, in torch.optim's single-tensor operation order: the reference
    kernel (on `optimlab._foreach.TensorList` s, the multi-tensor one).  ``state`` holds the
    ``momentum_buffer`` when momentum > 0."""
    g = hp.decay.grad(p, signed(g, hp.maximize))            # g (+ lambda theta for L2)
    if hp.momentum != 0:
        buf = state["momentum_buffer"]
        if s.first:
            buf.copy_(g)                                    # b_1 = g_1
        else:
            buf.mul_(hp.momentum).add_(g, alpha=1 - hp.dampening)   # b_t = mu b + (1-tau) g
        g = g.add(buf, alpha=hp.momentum) if hp.nesterov else buf   # d_t
    q = hp.decay.begin(p)                                   # theta_{t-1}, decoupled decay
    q.add_(g, alpha=-hp.lr)                                 # theta_t = theta_{t-1} - eta d_t
    hp.decay.end(p, q)                                      # decay of the updated weights


_F32, _F64 = torch.float32, torch.float64

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
        weight_decay: lambda >= 0 (tau >= 0, in updates, with ``wd_mode="timescale"``).
        wd_mode: ``"l2"`` (default, torch.optim.SGD), ``"decoupled"`` (decay eta_t * lambda) or
            ``"independent"`` (decay (eta_t / eta_0) * lambda: SGDW, Composer's DecoupledSGDW),
            ``"lr_squared"``, ``"absolute"`` or ``"timescale"`` (the table in `optimlab._common`).
        wd_after_update: decoupled/independent decay of the updated weights instead of
            theta_{t-1}.
        maximize: ascend instead of descend.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see `optimlab._optimizer.Optimizer`).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (see `optimlab._optimizer`;
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

    Hyper = SGDHyper
    fused = _ext.declare(_ext.FusedKernel(
        name="sgd", hyper=SGDHyper, state=("momentum_buffer",), scalars=SGDStep,
        dtypes=frozenset({(_F32, _F32, _F32), (_F64, _F64, _F64)})))
    _kernel = staticmethod(sgd_update)

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, *, wd_mode: str = "l2",
                 wd_after_update: bool = False, wd_form: str | None = None,
                 maximize: bool = False, nonfinite: str = "skip", impl: str = "auto"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=bool(nesterov),
                        weight_decay=weight_decay, wd_mode=wd_mode,
                        wd_after_update=bool(wd_after_update), wd_form=wd_form,
                        maximize=bool(maximize))
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
        check_weight_decay(group["weight_decay"], group["wd_mode"],
                           group.setdefault("wd_form", None))

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = {"step": 0}
        if group["momentum"] != 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _scalars(self, hp: SGDHyper, params, states):
        """SGDStep per tensor: ``first`` on a buffer's first step.  Where momentum was switched
        on after step 1 the state has no buffer yet: it is created here (zeros, so that it is
        never uninitialised memory) and starts this step, b_t = g_t."""
        first, later = (True, SGDStep(first=True)), (False, SGDStep(first=False))
        out = []
        for p, state in zip(params, states):
            late = hp.momentum != 0 and "momentum_buffer" not in state
            if late:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append(first if late or state["step"] == 0 else later)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """As `optimlab._optimizer.Optimizer.load_state_dict`; additionally accepts
        torch.optim.SGD's format, whose per-parameter state is only a ``momentum_buffer``
        (present once the buffer is in use): it loads with ``step = 1``."""
        state = state_dict["state"]
        if any("step" not in s and "momentum_buffer" in s for s in state.values()):
            state_dict = dict(state_dict)
            state_dict["state"] = {pid: ({**s, "step": 1} if "step" not in s else s)
                                   for pid, s in state.items()}
        super().load_state_dict(state_dict)
