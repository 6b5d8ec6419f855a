"""What every optimlab optimizer shares, defined once.

* **Argument checks** that name the argument and its valid range (`check_range`, `check_choice`).
* **The weight-decay vocabulary.**  "Weight decay" means three different things in the
  literature and in the libraries people migrate from.  Every optimizer that decays weights
  takes ``weight_decay`` (lambda) and ``wd_mode``, one of:

  ==============  ==========================================  =====================================
  ``wd_mode``     update, with eta_t = the group's current lr  where it comes from
  ==============  ==========================================  =====================================
  ``l2``          g <- g + lambda * theta  (before the moments)  torch's ``weight_decay`` in SGD,
                                                               Adagrad, RMSprop, Adam
  ``decoupled``   theta <- theta - eta_t * lambda * theta      torch.optim.AdamW: the decay is
                                                               coupled to the lr you pick
  ``independent`` theta <- theta - (eta_t / eta_0) * lambda *   Loshchilov & Hutter's intent,
                  theta                                        Composer's DecoupledAdamW/SGDW
  ==============  ==========================================  =====================================

  eta_0 is the group's ``initial_lr``: its lr when the optimizer was built, stored in the group
  as torch's lr schedulers do (they keep an existing ``initial_lr``).  With ``independent``
  decay a schedule multiplier scales the decay but the peak lr does not, so lambda is usually
  ~1e-5 where ``decoupled`` uses ~1e-2.  When eta_0 is 0 the multiplier is taken as 1 (Composer).

  Decoupled and independent decay shrink theta_{t-1}, *before* the gradient step (paper,
  torch, Composer), unless ``wd_after_update=True``, which shrinks the already-updated weights
  (the CS224N AdamW): theta <- (1 - eta_t * lambda) * (theta - step).

* **Epsilon placement** for the Adam family (``eps_placement``):
  ``"sqrt_v_hat"`` divides by sqrt(v_t / (1 - beta2^t)) + eps (PyTorch, the paper's Algorithm 1);
  ``"sqrt_v"`` divides by sqrt(v_t) + eps and folds the bias correction into the step size,
  lr * sqrt(1 - beta2^t) / (1 - beta1^t) (Kingma & Ba's "efficient version", TensorFlow's
  epsilon-hat).  They differ by a factor sqrt(1 - beta2^t) on eps, large in early steps.

* **The optimizer shell** (`Optimizer`): gathers the parameters that have gradients, enforces
  the non-finite-gradient policy, keeps ``initial_lr`` in each group, and loads state dicts
  with a documented dtype/device policy.  Subclasses supply `_init_state` and `_update_param`
  (the per-tensor reference kernel), `_foreach_update` (multi-tensor) and `_fused_update`.

* **The implementation** (``impl``, one option shared by every optimizer), torch.optim's three
  layers:

  ==============  ==========================================================================
  ``impl``        what runs
  ==============  ==========================================================================
  ``reference``   the readable per-tensor kernel (``adam_update``, ``sgd_update``, ...), one
                  tensor at a time: the ground truth the other two are tested against
  ``foreach``     multi-tensor ``torch._foreach_*`` kernels on each bucket of tensors that
                  share a device and dtypes (parameter, gradient and state dtypes)
  ``fused``       one fused kernel per bucket: optimlab's compiled CPU kernels (`optimlab._ext`,
                  one pass over memory per step) or, for the Adam family, torch's own
                  ``_fused_adam_``/``_fused_adamw_`` with transformed scalars (CPU and CUDA).
                  A bucket no fused kernel takes raises RuntimeError saying why.
  ``auto``        (default) ``fused`` where a fused kernel takes the bucket (torch's Adam
                  kernels only where they need no transformed scalars); else ``foreach``
                  on accelerators and ``reference`` on CPU, where torch's foreach kernels are
                  per-tensor loops themselves (and, in float16/bfloat16, round scalar operands
                  to the tensor dtype, unlike the per-tensor ops)
  ==============  ==========================================================================

  All three give the same parameters and state up to float rounding (tests/test_fast_paths.py
  states the tolerances); the state layout is the same, so a state dict saved under one
  implementation resumes under another.  ``optimizer.last_step_impls`` names the kernels the
  last step ran (``"reference"``, ``"foreach"``, ``"fused-cpu"``, ``"torch-fused"``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Callable

import torch

WD_MODES = ("l2", "decoupled", "independent")
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
    names the argument and the interval (NaN is never valid)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
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


def check_weight_decay(weight_decay: Any, wd_mode: Any,
                       modes: Sequence[str] = WD_MODES) -> tuple[float, str]:
    return check_range("weight_decay", weight_decay, 0.0), check_choice("wd_mode", wd_mode, modes)


# --------------------------------------------------------------------------- weight decay
def decay_multiplier(group: dict) -> float:
    """The factor f in theta <- theta - f * lambda * theta for decoupled/independent decay."""
    if group["wd_mode"] == "independent":
        initial_lr = group["initial_lr"]
        return group["lr"] / initial_lr if initial_lr else 1.0
    return group["lr"]


def grad_with_decay(p: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
    """The part of the update that comes before the optimizer's own math: maximize flips the
    gradient; ``l2`` adds lambda*theta to it; ``decoupled``/``independent`` (unless
    ``wd_after_update``) shrink theta_{t-1} in place.  Never writes into ``p.grad``."""
    if group.get("maximize", False):
        grad = -grad
    wd = group["weight_decay"]
    if wd != 0:
        if group["wd_mode"] == "l2":
            grad = grad.add(p, alpha=wd)
        elif not group.get("wd_after_update", False):
            p.mul_(1 - decay_multiplier(group) * wd)
    return grad


def decay_after_update(p: torch.Tensor, group: dict) -> None:
    """Decoupled/independent decay of the updated weights, for ``wd_after_update=True``:
    theta <- theta - f * lambda * theta, written as the CS224N reference writes it."""
    wd = group["weight_decay"]
    if wd != 0 and group["wd_mode"] != "l2" and group.get("wd_after_update", False):
        p.add_(p, alpha=-decay_multiplier(group) * wd)


# --------------------------------------------------------------------------- helpers
def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when no tensor holds inf or NaN.  One read of the tensors: on CPU by optimlab's
    kernel (a bit test of the exponent, all tensors in one parallel pass), else with one
    multi-tensor reduction per device and one sync."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for device, ts in by_device.items():
        if device.type == "cpu":
            from . import _ext
            ok = _ext.all_finite(ts)
            if ok is None:
                # the 2-norm is a fast vectorized reduction; it is finite only if every element
                # is, and may overflow for finite elements: then check exactly
                norms = torch._foreach_norm(ts, 2)
                ok = bool(torch.stack([n.float() for n in norms]).isfinite().all())
                if not ok:
                    ok = all(bool(torch.isfinite(t).all()) for t in ts)
            if not ok:
                return False
        else:
            norms = torch._foreach_norm(ts, float("inf"))
            if not bool(torch.stack([n.float() for n in norms]).isfinite().all()):
                return False
    return True


def report_nonfinite(owner: Any, msg: str, stacklevel: int) -> None:
    """Apply ``owner.nonfinite`` to a step that met inf or NaN (``msg`` says where): raise
    FloatingPointError for ``"raise"``, else count the skipped step and warn."""
    if owner.nonfinite == "raise":
        raise FloatingPointError(msg + " (nonfinite='raise')")
    owner.skipped_steps += 1
    warnings.warn(msg + "; the step was skipped (nonfinite='skip')", RuntimeWarning,
                  stacklevel=stacklevel + 1)


class NoFusedKernel(Exception):
    """Raised by `Optimizer._fused_update` when no fused kernel takes a bucket of tensors; the
    message says why.  ``impl="auto"`` then runs ``foreach``; ``impl="fused"`` re-raises it as
    a RuntimeError."""


def _flat(p: torch.Tensor, tensors) -> bool:
    """The gradient and the full-size state tensors lay out their elements as ``p`` does
    (all contiguous, or dense with equal strides): element-wise kernels may treat them as flat
    arrays."""
    if p.is_contiguous() and all(t.is_contiguous() for t in tensors):
        return True
    from ._ext import dense
    return dense(p) and all(dense(t, p) for t in tensors)


def uniform_contiguous(params: Sequence[torch.Tensor], states: Sequence[dict]) -> bool:
    """True when every parameter, gradient and state tensor is contiguous and the parameters
    share device and dtype and their states the same tensor keys and dtypes: then
    `bucket_tensors` would make one bucket of them all, and this says so at a third of its
    cost (a step spends it on every group)."""
    p0, s0 = params[0], states[0]
    dtype, device, n = p0.dtype, p0.device, len(s0)
    tensor = torch.Tensor
    sig = [(k, v.dtype) for k, v in s0.items() if isinstance(v, tensor)]
    for p, st in zip(params, states):
        g = p.grad
        if p.dtype is not dtype or g.dtype is not dtype or p.device != device or \
                len(st) != n or not p.is_contiguous() or not g.is_contiguous():
            return False
        for k, dt in sig:
            v = st.get(k)
            if v is None or v.dtype is not dt or not v.is_contiguous():
                return False
    return True


def bucket_tensors(params: Sequence[torch.Tensor], states: Sequence[dict]
                   ) -> dict[tuple, list[int]]:
    """Indices of ``params`` grouped by device, parameter and gradient dtype, the (key, dtype)
    of every tensor in the state, and whether the gradient and state are laid out as the
    parameter: the tensors one multi-tensor or fused kernel call can take together (so one
    oddly strided gradient does not keep its neighbours off the fused kernel)."""
    buckets: dict[tuple, list[int]] = {}
    tensor = torch.Tensor
    for i, (p, st) in enumerate(zip(params, states)):
        g = p.grad
        shape = p.shape
        skey = []
        full = [g]                          # the full-size tensors the kernels walk with p
        for k, v in st.items():
            if isinstance(v, tensor):
                skey.append((k, v.dtype))
                if v.shape == shape:
                    full.append(v)
        # the common case (all contiguous) without a call per tensor
        flat = (p.is_contiguous() and all([t.is_contiguous() for t in full])) or _flat(p, full)
        key = (p.device, p.dtype, g.dtype, tuple(skey), flat)
        bucket = buckets.get(key)
        if bucket is None:
            buckets[key] = [i]
        else:
            bucket.append(i)
    return buckets


def foreach_grads_with_decay(params: list[torch.Tensor], grads: list[torch.Tensor],
                             group: dict) -> list[torch.Tensor]:
    """`grad_with_decay` for a list of tensors (multi-tensor kernels)."""
    if group.get("maximize", False):
        grads = torch._foreach_neg(grads)
    wd = group["weight_decay"]
    if wd != 0:
        if group["wd_mode"] == "l2":
            grads = torch._foreach_add(grads, params, alpha=wd)
        elif not group.get("wd_after_update", False):
            torch._foreach_mul_(params, 1 - decay_multiplier(group) * wd)
    return grads


def foreach_decay_after_update(params: list[torch.Tensor], group: dict) -> None:
    """`decay_after_update` for a list of tensors."""
    wd = group["weight_decay"]
    if wd != 0 and group["wd_mode"] != "l2" and group.get("wd_after_update", False):
        torch._foreach_add_(params, params, alpha=-decay_multiplier(group) * wd)


def fused_decay_scalars(group: dict) -> tuple[float, float, float]:
    """(wd_l2, pre_mul, post_alpha) for the fused kernels: the L2 coefficient added to the
    gradient, the factor theta_{t-1} is multiplied by before the step, and alpha in the
    after-update decay theta <- theta + alpha * theta."""
    wd = group["weight_decay"]
    if wd == 0:
        return 0.0, 1.0, 0.0
    if group["wd_mode"] == "l2":
        return wd, 1.0, 0.0
    f = decay_multiplier(group) * wd
    if group.get("wd_after_update", False):
        return 0.0, 1.0, -f
    return 0.0, 1 - f, 0.0


def _shape(t: Any) -> tuple | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


# --------------------------------------------------------------------------- the shell
class Optimizer(torch.optim.Optimizer):
    """Base of every optimlab optimizer.

    ``step(closure=None)`` evaluates the closure (with grad enabled) and returns its loss,
    skips parameters whose ``grad`` is None, rejects sparse and complex gradients, applies the
    non-finite policy, then updates each parameter group.

    Non-finite gradients (``nonfinite=``):
      * ``"skip"`` (default): if any gradient holds inf or NaN, the whole step is skipped:
        no parameter, moment or step counter changes; a RuntimeWarning is issued and
        ``optimizer.skipped_steps`` counts it.  This is what torch.amp.GradScaler does for
        scaled steps, applied to every step, so one bad batch cannot poison the moments.
      * ``"raise"``: raise FloatingPointError, again before anything changes.
      * ``"ignore"``: no check (torch.optim's behaviour; saves one read of the gradients).
    The check reads every gradient once before anything is written (a step that may be
    skipped cannot start writing), so it costs one extra read of the gradients per step: on
    CPU one parallel pass of optimlab's kernel (about 4 of AdamW's 28 bytes per parameter).
    Adafactor's fused CPU kernel reads every gradient before it writes anything anyway and
    checks them on the way, at no cost.

    Implementation (``impl=``): ``"auto"`` (default), ``"reference"``, ``"foreach"`` or
    ``"fused"``; see the module docstring.  ``last_step_impls`` names what the last step ran.

    ``load_state_dict`` policy: state tensors keep the dtype they were saved with (fp32
    moments of bf16 parameters stay fp32; bf16 moments stay bf16) and move to their
    parameter's device; torch.optim instead casts them to the parameter's dtype.  A
    ``step`` saved as a tensor (torch.optim's format) becomes an int, so torch.optim state
    dicts of the same algorithm load directly.  A state dict whose parameter layout differs
    from this optimizer's (group sizes, tensor shapes, state keys) raises ValueError.
    """

    def __init__(self, params, defaults: dict, *, nonfinite: str = "skip", impl: str = "auto"):
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.impl = check_choice("impl", impl, IMPLS)
        self.skipped_steps = 0
        self.last_step_impls: tuple[str, ...] = ()
        self._used: set[str] = set()
        self._flat_bucket = False      # set by _update_group around a fused call
        super().__init__(params, defaults)

    def __getstate__(self) -> dict:             # copy/pickle keep optimlab's own settings
        state = super().__getstate__()
        state.update(nonfinite=self.nonfinite, impl=self.impl, skipped_steps=self.skipped_steps)
        return state

    def __setstate__(self, state: dict) -> None:    # also called by load_state_dict
        super().__setstate__(state)
        for key, value in (("nonfinite", "skip"), ("impl", "auto"), ("skipped_steps", 0),
                           ("last_step_impls", ()), ("_used", set()), ("_flat_bucket", False)):
            self.__dict__.setdefault(key, value)

    # groups remember the lr they started with, as torch's schedulers do
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])
        self._check_group(group)

    def _check_group(self, group: dict) -> None:
        """Validate a group's hyper-parameters (groups may override the defaults)."""

    # --- the template -------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        raise NotImplementedError

    def _update_param(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    def _foreach_update(self, group: dict, params: list[torch.Tensor], states: list[dict]) -> None:
        """Multi-tensor update of one bucket (same device and dtypes); default: the reference."""
        for p, state in zip(params, states):
            self._update_param(p, p.grad, state, group)

    def _same_layout(self, params: list[torch.Tensor], states: list[dict],
                     keys: Sequence[str]) -> bool:
        """`optimlab._ext.same_layout`, answered without a second look at every tensor when
        `bucket_tensors` has just put them together as laid out alike (its key says so)."""
        from . import _ext
        return self._flat_bucket or _ext.same_layout(params, states, keys)

    def _fused_cpu_code(self, params: list[torch.Tensor], states: list[dict],
                        keys: Sequence[str]) -> int:
        """The dtype code of optimlab's fused CPU kernels for this bucket (fp32 or fp64 weights,
        the state tensors ``keys`` in the weights' dtype and laid out as the weights), or raise
        `NoFusedKernel` saying why not."""
        from . import _ext
        name = type(self).__name__
        p0 = params[0]
        code = {torch.float32: 0, torch.float64: 2}.get(p0.dtype)
        if p0.device.type != "cpu" or code is None or not _ext.available():
            raise NoFusedKernel(f"no fused {name} kernel for {p0.dtype} on {p0.device.type} "
                                f"(optimlab's CPU kernels: fp32/fp64 on CPU; available: "
                                f"{_ext.available()})")
        if any(st[k].dtype != p0.dtype for st in states[:1] for k in keys) or \
                not self._same_layout(params, states, keys):
            raise NoFusedKernel(f"{name} state in another dtype or layout than the parameters")
        return code

    def _fused_update(self, group: dict, params: list[torch.Tensor], states: list[dict]) -> str:
        """Fused update of one bucket; returns the kernel's name, or raises `NoFusedKernel`."""
        raise NoFusedKernel(f"{type(self).__name__} has no fused kernel")

    def _group_states(self, group: dict, params: list[torch.Tensor],
                      fresh: list | None = None) -> list[dict]:
        """The state of each parameter, initialised where empty; ``fresh`` (if given)
        collects ``(p, had_an_entry)`` for each one initialised here, so a caller can undo it."""
        states = []
        for p in params:
            known = fresh is not None and p in self.state
            state = self.state[p]
            if not state:
                state.update(self._init_state(p, group))
                if fresh is not None:
                    fresh.append((p, known))
            states.append(state)
        return states

    def _update_group(self, group: dict, params: list[torch.Tensor]) -> None:
        states = self._group_states(group, params)
        if self.impl == "reference":
            for p, state in zip(params, states):
                self._update_param(p, p.grad, state, group)
            self._used.add("reference")
            return
        if uniform_contiguous(params, states):    # the common case, checked cheaply
            buckets = [(True, None)]
        else:
            buckets = [(key[-1], idx) for key, idx in bucket_tensors(params, states).items()]
        for flat, idx in buckets:
            if idx is None or len(idx) == len(params):
                ps, sts = params, states
            else:
                ps, sts = [params[i] for i in idx], [states[i] for i in idx]
            if self.impl in ("auto", "fused"):
                self._flat_bucket = flat
                try:
                    self._used.add(self._fused_update(group, ps, sts))
                    continue
                except NoFusedKernel as e:
                    if self.impl == "fused":
                        raise RuntimeError(f"{type(self).__name__}(impl='fused'): {e}; use "
                                           "impl='auto' to fall back to foreach") from None
                finally:
                    self._flat_bucket = False
            if self.impl == "foreach" or ps[0].device.type != "cpu":
                self._foreach_update(group, ps, sts)
                self._used.add("foreach")
            else:   # auto on CPU: torch's CPU foreach kernels are per-tensor loops anyway
                for p, state in zip(ps, sts):
                    self._update_param(p, p.grad, state, group)
                self._used.add("reference")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             grad_norm: float | torch.Tensor | None = None):
        """Perform one optimization step; returns the closure's loss (or None).

        ``grad_norm``: the total norm of this step's gradients over all of this optimizer's
        parameters, where the training loop has computed it anyway (it is what
        ``torch.nn.utils.clip_grad_norm_`` returns).  A finite norm proves every gradient
        finite (an inf or NaN element makes any p-norm inf or NaN), so the non-finite check
        does not read the gradients a second time; a non-finite norm (which finite gradients
        can also give, by overflow) leads to the exact check.  Results are the same either way.
        The value is used for nothing else: a caller that has checked the gradients itself
        (SAM's ``second_step``) passes any finite number.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        grads = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; "
                                       "use torch.optim.SparseAdam or dense gradients")
                if torch.is_complex(p):
                    raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
            work.append((group, params))
            grads.extend(p.grad for p in params)
        self._used: set[str] = set()
        done = False
        if self.nonfinite != "ignore" and grads and not (
                grad_norm is not None and math.isfinite(float(grad_norm))):
            done = self._checked_step(work)
            if done is False or (done is None and not all_finite(grads)):
                report_nonfinite(self, f"{type(self).__name__}: a gradient holds inf or NaN",
                                 stacklevel=2)
                return loss
        if not done:
            for group, params in work:
                if params:
                    self._update_group(group, params)
        self.last_step_impls = tuple(sorted(self._used))
        return loss

    def _checked_step(self, work: list[tuple[dict, list[torch.Tensor]]]) -> bool | None:
        """The whole step with the non-finite check inside the update (an optimizer whose
        kernel reads every gradient before it writes anything can check them on the way):
        True when the step ran, False when a gradient held inf or NaN and nothing changed,
        None when this optimizer cannot (the caller then checks and updates)."""
        return None

    # --- state dict -----------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups but this "
                             f"optimizer has {len(self.param_groups)}")
        pairs = []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict group {gi} has {len(saved['params'])} parameters "
                                 f"but this optimizer's group {gi} has {len(group['params'])}")
            pairs.extend((pid, p, group, gi) for pid, p in zip(saved["params"], group["params"]))
        saved_state = state_dict["state"]
        for pid, p, group, gi in pairs:
            if pid not in saved_state:
                continue
            expected = self._init_state(p, group)
            got = saved_state[pid]
            if set(got) != set(expected):
                raise ValueError(
                    f"state_dict does not match this optimizer: parameter {pid} (group {gi}, "
                    f"shape {tuple(p.shape)}) has state keys {sorted(got)}, expected "
                    f"{sorted(expected)}")
            for key, value in expected.items():
                if key == "step":   # an int here, a 0-dim tensor in torch.optim's format
                    continue
                if _shape(value) != _shape(got[key]):
                    raise ValueError(
                        f"state_dict does not match this optimizer: parameter {pid} (group "
                        f"{gi}) has shape {tuple(p.shape)}, so {key!r} should have shape "
                        f"{_shape(value)}, but the saved one has {_shape(got[key])}")
        defaults = dict(self.defaults)   # torch's load adds keys of its own to self.defaults
        super().load_state_dict(state_dict)
        # undo torch's cast of state tensors to the parameter dtype: keep the saved dtype
        for pid, p, group, gi in pairs:
            if pid not in saved_state:
                continue
            state = self.state[p]
            for key, value in saved_state[pid].items():
                if key == "step":
                    state[key] = int(value.item()) if isinstance(value, torch.Tensor) else int(value)
                elif isinstance(value, torch.Tensor):
                    state[key] = value.detach().to(device=p.device, copy=True)
        # a state dict from torch.optim lacks optimlab's options: they take their defaults
        for group in self.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)
            group.setdefault("initial_lr", group["lr"])
