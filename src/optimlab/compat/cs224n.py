"""The CS224N default project's AdamW (optimizer.py of the minBERT/GPT-2 project).

Its math, per parameter at step t: moments m, v; step_size = lr*sqrt(1-beta2^t)/(1-beta1^t)
(lr if not correct_bias); theta -= step_size * m / (sqrt(v) + eps); then
theta -= lr * weight_decay * theta.  This is exactly `optimlab.AdamW`'s default.
"""

from __future__ import annotations

from .. import adam as _adam


def AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
          *, nonfinite="skip", impl="auto"):
    """The CS224N AdamW: same arguments and defaults as the project's ``AdamW``."""
    return _adam.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                       correct_bias=correct_bias, nonfinite=nonfinite, impl=impl)
