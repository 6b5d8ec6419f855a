r"""SAM and ASAM around any optimizer, and the accumulation step that feeds both passes right.

Sharpness-Aware Minimization (Foret et al., 2021, Algorithm 1) minimizes
max_{||e||_2 <= rho} L(w + e), the inner maximum approximated by one normalized ascent step.
For each update, with g = grad L(w) the gradient of the loss over the *whole* batch:

    e(w) = rho * g / ||g||_2                  the norm over all parameters of all groups at once
    w   <- base_step(w, grad L(w + e(w)))     the gradient taken at the perturbed point, applied
                                              by the base optimizer to the original w

ASAM (Kwon et al., 2021) makes the neighbourhood scale-invariant with the elementwise operator
T_w = |w| + eta (``eta``; 0.01 in the paper and in SamsungLabs/ASAM):

    e(w) = rho * T_w^2 g / ||T_w g||_2        (SAM is T_w = 1)

ASAM wants a larger rho than SAM (SamsungLabs/ASAM defaults to rho = 0.5; SAM's usual is 0.05).

Each update therefore takes two forward/backward passes.  `SAM` offers them as
``first_step()`` (w <- w + e(w), w saved) and ``second_step()`` (w restored, base step with the
gradient now in ``.grad``), or as ``step(closure)``, which calls the closure twice.
`accumulate_and_step` runs both passes over a list of micro-batches (seed 004's bug was a
second pass that replayed only the last one) and is the same call for a plain optimizer.

Choices and departures, named:

* **Per-group rho, adaptive and eta** (as davda54/sam): each group scales its own part,
  e_i = rho_group * T_i^2 g_i / N, but N = ||T g||_2 is one norm over every group.
* **T_w on every parameter of an adaptive group.**  SamsungLabs/ASAM applies T_w only to
  parameters whose name contains "weight" (T = 1 for biases); to do the same, put the biases in
  a group with ``adaptive=False``.  davda54/sam's ASAM is ``eta=0`` (T_w = |w|).
* **||g|| = 0 gives e = 0** (no perturbation) instead of adding 1e-12 (davda54/sam) or 1e-16
  (SamsungLabs/ASAM) to the denominator; otherwise the formula is exact.
* The norm is accumulated in float32 (float64 when a parameter is float64) whatever the
  parameter dtype; e is formed in that precision and added to w in w's dtype.
* **w is restored by copying the saved w**, not by w - e: exact, so SAM with rho = 0 is
  bit-identical to its base optimizer.
* The ascent uses the loss gradient only: the base optimizer's weight decay (L2 or decoupled)
  acts in the base step, never in e(w) (as davda54/sam and SamsungLabs/ASAM).
* **Gradient clipping** (``max_grad_norm``): the helper clips the *second-pass* gradient, the one
  the base optimizer applies, just before the base step.  The first-pass gradient is not
  clipped: global-norm clipping multiplies g by a scalar c > 0 and e(w) is invariant to that
  (rho*c*g / ||c*g|| = e), so clipping it, as seed 004's loop does, changes nothing except that
  it turns an inf into NaN; ``first_step`` reports non-finite gradients itself.  In the
  two-call form, clip between the second backward and ``second_step()``.
* **BatchNorm running statistics** are restored after the second pass by the helper
  (``second_pass_updates_bn=False``), so each update counts its batch once, at w.  davda54/sam's
  example does the same by zeroing the momentum in the second pass.
* A state dict cannot be taken between ``first_step`` and ``second_step`` (the model is at
  w + e(w) then): that raises RuntimeError.  ``restore()`` undoes a ``first_step``.

Non-finite gradients follow optimlab's ``nonfinite`` policy (see `optimlab._optimizer.Optimizer`):
with ``"skip"`` (default), an inf/NaN first-pass gradient norm skips the update before anything
moves, and an inf/NaN second-pass gradient restores w and skips the base step; each issues a
RuntimeWarning and counts in ``skipped_steps``; ``"raise"`` raises FloatingPointError (after
restoring w); ``"ignore"`` checks nothing.  ``step(closure)`` does not run the second closure
when the first step was skipped.

DistributedDataParallel (``perturbation=``):

* ``"global"`` (default): both passes are all-reduced as usual, so e(w) comes from the global
  gradient and every replica computes the same e.  A DDP run equals a single-process run on the
  global batch.  With micro-batches, run all but the last backward of *each* pass under
  ``model.no_sync()``.
* ``"local"``: each replica perturbs with its own gradient (Foret et al.'s m-sharpness, m =
  the per-replica batch), which saves the first all-reduce.  The *first* pass runs entirely
  under ``model.no_sync()``; the second pass is all-reduced as usual, so every replica applies
  the same averaged gradient and the replicas stay identical.  Wrapping only the second pass in
  ``no_sync`` (a common mistake in public SAM code) perturbs with the global gradient and then
  updates each replica with its own gradient: the replicas drift apart.  In this mode
  ``first_step`` agrees the non-finite verdict across ranks (one all-reduce of a flag), so all
  ranks skip together.  ``step(closure)`` cannot insert ``no_sync`` for you: use the helper or
  the two-call form.

FSDP2 and other DTensor parameters: the gradient norm N is the only quantity that spans
shards.  Each rank sums the squares of its shards' T_w g, and one all-reduce (one number per
set of parameters sharded alike, usually one) over the mesh dimensions that shard them gives
every rank the global N; w is saved and perturbed shard by shard, with no other
communication.  An FSDP2 run equals a single-process run on the global batch.
``perturbation="local"`` is refused there: FSDP2 reduce-scatters every gradient into shards
and keeps no whole per-replica gradient to perturb with.

Mixed precision.  Under ``torch.autocast`` nothing changes (the gradients are in the
parameters' dtype).  With a ``torch.amp.GradScaler`` the order is, per update (the helper does
exactly this; ``step(closure)`` does not support a scaler):

    1. for each micro-batch: scaler.scale(weight_i * loss_i).backward()
    2. scaler.unscale_(sam)                     true gradients before ||g|| is taken
    3. inf/NaN?  zero the grads, scaler.update() (it backs off), stop: w never moved
    4. sam.first_step(zero_grad=True)           w <- w + e(w)
    5. for each micro-batch: scaler.scale(weight_i * loss_i).backward()   (same scale)
    6. scaler.unscale_(sam.base_optimizer)      a scaler unscales each optimizer once per
                                                update(), so the second pass uses the base's key
    7. inf/NaN?  sam.restore(), zero the grads, scaler.update(), stop: w is back, no step
    8. clip_grad_norm_(params, max_grad_norm)   on the unscaled second-pass gradient
    9. sam.second_step()                        restore w, base step
   10. scaler.update()                          once per update; either pass's inf backs it off
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from . import _shards
from ._common import NONFINITE_POLICIES
from ._optimizer import Optimizer as _OptimlabOptimizer
from ._common import all_finite, check_choice, check_range, report_nonfinite

__all__ = ["SAM", "accumulate_and_step", "find_sam", "sam_grad_norm", "sam_perturbation",
           "PERTURBATIONS", "ASAM_ETA"]

PERTURBATIONS = ("global", "local")
ASAM_ETA = 0.01          # Kwon et al.'s eta in T_w = |w| + eta


# --------------------------------------------------------------------------- the math
def _acc_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def sam_grad_norm(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  adaptive: Sequence[bool], eta: Sequence[float]) -> torch.Tensor:
    """N = ||T_w g||_2 over all the given tensors (T_w = |w| + eta where adaptive, else 1):
    a 0-dim float32 tensor (float64 if any parameter is float64) on the first tensor's device,
    a plain tensor even for DTensor parameters: their shards' squared norms are summed and
    all-reduced over the mesh dimensions that shard them, one all-reduce per set of
    parameters sharded alike."""
    dtype = _acc_dtype(params)
    lps, lgs, _ = _shards.local_views(params, grads, [{} for _ in params])
    device = lgs[0].device
    norms = []
    sharded: dict = {}                  # (mesh, sharding mesh dims) -> local sum of squares
    for p, lp, g, a, e in zip(params, lps, lgs, adaptive, eta):
        x = g.to(dtype)
        if a:
            x = x * lp.detach().to(dtype).abs().add_(e)
        if _shards.is_dtensor(p):
            key = (p.device_mesh, tuple(_shards.sharding_dims(p)))
            sq = torch.linalg.vector_norm(x, 2).square().reshape(1)
            sharded[key] = sq if key not in sharded else sharded[key] + sq
        else:
            norms.append(torch.linalg.vector_norm(x, 2).to(device))
    for (mesh, dims), sq in sharded.items():
        norms.append(_shards.all_reduce_sum(sq, mesh, dims).sqrt().reshape(()).to(device))
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def sam_perturbation(p: torch.Tensor, g: torch.Tensor, norm: torch.Tensor, *, rho: float,
                     adaptive: bool, eta: float) -> torch.Tensor:
    """e = rho * T_w^2 g / N for one tensor (T_w = 1 unless adaptive); e = 0 when N = 0.
    Returned in the parameter's dtype."""
    dtype = norm.dtype
    e = g.to(dtype)
    if adaptive:
        t = p.detach().to(dtype).abs().add_(eta)
        e = e * t * t
    norm = norm.to(p.device)
    scale = torch.where(norm > 0, rho / norm, torch.zeros_like(norm))
    return (e * scale).to(p.dtype)


