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
``"independent"`` by (alpha_t / alpha_0) * lambda; ``"lr_squared"``, ``"absolute"`` and
``"timescale"`` by the factors of `optimlab._common`'s table.

Departures from the paper: eps (above); the threshold is a parameter whose default is torch's
5, not the paper's 4; ``degenerate_to_sgd=False`` (the authors' code's
``degenerated_to_sgd=False``) is not in Algorithm 2; the authors' code applies its decoupled
decay only on steps that move the parameters, torch (and this class) on every step.

Reference:
    L. Liu, H. Jiang, P. He, W. Chen, X. Liu, J. Gao, J. Han. On the Variance of the
    Adaptive Learning Rate and Beyond. ICLR 2020.
"""

from __future__ import annotations

import dataclasses

import torch

from . import _ext
from ._common import (EPS_PLACEMENTS, WeightDecay, bias_corrections, check_betas, check_choice,
                      check_range, check_weight_decay, scalar, signed)
from ._optimizer import Optimizer

__all__ = ["RAdam", "RAdamHyper", "RAdamStep", "radam_step", "radam_update", "radam_rho"]


@dataclasses.dataclass(frozen=True)
class RAdamHyper:
    """One group's RAdam hyper-parameters for a step (the C struct ``RAdamHyper``)."""
    lr: float                 # alpha_t
    beta1: float
    beta2: float
    eps: float
    eps_on_v_hat: bool        # eps_placement == "sqrt_v_hat"
    rho_threshold: float
    degenerate_to_sgd: bool
    maximize: bool
    decay: WeightDecay

    @classmethod
    def of(cls, group: dict, params=None) -> "RAdamHyper":
        beta1, beta2 = group["betas"]
        return cls(lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=scalar(group["eps"]),
                   eps_on_v_hat=group["eps_placement"] == "sqrt_v_hat",
                   rho_threshold=scalar(group["rho_threshold"]),
                   degenerate_to_sgd=group["degenerate_to_sgd"], maximize=group["maximize"],
                   decay=WeightDecay.of(group))


# which update step t takes (RAdamStep.branch)
MOMENTS_ONLY, UNADAPTED, RECTIFIED = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class RAdamStep:
    """What step t makes of the hyper-parameters: ``branch`` (RECTIFIED when rho_t >
    rho_threshold, else UNADAPTED with degenerate_to_sgd, else MOMENTS_ONLY), the bias
    corrections c1 = 1 - beta1^t and sqrt(c2) = sqrt(1 - beta2^t), and the rectification
    term r_t (0 outside the rectified branch)."""
    branch: int
    c1: float
    sqrt_c2: float
    r_t: float


def radam_rho(step: int, beta2: float) -> tuple[float, float]:
    """(rho_inf, rho_t): the maximum and the step-t length of the approximated SMA."""
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** step) / (1 - beta2 ** step)
    return rho_inf, rho_t


def radam_step(hp: RAdamHyper, t: int) -> RAdamStep:
    """`RAdamStep` of step ``t`` (the only place the rectification is written)."""
    c1, c2 = bias_corrections(hp.beta1, hp.beta2, t)
    rho_inf, rho_t = radam_rho(t, hp.beta2)
    if rho_t > hp.rho_threshold:
        r_t = ((rho_t - 4) * (rho_t - 2) * rho_inf
               / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        return RAdamStep(branch=RECTIFIED, c1=c1, sqrt_c2=c2 ** 0.5, r_t=r_t)
    return RAdamStep(branch=UNADAPTED if hp.degenerate_to_sgd else MOMENTS_ONLY, c1=c1,
                     sqrt_c2=c2 ** 0.5, r_t=0.0)


def radam_update(p, g, state: dict, hp: RAdamHyper, s: RAdamStep) -> None:
    """One RAdam step, in place, in torch.optim's single-tensor operation order (bit-identical
    to it for ``eps_placement="sqrt_v"``, ``rho_threshold=5``, ``degenerate_to_sgd=True``):
    the reference kernel (on `optimlab._foreach.TensorList` s, the multi-tensor one).
    ``state`` holds ``exp_avg`` (m) and ``exp_avg_sq`` (v); the moments are computed in the
    state's dtype (fp32 state of bf16 parameters stays fp32)."""
    g = hp.decay.grad(p, signed(g, hp.maximize))            # g (+ lambda theta for L2)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    g = g.to(m.dtype)                                       # no-op when dtypes agree
    m.lerp_(g, 1 - hp.beta1)                                # m_t
    v.mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)     # v_t
    m_hat = m / s.c1                                        # m^_t
    q = hp.decay.begin(p)                                   # theta_{t-1}, decoupled decay
    if s.branch == RECTIFIED:
        if hp.eps_on_v_hat:                                 # 1 / (sqrt(v^) + eps)
            l_t = (v.sqrt() / s.sqrt_c2).add_(hp.eps).reciprocal_()
        else:                                               # sqrt(1-beta2^t) / (sqrt(v)+eps)
            l_t = s.sqrt_c2 / v.sqrt().add_(hp.eps)
        q.add_(m_hat * hp.lr * l_t * s.r_t, alpha=-1.0)     # theta -= alpha r m^ l
    elif s.branch == UNADAPTED:
        q.add_(m_hat * hp.lr, alpha=-1.0)                   # theta -= alpha m^
    hp.decay.end(p, q)                                      # decay of the updated weights


