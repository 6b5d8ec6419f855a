"""torch.optim's constructors, same keyword arguments and defaults, returning optimlab
optimizers that reproduce them (parity-tested against torch.optim to 1e-6 over 500 steps).

On finite gradients the result equals torch.optim's; on a non-finite gradient optimlab's
policy applies (``nonfinite="skip"`` by default; pass ``nonfinite="ignore"`` for torch's
unchecked behaviour).

``foreach``/``fused`` select optimlab's implementation as they select torch's
(`optimlab.compat._util.impl_from_flags`): ``fused=True`` -> ``impl="fused"``,
``foreach=True`` -> ``"foreach"``, ``foreach=False`` -> ``"reference"`` (the for-loop),
``fused=False`` -> ``"foreach"``, both None -> ``"auto"`` (optimlab's fastest, which unlike
torch's default is the fused kernel on CPU too).
"""

from __future__ import annotations

from .. import adafactor as _adafactor
from .._common import check_range
from .. import adam as _adam
from .. import adagrad as _adagrad
from .. import radam as _radam
from .. import rmsprop as _rmsprop
from .. import sgd as _sgd
from ._util import impl_from_flags, reject_unsupported


def Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
         foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
         decoupled_weight_decay=False, nonfinite="skip"):
    """torch.optim.Adam: L2 decay (or torch's lr-coupled decay of theta_{t-1} with
    ``decoupled_weight_decay=True``), eps on sqrt(v_hat)."""
    reject_unsupported("torch.optim.Adam", capturable=capturable, differentiable=differentiable)
    return _adam.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                      wd_mode="decoupled" if decoupled_weight_decay else "l2",
                      amsgrad=amsgrad, eps_placement="sqrt_v_hat", wd_after_update=False,
                      maximize=maximize, nonfinite=nonfinite,
        impl=impl_from_flags("torch.optim.Adam", foreach, fused))


def AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
          maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
          nonfinite="skip"):
    """torch.optim.AdamW: theta_{t-1} <- (1 - lr*wd) theta_{t-1} before the Adam step,
    eps on sqrt(v_hat), weight_decay=1e-2 by default."""
    reject_unsupported("torch.optim.AdamW", capturable=capturable, differentiable=differentiable)
    return _adam.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                      wd_mode="decoupled", amsgrad=amsgrad, eps_placement="sqrt_v_hat",
                      wd_after_update=False, maximize=maximize, nonfinite=nonfinite,
        impl=impl_from_flags("torch.optim.AdamW", foreach, fused))


def SGD(params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
        maximize=False, foreach=None, differentiable=False, fused=None, nonfinite="skip"):
    """torch.optim.SGD: L2 decay added to the gradient before the momentum buffer, buffer
    b_1 = g_1 then b_t = momentum*b_{t-1} + (1-dampening)*g_t, theta -= lr * b_t (or
    lr * (g_t + momentum*b_t) with nesterov)."""
    reject_unsupported("torch.optim.SGD", differentiable=differentiable)
    return _sgd.SGD(params, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                    weight_decay=weight_decay, wd_mode="l2", wd_after_update=False,
                    maximize=maximize, nonfinite=nonfinite,
        impl=impl_from_flags("torch.optim.SGD", foreach, fused))


def Adagrad(params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
            eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None,
            nonfinite="skip"):
    """torch.optim.Adagrad: L2 decay, step size lr / (1 + (t-1)*lr_decay), eps outside the
    root of the accumulated squared gradients (which start at initial_accumulator_value)."""
    reject_unsupported("torch.optim.Adagrad", differentiable=differentiable)
    return _adagrad.AdaGrad(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                            initial_accumulator_value=initial_accumulator_value, eps=eps,
                            wd_mode="l2", wd_after_update=False, maximize=maximize,
                            nonfinite=nonfinite,
        impl=impl_from_flags("torch.optim.Adagrad", foreach, fused))