# --------------------------------------------------------------------------- the optimizer
class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization (``adaptive=False``) or ASAM (``adaptive=True``) around a
    base optimizer (see the module docstring for the math, the departures, DDP and AMP).

    Args:
        params: parameters or parameter groups; a group may override ``rho``, ``adaptive``,
            ``eta`` and any of the base optimizer's hyper-parameters.
        base_optimizer: an optimizer *class* (``optimlab.AdamW``, ``torch.optim.SGD``, ...);
            it is built as ``base_optimizer(groups, **base_kwargs)`` on the same groups.
        rho: neighbourhood radius, >= 0 (0 is exactly the base optimizer).
        adaptive: ASAM's T_w = |w| + eta instead of T_w = 1.
        eta: ASAM's offset, >= 0 (default 0.01, Kwon et al.).
        perturbation: ``"global"`` (default) or ``"local"``: from which gradient e is taken under
            DDP (see the module docstring); the helper runs the passes accordingly.
        process_group: the group over which ``"local"`` agrees on skipping (default: world).
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"``; also passed to an optimlab base.
        **base_kwargs: the base optimizer's arguments (lr, betas, weight_decay, ...).

    ``param_groups`` and ``state`` *are* the base optimizer's (the same objects), so an lr
    scheduler built on the SAM object or on ``sam.base_optimizer`` drives the same lr, and
    ``sam.state[p]`` holds the base optimizer's moments.  ``state_dict()`` is
    ``{"base_optimizer": base.state_dict(), "sam": {"version": 1, "skipped_steps": n}}``;
    ``load_state_dict`` takes that or a plain base-optimizer state dict (to turn SAM on in the
    middle of a run).

    Example:
        >>> opt = optimlab.SAM(model.parameters(), optimlab.AdamW, rho=0.05, lr=1e-3)
        >>> loss_fn(model, batch).backward()
        >>> opt.first_step(zero_grad=True)          # w -> w + e(w)
        >>> loss_fn(model, batch).backward()
        >>> opt.second_step(zero_grad=True)         # back to w, AdamW step with grad L(w + e)
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, *,
                 eta: float = ASAM_ETA, perturbation: str = "global", process_group=None,
                 nonfinite: str = "skip", **base_kwargs):
        if not (isinstance(base_optimizer, type)
                and issubclass(base_optimizer, torch.optim.Optimizer)):
            what = (f"an instance of {type(base_optimizer).__name__}"
                    if isinstance(base_optimizer, torch.optim.Optimizer) else repr(base_optimizer))
            raise TypeError(f"Invalid base_optimizer: {what}; expected an optimizer class (a "
                            "torch.optim.Optimizer subclass such as optimlab.AdamW or "
                            "torch.optim.SGD), which SAM builds on its own parameter groups")
        if issubclass(base_optimizer, SAM):
            raise TypeError("Invalid base_optimizer: SAM cannot wrap SAM")
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.perturbation = check_choice("perturbation", perturbation, PERTURBATIONS)
        self.process_group = process_group
        self.skipped_steps = 0
        self._saved_w: dict[torch.Tensor, torch.Tensor] | None = None   # between the steps
        self._first_skipped = False       # the last first_step() skipped its update
        self._w_buffers: dict[torch.Tensor, torch.Tensor] = {}   # where first_step saves w
        sam_defaults = dict(rho=rho, adaptive=bool(adaptive), eta=eta)
        self._check_group(sam_defaults)
        self._sam_defaults = sam_defaults
        super().__init__(params, sam_defaults)            # groups get rho/adaptive/eta
        if issubclass(base_optimizer, _OptimlabOptimizer):
            base_kwargs.setdefault("nonfinite", nonfinite)
        # the base optimizer adopts the very same group dicts; from here on `param_groups` and
        # `state` are the base's (see the properties below)
        self.base_optimizer = base_optimizer(self.__dict__.pop("_own_param_groups"), **base_kwargs)
        self.__dict__.pop("_own_state", None)
        self.defaults = {**self.base_optimizer.defaults, **sam_defaults}

    # --- shared groups and state ------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        base = self.__dict__.get("base_optimizer")
        return base.param_groups if base is not None else self.__dict__["_own_param_groups"]

    @param_groups.setter
    def param_groups(self, value) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.param_groups = value
        else:
            self.__dict__["_own_param_groups"] = value

    @property
    def state(self):
        base = self.__dict__.get("base_optimizer")
        return base.state if base is not None else self.__dict__["_own_state"]

    @state.setter
    def state(self, value) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.state = value
        else:
            self.__dict__["_own_state"] = value

    def __getstate__(self) -> dict:              # copy/pickle keep the base optimizer
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def _check_group(self, group: dict) -> None:
        check_range("rho", group["rho"], 0.0)
        check_range("eta", group["eta"], 0.0)
        if not isinstance(group["adaptive"], bool):
            raise ValueError(f"Invalid adaptive: {group['adaptive']!r}; expected True or False")

    def add_param_group(self, param_group: dict) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:                           # during __init__: SAM's own list
            super().add_param_group(param_group)
            self._check_group(self.param_groups[-1])
            return
        for key, value in self._sam_defaults.items():
            param_group.setdefault(key, value)
        self._check_group(param_group)
        base.add_param_group(param_group)          # appends to the shared list

    # --- the two steps -----------------------------------------------------------------------
    @property
    def perturbed(self) -> bool:
        """True between ``first_step`` and ``second_step``/``restore``: the model is at w + e."""
        return self._saved_w is not None

    def _any_rank(self, flag: bool, device: torch.device) -> bool:
        """With ``perturbation="local"`` under torch.distributed, True if ``flag`` is True on
        any rank (one all-reduce); otherwise ``flag``."""
        if self.perturbation != "local":
            return flag
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or \
                dist.get_world_size(self.process_group) == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(t.item())

    def _nonfinite(self, what: str) -> None:
        report_nonfinite(self, f"SAM: the {what} holds inf or NaN", stacklevel=3)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Save w and move to w + e(w) using the gradients in ``.grad`` (the whole batch's).

        Returns True, or False when the update was skipped for a non-finite gradient norm
        (nothing moved; call neither the second pass nor ``second_step``)."""
        if self._saved_w is not None:
            raise RuntimeError("SAM.first_step() called twice: the parameters are already at "
                               "w + e(w); call second_step() (or restore()) first")
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SAM does not support sparse gradients")
                work.append((p, group))
        if work:
            norm = sam_grad_norm([p for p, _ in work], [p.grad for p, _ in work],
                                 [g["adaptive"] for _, g in work], [g["eta"] for _, g in work])
            if self.nonfinite != "ignore" and \
                    self._any_rank(not bool(torch.isfinite(norm)), norm.device):
                self._nonfinite("first-pass gradient norm")
                if zero_grad:
                    self.zero_grad()
                self._first_skipped = True
                return False
        self._first_skipped = False
        saved = {}
        n = None
        # (a DTensor is saved and perturbed on its local shard)
        lps, lgs, _ = _shards.local_views([p for p, _ in work], [p.grad for p, _ in work],
                                          [{} for _ in work])
        for (p, group), lp, lg in zip(work, lps, lgs):
            # w is saved into a buffer kept from step to step (one copy of the parameters, the
            # memory SAM needs anyway): a fresh copy per update costs far more than the copy
            # itself (new pages are zeroed by the OS); see ``optimlab bench --optimizers sam``
            buf = self._w_buffers.get(p)
            if buf is None or buf.shape != lp.shape or buf.dtype != lp.dtype or \
                    buf.device != lp.device:
                buf = self._w_buffers[p] = torch.empty_like(lp,
                                                            memory_format=torch.preserve_format)
            buf.copy_(lp)
            saved[p] = buf
            if not group["adaptive"] and lg.dtype == lp.dtype == norm.dtype:
                if n is None:
                    n = float(norm)
                # w + (rho / N) g in one pass, no temporary (rounds as torch's add with alpha)
                lp.add_(lg, alpha=group["rho"] / n if n > 0 else 0.0)
            else:
                lp.add_(sam_perturbation(lp, lg, norm, rho=group["rho"],
                                         adaptive=group["adaptive"], eta=group["eta"]))
        self._saved_w = saved
        if zero_grad:
            self.zero_grad()
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the w saved by ``first_step`` (no base step).  No-op when not perturbed."""
        if self._saved_w is None:
            return
        for p, w in self._saved_w.items():
            _shards.local(p).copy_(w)
        self._saved_w = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *,
                    grad_norm: float | torch.Tensor | None = None) -> bool:
        """Restore w and take the base optimizer's step with the gradient in ``.grad`` (taken
        at w + e(w)).  Returns True, or False when skipped for a non-finite gradient.

        ``grad_norm``: the second-pass gradients' total norm where the loop has it (what
        ``clip_grad_norm_`` returned); a finite norm proves them finite, so neither SAM nor an
        optimlab base optimizer reads them again to check.  Either way the gradients are
        checked once, by SAM, and an optimlab base optimizer is told so."""
        if self._saved_w is None:
            raise RuntimeError("SAM.second_step() called without first_step(): compute the "
                               "gradient at w, call first_step(), compute it again at w + e(w), "
                               "then call second_step()")
        finite = True
        proven = grad_norm is not None and math.isfinite(float(grad_norm))
        if self.nonfinite != "ignore" and not proven:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            finite = not grads or all_finite(grads)
        self.restore()
        if not finite:
            self._nonfinite("second-pass gradient")
            if zero_grad:
                self.zero_grad()
            return False
        if isinstance(self.base_optimizer, _OptimlabOptimizer) and (
                proven or self.nonfinite != "ignore"):
            # checked above: any finite number tells the base optimizer so (its grad_norm)
            self.base_optimizer.step(grad_norm=float(grad_norm) if proven else 0.0)
        else:
            self.base_optimizer.step()
        self._opt_called = True      # an lr scheduler built on SAM sees that a step happened
        if zero_grad:
            self.zero_grad()
        return True

    def step(self, closure: Callable[[], Any] | None = None):
        """One SAM update.  ``closure`` must zero the gradients, run the forward and backward
        pass and return the loss; it is called at w and again at w + e(w).  Returns the first
        (unperturbed) loss.

        Without a closure, after ``first_step()`` and the second backward: ``second_step()``,
        for loops that call ``step()`` once per update after their own backward passes (the
        Hugging Face Trainer, accelerate: `optimlab.integrations`); after a ``first_step()``
        that skipped the update (non-finite gradient), nothing."""
        if closure is None:
            if self._saved_w is not None:
                self.second_step()
                return None
            if self._first_skipped:
                self._first_skipped = False
                return None
            raise RuntimeError(
                "SAM.step() needs a closure (zero_grad + forward + backward, returning the loss); "
                "it is called twice, at w and at w + e(w).  Without a closure, call "
                "first_step() and second_step() (or step()) around your own second "
                "forward/backward, or use optimlab.accumulate_and_step")
        closure = torch.enable_grad()(closure)
        loss = closure()
        if self.first_step(zero_grad=True):
            closure()
            self.second_step()
        return loss

    # --- state dict --------------------------------------------------------------------------
    def _check_not_perturbed(self, what: str) -> None:
        if self._saved_w is not None:
            raise RuntimeError(f"SAM.{what} called between first_step() and second_step(): the "
                               "parameters are at the perturbed point w + e(w); call "
                               "second_step() (or restore()) first")

    def state_dict(self) -> dict:
        self._check_not_perturbed("state_dict()")
        return {"base_optimizer": self.base_optimizer.state_dict(),
                "sam": {"version": 1, "skipped_steps": self.skipped_steps}}

    def load_state_dict(self, state_dict: dict) -> None:
        self._check_not_perturbed("load_state_dict()")
        if "base_optimizer" in state_dict:
            base_sd, extra = state_dict["base_optimizer"], state_dict.get("sam", {})
        elif "state" in state_dict and "param_groups" in state_dict:
            base_sd, extra = state_dict, {}      # a plain base-optimizer checkpoint
        else:
            raise ValueError("not a SAM state_dict (expected the keys 'base_optimizer' and "
                             "'sam') nor an optimizer state_dict ('state', 'param_groups')")
        self.base_optimizer.load_state_dict(base_sd)
        for group in self.param_groups:          # a plain base checkpoint has no rho/adaptive/eta
            for key, value in self._sam_defaults.items():
                group.setdefault(key, value)
            self._check_group(group)
        self.skipped_steps = int(extra.get("skipped_steps", 0))

    def __repr__(self) -> str:
        return f"SAM(perturbation={self.perturbation!r}, base_optimizer={self.base_optimizer!r})"