_F32, _F64 = torch.float32, torch.float64

class RAdam(Optimizer):
    r"""Rectified Adam (see the module docstring for the math, the thresholds and eps
    placements of the paper, torch and the authors' code, and the departures).

    Args:
        params: parameters or parameter groups.
        lr: alpha >= 0 (default 1e-3).
        betas: (beta1, beta2), each in [0, 1).
        eps: >= 0, added where ``eps_placement`` says.
        weight_decay: lambda >= 0 (tau >= 0, in updates, with ``wd_mode="timescale"``).
        wd_mode: ``"l2"`` (default, torch.optim.RAdam), ``"decoupled"`` (torch's
            ``decoupled_weight_decay=True``), ``"independent"``, ``"lr_squared"``, ``"absolute"``
            or ``"timescale"`` (the table in `optimlab._common`).
        wd_after_update: decoupled/independent decay of the updated weights instead of
            theta_{t-1}.
        rho_threshold: >= 4; the rectified step is taken when rho_t > rho_threshold (default
            5, torch; the paper uses 4; r_t is not real for rho_t < 4).
        degenerate_to_sgd: when rho_t <= rho_threshold, take the un-adapted momentum step
            theta -= alpha * m^_t (True, default) or leave theta unchanged (False).
        eps_placement: ``"sqrt_v"`` (default, torch and the authors' code) or
            ``"sqrt_v_hat"``.
        maximize: ascend instead of descend.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see `optimlab._optimizer.Optimizer`).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (see `optimlab._optimizer`;
            fused: optimlab's CPU kernel, fp32/fp64).

    State per parameter (torch.optim's keys): ``step`` (int), ``exp_avg`` (m), ``exp_avg_sq`` (v).

    Example:
        >>> opt = optimlab.RAdam(model.parameters(), lr=1e-3, weight_decay=1e-2,
        ...                      wd_mode="decoupled")
    """

    Hyper = RAdamHyper
    fused = _ext.declare(_ext.FusedKernel(
        name="radam", hyper=RAdamHyper, state=("exp_avg", "exp_avg_sq"), scalars=RAdamStep,
        dtypes=frozenset({(_F32, _F32, _F32), (_F64, _F64, _F64)})))
    _kernel = staticmethod(radam_update)

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, wd_mode: str = "l2",
                 wd_after_update: bool = False, wd_form: str | None = None,
                 rho_threshold: float = 5.0,
                 degenerate_to_sgd: bool = True, eps_placement: str = "sqrt_v",
                 maximize: bool = False, nonfinite: str = "skip", impl: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        wd_mode=wd_mode, wd_after_update=bool(wd_after_update), wd_form=wd_form,
                        rho_threshold=rho_threshold, degenerate_to_sgd=bool(degenerate_to_sgd),
                        eps_placement=eps_placement, maximize=bool(maximize))
        self._check_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite, impl=impl)

    def _check_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        group["betas"] = check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_weight_decay(group["weight_decay"], group["wd_mode"],
                           group.setdefault("wd_form", None))
        check_range("rho_threshold", group["rho_threshold"], 4.0)
        check_choice("eps_placement", group["eps_placement"], EPS_PLACEMENTS)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        return {"step": 0,
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def _step_scalars(self, hp: RAdamHyper, p, state) -> RAdamStep:
        return radam_step(hp, state["step"] + 1)
