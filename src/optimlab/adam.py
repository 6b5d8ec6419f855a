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
instead of adding lambda * theta to the gradient; see `optimlab._common` for the meanings
of weight decay (``wd_mode``: L2 and five ways to scale a decoupled shrink) and where it is
applied (``wd_after_update``).

Departures from the papers: ``wd_mode``, ``eps_placement`` and ``wd_after_update`` select
between the published variants rather than one of them; ``correct_bias=False`` drops the
bias correction (alpha_t = alpha), as in the BERT/CS224N optimizer; AMSGrad keeps the bias
correction of v (torch.optim's choice).
"""

from __future__ import annotations

import dataclasses

import torch

from . import _ext, _gate
from ._common import (EPS_PLACEMENTS, ShrinkForm, WeightDecay, bias_corrections, check_betas,
                      check_choice, check_range, check_weight_decay, scalar, signed)
from ._foreach import maximum_
from ._optimizer import Optimizer

__all__ = ["Adam", "AdamW", "AMSGrad", "AdamHyper", "AdamStep", "adam_step", "adam_update",
           "STATE_DTYPES", "torch_fused_adam_scalars"]

# moment storage: None = the parameter's dtype
STATE_DTYPES = (None, torch.float32, torch.float64, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class AdamHyper:
    """One group's Adam hyper-parameters for a step, as every kernel takes them (the C
    struct ``AdamHyper`` has these fields, in this order)."""
    lr: float                 # alpha
    beta1: float
    beta2: float
    eps: float
    eps_on_v_hat: bool        # eps_placement == "sqrt_v_hat"
    correct_bias: bool
    amsgrad: bool
    maximize: bool
    decay: WeightDecay

    @classmethod
    def of(cls, group: dict, params=None) -> "AdamHyper":
        beta1, beta2 = group["betas"]
        return cls(lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=scalar(group["eps"]),
                   eps_on_v_hat=group["eps_placement"] == "sqrt_v_hat",
                   correct_bias=group["correct_bias"], amsgrad=group["amsgrad"],
                   maximize=group["maximize"], decay=WeightDecay.of(group))


@dataclasses.dataclass(frozen=True)
class AdamStep:
    """What step t makes of the hyper-parameters: theta <- theta - alpha_t m / d with
    d = sqrt(v) / sqrt_c2 + eps, i.e.

    * eps on sqrt(v_hat): alpha_t = alpha / c1, sqrt_c2 = sqrt(c2) (d = sqrt(v_hat) + eps);
    * eps on sqrt(v): alpha_t = alpha sqrt(c2) / c1, sqrt_c2 = 1 (the efficient version);

    with the bias corrections c1 = 1 - beta1^t, c2 = 1 - beta2^t (1 without them)."""
    alpha_t: float
    sqrt_c2: float


def adam_step(hp: AdamHyper, t: int) -> AdamStep:
    """`AdamStep` of step ``t`` (the only place Adam's bias correction is written)."""
    c1, c2 = bias_corrections(hp.beta1, hp.beta2, t, hp.correct_bias)
    if hp.eps_on_v_hat:
        return AdamStep(alpha_t=hp.lr / c1, sqrt_c2=c2 ** 0.5)
    return AdamStep(alpha_t=hp.lr * c2 ** 0.5 / c1, sqrt_c2=1.0)


def _narrower(state_dtype: torch.dtype, param_dtype: torch.dtype) -> bool:
    """True when moments stored in ``state_dtype`` are computed in ``param_dtype`` and
    rounded once when stored (e.g. bf16 moments of fp32 weights)."""
    return (state_dtype.is_floating_point and param_dtype.is_floating_point
            and torch.finfo(state_dtype).bits < torch.finfo(param_dtype).bits)


def adam_update(p, g, state: dict, hp: AdamHyper, s: AdamStep) -> None:
    """One Adam step, in place: the reference kernel (readable, per tensor; run on
    `optimlab._foreach.TensorList` s it is the multi-tensor kernel too).

    ``state`` holds ``exp_avg`` (m), ``exp_avg_sq`` (v) and, for AMSGrad, ``max_exp_avg_sq``.
    The moments may have another dtype than the parameter: moments stored in a narrower dtype
    (bf16 moments of fp32 weights, ``state_dtype=torch.bfloat16``) are computed in the
    parameter's dtype and rounded (to nearest even) once, when stored, and the step uses the
    unrounded values; moments in a wider dtype (fp32 state of bf16 weights) are computed in
    their own dtype: the gradient is brought to it."""
    g = hp.decay.grad(p, signed(g, hp.maximize))            # g (+ lambda theta for L2)
    stored = [state["exp_avg"], state["exp_avg_sq"]]
    if hp.amsgrad and "max_exp_avg_sq" in state:
        stored.append(state["max_exp_avg_sq"])
    narrow = _narrower(stored[0].dtype, p.dtype)
    m, v, *v_max = [t.to(p.dtype) for t in stored] if narrow else stored
    g = g.to(m.dtype)
    m.lerp_(g, 1 - hp.beta1)                                # m_t
    v.mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)     # v_t
    if narrow:
        for t, w in zip(stored, (m, v)):
            t.copy_(w)
    if v_max:
        maximum_(v_max[0], v)                               # v^max_t
        v = v_max[0]
        if narrow:
            stored[2].copy_(v)
    if hp.eps_on_v_hat:                                     # alpha m^ / (sqrt(v^) + eps)
        denom = (v.sqrt() / s.sqrt_c2).add_(hp.eps)
    else:                                                   # alpha_t m / (sqrt(v) + eps)
        denom = v.sqrt().add_(hp.eps)
    q = hp.decay.begin(p)                                   # theta_{t-1}, decoupled decay
    q.addcdiv_(m, denom, value=-s.alpha_t)                  # theta_t
    hp.decay.end(p, q)                                      # decay of the updated weights