# --------------------------------------------------------------------------- accumulation
def _batch_size(batch: Any) -> int:
    """Examples in a micro-batch: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, Mapping) else \
        batch if isinstance(batch, (tuple, list)) else None
    if values is not None:
        for v in values:
            if isinstance(v, (torch.Tensor, Mapping, tuple, list)):
                try:
                    return _batch_size(v)
                except TypeError:
                    continue
    raise TypeError(f"cannot tell how many examples a micro-batch of type "
                    f"{type(batch).__name__} holds; pass sizes=[...]")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class _DataParallel(NamedTuple):
    """How the engine that wraps a model averages gradients over its replicas."""
    engine: str                                       # "ddp", "fsdp" or "fsdp2"
    world: float                                      # the gradient is divided by this
    sum: Callable[[torch.Tensor], None]               # all-reduce (sum) over those replicas
    no_sync: Callable[[], contextlib.AbstractContextManager]   # a backward without the reduce


def _data_parallel(model: torch.nn.Module) -> _DataParallel | None:
    """The data-parallel engine around ``model``: DistributedDataParallel (its process group),
    FSDP2 (``fully_shard``: the mesh it was given, HSDP's two dimensions included, or its
    ``set_gradient_divide_factor``) or FSDP1; None for a plain model or one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed import fsdp
    for engine, cls in (("ddp", torch.nn.parallel.DistributedDataParallel),
                        ("fsdp", fsdp.FullyShardedDataParallel)):
        if isinstance(model, cls):          # both average over their process group
            group = model.process_group
            return _DataParallel(engine, dist.get_world_size(group),
                                 lambda t: dist.all_reduce(t, group=group), model.no_sync)
    if isinstance(model, getattr(fsdp, "FSDPModule", ())):
        groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules()
                  if isinstance(m, fsdp.FSDPModule)]
        groups = [g for g in groups if g is not None]
        if not groups:
            return None
        mesh = groups[0].mesh_info.mesh              # the mesh given to fully_shard
        factor = groups[0].gradient_divide_factor

        def mesh_sum(t: torch.Tensor) -> None:
            for d in range(mesh.ndim):
                dist.all_reduce(t, group=mesh.get_group(d))

        @contextlib.contextmanager
        def no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return _DataParallel("fsdp2", factor if factor is not None else mesh.size(), mesh_sum,
                             no_sync)
    return None


