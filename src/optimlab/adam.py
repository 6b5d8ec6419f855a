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

from . import _ext
from ._common import (EPS_PLACEMENTS, NoFusedKernel, Optimizer, check_betas, check_choice,
                      check_range, check_weight_decay, decay_after_update, decay_multiplier,
                      foreach_decay_after_update, foreach_grads_with_decay, fused_decay_scalars,
                      grad_with_decay)

__all__ = ["Adam", "AdamW", "AMSGrad", "adam_update", "adam_update_foreach", "STATE_DTYPES",
           "torch_fused_adam_scalars"]

# moment storage: None = the parameter's dtype
STATE_DTYPES = (None, torch.float32, torch.float64, torch.bfloat16)


def _narrower(state_dtype: torch.dtype, param_dtype: torch.dtype) -> bool:
    """True when moments stored in ``state_dtype`` are computed in ``param_dtype`` and
    rounded once when stored (e.g. bf16 moments of fp32 weights)."""
    return (state_dtype.is_floating_point and param_dtype.is_floating_point
            and torch.finfo(state_dtype).bits < torch.finfo(param_dtype).bits)


def adam_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                v_max: torch.Tensor | None, *, step: int, lr: float, beta1: float,
                beta2: float, eps: float, eps_placement: str, correct_bias: bool) -> None:
    """One Adam step on one tensor, in place (the reference kernel: readable, per tensor).

    ``g`` already contains any L2 term; ``v_max`` is None unless AMSGrad.  The moments may
    have another dtype than the parameter.  Moments stored in a narrower dtype (bf16 moments
    of fp32 weights, ``state_dtype=torch.bfloat16``) are computed in the parameter's dtype
    and rounded (to nearest even) once, when stored; the step uses the unrounded values.
    Moments in a wider dtype (fp32 state of bf16 weights) are computed in their own dtype:
    the gradient is brought to it."""
    if _narrower(m.dtype, p.dtype):
        wide = [t.to(p.dtype) for t in (m, v) + ((v_max,) if v_max is not None else ())]
        adam_update(p, g, wide[0], wide[1], wide[2] if v_max is not None else None, step=step,
                    lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps_placement=eps_placement,
                    correct_bias=correct_bias)
        for narrow, w in zip((m, v, v_max), wide):
            narrow.copy_(w)
        return
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


def adam_update_foreach(params: list[torch.Tensor], grads: list[torch.Tensor],
                        ms: list[torch.Tensor], vs: list[torch.Tensor],
                        v_maxs: list[torch.Tensor] | None, *, steps: list[int], lr: float,
                        beta1: float, beta2: float, eps: float, eps_placement: str,
                        correct_bias: bool) -> None:
    """`adam_update` on lists of tensors that share a device and dtypes, with
    ``torch._foreach_*`` kernels in the reference's operation order; ``steps`` per tensor."""
    if _narrower(ms[0].dtype, params[0].dtype):
        dt = params[0].dtype
        wide_m, wide_v = [m.to(dt) for m in ms], [v.to(dt) for v in vs]
        wide_max = [v.to(dt) for v in v_maxs] if v_maxs is not None else None
        adam_update_foreach(params, grads, wide_m, wide_v, wide_max, steps=steps, lr=lr,
                            beta1=beta1, beta2=beta2, eps=eps, eps_placement=eps_placement,
                            correct_bias=correct_bias)
        torch._foreach_copy_(ms, wide_m)
        torch._foreach_copy_(vs, wide_v)
        if v_maxs is not None:
            torch._foreach_copy_(v_maxs, wide_max)
        return
    if grads[0].dtype != ms[0].dtype:
        grads = [g.to(ms[0].dtype) for g in grads]
    torch._foreach_lerp_(ms, grads, 1 - beta1)                          # m_t
    torch._foreach_mul_(vs, beta2)                                      # v_t
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    if v_maxs is not None:
        torch._foreach_maximum_(v_maxs, vs)                             # v^max_t
        vs = v_maxs
    bc1 = [1 - beta1 ** t if correct_bias else 1.0 for t in steps]
    bc2 = [1 - beta2 ** t if correct_bias else 1.0 for t in steps]
    denom = torch._foreach_sqrt(vs)
    if eps_placement == "sqrt_v_hat":                                   # alpha m^ / (sqrt(v^) + eps)
        torch._foreach_div_(denom, [b ** 0.5 for b in bc2])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, ms, denom, [-lr / b for b in bc1])
    else:                                                               # alpha_t m / (sqrt(v) + eps)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, ms, denom,
                                [-lr * b2 ** 0.5 / b1 for b1, b2 in zip(bc1, bc2)])