def torch_fused_adam_scalars(hp: AdamHyper, step: int) -> tuple[bool, float, float, float]:
    """The (adamw, lr', eps', weight_decay') with which torch's fused kernels compute step
    ``step`` of ``hp``, or raise ValueError where they cannot.

    torch's kernels (``torch._fused_adam_``; ``_fused_adamw_`` first multiplies theta by
    1 - lr' wd') compute, with bias corrections c1 = 1 - beta1^t, c2 = 1 - beta2^t:

        theta <- theta - (lr' / c1) m / (sqrt(v) / sqrt(c2) + eps')
              =  theta - lr' (sqrt(c2) / c1) m / (sqrt(v) + eps' sqrt(c2))

    so every variant here maps onto them exactly in real arithmetic:

    * eps on sqrt(v): eps' = eps / sqrt(c2);
    * no bias correction: also lr' = lr c1 / sqrt(c2);
    * decay of the updated weights, (1 - f lambda)(theta - s): lr' is multiplied by
      (1 - f lambda) and 1 - lr' wd' = 1 - f lambda, i.e. wd' = f lambda / lr';
    * decoupled/independent decay of theta_{t-1}: wd' = f lambda / lr' (f = the decay
      factor); L2 decay: the Adam kernel with its own weight_decay.

    Where the mapping is the identity (`torch_fused_is_exact`) torch's kernels compute what
    the reference kernel computes; elsewhere the results differ by float rounding."""
    d = hp.decay
    c1, c2 = 1 - hp.beta1 ** step, 1 - hp.beta2 ** step
    f_wd = d.factor * d.lam
    post = 1 - f_wd if d.after else 1.0
    if hp.correct_bias:
        lr_k = post * hp.lr
        eps_k = hp.eps if hp.eps_on_v_hat else hp.eps / c2 ** 0.5
    else:
        lr_k = post * hp.lr * c1 / c2 ** 0.5
        eps_k = hp.eps / c2 ** 0.5
    if d.lam == 0:
        return False, lr_k, eps_k, d.l2
    if d.form == ShrinkForm.FOLD:
        raise ValueError("torch's fused kernels cannot fold the shrink into the update "
                         "(wd_form='fold'): they multiply theta by 1 - lr' wd' first")
    if lr_k == 0:
        if f_wd != 0:
            raise ValueError("torch's fused kernels cannot decay the weights with lr' = 0")
        return True, lr_k, eps_k, 0.0
    if not d.after and d.factor == hp.lr and lr_k == hp.lr:
        return True, lr_k, eps_k, d.lam               # torch.optim.AdamW itself
    return True, lr_k, eps_k, f_wd / lr_k