def RMSprop(params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
            capturable=False, foreach=None, maximize=False, differentiable=False, *,
            nonfinite="skip"):
    """torch.optim.RMSprop: L2 decay, eps outside the root, lr outside the momentum buffer,
    optionally centered (root of the running variance)."""
    reject_unsupported("torch.optim.RMSprop", capturable=capturable,
                       differentiable=differentiable)
    return _rmsprop.RMSProp(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                            momentum=momentum, centered=centered, wd_mode="l2",
                            wd_after_update=False, maximize=maximize, nonfinite=nonfinite,
        impl=impl_from_flags("torch.optim.RMSprop", foreach, None))


def RAdam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
          decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
          differentiable=False, nonfinite="skip"):
    """torch.optim.RAdam: rectified step when rho_t > 5, else theta -= lr * m_hat; eps on the
    uncorrected sqrt(v); L2 decay, or with ``decoupled_weight_decay=True``
    theta_{t-1} <- (1 - lr*wd) theta_{t-1} before the step."""
    reject_unsupported("torch.optim.RAdam", capturable=capturable, differentiable=differentiable)
    return _radam.RAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        wd_mode="decoupled" if decoupled_weight_decay else "l2",
                        wd_after_update=False, rho_threshold=5.0, degenerate_to_sgd=True,
                        eps_placement="sqrt_v", maximize=maximize, nonfinite=nonfinite,
        impl=impl_from_flags("torch.optim.RAdam", foreach, None))


def Adafactor(params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *,
              foreach=None, maximize=False, nonfinite="skip"):
    """torch.optim.Adafactor: rho_t = min(lr, 1/sqrt(t)) with parameter scaling always on,
    eps1 as a clamp (V^ >= eps1^2, mean(R) >= eps1; None = machine epsilon of the group's
    first parameter's dtype), d >= 1, decay theta_{t-1} <- (1 - lr*wd) theta_{t-1} after
    RMS(theta_{t-1}) was read, no first moment, state in the parameter's dtype.

    A 1-element tensor ``lr`` is read once, here (torch reads it at every step).  State keys
    are optimlab's (``exp_avg_sq_row``/``exp_avg_sq_col`` without torch's keepdim axis,
    ``exp_avg_sq``); torch.optim.Adafactor state dicts load all the same (converted on load,
    `optimlab.adafactor.convert_state_dict`), and `torch_state_dict` writes one for torch."""
    if hasattr(lr, "numel"):
        if lr.numel() != 1:
            raise ValueError("Invalid lr: Tensor lr must be 1-element")
        lr = float(lr.item())
    check_range("beta2_decay", beta2_decay, high=0.0)
    check_range("d", d, 1.0)
    return _adafactor.Adafactor(params, lr=lr, eps=eps, clip_threshold=d,
                                decay_rate=beta2_decay, beta1=None, weight_decay=weight_decay,
                                wd_mode="decoupled", scale_parameter=True, relative_step=True,
                                warmup_init=False, eps1_placement="clamp",
                                decay_scale="lr", wd_after_update=False, upcast=False,
                                maximize=maximize, nonfinite=nonfinite,
        impl=impl_from_flags("torch.optim.Adafactor", foreach, None))


def torch_state_dict(optimizer) -> dict:
    """``optimizer.state_dict()`` (an optimizer built by one of these constructors) in
    torch.optim's format, for the torch.optim class of the same algorithm to load and continue
    the run: Adafactor's keys and shapes converted (`optimlab.adafactor.convert_state_dict`),
    RAdam's decay named as torch names it (``decoupled_weight_decay``).  The others' state
    dicts are torch.optim's already (torch turns the int ``step`` into its tensor).  Load it
    with ``load_state_dict``; torch.optim keeps the tensors it is given, so a state dict that
    is still in use elsewhere should be copied first (a checkpoint file is)."""
    sd = optimizer.state_dict()
    if isinstance(optimizer, _adafactor.Adafactor):
        return _adafactor.convert_state_dict(sd, "torch")
    if isinstance(optimizer, _radam.RAdam):
        groups = [dict(g, decoupled_weight_decay=g.get("wd_mode") == "decoupled")
                  for g in sd["param_groups"]]
        return {"state": sd["state"], "param_groups": groups}
    return sd