def torch_fused_adam_scalars(group: dict, step: int) -> tuple[bool, float, float, float]:
    """The (adamw, lr', eps', weight_decay') with which torch's fused kernels compute this
    group's step ``step``, or raise `NoFusedKernel`.

    torch's kernels (``torch._fused_adam_``; ``_fused_adamw_`` first multiplies theta by
    1 - lr' wd') compute, with bias corrections c1 = 1 - beta1^t, c2 = 1 - beta2^t:

        theta <- theta - (lr' / c1) m / (sqrt(v) / sqrt(c2) + eps')
              =  theta - lr' (sqrt(c2) / c1) m / (sqrt(v) + eps' sqrt(c2))

    so every variant here maps onto them exactly in real arithmetic:

    * eps on sqrt(v) (``"sqrt_v"``): eps' = eps / sqrt(c2);
    * no bias correction: also lr' = lr c1 / sqrt(c2);
    * decay of the updated weights, (1 - f lambda)(theta - s): lr' is multiplied by
      (1 - f lambda) and 1 - lr' wd' = 1 - f lambda, i.e. wd' = f lambda / lr';
    * decoupled/independent decay of theta_{t-1}: wd' = f lambda / lr' (f = the decay
      multiplier); L2 decay: the Adam kernel with its own weight_decay.

    In float32 the results differ from the reference kernel by rounding only."""
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
    decoupled = wd != 0 and group["wd_mode"] != "l2"
    after = decoupled and group["wd_after_update"]
    f_wd = decay_multiplier(group) * wd if decoupled else 0.0
    post = 1 - f_wd if after else 1.0
    if group["correct_bias"]:
        lr_k = post * lr
        eps_k = eps if group["eps_placement"] == "sqrt_v_hat" else eps / c2 ** 0.5
    else:
        lr_k = post * lr * c1 / c2 ** 0.5
        eps_k = eps / c2 ** 0.5
    if not decoupled:
        return False, lr_k, eps_k, (wd if wd != 0 else 0.0)
    if lr_k == 0:
        if f_wd != 0:
            raise NoFusedKernel("torch's fused kernels cannot decay the weights with lr' = 0")
        return True, lr_k, eps_k, 0.0
    if group["wd_mode"] == "decoupled" and not after and lr_k == lr:
        return True, lr_k, eps_k, wd                 # torch.optim.AdamW itself
    return True, lr_k, eps_k, f_wd / lr_k


