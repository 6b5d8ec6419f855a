"""The vocabulary every optimlab optimizer shares, each idea defined once.

* **Argument checks** that name the argument and its valid range (`check_range`, `check_choice`).
* **Weight decay** (`WeightDecay`).  "Weight decay" means several different things in the
  literature and in the libraries people migrate from.  Every optimizer that decays weights
  takes ``weight_decay`` (lambda; tau for ``timescale``) and ``wd_mode``, one of (eta_t = the
  group's current lr, eta_0 = its ``initial_lr``, s_t = eta_t / eta_0 the schedule's multiplier):

  ===============  ========================================  ======================================
  ``wd_mode``      update                                    where it comes from
  ===============  ========================================  ======================================
  ``l2``           g <- g + lambda theta  (before the         torch's ``weight_decay`` in SGD,
                   moments)                                  Adagrad, RMSprop, Adam
  ``decoupled``    theta <- theta - eta_t lambda theta       torch.optim.AdamW, optax: the decay is
                                                             coupled to the lr you pick
  ``independent``  theta <- theta - s_t lambda theta         Loshchilov & Hutter's intent (their
                                                             eta_t is the multiplier), Composer's
                                                             DecoupledAdamW/SGDW
  ``lr_squared``   theta <- theta - (eta_t^2 / eta_0)        PaLM (decay lr_t^2), timm's
                   lambda theta                              ``corrected_weight_decay`` (Defazio
                                                             2025: wd lr^2 / max_lr)
  ``absolute``     theta <- theta - lambda theta             labml's ``absolute`` weight decay: a
                                                             fixed shrink per step, whatever the lr
  ``timescale``    theta <- theta - (s_t / tau) theta        Wang & Aitchison 2024: tau = 1 /
                                                             (eta_0 lambda_torch) is the EMA
                                                             timescale of the weights in updates
  ===============  ========================================  ======================================

  eta_0 is the group's ``initial_lr``: its lr when the optimizer was built, stored in the group
  as torch's lr schedulers do (they keep an existing ``initial_lr``).  With ``independent``
  decay a schedule multiplier scales the decay but the peak lr does not, so lambda is usually
  ~1e-5 where ``decoupled`` uses ~1e-2.  When eta_0 is 0, s_t is taken as 1 (Composer).

  ``timescale`` gives the decay as Wang & Aitchison ("How to set AdamW's weight decay as you
  scale model and dataset size", 2024) do: AdamW's weights are an exponential moving average
  of the updates with timescale tau_iter = 1 / (eta lambda) updates, and the best tau measured
  in epochs stays roughly constant as model and data grow.  ``weight_decay`` is tau in updates
  at the peak lr (0: no decay, as in every mode); a schedule stretches it as it scales eta_t
  (their lambda is fixed while eta_t follows the schedule), so the shrink is s_t / tau.  The
  same decay as ``decoupled`` with lambda = 1 / (eta_0 tau), or ``independent`` with lambda =
  1 / tau.  (A shrink that stays 1 / tau while the lr moves is ``absolute`` with lambda = 1 /
  tau.)

  Decoupled and independent decay shrink theta_{t-1}, *before* the gradient step (paper,
  torch, Composer), unless ``wd_after_update=True``, which shrinks the already-updated weights
  (the CS224N AdamW): theta <- (1 - eta_t * lambda) * (theta - step).

  ``wd_form`` says how that shrink is rounded (`ShrinkForm`): ``"multiply"`` (torch),
  ``"add"`` (CS224N), ``"fold"`` (into the step, one rounding: optax) or ``"compensated"``
  (Kahan); None, the default, is torch's form before the update and CS224N's after it.

  `WeightDecay.of` turns a group's options into one object, the only place that knows what
  the modes mean; every kernel (reference, foreach, the C++ ones, torch's fused Adam) takes
  that object, and its fields are the C struct's, one for one.

* **Epsilon placement** for the Adam family (``eps_placement``):
  ``"sqrt_v_hat"`` divides by sqrt(v_t / (1 - beta2^t)) + eps (PyTorch, the paper's Algorithm 1);
  ``"sqrt_v"`` divides by sqrt(v_t) + eps and folds the bias correction into the step size,
  lr * sqrt(1 - beta2^t) / (1 - beta1^t) (Kingma & Ba's "efficient version", TensorFlow's
  epsilon-hat).  They differ by a factor sqrt(1 - beta2^t) on eps, large in early steps.

* **Bias correction** (`bias_corrections`): c1 = 1 - beta1^t, c2 = 1 - beta2^t, or 1 and 1
  without it.

* **Scalars are Python floats**: a 1-element tensor ``lr`` (torch.optim accepts one) is
  validated when the group is built and read as a float by each algorithm's hyper-parameter
  declaration (`Hyper.of`), so no kernel ever sees a tensor scalar.

The optimizer shell that drives the kernels is `optimlab._optimizer.Optimizer`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ._foreach import zeros_like

WD_MODES = ("l2", "decoupled", "independent", "lr_squared", "absolute", "timescale")
WD_FORMS = ("multiply", "add", "fold", "compensated")
EPS_PLACEMENTS = ("sqrt_v_hat", "sqrt_v")
NONFINITE_POLICIES = ("skip", "raise", "ignore")
IMPLS = ("auto", "reference", "foreach", "fused")


# --------------------------------------------------------------------------- argument checks
def _interval(name: str, low, high, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{low} {'<' if low_open else '<='} ")
    parts.append(name)
    if high is not None:
        parts.append(f" {'<' if high_open else '<='} {high}")
    return "".join(parts)


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it lies in the interval, else raise a ValueError that
    names the argument and the interval (NaN is never valid).  A 1-element tensor is read as
    its value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and \
                value.dtype not in (torch.bool,) and not value.dtype.is_complex and \
                value.device.type != "meta":
            value = value.item()
        else:
            raise ValueError(f"Invalid {name}: {value!r}; expected a number with "
                             f"{_interval(name, low, high, low_open, high_open)}")
    ok = not math.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; expected "
                         f"{_interval(name, low, high, low_open, high_open)}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {allowed}")
    return value


def check_betas(betas: Any, name: str = "betas") -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r}; expected a pair (beta1, beta2)")
    return (check_range(f"{name}[0]", betas[0], 0.0, 1.0, high_open=True),
            check_range(f"{name}[1]", betas[1], 0.0, 1.0, high_open=True))


def check_weight_decay(weight_decay: Any, wd_mode: Any, wd_form: Any = None,
                       modes: Sequence[str] = WD_MODES) -> tuple[float, str]:
    wd = check_range("weight_decay", weight_decay, 0.0)
    mode = check_choice("wd_mode", wd_mode, modes)
    if wd_form is not None:
        check_choice("wd_form", wd_form, WD_FORMS)
    if mode == "timescale" and 0 < wd < 1:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r}; with wd_mode='timescale' it is "
                         f"tau, the EMA timescale of the weights in updates: 0 (no decay) or "
                         f">= 1 (a lambda of torch's AdamW is tau = 1 / (lr * lambda))")
    return wd, mode


def scalar(value: Any) -> float:
    """A group's scalar hyper-parameter as a Python float (a 1-element tensor ``lr`` is read
    here, once per step; the group keeps what the user gave, so schedulers still work)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


