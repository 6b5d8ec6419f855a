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
shrink theta_{t-1} by eta * lambda or (eta / eta_0) * lambda; ``"lr_squared"``,
``"absolute"`` and ``"timescale"`` by the factors of `optimlab._common`'s table.

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

import dataclasses

import torch

from . import _ext
from ._common import WeightDecay, check_range, check_weight_decay, scalar, signed
from ._optimizer import Optimizer

__all__ = ["RMSProp", "RMSPropHyper", "RMSPropStep", "rmsprop_update"]


@dataclasses.dataclass(frozen=True)
class RMSPropHyper:
    """One group's RMSProp hyper-parameters for a step (the C struct ``RMSPropHyper``)."""
    lr: float                 # eta
    alpha: float
    eps: float
    momentum: float           # mu
    centered: bool
    maximize: bool
    decay: WeightDecay

    @classmethod
    def of(cls, group: dict, params=None) -> "RMSPropHyper":
        return cls(lr=scalar(group["lr"]), alpha=scalar(group["alpha"]),
                   eps=scalar(group["eps"]), momentum=scalar(group["momentum"]),
                   centered=group["centered"], maximize=group["maximize"],
                   decay=WeightDecay.of(group))


@dataclasses.dataclass(frozen=True)
class RMSPropStep:
    """RMSProp's step does not depend on t: no per-tensor scalars."""


_NO_SCALARS = RMSPropStep()


def rmsprop_update(p, g, state: dict, hp: RMSPropHyper, s: RMSPropStep) -> None:
    """One RMSProp step, in place, in torch.optim's single-tensor operation order: the
    reference kernel (on `optimlab._foreach.TensorList` s, the multi-tensor one).  ``state``
    holds ``square_avg`` (v_t), ``grad_avg`` (a_t) when centered and ``momentum_buffer``
    (b_t) when momentum > 0.  The averages are computed in the state's dtype (fp32 state of
    bf16 parameters stays fp32)."""
    g = hp.decay.grad(p, signed(g, hp.maximize))            # g (+ lambda theta for L2)
    square_avg = state["square_avg"]
    g = g.to(square_avg.dtype)                              # no-op when dtypes agree
    square_avg.mul_(hp.alpha).addcmul_(g, g, value=1 - hp.alpha)    # v_t
    if hp.centered:
        grad_avg = state["grad_avg"]
        grad_avg.lerp_(g, 1 - hp.alpha)                             # a_t
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()   # sqrt(v_t - a_t^2)
    else:
        avg = square_avg.sqrt()                                     # sqrt(v_t)
    avg = avg.add_(hp.eps)                                          # d_t
    q = hp.decay.begin(p)                                   # theta_{t-1}, decoupled decay
    if hp.momentum > 0:
        buf = state["momentum_buffer"]
        buf.mul_(hp.momentum).addcdiv_(g, avg)              # b_t = mu b_{t-1} + g_t / d_t
        q.add_(buf, alpha=-hp.lr)
    else:
        q.addcdiv_(g, avg, value=-hp.lr)
    hp.decay.end(p, q)                                      # decay of the updated weights


_F32, _F64 = torch.float32, torch.float64

class RMSProp(Optimizer):
    r"""RMSProp, optionally centered and with momentum (see the module docstring for the math
    and the departures from the sources).

    Args:
        params: parameters or parameter groups.
        lr: eta >= 0 (default 1e-2).
        alpha: smoothing constant in [0, 1) (default 0.99).  torch only requires alpha >= 0;
            alpha >= 1 would keep v_t at 0 (or grow it) and is rejected here.
        eps: >= 0, added to the root (outside it).
        weight_decay: lambda >= 0 (tau >= 0, in updates, with ``wd_mode="timescale"``).
        momentum: mu in [0, 1) (0: no buffer).  torch only requires mu >= 0.
        centered: divide by the running standard deviation sqrt(v_t - a_t^2) (Graves).
        wd_mode: ``"l2"`` (default, torch.optim.RMSprop), ``"decoupled"``, ``"independent"``,
            ``"lr_squared"``, ``"absolute"`` or ``"timescale"`` (the table in `optimlab._common`).
        wd_after_update: decoupled/independent decay of the updated weights instead of
            theta_{t-1}.
        maximize: ascend instead of descend.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see `optimlab._optimizer.Optimizer`).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (see `optimlab._optimizer`;
            fused: optimlab's CPU kernel, fp32/fp64).

    State per parameter (torch.optim's keys): ``step`` (int), ``square_avg`` (v_t),
    ``momentum_buffer`` (b_t) when momentum > 0, ``grad_avg`` (a_t) when centered.

    Example:
        >>> opt = optimlab.RMSProp(model.parameters(), lr=1e-3, alpha=0.95, momentum=0.9,
        ...                        centered=True)
    """

    Hyper = RMSPropHyper
    fused = _ext.declare(_ext.FusedKernel(
        name="rmsprop", hyper=RMSPropHyper, state=("square_avg", "grad_avg", "momentum_buffer"),
        scalars=RMSPropStep, dtypes=frozenset({(_F32, _F32, _F32), (_F64, _F64, _F64)})))
    _kernel = staticmethod(rmsprop_update)

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *,
                 wd_mode: str = "l2", wd_after_update: bool = False,
                 wd_form: str | None = None, maximize: bool = False,
                 nonfinite: str = "skip", impl: str = "auto"):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=bool(centered), wd_mode=wd_mode,
                        wd_after_update=bool(wd_after_update), wd_form=wd_form,
                        maximize=bool(maximize))
        self._check_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite, impl=impl)

    def _check_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("alpha", group["alpha"], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)
        check_weight_decay(group["weight_decay"], group["wd_mode"],
                           group.setdefault("wd_form", None))
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = {"step": 0,
                 "square_avg": torch.zeros_like(p, memory_format=torch.preserve_format)}
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _scalars_key(self, p, state):
        return None

    def _step_scalars(self, hp: RMSPropHyper, p, state) -> RMSPropStep:
        return _NO_SCALARS