def torch_fused_is_exact(group: dict) -> bool:
    """True when `torch_fused_adam_scalars` hands torch's fused kernels this group's own lr, eps
    and weight decay (torch.optim's Adam/AdamW semantics), so they compute what the reference
    kernel computes; ``impl="auto"`` uses torch's kernels only then."""
    decoupled = group["weight_decay"] != 0 and group["wd_mode"] != "l2"
    return group["correct_bias"] and group["eps_placement"] == "sqrt_v_hat" and (
        not decoupled or (group["wd_mode"] == "decoupled" and not group["wd_after_update"]))


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
        state_dtype: the dtype the moments are stored in: None (default: the parameter's),
            ``torch.bfloat16`` (half the state memory: 4 bytes per parameter instead of 8;
            the moments are computed in the parameter's dtype and rounded to nearest even
            when stored), ``torch.float32`` or ``torch.float64``.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see `optimlab._common.Optimizer`).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (see `optimlab._common`).

    State per parameter: ``step`` (int), ``exp_avg`` (m), ``exp_avg_sq`` (v) and, with
    amsgrad, ``max_exp_avg_sq``: the keys torch.optim uses.

    Fast paths: on CPU optimlab's fused kernel (fp32 or fp64 weights; bf16 moments of fp32
    weights) reads p, g, m, v and writes p, m, v once per step; elsewhere, and where that
    kernel is not built, torch's ``_fused_adam_``/``_fused_adamw_`` with the scalars of
    `torch_fused_adam_scalars` (state in the parameter's dtype, fp32/fp64), else the
    multi-tensor `adam_update_foreach`.

    Example:
        >>> opt = optimlab.Adam(model.parameters(), lr=1e-3, weight_decay=1e-2, wd_mode="l2")
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, wd_mode: str = "l2", amsgrad: bool = False,
                 eps_placement: str = "sqrt_v_hat", correct_bias: bool = True,
                 wd_after_update: bool = False, maximize: bool = False,
                 state_dtype: torch.dtype | None = None, nonfinite: str = "skip",
                 impl: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        wd_mode=wd_mode, amsgrad=bool(amsgrad), eps_placement=eps_placement,
                        correct_bias=bool(correct_bias), wd_after_update=bool(wd_after_update),
                        maximize=bool(maximize), state_dtype=state_dtype)
        self._check_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite, impl=impl)

    def _check_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        group["betas"] = check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_weight_decay(group["weight_decay"], group["wd_mode"])
        check_choice("eps_placement", group["eps_placement"], EPS_PLACEMENTS)
        check_choice("state_dtype", group.setdefault("state_dtype", None), STATE_DTYPES)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        kw = dict(dtype=group.get("state_dtype") or p.dtype, memory_format=torch.preserve_format)
        state = {"step": 0,
                 "exp_avg": torch.zeros_like(p, **kw),
                 "exp_avg_sq": torch.zeros_like(p, **kw)}
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, **kw)
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

    def _foreach_update(self, group, params, states) -> None:
        amsgrad = group["amsgrad"] and "max_exp_avg_sq" in states[0]
        grads = foreach_grads_with_decay(params, [p.grad for p in params], group)
        for state in states:
            state["step"] += 1
        beta1, beta2 = group["betas"]
        adam_update_foreach(params, grads, [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states],
                            [s["max_exp_avg_sq"] for s in states] if amsgrad else None,
                            steps=[s["step"] for s in states], lr=group["lr"], beta1=beta1,
                            beta2=beta2, eps=group["eps"], eps_placement=group["eps_placement"],
                            correct_bias=group["correct_bias"])
        foreach_decay_after_update(params, group)

    def _fused_update(self, group, params, states) -> str:
        amsgrad = group["amsgrad"] and "max_exp_avg_sq" in states[0]
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        p0, st0 = params[0], states[0]
        sdt = st0["exp_avg"].dtype
        code = {(torch.float32, torch.float32): 0, (torch.float32, torch.bfloat16): 1,
                (torch.float64, torch.float64): 2}.get((p0.dtype, sdt))
        same = all(st0[k].dtype == sdt for k in keys)
        if p0.device.type == "cpu" and code is not None and same and _ext.available() and \
                self._same_layout(params, states, keys):
            for state in states:
                state["step"] += 1
            slots = []
            for p, st in zip(params, states):
                slots += (p.data_ptr(), p.grad.data_ptr(), st["exp_avg"].data_ptr(),
                          st["exp_avg_sq"].data_ptr(),
                          st["max_exp_avg_sq"].data_ptr() if amsgrad else 0,
                          p.numel(), st["step"])
            beta1, beta2 = group["betas"]
            wd_l2, pre, post = fused_decay_scalars(group)
            _ext.call("adam", code, slots, 7,
                      (group["lr"], beta1, beta2, group["eps"], wd_l2, pre, post,
                       group["maximize"], amsgrad, group["eps_placement"] == "sqrt_v_hat",
                       group["correct_bias"]))
            return "fused-cpu"
        if self.impl == "auto" and not torch_fused_is_exact(group):
            raise NoFusedKernel("torch's fused kernels compute this variant with transformed "
                                "scalars (equal up to float rounding, not bit for bit): "
                                "impl='fused' uses them, impl='auto' does not")
        return self._torch_fused_update(group, params, states, keys, amsgrad)

    def _torch_fused_update(self, group, params, states, keys, amsgrad) -> str:
        p0 = params[0]
        if p0.dtype not in (torch.float32, torch.float64) or \
                any(states[0][k].dtype != p0.dtype for k in keys):
            raise NoFusedKernel(
                f"no fused kernel for {p0.dtype} weights with {states[0]['exp_avg'].dtype} "
                "moments here (optimlab's CPU kernels: fp32/fp64 weights, bf16 moments of "
                f"fp32 weights; available: {_ext.available()}; torch's fused kernels: moments "
                "in the weights' fp32/fp64 dtype)")
        if p0.device.type not in ("cpu", "cuda"):
            raise NoFusedKernel(f"no fused kernel on {p0.device.type}")
        if not self._same_layout(params, states, keys):
            raise NoFusedKernel("torch's fused kernels need the gradients and moments laid out "
                                "as their parameters (dense, equal strides)")
        by_step: dict[int, list[int]] = {}
        for i, state in enumerate(states):
            by_step.setdefault(state["step"] + 1, []).append(i)
        plans = [(step, idx, torch_fused_adam_scalars(group, step))   # may raise: nothing
                 for step, idx in by_step.items()]                  # has changed yet
        for state in states:
            state["step"] += 1
        beta1, beta2 = group["betas"]
        for step, idx, (adamw, lr_k, eps_k, wd_k) in plans:
            fn = torch._fused_adamw_ if adamw else torch._fused_adam_
            step_t = torch.tensor(float(step), dtype=torch.float32, device=p0.device)
            fn([params[i] for i in idx], [params[i].grad for i in idx],
               [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx],
               [states[i]["max_exp_avg_sq"] for i in idx] if amsgrad else [],
               [step_t] * len(idx), amsgrad=amsgrad, lr=lr_k, beta1=beta1, beta2=beta2,
               weight_decay=wd_k, eps=eps_k, maximize=group["maximize"], grad_scale=None,
               found_inf=None)
        return "torch-fused"


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
                 maximize: bool = False, state_dtype: torch.dtype | None = None,
                 nonfinite: str = "skip", impl: str = "auto"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         wd_mode=wd_mode, amsgrad=amsgrad, eps_placement=eps_placement,
                         correct_bias=correct_bias, wd_after_update=wd_after_update,
                         maximize=maximize, state_dtype=state_dtype, nonfinite=nonfinite,
                         impl=impl)


class AMSGrad(Adam):
    """`Adam` with ``amsgrad=True`` (Reddi et al., 2018); all arguments as in `Adam`."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **kwargs):
        kwargs.setdefault("amsgrad", True)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         **kwargs)