# --------------------------------------------------------------------------- weight decay
def decay_multiplier(group: dict) -> float:
    """The factor f in theta <- theta - f * lambda * theta (every mode but ``l2``): eta_t
    (``decoupled``), s_t = eta_t / eta_0 (``independent``, ``timescale``; 1 when eta_0 is 0),
    eta_t s_t (``lr_squared``) or 1 (``absolute``)."""
    mode = group["wd_mode"]
    if mode == "absolute":
        return 1.0
    lr = scalar(group["lr"])
    if mode == "decoupled":
        return lr
    initial_lr = scalar(group["initial_lr"])
    s = lr / initial_lr if initial_lr else 1.0
    return lr * s if mode == "lr_squared" else s


def decay_rate(weight_decay: float, wd_mode: str) -> float:
    """lambda in theta <- theta - f * lambda * theta: ``weight_decay``, or 1 / tau for
    ``timescale`` (``weight_decay`` is tau there; 0 means no decay in every mode)."""
    if wd_mode == "timescale":
        return 1.0 / weight_decay if weight_decay else 0.0
    return weight_decay


class ShrinkForm(enum.IntEnum):
    """How a decoupled shrink theta <- theta - c theta (c = f lambda) is rounded; equal in real
    arithmetic, not in floats (``wd_form``):

    * ``MULTIPLY``: theta * (1 - c) (torch.optim.AdamW's ``param.mul_(1 - lr * wd)``).  The
      factor 1 - c is itself rounded to the weights' dtype: in float32 c moves in steps of
      6e-8, so a c of 1e-8 shrinks nothing and one of 3e-8 shrinks 6e-8 (issue 15 measured
      95% / 115% / 287% / 0% of the intended decay at c = 2e-7 / 1e-7 / 3e-8 / 1e-8).
    * ``ADD``: theta + (-c) theta in one fused multiply-add (the CS224N reference's
      ``p.add_(p, alpha=-lr * wd)``): the product is exact-ish, but the sum rounds to the
      weights' grid, so a shrink under half an ulp of theta (c < 6e-8 in float32, 4e-3 in
      bfloat16) vanishes.
    * ``FOLD``: the shrink joins the update, theta' = theta + (k delta - c theta) with delta the
      optimizer's step (k = 1, or 1 - c for ``wd_after_update``: (1 - c)(theta + delta)),
      rounded onto theta's grid once (optax's ``add_decayed_weights`` before ``apply_updates``,
      Loshchilov & Hutter's Algorithm 2 line 12 as written).  The bracket is computed in float32
      at least.  A decay under half an ulp survives wherever the step moves theta across a
      rounding boundary, and is lost where the step is zero: it helps ordinary training, not a
      weight that no gradient reaches.
    * ``COMPENSATED``: the sum is compensated (Kahan): e, a buffer of the rounding errors so far
      (state ``wd_compensation``, in the weights' dtype), joins the shrink, y = -c theta + e,
      theta' = theta + y rounded, e' = y - (theta' - theta); no decay is lost to rounding,
      whatever c and the dtype.  The optimizer shell applies it (`optimlab._optimizer`)
      around the kernels, which then shrink nothing: every execution path supports it.
    """
    MULTIPLY = 0
    ADD = 1
    FOLD = 2
    COMPENSATED = 3


