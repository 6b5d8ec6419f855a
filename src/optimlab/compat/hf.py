"""Hugging Face transformers' optimizers (transformers need not be installed)."""

from __future__ import annotations

from .. import adafactor as _adafactor


def Adafactor(params, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
              beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=True,
              warmup_init=False, *, nonfinite="skip", impl="auto"):
    """transformers.optimization.Adafactor (the fairseq port): eps1 added to g^2, the first
    moment averages the clipped, lr-scaled update, decay theta <- theta - alpha_t*wd*theta
    with alpha_t the step actually taken, bf16/fp16 parameters updated in fp32.

    ``relative_step=True`` (lr must be None) is rho_t = min(1e-2, 1/sqrt(t)), or
    min(1e-6 t, 1/sqrt(t)) with ``warmup_init``: optimlab's relative step with lr=1e-2, which
    is what the group's ``lr`` holds (transformers keeps None there).  ``relative_step=False``
    needs an lr: transformers accepts lr=None and fails at the first step with a TypeError;
    here it is a ValueError at construction.  optimlab validates clip_threshold > 0,
    decay_rate <= 0 and beta1 in [0, 1), which transformers does not check.  The state has no
    ``RMS`` entry, so transformers state dicts do not load, and the optimizer has no
    ``_get_lr`` for transformers' AdafactorSchedule."""
    if lr is not None and relative_step:
        raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
    if warmup_init and not relative_step:
        raise ValueError("`warmup_init=True` requires `relative_step=True`")
    if lr is None and not relative_step:
        raise ValueError("Invalid lr: None; relative_step=False needs an explicit lr >= 0")
    return _adafactor.Adafactor(params, lr=1e-2 if relative_step else lr, eps=eps,
                                clip_threshold=clip_threshold, decay_rate=decay_rate,
                                beta1=beta1, weight_decay=weight_decay, wd_mode="decoupled",
                                scale_parameter=scale_parameter, relative_step=relative_step,
                                warmup_init=warmup_init, eps1_placement="grad_sq",
                                momentum_of="scaled_update", decay_scale="alpha",
                                wd_after_update=False, upcast=True, maximize=False,
                                nonfinite=nonfinite, impl=impl)
