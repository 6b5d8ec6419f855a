r"""Adafactor (Shazeer & Stern, 2018): adaptive learning rates with sublinear memory cost.

The paper's algorithm
---------------------
For a weight matrix X in R^{n x m} (Algorithm 4), at step t = 1, 2, ... with gradient G_t:

    alpha_t = max(eps2, RMS(X_{t-1})) * rho_t                         (relative step size)
    R_t = beta2_t * R_{t-1} + (1 - beta2_t) * (G_t^2 + eps1 1_n 1_m^T) 1_m      (row sums)
    C_t = beta2_t * C_{t-1} + (1 - beta2_t) * 1_n^T (G_t^2 + eps1 1_n 1_m^T)    (column sums)
    V^_t = R_t C_t / (1_n^T R_t)                                  (factored second moment)
    U_t = G_t / sqrt(V^_t)
    U^_t = U_t / max(1, RMS(U_t) / d)                                     (update clipping)
    X_t = X_{t-1} - alpha_t * U^_t

and for a vector x in R^n (Algorithm 5) the second moment is kept whole:

    V^_t = beta2_t * V^_{t-1} + (1 - beta2_t) * (G_t^2 + eps1 1_n),   U_t = G_t / sqrt(V^_t)

with RMS(Y) = sqrt(mean(Y^2)), the increasing decay beta2_t = 1 - t^c (c = -0.8, so
beta2_1 = 0 and no bias correction is needed), the relative step rho_t = min(1e-2, 1/sqrt(t))
(min(1e-6 t, 1/sqrt(t)) with warm-up), eps1 = 1e-30, eps2 = 1e-3, d = 1.  R and C are kept as
means rather than sums here (mean = sum / m, resp. / n): V^_t is the same, the numbers are
smaller.  Tensors with more than two dimensions are factored over their last two; the leading
dimensions are batch dimensions (one R, C pair per leading index).  Memory for an n x m
matrix: n + m second-moment numbers instead of n * m.

Every option, in those symbols
------------------------------
``relative_step`` / ``warmup_init`` / ``lr`` (eta, the group's lr, never overwritten):

    rho_t = min(eta, 1/sqrt(t))                 relative_step=True
    rho_t = min(1e-6 t, eta, 1/sqrt(t))         relative_step=True, warmup_init=True
    rho_t = eta                                 relative_step=False

  With eta = 1e-2 the first two are the paper's (and transformers') formulas exactly: the
  warm-up ramp 1e-6 t meets 1/sqrt(t) at t = 1e4 where both equal 1e-2, so the cap never
  binds.  torch.optim always uses the first form with its lr.

``scale_parameter``: alpha_t = max(eps2, RMS(theta_{t-1})) * rho_t if True, else
  alpha_t = rho_t.  RMS is read before any weight decay of this step.

``eps=(eps1, eps2)`` and ``eps1_placement``:

  * ``"grad_sq"`` (paper, fairseq, transformers): eps1 is added to G_t^2 before the averages
    above, V^ = R C / mean(R), U = G / sqrt(V^).
  * ``"clamp"`` (torch.optim): the averages are of G_t^2 alone, and
    V^ = R C / max(mean(R), eps1),  U = G / max(sqrt(V^), eps1)  (a clamp of V^ at eps1^2).

  eps1 = None means the machine epsilon of the dtype of the group's first parameter that
  has a gradient (torch.optim's rule, group-wide).

``clip_threshold`` d > 0 (``inf`` disables clipping).  torch.optim requires d >= 1 and
  transformers checks nothing; any d > 0 is a well-defined clip (d < 1 clips harder), so
  optimlab accepts d > 0 and `optimlab.compat.torch.Adafactor` keeps torch's d >= 1.
``decay_rate`` c <= 0 (c = 0 gives beta2_t = 0: no averaging; c > 0 would make beta2_t < 0).
``beta2`` (None: the increasing decay above) in [0, 1): a fixed decay with Adam's bias
  correction, written as the paper does (section 7.1) and Tensor2Tensor's
  ``adafactor_decay_rate_adam``: beta2_t = beta2 (1 - beta2^(t-1)) / (1 - beta2^t), so that
  V^_t is Adam's bias-corrected v_t / (1 - beta2^t) (``decay_rate`` is then unused).
``factored`` (default True): False keeps the whole second moment of every tensor
  (Algorithm 5 for matrices too, n * m numbers; Tensor2Tensor's ``factored=False``).  With
  ``factored=False``, ``beta2``, ``beta1=None``, ``clip_threshold=inf``,
  ``relative_step=False`` and ``scale_parameter=False`` this is Adam with beta1 = 0 and its
  eps moved inside the root (eps1 on G^2), which the paper's ablation (its Table 2) starts
  from; ``optimlab lab adafactor-ablation`` runs it.

``beta1`` (None: no first moment, no state) and ``momentum_of``:

  * ``"scaled_update"`` (Tensor2Tensor, fairseq, transformers): the average is of the
    step itself, m_t = beta1 m_{t-1} + (1 - beta1) alpha_t U^_t,  X_t = X_{t-1} - m_t.
  * ``"update"``: m_t = beta1 m_{t-1} + (1 - beta1) U^_t,  X_t = X_{t-1} - alpha_t m_t.

  The two agree while alpha_t is constant.

``weight_decay`` (lambda), ``wd_mode`` and ``decay_scale`` (see `optimlab._common`):

  * ``l2``: G_t <- G_t + lambda X_{t-1} before the second moment.
  * ``decoupled``: X <- X - f lambda X with f = eta (``decay_scale="lr"``, torch.optim) or
    f = alpha_t (``decay_scale="alpha"``, transformers: the step actually taken).
  * ``independent``: f = eta / eta_0; ``lr_squared``, ``absolute``, ``timescale``: f and
    lambda as in `optimlab._common`'s table (eta: the group's lr).
  The decay shrinks X_{t-1} (after RMS(X_{t-1}) was read, before X_{t-1} - step), or the
  updated weights with ``wd_after_update=True``.

``maximize``: G_t <- -G_t.  ``upcast``: see low precision below.

Variants as option values
-------------------------
==========================  ==================  ===================  ======================
option                      paper (Alg. 4/5)    transformers         torch.optim
==========================  ==================  ===================  ======================
lr (eta)                    1e-2 (cap of rho)   1e-2 if relative_    lr (default 1e-2)
                                                step, else its lr
relative_step               True                relative_step        True
warmup_init                 False (or True)     warmup_init          False
scale_parameter             True                scale_parameter      True
eps                         (1e-30, 1e-3)       eps                  (None, 1e-3)
eps1_placement              "grad_sq"           "grad_sq"            "clamp"
clip_threshold              1.0                 clip_threshold       d (>= 1)
decay_rate                  -0.8                decay_rate           beta2_decay
beta2                       None                (none)               (none)
factored                    True                (always)             (always)
beta1                       None                beta1                None
momentum_of                 (no momentum)       "scaled_update"      (no momentum)
weight_decay / wd_mode      (none)              decoupled            decoupled
decay_scale                 (none)              "alpha"              "lr"
upcast                      (n/a)               True                 False
==========================  ==================  ===================  ======================

`optimlab.compat.hf.Adafactor` and `optimlab.compat.torch.Adafactor` take those libraries'
own arguments and build the matching configuration.

Low precision
-------------
With ``upcast=True`` (default, transformers' choice) a bf16/fp16 parameter is updated in
fp32: its state is fp32, the gradient and the parameter are read as fp32 and the result is
rounded back once per step.  ``upcast=False`` computes and keeps state in the parameter's
dtype (torch.optim's choice).  fp32/fp64 parameters are computed in their own dtype.  The
update is computed in the dtype of the parameter's state, so state loaded from a state dict
keeps deciding it (fp32 state saved from an fp32 model keeps a bf16 copy training in fp32).
eps1 = None resolves from the parameter's dtype (bf16's epsilon is 2^-7), as in torch.optim.

Departures
----------
* The group's ``lr`` is never overwritten or required to be None: it is eta above, the cap
  of rho_t (transformers keeps lr=None in the group and computes the step internally).
* ``eps1_placement``, ``momentum_of``, ``decay_scale`` and ``upcast`` select between the
  published variants rather than one of them; weight decay is not in the paper.
* The arithmetic follows the reference whose eps1 placement is chosen, so each reference is
  reproduced bit for bit (measured in the parity tests, float32 and float64): with ``"grad_sq"`` the averages are written v*beta2 + (1-beta2)*x
  and 1/sqrt(V^) as rsqrt(R/mean R) rsqrt(C) (fairseq/transformers); with ``"clamp"`` they
  are lerps with weight t^c and V^ is the outer product R C (torch.optim).
* Non-finite gradients follow ``nonfinite`` (`optimlab._optimizer.Optimizer`).

Example
-------
>>> opt = optimlab.Adafactor(model.parameters())            # the paper's configuration
>>> opt = optimlab.Adafactor(model.parameters(), lr=1e-3, relative_step=False,
...                          scale_parameter=False, beta1=0.9)   # T5 fine-tuning recipe

References
----------
N. Shazeer, M. Stern. Adafactor: Adaptive Learning Rates with Sublinear Memory Cost. ICML
2018, arXiv:1804.04235 (Algorithms 4 and 5, section 9 for the proposed hyper-parameters).
fairseq/transformers ``Adafactor``; ``torch.optim.Adafactor``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.autograd.graph import increment_version

from . import _ext, _gate, _shards
from ._common import (ShrinkForm, WeightDecay, check_choice, check_range, check_weight_decay,
                      scalar, signed)
from ._foreach import TensorList
from ._optimizer import Optimizer

__all__ = ["Adafactor", "AdafactorHyper", "AdafactorStep", "adafactor_step", "adafactor_update",
           "adafactor_update_foreach", "convert_state_dict", "state_dict_format",
           "EPS1_PLACEMENTS", "MOMENTUM_OF", "DECAY_SCALES", "STATE_DICT_FORMATS"]

EPS1_PLACEMENTS = ("grad_sq", "clamp")
MOMENTUM_OF = ("scaled_update", "update")
DECAY_SCALES = ("lr", "alpha")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class AdafactorHyper:
    """One group's Adafactor hyper-parameters for a step (the C struct ``AdafactorHyper``).
    ``eps1`` is resolved (None: the machine epsilon of the dtype of the group's first
    parameter with a gradient); ``momentum`` is 0 without a first moment (beta1 None), 1 for
    the average of the scaled update, 2 of the update; the decay's shrink is
    ``decay.lam * alpha_t`` instead of ``decay.factor * decay.lam`` with
    ``decay_by_alpha`` (``decay_scale="alpha"``)."""
    lr: float                 # eta
    eps1: float
    eps2: float
    clip_threshold: float     # d
    decay_rate: float         # c
    beta2: float              # a fixed beta2 (bias-corrected) where fixed_beta2, else unused
    fixed_beta2: bool
    beta1: float
    momentum: int
    scale_parameter: bool
    relative_step: bool
    warmup_init: bool
    grad_sq: bool             # eps1_placement == "grad_sq"
    maximize: bool
    decay: WeightDecay
    decay_by_alpha: bool

    @classmethod
    def of(cls, group: dict, params) -> "AdafactorHyper":
        eps1, eps2 = group["eps"]
        if eps1 is None:          # torch.optim's rule: the first parameter's dtype, group-wide
            eps1 = torch.finfo(params[0].dtype).eps
        elif group["eps1_placement"] == "clamp":
            # the clamp of V^ at eps1^2 must be representable in the dtype the update is
            # computed in, or a zero gradient coordinate becomes rsqrt(0) * 0 = NaN
            dt = params[0].dtype
            dt = torch.float32 if group["upcast"] and dt in _LOW_PRECISION else dt
            tiny = torch.finfo(dt).tiny
            if eps1 > 0 and eps1 * eps1 < tiny:     # (0 is a deliberate: no floor)
                raise ValueError(
                    f"Invalid eps[0]: {eps1!r} with eps1_placement='clamp': eps1**2 = "
                    f"{eps1 * eps1:.3g} underflows in {str(dt).replace('torch.', '')} (smallest "
                    f"normal {tiny:.3g}), and a zero gradient coordinate would give NaN; use "
                    f"eps=(None, eps2) (the dtype's machine epsilon, torch.optim's default) or "
                    f"eps1 >= {tiny ** 0.5:.3g}")
        beta1 = group["beta1"]
        by_alpha = group["decay_scale"] == "alpha"
        return cls(lr=scalar(group["lr"]), eps1=eps1, eps2=eps2,
                   clip_threshold=scalar(group["clip_threshold"]),
                   decay_rate=scalar(group["decay_rate"]),
                   beta2=0.0 if group.get("beta2") is None else group["beta2"],
                   fixed_beta2=group.get("beta2") is not None,
                   beta1=0.0 if beta1 is None else beta1,
                   momentum=0 if beta1 is None else (1 if group["momentum_of"] == "scaled_update"
                                                     else 2),
                   scale_parameter=group["scale_parameter"],
                   relative_step=group["relative_step"], warmup_init=group["warmup_init"],
                   grad_sq=group["eps1_placement"] == "grad_sq", maximize=group["maximize"],
                   decay=WeightDecay.of(group, form=ShrinkForm.ADD if by_alpha
                                        else ShrinkForm.MULTIPLY),
                   decay_by_alpha=by_alpha)


@dataclasses.dataclass(frozen=True)
class AdafactorStep:
    """Per tensor: its geometry (``batches`` matrices of ``rows`` x ``cols``, row-major;
    ``cols`` = 0 for an unfactored tensor of ``rows`` elements), its group's index in a call
    over several groups, rho_t and ``decay_weight`` = 1 - beta2_t: t^c, or (1 - beta2) / (1 -
    beta2^t) for a fixed ``beta2``."""
    batches: int
    rows: int
    cols: int
    group: int
    rho: float
    decay_weight: float


def adafactor_step(hp: AdafactorHyper, t: int, shape: tuple, factored: bool,
                   group: int = 0) -> AdafactorStep:
    """`AdafactorStep` of step ``t`` for a tensor of ``shape``."""
    if factored:
        batches = 1
        for d in shape[:-2]:
            batches *= d
        rows, cols = shape[-2], shape[-1]
    else:
        batches, rows, cols = 1, math.prod(shape), 0
    return AdafactorStep(batches=batches, rows=rows, cols=cols, group=group,
                         rho=relative_step_size(t, hp.lr, hp.relative_step, hp.warmup_init),
                         decay_weight=(1 - hp.beta2) / (1 - hp.beta2 ** t) if hp.fixed_beta2
                         else math.pow(t, hp.decay_rate))


def relative_step_size(step: int, lr: float, relative_step: bool, warmup_init: bool) -> float:
    """rho_t (see the module docstring)."""
    if not relative_step:
        return lr
    rho = min(lr, 1.0 / math.sqrt(step))
    if warmup_init:
        rho = min(1e-6 * step, rho)
    return rho


def adafactor_update(p, g, state: dict, hp: AdafactorHyper, s: AdafactorStep) -> None:
    """One Adafactor step on one tensor, in place: the reference kernel (readable, per tensor).

    The update is computed in the dtype of the tensor's state (fp32 for bf16/fp16 weights
    with ``upcast``, or as a state dict saved it), on a copy of the weights where that is not
    theirs (rounded back once); the gradient is brought to that dtype, signed (maximize) and
    given its L2 term there.  A zero-size tensor does not move.

    A DTensor ``p`` (FSDP2, tensor parallel; gradient and state DTensors as well) is updated
    on this rank's shard, and each quantity that spans shards is all-reduced over the mesh
    dimensions that shard it (`optimlab._shards.Reduction`), per factored matrix:
    RMS(theta_{t-1}) (one number, with ``scale_parameter``), the mean of G^2 + eps1 over a
    sharded dimension (the column statistic C_t of a row-sharded matrix: m numbers; the row
    statistic R_t of a column-sharded one: n numbers), the mean of R_t over the rows where R_t
    is sharded (one number per batch index), and RMS(U_t) (one number).  A vector sends two
    numbers.  Every rank calls the same collectives, an empty shard included."""
    red = _shards.Reduction(p)
    if red.numel == 0:
        return
    if p.is_meta:
        raise NotImplementedError(
            "optimlab.Adafactor cannot step meta tensors: its step size and update clipping "
            "read RMS values of the data (torch.optim.Adafactor cannot either)")
    if red.sharded:
        [p], [g], [state] = _shards.local_views([p], [g], [state])
    row, col, v = state.get("exp_avg_sq_row"), state.get("exp_avg_sq_col"), state.get("exp_avg_sq")
    dtype = (row if row is not None else v).dtype
    work = p if dtype == p.dtype else p.to(dtype)           # e.g. an fp32 copy of a bf16 p
    g = hp.decay.grad(work, signed(g.to(dtype), hp.maximize))
    _adafactor_tensor(work, g, state.get("exp_avg"), row, col, v, hp, s, red)
    if work is not p:
        p.copy_(work)


def _adafactor_tensor(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor | None,
                      row: torch.Tensor | None, col: torch.Tensor | None,
                      v: torch.Tensor | None, hp: AdafactorHyper, s: AdafactorStep,
                      red: _shards.Reduction) -> None:
    """`adafactor_update` of a tensor in its compute dtype, ``g`` signed and with its L2 term.
    The tensors may be a DTensor's local shards: the reductions over the whole tensor or over
    one of its dimensions go through ``red``, which all-reduces what spans shards (for a
    plain tensor they are torch's own reductions, unchanged).

    ``row``/``col`` are the factored second moment (shapes ``p.shape[:-1]`` and
    ``p.shape[:-2] + p.shape[-1:]``) or None, in which case ``v`` (shape of ``p``) is the
    unfactored one.  ``exp_avg`` is None without a first moment.

    Two arithmetic layouts, chosen by ``hp.grad_sq`` (eps1 placement; same math up to eps1,
    different rounding): ``"grad_sq"`` is written as fairseq/transformers write it, with
    RMS(X), alpha_t and the clipping factor as 0-dim tensors; ``"clamp"`` as torch.optim
    writes it, with python-float step sizes.  The parity tests find each reference reproduced
    to the last bit."""
    fairseq = hp.grad_sq
    rho, eps1, eps2, clip_threshold = s.rho, hp.eps1, hp.eps2, hp.clip_threshold
    beta1 = hp.beta1 if hp.momentum else None
    n = red.numel                                      # of the whole (global) tensor

    # alpha_t = max(eps2, RMS(X_{t-1})) * rho_t, read before this step's decay
    if not hp.scale_parameter:
        alpha = rho
    elif fairseq:       # a 0-dim tensor, or the float eps2 * rho_t where the floor binds
        alpha = max(eps2, red.norm(p) / (n ** 0.5)) * rho
    else:
        alpha = max(eps2, red.norm(p).item() / (n ** 0.5)) * rho

    # the shrink: X - alpha_t lambda X (decay_scale "alpha"), else X - f lambda X; q: where
    # the step goes (X itself, or the folded shrink's buffer)
    coef = hp.decay.lam * alpha if hp.decay_by_alpha else None
    q = hp.decay.begin(p, coef)

    # U_t = G_t / sqrt(V^_t)
    if fairseq:
        beta2 = 1.0 - s.decay_weight                   # beta2_t = 1 - t^c
        sq = g * g + eps1                              # G_t^2 + eps1
        if row is not None:
            row.mul_(beta2).add_(red.mean(sq, -1, of=-1), alpha=1.0 - beta2)
            col.mul_(beta2).add_(red.mean(sq, -2, of=-2), alpha=1.0 - beta2)
            # (R_t's last dimension is the parameter's rows)
            r_factor = (row / red.mean(row, -1, of=-2, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            u = torch.mul(r_factor, c_factor).mul_(g)
        else:
            v.mul_(beta2).add_(sq, alpha=1.0 - beta2)
            u = v.rsqrt().mul_(g)
    else:
        weight = s.decay_weight                        # 1 - beta2_t = t^c
        if row is not None:
            row.lerp_(red.mean_sq(g, -1), weight)
            col.lerp_(red.mean_sq(g, -2), weight)
            r = row.unsqueeze(-1)
            var = r @ col.unsqueeze(-2)                # R C (outer product per batch index)
            var.div_(red.mean(r, -2, of=-2, keepdim=True).clamp_(min=eps1))
        else:
            v.lerp_(g * g, weight)
            var = v.clone()
        u = var.clamp_(min=eps1 * eps1).rsqrt_().mul_(g)

    # update clipping, U^_t = U_t / max(1, RMS(U_t) / d), then the step
    if fairseq:
        u.div_((red.norm(u) / (n ** 0.5) / clip_threshold).clamp_(min=1.0))     # U^_t
        if beta1 is None:
            q.sub_(u.mul_(alpha))
        elif hp.momentum == 1:                         # of the scaled update
            exp_avg.mul_(beta1).add_(u.mul_(alpha), alpha=1.0 - beta1)
            q.sub_(exp_avg)
        else:
            exp_avg.mul_(beta1).add_(u, alpha=1.0 - beta1)
            q.sub_(exp_avg * alpha)
    else:
        clip = max(1.0, red.norm(u).item() / ((n ** 0.5) * clip_threshold))
        if beta1 is None:
            q.add_(u, alpha=-alpha / clip)
        elif hp.momentum == 1:
            exp_avg.mul_(beta1).add_(u, alpha=(1.0 - beta1) * alpha / clip)
            q.sub_(exp_avg)
        else:
            exp_avg.mul_(beta1).add_(u, alpha=(1.0 - beta1) / clip)
            q.add_(exp_avg, alpha=-alpha)

    hp.decay.end(p, q, coef)


def adafactor_update_foreach(ps: list[torch.Tensor], gs: list[torch.Tensor],
                             exp_avgs: list[torch.Tensor | None],
                             rows: list[torch.Tensor | None], cols: list[torch.Tensor | None],
                             vs: list[torch.Tensor | None], hp: AdafactorHyper,
                             steps: list[AdafactorStep]) -> None:
    """`_adafactor_tensor` on lists of tensors that share a device and dtypes: the same
    arithmetic, with the whole-tensor norms (RMS of theta, RMS of U) taken by one
    multi-tensor reduction each, the element-wise steps by ``torch._foreach_*`` kernels, and,
    in the ``"clamp"`` layout, one host sync per reduction instead of one per tensor.  The
    row/column reductions stay per tensor (their shapes differ), so this is Adafactor's own
    multi-tensor kernel rather than `adafactor_update` on TensorLists."""
    fairseq = hp.grad_sq
    eps1, eps2, clip_threshold = hp.eps1, hp.eps2, hp.clip_threshold
    beta1 = hp.beta1 if hp.momentum else None
    rhos = [st.rho for st in steps]
    ns = [p.numel() for p in ps]
    k = range(len(ps))
    if not hp.scale_parameter:
        alphas = list(rhos)
    elif fairseq:
        norms = torch._foreach_norm(ps, 2)
        alphas = [max(eps2, norms[i] / (ns[i] ** 0.5)) * rhos[i] for i in k]
    else:
        norms = torch.stack(torch._foreach_norm(ps, 2)).tolist()
        alphas = [max(eps2, norms[i] / (ns[i] ** 0.5)) * rhos[i] for i in k]

    # the shrink, per tensor where it scales with alpha_t; qs: where the steps go
    coefs = [hp.decay.lam * a for a in alphas] if hp.decay_by_alpha else None
    if coefs is not None:
        qs = [hp.decay.begin(p, c) for p, c in zip(ps, coefs)]
    else:
        qs = hp.decay.begin(TensorList(ps)).ts

    us: list[torch.Tensor] = [None] * len(ps)        # type: ignore[list-item]
    if fairseq:
        sq = torch._foreach_mul(gs, gs)
        torch._foreach_add_(sq, eps1)
        for i in k:
            beta2 = 1.0 - steps[i].decay_weight
            if rows[i] is not None:
                rows[i].mul_(beta2).add_(sq[i].mean(dim=-1), alpha=1.0 - beta2)
                cols[i].mul_(beta2).add_(sq[i].mean(dim=-2), alpha=1.0 - beta2)
                r_factor = (rows[i] / rows[i].mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                us[i] = torch.mul(r_factor, cols[i].unsqueeze(-2).rsqrt())
            else:
                vs[i].mul_(beta2).add_(sq[i], alpha=1.0 - beta2)
                us[i] = vs[i].rsqrt()
        torch._foreach_mul_(us, gs)
        norms_u = torch._foreach_norm(us, 2)
        torch._foreach_div_(us, [(norms_u[i] / (ns[i] ** 0.5) / clip_threshold).clamp_(min=1.0)
                                 for i in k])
        if beta1 is None:
            for i in k:
                qs[i].sub_(us[i].mul_(alphas[i]))
        elif hp.momentum == 1:
            for i in k:
                us[i].mul_(alphas[i])
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, us, alpha=1.0 - beta1)
            torch._foreach_sub_(qs, exp_avgs)
        else:
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, us, alpha=1.0 - beta1)
            for i in k:
                qs[i].sub_(exp_avgs[i] * alphas[i])
    else:
        for i in k:
            weight = steps[i].decay_weight
            g = gs[i]
            if rows[i] is not None:
                rows[i].lerp_(torch.linalg.vector_norm(g, dim=-1).square_().div_(g.size(-1)),
                              weight)
                cols[i].lerp_(torch.linalg.vector_norm(g, dim=-2).square_().div_(g.size(-2)),
                              weight)
                r = rows[i].unsqueeze(-1)
                var = r @ cols[i].unsqueeze(-2)
                us[i] = var.div_(r.mean(dim=-2, keepdim=True).clamp_(min=eps1))
            else:
                vs[i].lerp_(g * g, weight)
                us[i] = vs[i].clone()
        torch._foreach_clamp_min_(us, eps1 * eps1)
        torch._foreach_rsqrt_(us)
        torch._foreach_mul_(us, gs)
        norms_u = torch.stack(torch._foreach_norm(us, 2)).tolist()
        clips = [max(1.0, norms_u[i] / ((ns[i] ** 0.5) * clip_threshold)) for i in k]
        # per-tensor step sizes: one fused multiply-add per tensor, as the reference
        if beta1 is None:
            for i in k:
                qs[i].add_(us[i], alpha=-alphas[i] / clips[i])
        elif hp.momentum == 1:
            torch._foreach_mul_(exp_avgs, beta1)
            for i in k:
                exp_avgs[i].add_(us[i], alpha=(1.0 - beta1) * alphas[i] / clips[i])
            torch._foreach_sub_(qs, exp_avgs)
        else:
            torch._foreach_mul_(exp_avgs, beta1)
            for i in k:
                exp_avgs[i].add_(us[i], alpha=(1.0 - beta1) / clips[i])
                qs[i].add_(exp_avgs[i], alpha=-alphas[i])

    if coefs is not None:
        for p, q, c in zip(ps, qs, coefs):
            hp.decay.end(p, q, c)
    else:
        hp.decay.end(TensorList(ps), TensorList(qs))


_F32, _F64 = torch.float32, torch.float64

STATE_DICT_FORMATS = ("optimlab", "torch", "transformers")
# group keys: optimlab's name -> torch.optim.Adafactor's
_TORCH_GROUP_KEYS = {"lr": "lr", "decay_rate": "beta2_decay", "eps": "eps", "clip_threshold": "d",
                     "weight_decay": "weight_decay", "maximize": "maximize"}
_HF_GROUP_KEYS = ("lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay",
                  "scale_parameter", "relative_step", "warmup_init")


def state_dict_format(state_dict: dict) -> str:
    """Which library wrote an Adafactor state dict: ``"torch"`` (torch.optim: ``row_var`` of
    shape (..., n, 1), ``col_var`` (..., 1, m), ``variance``, a tensor ``step``),
    ``"transformers"`` (the keys used here, plus ``RMS``) or ``"optimlab"``."""
    states = state_dict.get("state", {}).values()
    if any("row_var" in st or "variance" in st for st in states) or \
            any("beta2_decay" in g for g in state_dict.get("param_groups", ())):
        return "torch"
    if any("RMS" in st for st in states):
        return "transformers"
    return "optimlab"


def convert_state_dict(state_dict: dict, to: str) -> dict:
    """An Adafactor state dict of torch.optim, transformers or optimlab (`state_dict_format`)
    in the format ``to``, so that a run switches library mid-way without losing its
    statistics: the three keep the same numbers (the row and column *means* of G^2, the step
    count, the first moment of transformers/optimlab), under other keys and shapes.

    * torch.optim: ``row_var`` = R with a trailing 1, ``col_var`` = C with a 1 before the last
      dimension, ``variance`` = V; ``step`` a float32 tensor; group keys ``beta2_decay`` (our
      ``decay_rate``) and ``d`` (``clip_threshold``).  torch.optim has no first moment: a
      state with ``exp_avg`` does not convert to it (ValueError).
    * transformers: our keys, plus ``RMS`` (which transformers recomputes at every step before
      use: written as 0.0, dropped on import).

    Groups keep the keys the target knows; options the target lacks take the defaults of the
    optimizer that loads the result (build it with the same settings: e.g.
    `optimlab.compat.torch.Adafactor` for torch.optim's).  Tensors are shared, not copied."""
    check_choice("to", to, STATE_DICT_FORMATS)
    src = state_dict_format(state_dict)
    states, groups = {}, []
    for pid, st in state_dict["state"].items():        # to optimlab's keys first
        st = dict(st)
        st.pop("RMS", None)
        if "row_var" in st:
            st["exp_avg_sq_row"] = st.pop("row_var").squeeze(-1)
            st["exp_avg_sq_col"] = st.pop("col_var").squeeze(-2)
        if "variance" in st:
            st["exp_avg_sq"] = st.pop("variance")
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = int(st["step"].item())
        states[pid] = st
    for g in state_dict["param_groups"]:
        g = dict(g)
        if src == "torch":
            g.pop("foreach", None)
            for ours, theirs in _TORCH_GROUP_KEYS.items():
                if theirs != ours and theirs in g:
                    g[ours] = g.pop(theirs)
        if g.get("lr", 0) is None:                     # transformers' relative step: the cap
            g.pop("lr")                                # eta is the loading optimizer's lr
        groups.append(g)
    if to == "optimlab":
        return {"state": states, "param_groups": groups}
    out_states = {}
    for pid, st in states.items():
        st = dict(st)
        if to == "torch":
            if "exp_avg" in st:
                raise ValueError("convert_state_dict(to='torch'): torch.optim.Adafactor has no "
                                 "first moment, and this state has one (beta1 is set)")
            if "exp_avg_sq_row" in st:
                st["row_var"] = st.pop("exp_avg_sq_row").unsqueeze(-1)
                st["col_var"] = st.pop("exp_avg_sq_col").unsqueeze(-2)
            if "exp_avg_sq" in st:
                st["variance"] = st.pop("exp_avg_sq")
            st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
        else:
            st["RMS"] = 0.0
        out_states[pid] = st
    out_groups = []
    for g in groups:
        if to == "torch":
            ng = {theirs: g[ours] for ours, theirs in _TORCH_GROUP_KEYS.items() if ours in g}
            ng["foreach"] = None
        else:
            ng = {k: g[k] for k in _HF_GROUP_KEYS if k in g}
        ng["params"] = g["params"]
        out_groups.append(ng)
    return {"state": out_states, "param_groups": out_groups}


class Adafactor(Optimizer):
    r"""Adafactor with every published choice named (see the module docstring for the math).

    Args:
        params: parameters or parameter groups.
        lr: eta >= 0: the cap of the relative step rho_t (``relative_step=True``) or the step
            itself; also the decay factor of ``wd_mode="decoupled"`` with
            ``decay_scale="lr"``.  Never overwritten.
        eps: (eps1, eps2): eps1 >= 0 or None (machine epsilon, see ``eps1_placement``),
            eps2 >= 0 the floor of the parameter scale.
        clip_threshold: d > 0 (``inf`` disables update clipping).
        decay_rate: c <= 0 in beta2_t = 1 - t^c.
        beta2: None (the increasing decay 1 - t^c) or a fixed beta2 in [0, 1), bias-corrected
            as Adam's.
        factored: factor the second moment of matrices (default True; False: n * m numbers).
        beta1: None (no first moment, none stored) or in [0, 1).
        weight_decay: lambda >= 0 (tau >= 0, in updates, with ``wd_mode="timescale"``).
        wd_mode: ``"decoupled"`` (default), ``"independent"``, ``"l2"``, ``"lr_squared"``,
            ``"absolute"`` or ``"timescale"`` (the table in `optimlab._common`).
        scale_parameter: multiply rho_t by max(eps2, RMS(theta_{t-1})).
        relative_step: rho_t = min(lr, 1/sqrt(t)) instead of lr.
        warmup_init: rho_t = min(1e-6 t, lr, 1/sqrt(t)); requires ``relative_step``.
        eps1_placement: ``"grad_sq"`` (paper, transformers) or ``"clamp"`` (torch.optim).
        momentum_of: ``"scaled_update"`` (transformers) or ``"update"``.
        decay_scale: ``"lr"`` (torch.optim) or ``"alpha"`` (transformers); ``"alpha"`` needs
            ``wd_mode="decoupled"``.
        wd_after_update: decay the updated weights instead of theta_{t-1}.
        upcast: update bf16/fp16 parameters in fp32 with fp32 state (default True).
        maximize: ascend instead of descend.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (see `optimlab._optimizer.Optimizer`).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (see `optimlab._optimizer`).
            The fused CPU kernel (fp32/fp64 weights with state in the same dtype) reads each
            factored tensor twice: RMS(theta), the row/column means of G^2 and RMS(U) (as
            d sum_j w_j / C_j with w_j = sum_i G_ij^2 / R_i, exact up to rounding; a pass of
            its own only where the eps1^2 clamp can bind); then the update.  With
            ``nonfinite="skip"`` it runs the first pass of every tensor of every group before
            writing anything and checks the gradients there.  bf16 weights with ``upcast`` run
            ``foreach``.

    State per parameter: ``step`` (int); ``exp_avg`` (m, only when beta1 is not None);
    ``exp_avg_sq_row`` (shape[:-1]) and ``exp_avg_sq_col`` (shape[:-2] + shape[-1:]) for
    tensors with >= 2 dims, else ``exp_avg_sq``: transformers' keys and shapes.

    Example:
        >>> opt = optimlab.Adafactor(model.parameters(), beta1=0.9, weight_decay=1e-2)
    """

    Hyper = AdafactorHyper
    fused = _ext.declare(_ext.FusedKernel(
        name="adafactor", hyper=AdafactorHyper,
        state=("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"),
        scalars=AdafactorStep, dtypes=frozenset({(_F32, _F32, _F32), (_F64, _F64, _F64)}),
        contiguous_only=True))
    _kernel = staticmethod(adafactor_update)

    def __init__(self, params, lr: float = 1e-2, eps=(1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, *, beta2: float | None = None,
                 factored: bool = True, wd_mode: str = "decoupled",
                 scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, eps1_placement: str = "grad_sq",
                 momentum_of: str = "scaled_update", decay_scale: str = "lr",
                 wd_after_update: bool = False, wd_form: str | None = None,
                 upcast: bool = True, maximize: bool = False,
                 nonfinite: str = "skip", impl: str = "auto"):
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, beta2=beta2, factored=bool(factored),
                        weight_decay=weight_decay, wd_mode=wd_mode,
                        scale_parameter=bool(scale_parameter),
                        relative_step=bool(relative_step), warmup_init=bool(warmup_init),
                        eps1_placement=eps1_placement, momentum_of=momentum_of,
                        decay_scale=decay_scale, wd_after_update=bool(wd_after_update),
                        wd_form=wd_form,
                        upcast=bool(upcast), maximize=bool(maximize))
        self._check_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite, impl=impl)

    def _check_group(self, group: dict) -> None:
        group["lr"] = check_range("lr", group["lr"], 0.0)    # a 1-element tensor -> float
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"Invalid eps: {eps!r}; expected a pair (eps1, eps2) with "
                             "eps1 None or >= 0 and eps2 >= 0")
        eps1 = None if eps[0] is None else check_range("eps[0]", eps[0], 0.0)
        group["eps"] = (eps1, check_range("eps[1]", eps[1], 0.0))
        check_range("clip_threshold", group["clip_threshold"], 0.0, low_open=True)
        check_range("decay_rate", group["decay_rate"], high=0.0)
        if group["beta1"] is not None:
            group["beta1"] = check_range("beta1", group["beta1"], 0.0, 1.0, high_open=True)
        if group.setdefault("beta2", None) is not None:
            group["beta2"] = check_range("beta2", group["beta2"], 0.0, 1.0, high_open=True)
        group.setdefault("factored", True)
        _, wd_mode = check_weight_decay(group["weight_decay"], group["wd_mode"],
                                        group.setdefault("wd_form", None))
        check_choice("eps1_placement", group["eps1_placement"], EPS1_PLACEMENTS)
        check_choice("momentum_of", group["momentum_of"], MOMENTUM_OF)
        check_choice("decay_scale", group["decay_scale"], DECAY_SCALES)
        if group["decay_scale"] == "alpha" and wd_mode != "decoupled":
            raise ValueError(f"Invalid decay_scale: 'alpha' scales decoupled decay by the "
                             f"step alpha_t and needs wd_mode='decoupled', got {wd_mode!r}")
        if group["wd_form"] == "compensated" and (group["scale_parameter"] or
                                                  group["decay_scale"] == "alpha"):
            raise ValueError("Invalid wd_form: 'compensated' shrinks the weights around the "
                             "step, but this Adafactor reads them inside it (RMS(X_{t-1}) for "
                             "scale_parameter=True, alpha_t for decay_scale='alpha'); use "
                             "scale_parameter=False and decay_scale='lr', or another wd_form")
        if group["warmup_init"] and not group["relative_step"]:
            raise ValueError("Invalid warmup_init: True requires relative_step=True")

    def _import_state_dict(self, state_dict: dict) -> dict:
        """torch.optim's and transformers' Adafactor state dicts load (`convert_state_dict`)."""
        return convert_state_dict(state_dict, "optimlab") \
            if state_dict_format(state_dict) != "optimlab" else state_dict

    def _state_dtype(self, p: torch.Tensor, group: dict) -> torch.dtype:
        return torch.float32 if group["upcast"] and p.dtype in _LOW_PRECISION else p.dtype

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        dtype = self._state_dtype(p, group)
        state: dict = {"step": 0}
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype,
                                                memory_format=torch.preserve_format)
        if p.dim() >= 2 and group.get("factored", True):   # n + m numbers per matrix
            # (on a DTensor's mesh, sharded as the parameter's rows resp. columns are)
            state["exp_avg_sq_row"] = _shards.reduced_zeros(p, -1, dtype)
            state["exp_avg_sq_col"] = _shards.reduced_zeros(p, -2, dtype)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype,
                                                   memory_format=torch.preserve_format)
        return state

    def _scalars(self, hp: AdafactorHyper, params, states, group_index: int = 0):
        cache: dict = {}
        out = []
        for p, st in zip(params, states):
            key = (st["step"], p.shape, "exp_avg_sq_row" in st)
            s = cache.get(key)
            if s is None:
                s = cache[key] = (key, adafactor_step(hp, st["step"] + 1, tuple(p.shape),
                                                      key[2], group_index))
            out.append(s)
        return out

    def _update_group(self, group: dict, params: list[torch.Tensor]) -> None:
        if not any(_shards.is_dtensor(p) for p in params):
            super()._update_group(group, params)
            return
        # DTensors: the reference kernel, whose reductions all-reduce across the shards; no
        # fused or multi-tensor kernel can, as its passes need collectives between them
        if self.impl == "fused":
            raise RuntimeError("Adafactor(impl='fused'): DTensor parameters need collectives "
                               "between the kernel's passes (the factored statistics and RMS "
                               "values span shards); use impl='auto'")
        hp, decay = self._kernel_decay(self.Hyper.of(group, params))
        states = self._group_states(group, params)
        self._around(decay, params, states, lambda: self._reference(
            hp, params, [p.grad for p in params], states, self._scalars(hp, params, states)))

    def _foreach(self, hp: AdafactorHyper, params, grads, states, scalars) -> None:
        live = [i for i, p in enumerate(params) if p.numel() > 0]
        if live:
            ps, sts = [params[i] for i in live], [states[i] for i in live]
            gs = [grads[i] for i in live]
            st0 = sts[0]
            dtype = st0["exp_avg_sq_row" if "exp_avg_sq_row" in st0 else "exp_avg_sq"].dtype
            works = [p if dtype == p.dtype else p.to(dtype) for p in ps]
            gs = TensorList([g.to(dtype) for g in gs])
            gs = hp.decay.grad(TensorList(works), signed(gs, hp.maximize)).ts
            adafactor_update_foreach(
                works, gs, [s.get("exp_avg") for s in sts],
                [s.get("exp_avg_sq_row") for s in sts], [s.get("exp_avg_sq_col") for s in sts],
                [s.get("exp_avg_sq") for s in sts], hp, [scalars[i][1] for i in live])
            for p, w in zip(ps, works):
                if w is not p:
                    p.copy_(w)
        for st in states:
            st["step"] += 1
        self._used.add("foreach")

    def _checked_step(self, work) -> bool | None:
        """The whole step (every group) in one call of the fused kernel, which runs pass 1 of
        every tensor before it writes anything and finds non-finite gradients on the way."""
        if self.impl not in ("auto", "fused") or not _ext.available() or \
                any(_shards.is_dtensor(p) for _, params in work for p in params) or \
                any(group["wd_form"] == "compensated" for group, _ in work):
            return None
        live = [(group, params) for group, params in work if params]
        fresh, hps, rows, parts, keys = [], [], [], [], set()
        ran = False
        try:
            for gi, (group, params) in enumerate(live):
                hp = self.Hyper.of(group, params)
                states = self._group_states(group, params, fresh)
                scalars = self._scalars(hp, params, states, gi)
                # factored and unfactored tensors are buckets of their own (their state keys
                # differ); the kernel takes them all in one call of one dtype combination
                grads = [p.grad for p in params]
                for key, idx in _gate.buckets(params, grads, states):
                    if self._cpu_refusal(key) is not None:
                        return None
                    keys.add((key.param_dtype, key.grad_dtype, key.state_dtype(self.fused.state)))
                    pick = (lambda xs: xs) if idx is None else (lambda xs: [xs[i] for i in idx])
                    rows.extend(self._fused_rows(pick(params), pick(grads), pick(states),
                                                 pick(scalars), key))
                hps.append(hp)
                parts.append((params, states))
            if len(keys) != 1:
                return None
            rc = _ext.run(self.fused, hps, rows, self._call(key, groups=len(hps),
                                                            check_finite=True))
            if rc == _ext.Rc.OVERLAP:
                return None
            ran = rc == _ext.Rc.OK
        finally:
            if not ran:                          # not run, or skipped: as before the step
                for p, known in fresh:           # (no state, or an empty one)
                    if known:
                        self.state[p].clear()
                    else:
                        del self.state[p]
        if not ran:                              # a gradient held inf or NaN
            return False
        for params, states in parts:
            for st in states:
                st["step"] += 1
            increment_version(params)
        self._used.add("fused-cpu")
        return True