@contextlib.contextmanager
def _keep_running_stats(model: torch.nn.Module):
    """Restore BatchNorm-style running statistics (running_mean/var, num_batches_tracked)."""
    saved = []
    for m in model.modules():
        if getattr(m, "track_running_stats", False) and m.training:
            saved.extend((b, b.detach().clone()) for b in
                         (getattr(m, "running_mean", None), getattr(m, "running_var", None),
                          getattr(m, "num_batches_tracked", None)) if b is not None)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _autocast_context(autocast, model) -> Callable[[], Any]:
    if autocast is None:
        return contextlib.nullcontext
    if isinstance(autocast, torch.dtype):
        device_type = next(model.parameters()).device.type
        return lambda: torch.autocast(device_type=device_type, dtype=autocast)
    if callable(autocast):
        return autocast
    raise TypeError(f"Invalid autocast: {autocast!r}; expected None, a dtype (e.g. "
                    "torch.bfloat16) or a callable returning a context manager")


def _one_pass(model, batches, loss_fn, weights, sizes, autocast_ctx, scaler, sync_ctx,
              sync_last: bool) -> torch.Tensor:
    """Forward/backward over every micro-batch, gradients accumulated with ``weights``;
    returns sum_i size_i * loss_i (detached)."""
    total = None
    last = len(batches) - 1
    for i, (batch, w, n) in enumerate(zip(batches, weights, sizes)):
        quiet = sync_ctx is not None and (i < last or not sync_last)
        with (sync_ctx() if quiet else contextlib.nullcontext()):
            with autocast_ctx():
                loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise ValueError("loss_fn(model, micro_batch) must return a scalar tensor: the "
                                 "mean loss over the micro-batch's examples")
            scaled = loss.float() * w
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        contrib = loss.detach().float() * n
        total = contrib if total is None else total + contrib
    return total