@dataclasses.dataclass(frozen=True)
class WeightDecay:
    """One step's weight decay, as every kernel applies it (the C struct ``WeightDecay`` has
    these fields, in this order):

        g     <- g + l2 * theta                          (before the optimizer's own math)
        theta <- theta - factor * lam * theta            (``after``: of the updated weights,
                                                          else of theta_{t-1}; rounded as
                                                          ``form`` says)

    `of` builds it from a group; ``lam`` is 0 when there is no shrink, ``l2`` 0 when there is
    no L2 term (at most one of them is non-zero)."""

    l2: float = 0.0
    lam: float = 0.0
    factor: float = 0.0
    after: bool = False
    form: ShrinkForm = ShrinkForm.MULTIPLY

    @classmethod
    def of(cls, group: dict, form: ShrinkForm | None = None) -> "WeightDecay":
        """The decay ``group`` asks for (``weight_decay``, ``wd_mode``, ``wd_after_update``,
        ``wd_form``, its lr and initial_lr, and ``wd_multiplier``, which a
        `optimlab.WeightDecayScheduler` sets: lambda_t = m_t lambda).  The shrink's rounding:
        the group's ``wd_form`` where given, else ``form``, else ``MULTIPLY`` before the update
        and ``ADD`` after it (torch's and CS224N's forms)."""
        wd = scalar(group["weight_decay"])
        m = scalar(group.get("wd_multiplier", 1.0))
        if wd == 0 or m == 0:
            return NO_DECAY
        if group["wd_mode"] == "l2":
            return cls(l2=wd * m)
        after = bool(group.get("wd_after_update", False))
        if group.get("wd_form") is not None:
            form = ShrinkForm[group["wd_form"].upper()]
        elif form is None:
            form = ShrinkForm.ADD if after else ShrinkForm.MULTIPLY
        return cls(lam=decay_rate(wd, group["wd_mode"]) * m, factor=decay_multiplier(group),
                   after=after, form=form)

    # ---- the reference arithmetic: on tensors, and on TensorLists (optimlab._foreach)
    def grad(self, p, g):
        """g + l2 * theta (a new tensor; ``g`` is never written)."""
        return g.add(p, alpha=self.l2) if self.l2 != 0 else g

    def shrink(self, p, coef: float | None = None) -> None:
        """theta <- theta - coef * theta, coef = factor * lam unless given (Adafactor's
        decay scaled by its step alpha_t passes its own)."""
        c = self.factor * self.lam if coef is None else coef
        if self.form == ShrinkForm.COMPENSATED:       # the shell's (it needs the state)
            raise RuntimeError("a compensated shrink reached a kernel: the optimizer shell "
                               "applies it (Optimizer._kernel_decay)")
        if self.form == ShrinkForm.MULTIPLY:
            p.mul_(1 - c)
        else:
            p.add_(p, alpha=-c)

    def before(self, p, coef: float | None = None) -> None:
        """The shrink of theta_{t-1}, where it comes before the update."""
        if self.lam != 0 and not self.after:
            self.shrink(p, coef)

    def after_update(self, p, coef: float | None = None) -> None:
        """The shrink of the updated weights (``wd_after_update``)."""
        if self.lam != 0 and self.after:
            self.shrink(p, coef)

    @property
    def folds(self) -> bool:
        """True when the shrink is folded into the update (``FOLD``)."""
        return self.lam != 0 and self.form == ShrinkForm.FOLD

    def begin(self, p, coef: float | None = None):
        """Where a kernel adds its step delta: theta itself, shrunk first where the shrink
        comes before the update; or, where the shrink folds into it, a new zero buffer (in
        float32 at least) that receives delta and that `end` adds to theta.  Every kernel ends

            q = decay.begin(p); q.add_(delta ...); decay.end(p, q)

        ``coef``: c where it is not ``factor * lam`` (Adafactor's alpha_t lambda)."""
        if not self.folds:
            self.before(p, coef)
            return p
        return zeros_like(p, torch.float32 if p.dtype in (torch.bfloat16, torch.float16)
                          else p.dtype)

    def end(self, p, q, coef: float | None = None) -> None:
        """theta after the step: the shrink of the updated weights (``wd_after_update``), or,
        folded, theta <- theta + (k q - c theta) with k = 1 (1 - c after the update), one
        rounding onto theta's grid."""
        if not self.folds:
            self.after_update(p, coef)
            return
        c = self.factor * self.lam if coef is None else coef
        if self.after:
            q.mul_(1 - c)
        p.add_(q.add_(p, alpha=-c))