def torch_fused_is_exact(hp: AdamHyper) -> bool:
    """True when `torch_fused_adam_scalars` hands torch's fused kernels this group's own lr,
    eps and weight decay (torch.optim's Adam/AdamW semantics: bias correction, eps on
    sqrt(v_hat), decay of theta_{t-1} by lr * lambda), so they compute what the reference
    kernel computes; ``impl="auto"`` uses torch's kernels only then."""
    d = hp.decay
    return hp.correct_bias and hp.eps_on_v_hat and (
        d.lam == 0 or (not d.after and d.factor == hp.lr
                       and d.form == ShrinkForm.MULTIPLY))


_F32, _BF16, _F64 = torch.float32, torch.bfloat16, torch.float64

class Adam(Optimizer):
    r"""Adam with every published choice named (see the module docstring for the math).

    Args:
        params: parameters or parameter groups.
        lr: alpha, >= 0.
        betas: (beta1, beta2), each in [0, 1).
        eps: >= 0, added where ``eps_placement`` says.
        weight_decay: lambda >= 0 (tau >= 0, in updates, with ``wd_mode="timescale"``).
        wd_mode: ``"l2"`` (default here, torch.optim.Adam), ``"decoupled"``, ``"independent"``,
            ``"lr_squared"``, ``"absolute"`` or ``"timescale"`` (the table in `optimlab._common`).
        amsgrad: use the running maximum of v (AMSGrad).
        eps_placement: ``"sqrt_v_hat"`` (default, PyTorch) or ``"sqrt_v"`` (efficient/TF).
        correct_bias: apply bias correction (default True).
        wd_after_update: decoupled decay of the updated weights instead of theta_{t-1}.
        maximize: ascend instead of descend.
        state_dtype: the dtype the moments are stored in: None (default: the parameter's),
            ``torch.bfloat16`` (half the state memory: 4 bytes per parameter instead of 8;
            the moments are computed in the parameter's dtype and rounded to nearest even
            when stored), ``torch.float32`` or ``torch.float64``.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see `optimlab._optimizer.Optimizer`).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (see `optimlab._optimizer`).

    State per parameter: ``step`` (int), ``exp_avg`` (m), ``exp_avg_sq`` (v) and, with
    amsgrad, ``max_exp_avg_sq``: the keys torch.optim uses.

    Fast paths: on CPU optimlab's fused kernel (fp32 or fp64 weights and gradients; bf16
    moments of fp32 weights) reads p, g, m, v and writes p, m, v once per step; elsewhere, and
    where that kernel is not built, torch's ``_fused_adam_``/``_fused_adamw_`` with the
    scalars of `torch_fused_adam_scalars` (state in the parameter's dtype, fp32/fp64), else
    `adam_update` on TensorLists (multi-tensor).

    Example:
        >>> opt = optimlab.Adam(model.parameters(), lr=1e-3, weight_decay=1e-2, wd_mode="l2")
    """

    Hyper = AdamHyper
    fused = _ext.declare(_ext.FusedKernel(
        name="adam", hyper=AdamHyper, state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        scalars=AdamStep,
        dtypes=frozenset({(_F32, _F32, _F32), (_F32, _F32, _BF16), (_F64, _F64, _F64)})))
    _kernel = staticmethod(adam_update)

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, wd_mode: str = "l2", amsgrad: bool = False,
                 eps_placement: str = "sqrt_v_hat", correct_bias: bool = True,
                 wd_after_update: bool = False, wd_form: str | None = None,
                 maximize: bool = False, state_dtype: torch.dtype | None = None,
                 nonfinite: str = "skip", impl: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        wd_mode=wd_mode, amsgrad=bool(amsgrad), eps_placement=eps_placement,
                        correct_bias=bool(correct_bias), wd_after_update=bool(wd_after_update),
                        wd_form=wd_form, maximize=bool(maximize), state_dtype=state_dtype)
        self._check_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite, impl=impl)

    def _check_group(self, group: dict) -> None:
        check_range("lr", group["lr"], 0.0)
        group["betas"] = check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_weight_decay(group["weight_decay"], group["wd_mode"],
                           group.setdefault("wd_form", None))
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

    def _step_scalars(self, hp: AdamHyper, p, state) -> AdamStep:
        return adam_step(hp, state["step"] + 1)

    def _other_refusal(self, key, hp: AdamHyper, states, reason: str) -> str | None:
        """torch's ``_fused_adam_``/``_fused_adamw_`` (CPU, CUDA) take what optimlab's CPU
        kernel did not, with the scalars of `torch_fused_adam_scalars`; ``impl="auto"`` uses
        them only where those are torch's own (exact)."""
        if self.impl == "auto" and not torch_fused_is_exact(hp):
            return (f"{reason}; torch's fused kernels compute this variant with transformed "
                    "scalars (equal up to float rounding, not bit for bit): impl='fused' uses "
                    "them, impl='auto' does not")
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp.amsgrad else ())
        refusal = _gate.torch_fused_refusal(key, keys)
        if refusal is not None:
            return f"{reason}; {refusal}"
        try:
            for step in {state["step"] + 1 for state in states}:
                torch_fused_adam_scalars(hp, step)
        except ValueError as e:
            return f"{reason}; {e}"
        return None

    def _run_other(self, key, hp: AdamHyper, params, grads, states, scalars) -> None:
        amsgrad = hp.amsgrad and "max_exp_avg_sq" in states[0]
        by_step: dict[int, list[int]] = {}
        for i, state in enumerate(states):
            by_step.setdefault(state["step"] + 1, []).append(i)
        device = params[0].device
        for step, idx in by_step.items():
            adamw, lr_k, eps_k, wd_k = torch_fused_adam_scalars(hp, step)
            fn = torch._fused_adamw_ if adamw else torch._fused_adam_
            step_t = torch.tensor(float(step), dtype=torch.float32, device=device)
            fn([params[i] for i in idx], [grads[i] for i in idx],
               [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx],
               [states[i]["max_exp_avg_sq"] for i in idx] if amsgrad else [],
               [step_t] * len(idx), amsgrad=amsgrad, lr=lr_k, beta1=hp.beta1, beta2=hp.beta2,
               weight_decay=wd_k, eps=eps_k, maximize=hp.maximize, grad_scale=None,
               found_inf=None)
        for state in states:
            state["step"] += 1
        self._used.add("torch-fused")


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
                 wd_form: str | None = None, maximize: bool = False,
                 state_dtype: torch.dtype | None = None, nonfinite: str = "skip",
                 impl: str = "auto"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         wd_mode=wd_mode, amsgrad=amsgrad, eps_placement=eps_placement,
                         correct_bias=correct_bias, wd_after_update=wd_after_update,
                         wd_form=wd_form, maximize=maximize, state_dtype=state_dtype,
                         nonfinite=nonfinite, impl=impl)


class AMSGrad(Adam):
    """`Adam` with ``amsgrad=True`` (Reddi et al., 2018); all arguments as in `Adam`."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **kwargs):
        kwargs.setdefault("amsgrad", True)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         **kwargs)