def _sync_found_inf(scaler, optimizer, group) -> None:
    """Under ``perturbation="local"`` the first-pass gradients are per replica, so the scaler's
    inf verdicts may differ: make every rank's scaler see the union (else the loss scales of
    the replicas drift apart).  Uses GradScaler's per-optimizer record."""
    for found in scaler._found_inf_per_device(optimizer).values():
        torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX, group=group)


def find_sam(optimizer: Any) -> "SAM | None":
    """The `SAM` in ``optimizer``, or None: itself, or the one a trainer's wrapper holds as
    ``.optimizer`` (accelerate's ``AcceleratedOptimizer``; Lightning's ``LightningOptimizer``,
    which passes ``isinstance(w, SAM)`` without holding SAM's state)."""
    for _ in range(8):                       # wrappers of wrappers, never a cycle
        if optimizer is None:
            return None
        if isinstance(optimizer, SAM) and "base_optimizer" in vars(optimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def accumulate_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        micro_batches: Sequence[Any],
                        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], *,
                        max_grad_norm: float | None = None, sizes: Sequence[int] | None = None,
                        autocast=None, scaler=None, no_sync: bool | None = None,
                        second_pass_updates_bn: bool = False) -> float:
    """One optimizer update over ``micro_batches``, for a `SAM` or any other optimizer.

    ``loss_fn(model, micro_batch)`` returns the *mean* loss over the micro-batch.  Micro-batch i
    of n_i examples is weighted by n_i / N (N = sum n_i), so k micro-batches give exactly the
    gradient of one concatenated batch, whatever their sizes.  n_i is the leading dimension of
    the micro-batch's first tensor (tensor, tuple/list or dict), or ``sizes[i]`` (e.g. token
    counts for a per-token mean).

    With a `SAM` optimizer both passes run over *all* micro-batches (not just the last: seed
    004's bug): pass 1 at w, ``first_step``, pass 2 at w + e(w), clipping, ``second_step``.
    With any other optimizer: one pass, clipping, ``step``.  Gradients are zeroed first.  A
    SAM inside a trainer's wrapper (accelerate's ``AcceleratedOptimizer``: `find_sam`) is
    driven directly.

    Args:
        max_grad_norm: clip the gradient the optimizer applies (SAM: the second-pass gradient)
            to this global 2-norm just before the step; None: no clipping.
        sizes: examples (or tokens) per micro-batch, overriding the inferred sizes.
        autocast: None, a dtype (``torch.autocast(model's device type, dtype)`` around each
            forward and loss), or a callable returning a context manager.
        scaler: a ``torch.amp.GradScaler``: losses are scaled, gradients unscaled before the
            norm, clipping and step; a non-finite pass skips the whole update (w restored) and
            the scaler backs off; ``scaler.update()`` is called once.  See the AMP order in
            `optimlab.sam`.
        no_sync: run all but the last backward of each all-reduced pass without the
            gradient reduction (``model.no_sync()``; FSDP2: ``set_requires_gradient_sync``),
            and the whole first pass, for ``perturbation="local"``.  None (default): under
            DDP, FSDP and FSDP2, or when the model has ``no_sync``.
        second_pass_updates_bn: keep the BatchNorm running statistics updated by SAM's second
            pass (default False: they are restored to their values after the first pass).

    Under DDP, FSDP and FSDP2 (``fully_shard``), which average the gradient over the replicas,
    N is summed over them (one all-reduce of a count), so replicas holding different numbers
    of examples still give the global-batch mean gradient.  Under FSDP every rank must pass
    the same number of micro-batches (each forward gathers the weights from every rank).

    Returns:
        The mean loss of the first pass (at w) over this process's examples, as a float.
    """
    batches = list(micro_batches)
    if not batches:
        raise ValueError("micro_batches is empty")
    if sizes is None:
        sizes = [_batch_size(b) for b in batches]
    else:
        sizes = [int(s) for s in sizes]
        if len(sizes) != len(batches):
            raise ValueError(f"sizes has {len(sizes)} entries for {len(batches)} micro-batches")
    if any(s <= 0 for s in sizes):
        raise ValueError(f"Invalid sizes: {sizes}; every micro-batch needs >= 1 example")
    if max_grad_norm is not None:
        check_range("max_grad_norm", max_grad_norm, 0.0, low_open=True)
    local_total = sum(sizes)
    optimizer = find_sam(optimizer) or optimizer
    is_sam = isinstance(optimizer, SAM)
    local = is_sam and optimizer.perturbation == "local"
    dp = _data_parallel(model)
    if dp is not None:       # the engine averages over replicas: weight by world / N_global
        count = torch.tensor([float(local_total)], device=_device(model))
        dp.sum(count)
        weights = [n * dp.world / count.item() for n in sizes]
    else:
        weights = [n / local_total for n in sizes]
    if local and dp is not None and dp.engine == "fsdp2":
        raise ValueError("SAM perturbation='local' perturbs each replica with its own whole "
                         "gradient, which FSDP2 does not keep (it reduce-scatters gradients into "
                         "shards): use perturbation='global' with fully_shard")
    use_no_sync = (dp is not None or hasattr(model, "no_sync")) if no_sync is None \
        else bool(no_sync)
    if use_no_sync and dp is None and not hasattr(model, "no_sync"):
        raise ValueError(f"no_sync=True: {type(model).__name__} has no no_sync(); it is for "
                         f"DistributedDataParallel and FSDP models")
    sync_ctx = (dp.no_sync if dp is not None else model.no_sync) if use_no_sync else None
    autocast_ctx = _autocast_context(autocast, model)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def clip():
        if max_grad_norm is not None:
            return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                                  max_grad_norm)
        return None

    def finite() -> bool:
        grads = [p.grad for p in params if p.grad is not None]
        return not grads or all_finite(grads)

    optimizer.zero_grad(set_to_none=True)
    total = _one_pass(model, batches, loss_fn, weights, sizes, autocast_ctx, scaler, sync_ctx,
                      sync_last=not local)
    mean_loss = total.item() / local_total

    if not is_sam:
        if scaler is not None:
            scaler.unscale_(optimizer)
            clip()
            scaler.step(optimizer)            # skips the step if unscale_ found inf/NaN
            scaler.update()
        else:
            norm = clip()
            if norm is not None and isinstance(optimizer, _OptimlabOptimizer):
                optimizer.step(grad_norm=norm)    # the clip read the gradients already
            else:
                optimizer.step()
        return mean_loss

    # ---- SAM: first pass done; perturb
    if scaler is not None:
        scaler.unscale_(optimizer)
        ok = finite()
        if local and dp is not None:
            ok = not optimizer._any_rank(not ok, _device(model))
            _sync_found_inf(scaler, optimizer, model.process_group)
        if not ok:                            # the scaler's business: skip quietly, back off
            optimizer.zero_grad(set_to_none=True)
            scaler.update()
            return mean_loss
    if not optimizer.first_step(zero_grad=True):
        if scaler is not None:
            scaler.update()
        return mean_loss
    # ---- second pass at w + e(w), over every micro-batch again
    try:
        bn = contextlib.nullcontext() if second_pass_updates_bn else _keep_running_stats(model)
        with bn:
            _one_pass(model, batches, loss_fn, weights, sizes, autocast_ctx, scaler, sync_ctx,
                      sync_last=True)
        if scaler is not None:
            scaler.unscale_(optimizer.base_optimizer)
            if not finite():
                optimizer.restore()
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                return mean_loss
        optimizer.second_step(grad_norm=clip())
    finally:
        optimizer.restore()                   # no-op after second_step; undoes w + e on errors
    if scaler is not None:
        scaler.update()
    return mean_loss
