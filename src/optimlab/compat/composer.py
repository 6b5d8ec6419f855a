"""MosaicML Composer's decoupled optimizers, from their documented math (Composer need not be
installed).  Both decay theta_{t-1} by (lr / initial_lr) * weight_decay: the schedule
multiplier scales the decay, the peak lr does not (``wd_mode="independent"``).  Composer's
defaults differ from torch's: DecoupledAdamW uses betas=(0.9, 0.95) and weight_decay=1e-5.
"""

from __future__ import annotations

from .. import adam as _adam
from .. import sgd as _sgd


def DecoupledAdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-5,
                   amsgrad=False, *, nonfinite="skip", impl="auto"):
    """composer.optim.DecoupledAdamW: theta <- theta * (1 - (lr/initial_lr)*wd), then
    Adam with eps on sqrt(v_hat)."""
    return _adam.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                      wd_mode="independent", amsgrad=amsgrad, eps_placement="sqrt_v_hat",
                      wd_after_update=False, nonfinite=nonfinite, impl=impl)


def DecoupledSGDW(params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                  nonfinite="skip", impl="auto"):
    """composer.optim.DecoupledSGDW: momentum buffer as torch.optim.SGD (b_1 = g_1, then
    b_t = momentum*b_{t-1} + (1-dampening)*g_t; d_t = b_t or g_t + momentum*b_t with
    nesterov), then theta <- theta * (1 - (lr/initial_lr)*wd), then theta -= lr * d_t.
    ``lr`` has no default, as in Composer."""
    return _sgd.SGD(params, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                    weight_decay=weight_decay, wd_mode="independent", wd_after_update=False,
                    nonfinite=nonfinite, impl=impl)
