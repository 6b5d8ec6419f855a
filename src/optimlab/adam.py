r"""Adam, AdamW and AMSGrad.

Adam (Kingma & Ba, 2015, Algorithm 1), for step t = 1, 2, ... with gradient g_t:

    m_t = beta1 * m_{t-1} + (1 - beta1) * g_t                  (first moment)
    v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2                (second moment)
    m^_t = m_t / (1 - beta1^t),  v^_t = v_t / (1 - beta2^t)    (bias correction)
    theta_t = theta_{t-1} - alpha * m^_t / (sqrt(v^_t) + eps)

The paper's "efficient version" (end of its section 2) folds the corrections into the step:

    alpha_t = alpha * sqrt(1 - beta2^t) / (1 - beta1^t)
    theta_t = theta_{t-1} - alpha_t * m_t / (sqrt(v_t) + eps^)

which equals the first form only when eps^ = eps * sqrt(1 - beta2^t): the two placements of
epsilon (``eps_placement="sqrt_v_hat"`` for the first, ``"sqrt_v"`` for the second, as
TensorFlow and the CS224N reference do) are different optimizers in early steps.

AMSGrad (Reddi et al., 2018) replaces v_t in the denominator by its running maximum
v^max_t = max(v^max_{t-1}, v_t); like torch.optim, the maximum is taken of the *uncorrected*
v_t and the bias correction of v is then applied to it (the paper has no bias correction).

AdamW (Loshchilov & Hutter, 2019, Algorithm 2) decays the weights outside the adaptive step
instead of adding lambda * theta to the gradient; see `optimlab._common` for the three
meanings of weight decay (``wd_mode``) and where it is applied (``wd_after_update``).

Departures from the papers: ``wd_mode``, ``eps_placement`` and ``wd_after_update`` select
between the published variants rather than one of them; ``correct_bias=False`` drops the
bias correction (alpha_t = alpha), as in the BERT/CS224N optimizer; AMSGrad keeps the bias
correction of v (torch.optim's choice).
"""

from __future__ import annotations

import torch

from ._common import (EPS_PLACEMENTS, Optimizer, check_betas, check_choice, check_range,
                      check_weight_decay, decay_after_update, grad_with_decay)

__all__ = ["Adam", "AdamW", "AMSGrad", "adam_update"]


def adam_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                v_max: torch.Tensor | None, *, step: int, lr: float, beta1: float,
                beta2: float, eps: float, eps_placement: str, correct_bias: bool) -> None:
    """One Adam step on one tensor, in place (the reference kernel: readable, per tensor).

    ``g`` already contains any L2 term; ``v_max`` is None unless AMSGrad.  The moments may
    have another dtype than the parameter (e.g. fp32 state loaded for bf16 weights): the
    gradient is brought to the moments' dtype."""
    g = g.to(m.dtype)
    m.lerp_(g, 1 - beta1)                                   # m_t
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)           # v_t
    if v_max is not None:
        torch.maximum(v_max, v, out=v_max)                  # v^max_t
        v = v_max
    bias_correction1 = 1 - beta1 ** step if correct_bias else 1.0
    bias_correction2 = 1 - beta2 ** step if correct_bias else 1.0
    if eps_placement == "sqrt_v_hat":                       # alpha * m^ / (sqrt(v^) + eps)
        denom = (v.sqrt() / bias_correction2 ** 0.5).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bias_correction1)
    else:                                                   # alpha_t * m / (sqrt(v) + eps)
        denom = v.sqrt().add_(eps)
        p.addcdiv_(m, denom, value=-lr * bias_correction2 ** 0.5 / bias_correction1)


class Adam(Optimizer):
    r"""Adam with every published choice named (see the module docstring for the math).

    Args:
        params: parameters or parameter groups.
        lr: alpha, >= 0.
        betas: (beta1, beta2), each in [0, 1).
        eps: >= 0, added where ``eps_placement`` says.
        weight_decay: lambda >= 0.
        wd_mode: ``"l2"`` (default here, torch.optim.Adam), ``"decoupled"`` or ``"independent"``.
        amsgrad: use the running maximum of v (AMSGrad).
        eps_placement: ``"sqrt_v_hat"`` (default, PyTorch) or ``"sqrt_v"`` (efficient/TF).
        correct_bias: apply bias correction (default True).
        wd_after_update: decoupled decay of the updated weights instead of theta_{t-1}.
        maximize: ascend instead of descend.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see `optimlab._common.Optimizer`).

    State per parameter: ``step`` (int), ``exp_avg`` (m), ``exp_avg_sq`` (v) and, with
    amsgrad, ``max_exp_avg_sq``: the keys torch.optim uses.

    Example:
        >>> opt = optimlab.Adam(model.parameters(), lr=1e-3, weight_decay=1e-2, wd_mode="l2")
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, wd_mode: str = "l2", amsgrad: bool = False,
                 eps_placement: str = "sqrt_v_hat", correct_bias: bool = True,
                 wd_after_update: bool = False, maximize: bool = False,
                 nonfinite: str = "skip"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        wd_mode=wd_mode, amsgrad=bool(amsgrad), eps_placement=eps_placement,
                        correct_bias=bool(correct_bias), wd_after_update=bool(wd_after_update),
                        maximize=bool(maximize))
        self._check_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _check_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        group["betas"] = check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_weight_decay(group["weight_decay"], group["wd_mode"])
        check_choice("eps_placement", group["eps_placement"], EPS_PLACEMENTS)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = {"step": 0,
                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _update_param(self, p, grad, state, group) -> None:
        grad = grad_with_decay(p, grad, group)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adam_update(p, grad, state["exp_avg"], state["exp_avg_sq"],
                    state.get("max_exp_avg_sq") if group["amsgrad"] else None,
                    step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2,
                    eps=group["eps"], eps_placement=group["eps_placement"],
                    correct_bias=group["correct_bias"])
        decay_after_update(p, group)


class AdamW(Adam):
    r"""AdamW with the CS224N default project's semantics by default.

    ``AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
    correct_bias=True)`` does, per parameter at step t:

        m <- beta1*m + (1-beta1)*g ;  v <- beta2*v + (1-beta2)*g^2
        step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)    (just lr if not correct_bias)
        theta <- theta - step_size * m / (sqrt(v) + eps)        (eps on the uncorrected sqrt(v))
        theta <- theta - lr * weight_decay * theta              (after the update)

    i.e. ``eps_placement="sqrt_v"``, ``wd_mode="decoupled"``, ``wd_after_update=True``.
    For torch.optim.AdamW's semantics (eps=1e-8 on sqrt(v_hat), decay of theta_{t-1},
    weight_decay=1e-2) use `optimlab.compat.torch.AdamW`; for truly decoupled decay pass
    ``wd_mode="independent"``.  All other arguments as in `Adam`.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, *,
                 wd_mode: str = "decoupled", amsgrad: bool = False,
                 eps_placement: str = "sqrt_v", wd_after_update: bool = True,
                 maximize: bool = False, nonfinite: str = "skip"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         wd_mode=wd_mode, amsgrad=amsgrad, eps_placement=eps_placement,
                         correct_bias=correct_bias, wd_after_update=wd_after_update,
                         maximize=maximize, nonfinite=nonfinite)


class AMSGrad(Adam):
    """`Adam` with ``amsgrad=True`` (Reddi et al., 2018); all arguments as in `Adam`."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **kwargs):
        kwargs.setdefault("amsgrad", True)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         **kwargs)