NO_DECAY = WeightDecay()


def compensated_shrink(p: torch.Tensor, e: torch.Tensor, c: float) -> None:
    """theta <- theta - c theta, the rounding error carried in ``e`` (Kahan): y = -c theta + e,
    theta' = theta + y rounded to theta's dtype, e <- y - (theta' - theta).  Computed in float32
    at least (theta' - theta is then exact for bfloat16/float16 weights; for float32 weights it
    is exact by Sterbenz's lemma, |y| being far below |theta|); ``e`` keeps the weights' dtype."""
    work = p.float() if p.dtype in (torch.bfloat16, torch.float16) else p
    y = e.to(work.dtype, copy=True).sub_(work, alpha=c)
    new = (work + y).to(p.dtype)
    e.copy_(y.sub_(new.to(work.dtype) - work))
    p.copy_(new)


def signed(g, maximize: bool):
    """-g when maximizing (ascent), else g."""
    return -g if maximize else g


# --------------------------------------------------------------------------- bias correction
def bias_corrections(beta1: float, beta2: float, step: int,
                     correct_bias: bool = True) -> tuple[float, float]:
    """(c1, c2) = (1 - beta1^t, 1 - beta2^t), or (1, 1) without bias correction."""
    if not correct_bias:
        return 1.0, 1.0
    return 1 - beta1 ** step, 1 - beta2 ** step


# --------------------------------------------------------------------------- non-finite steps
def report_nonfinite(owner: Any, msg: str, stacklevel: int) -> None:
    """Apply ``owner.nonfinite`` to a step that met inf or NaN (``msg`` says where): raise
    FloatingPointError for ``"raise"``, else count the skipped step and warn."""
    if owner.nonfinite == "raise":
        raise FloatingPointError(msg + " (nonfinite='raise')")
    owner.skipped_steps += 1
    warnings.warn(msg + "; the step was skipped (nonfinite='skip')", RuntimeWarning,
                  stacklevel=stacklevel + 1)


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when no tensor holds inf or NaN.  One read of the tensors: plain CPU tensors by
    optimlab's kernel (a bit test of the exponent, all tensors in one parallel pass), others
    with one multi-tensor reduction per device and one sync.  ``meta`` tensors hold no values
    and count as finite.  A DTensor is checked on its local shard, and the verdict is then
    agreed over its mesh (`optimlab._shards.agree`: one all-reduce of one flag), so every
    rank of a sharded model skips or steps together."""
    from . import _ext, _shards
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        t = _shards.local(t)
        if t.device.type == "meta":
            continue
        by_device.setdefault(t.device, []).append(t)
    ok = True
    for device, ts in by_device.items():
        ok = _ext.all_finite(ts) if device.type == "cpu" else None
        if ok is None:
            # the 2-norm is a fast vectorized reduction; it is finite only if every element
            # is, and may overflow for finite elements: then check exactly
            p = 2 if device.type == "cpu" else float("inf")
            norms = torch._foreach_norm(ts, p)
            ok = bool(torch.stack([n.float() for n in norms]).isfinite().all())
            if not ok and p == 2:
                ok = all(bool(torch.isfinite(t).all()) for t in ts)
        if not ok:
            break
    return _shards.agree(ok, tensors)
