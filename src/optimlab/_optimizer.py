"""The optimizer shell every optimlab optimizer shares: `Optimizer`.

An algorithm is a thin subclass that declares (as labml's and Muon's are; the math lives in
pure functions):

* ``Hyper``: a frozen dataclass of its hyper-parameters for one step of one group, built by
  ``Hyper.of(group, params)``, which also settles eps placement, bias correction and weight
  decay (`optimlab._common.WeightDecay`).  Every execution path takes that one object.
* ``_init_state(p, group)``: the state of a parameter (torch.optim's keys).
* ``_step_scalars(hp, p, state)``: what the coming step t = state["step"] + 1 makes of the
  hyper-parameters for one tensor (bias corrections, RAdam's rectification, ...), a frozen
  dataclass; computed once per distinct ``_scalars_key`` (the step, by default), so once per
  step for a group whose tensors are in step.
* ``_kernel(p, g, state, hp, s)``: the reference kernel, the readable ground truth, in Tensor
  methods; it runs on tensors and, unchanged, on `optimlab._foreach.TensorList` s (the
  multi-tensor path).
* ``fused``: an `optimlab._ext.FusedKernel` binding it to its C++ kernel (or None).

The shell gathers the parameters that have gradients, enforces the non-finite-gradient
policy, keeps ``initial_lr`` in each group, splits each group into buckets at the gate
(`optimlab._gate`), runs each bucket on the implementation ``impl`` asks for, and loads state
dicts with a documented dtype/device policy.

The implementation (``impl``, one option shared by every optimizer), torch.optim's three
layers:

==============  ==========================================================================
``impl``        what runs
==============  ==========================================================================
``reference``   ``_kernel`` one tensor at a time: the ground truth the other two are tested
                against
``foreach``     ``_kernel`` on TensorLists: multi-tensor ``torch._foreach_*`` kernels on each
                bucket of tensors that share a device and dtypes (and per-tensor scalars)
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

A fused kernel only ever takes a bucket the gate lets through: plain, non-empty, strided
tensors on its device, laid out alike, in a dtype combination it was built for, none of the
written ones sharing memory with another.  Everything else (a bf16 gradient of an fp32
weight, a zero-size or meta tensor, an aliased gradient) runs the reference or foreach path,
with the same result.  A DTensor parameter (FSDP2, tensor parallel) is updated on its local
shard, which goes through the gate as any plain tensor does (`optimlab._shards`); what spans
shards (the non-finite verdict; Adafactor's statistics) is an explicit all-reduce.  All
three paths give the same parameters and state up to float rounding (tests/test_fast_paths.py
states the tolerances); the state layout is the same, so a state dict saved under one
implementation resumes under another.
``optimizer.last_step_impls`` names the kernels the last step ran (``"reference"``,
``"foreach"``, ``"fused-cpu"``, ``"torch-fused"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import torch
from torch.autograd.graph import increment_version

from . import _ext, _gate, _shards
from ._common import (IMPLS, NONFINITE_POLICIES, ShrinkForm, all_finite, check_choice,
                      compensated_shrink, report_nonfinite)
from ._foreach import TensorList

__all__ = ["Optimizer"]


def _shape(t: Any) -> tuple | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


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
    checks them on the way, at no cost.  ``meta`` tensors have no values to check.

    Implementation (``impl=``): ``"auto"`` (default), ``"reference"``, ``"foreach"`` or
    ``"fused"``; see the module docstring.  ``last_step_impls`` names what the last step ran.
    A fused kernel writes through data pointers; afterwards the shell bumps each parameter's
    version counter, as an in-place torch op would, so autograd still notices a parameter
    changed under a saved graph.

    ``load_state_dict`` policy: another library's state dict of the same algorithm is first
    brought to this optimizer's keys (`_import_state_dict`: torch.optim's and transformers'
    Adafactor); state tensors keep the dtype they were saved with (fp32
    moments of bf16 parameters stay fp32; bf16 moments stay bf16) and move to their
    parameter's device; torch.optim instead casts them to the parameter's dtype.  A
    ``step`` saved as a tensor (torch.optim's format) becomes an int, so torch.optim state
    dicts of the same algorithm load directly.  A state dict whose parameter layout differs
    from this optimizer's (group sizes, tensor shapes, state keys) raises ValueError.
    """

    Hyper: ClassVar[type]
    fused: ClassVar[_ext.FusedKernel | None] = None

    def __init__(self, params, defaults: dict, *, nonfinite: str = "skip", impl: str = "auto"):
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.impl = check_choice("impl", impl, IMPLS)
        self.skipped_steps = 0
        self.last_step_impls: tuple[str, ...] = ()
        self._used: set[str] = set()
        super().__init__(params, defaults)

    def __getstate__(self) -> dict:             # copy/pickle keep optimlab's own settings
        state = super().__getstate__()
        state.update(nonfinite=self.nonfinite, impl=self.impl, skipped_steps=self.skipped_steps)
        return state

    def __setstate__(self, state: dict) -> None:    # also called by load_state_dict
        super().__setstate__(state)
        for key, value in (("nonfinite", "skip"), ("impl", "auto"), ("skipped_steps", 0),
                           ("last_step_impls", ()), ("_used", set())):
            self.__dict__.setdefault(key, value)

    # groups remember the lr they started with, as torch's schedulers do
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])
        self._check_group(group)

    def _check_group(self, group: dict) -> None:
        """Validate a group's hyper-parameters (groups may override the defaults)."""

    # --- what each algorithm declares --------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        raise NotImplementedError

    def _full_init_state(self, p: torch.Tensor, group: dict) -> dict:
        """`_init_state`, plus the shell's own state: ``wd_compensation`` (the compensated
        shrink's rounding errors, in the weights' dtype) where ``wd_form="compensated"``."""
        state = self._init_state(p, group)
        if group.get("wd_form") == "compensated":
            state["wd_compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _step_scalars(self, hp: Any, p: torch.Tensor, state: dict) -> Any:
        """The per-tensor scalars of the coming step (see the module docstring)."""
        raise NotImplementedError

    def _scalars_key(self, p: torch.Tensor, state: dict) -> Any:
        """What `_step_scalars` depends on besides the group (the step, by default)."""
        return state["step"]

    @staticmethod
    def _kernel(p, g, state, hp, s) -> None:
        raise NotImplementedError

    # --- the drivers ----------------------------------------------------------------------
    def _group_states(self, group: dict, params: list[torch.Tensor],
                      fresh: list | None = None) -> list[dict]:
        """The state of each parameter, initialised where empty; ``fresh`` (if given)
        collects ``(p, had_an_entry)`` for each one initialised here, so a caller can undo it."""
        states = []
        for p in params:
            known = fresh is not None and p in self.state
            state = self.state[p]
            if not state:
                state.update(self._full_init_state(p, group))
                if fresh is not None:
                    fresh.append((p, known))
            states.append(state)
        return states

    def _scalars(self, hp: Any, params: list[torch.Tensor], states: list[dict]) -> list[tuple]:
        """(key, scalars) per tensor, each distinct key computed once."""
        cache: dict = {}
        out = []
        for p, st in zip(params, states):
            key = self._scalars_key(p, st)
            s = cache.get(key)
            if s is None:
                s = cache[key] = (key, self._step_scalars(hp, p, st))
            out.append(s)
        return out

    def _reference(self, hp, params, grads, states, scalars) -> None:
        for p, g, st, (_, s) in zip(params, grads, states, scalars):
            self._kernel(p, g, st, hp, s)
            st["step"] += 1
        self._used.add("reference")

    def _foreach(self, hp, params, grads, states, scalars) -> None:
        """The reference kernel on TensorLists, one call per run of equal scalars."""
        runs: dict = {}
        for i, (key, s) in enumerate(scalars):
            runs.setdefault(key, (s, []))[1].append(i)
        keys = [k for k, v in states[0].items() if isinstance(v, torch.Tensor)]
        for s, idx in runs.values():
            sts = [states[i] for i in idx]
            lists = {k: TensorList([st[k] for st in sts]) for k in keys}
            self._kernel(TensorList([params[i] for i in idx]),
                         TensorList([grads[i] for i in idx]), lists, hp, s)
            for st in sts:
                st["step"] += 1
        self._used.add("foreach")

    def _fused_rows(self, params, grads, states, scalars, key: _gate.Bucket) -> list[tuple]:
        """One row of the kernel's tensor struct per tensor (`optimlab._ext.run`)."""
        spec = self.fused
        present = {k for k, _ in key.state}
        keys = [k if k in present else None for k in spec.state]
        values: dict = {}
        rows = []
        for p, g, st, (skey, s) in zip(params, grads, states, scalars):
            sv = values.get(skey)           # the scalars' fields, once per distinct key
            if sv is None:
                sv = values[skey] = tuple(getattr(s, f.name) for f in dataclasses.fields(s))
            rows.append((p.data_ptr(), g.data_ptr(),
                         *[st[k].data_ptr() if k is not None else 0 for k in keys],
                         p.numel(), *sv))
        return rows

    def _call(self, key: _gate.Bucket, **kw) -> _ext.Call:
        codes = _ext.DTYPE_CODES
        return _ext.Call(param_dtype=codes[key.param_dtype], grad_dtype=codes[key.grad_dtype],
                         state_dtype=codes.get(key.state_dtype(self.fused.state), 0),
                         threads=torch.get_num_threads(), **kw)

    def _cpu_refusal(self, key: _gate.Bucket) -> str | None:
        """Why optimlab's CPU kernel cannot take a bucket, or None."""
        spec = self.fused
        if spec is None:
            return f"{type(self).__name__} has no fused CPU kernel"
        if not _ext.available():
            return (f"optimlab's CPU kernels are not available (available: False; "
                    f"{_ext.status()['reason']})")
        return _gate.cpu_kernel_refusal(key, spec.name, spec.state, spec.dtypes,
                                        spec.contiguous_only)

    def _run_cpu(self, key: _gate.Bucket, hp, params, grads, states, scalars) -> bool:
        """Run optimlab's CPU kernel on a bucket it takes; False when the kernel found that a
        tensor it would write shares memory with another (nothing has been written then)."""
        rc = _ext.run(self.fused, [hp], self._fused_rows(params, grads, states, scalars, key),
                      self._call(key))
        if rc == _ext.Rc.OVERLAP:
            return False
        for st in states:
            st["step"] += 1
        increment_version(params)
        self._used.add("fused-cpu")
        return True

    def _other_refusal(self, key: _gate.Bucket, hp, states, reason: str) -> str | None:
        """Why no other fused kernel takes a bucket optimlab's CPU kernel refused
        (``reason``), or None (the Adam family: torch's fused kernels)."""
        return reason

    def _run_other(self, key: _gate.Bucket, hp, params, grads, states, scalars) -> None:
        raise NotImplementedError

    def _update_group(self, group: dict, params: list[torch.Tensor]) -> None:
        hp = self.Hyper.of(group, params)
        states = self._group_states(group, params)
        scalars = self._scalars(hp, params, states)
        grads = [p.grad for p in params]
        hp, decay = self._kernel_decay(hp)
        views = (params, grads, states)
        if any(_shards.is_dtensor(p) for p in params):
            # DTensor parameters (FSDP2, tensor parallel): the rule is element-wise, so each
            # rank updates its own shard, on whichever path takes the local tensors
            views = _shards.local_views(params, grads, states)
        self._run(hp, *views, scalars, decay)
        if views[0] is not params:
            _shards.write_back(states, views[2])

    @staticmethod
    def _kernel_decay(hp):
        """(the hyper-parameters the kernels get, the decay the shell applies or None): with
        ``wd_form="compensated"`` the shell shrinks, compensated, around a kernel that shrinks
        nothing.  The element-wise kernels read theta only for the decay, so shrinking before
        the kernel (or after it, for ``wd_after_update``) is the same update."""
        decay = hp.decay
        if decay.form != ShrinkForm.COMPENSATED or decay.lam == 0:
            return hp, None
        return dataclasses.replace(hp, decay=dataclasses.replace(decay, lam=0.0)), decay

    @staticmethod
    def _around(decay, params, states, run: Callable[[], None]) -> None:
        """``run()`` (the kernels), with the compensated shrink ``decay`` of `_kernel_decay`
        (or None) before it, or after it for ``wd_after_update``."""
        if decay is not None and not decay.after:
            Optimizer._compensated_shrink(params, states, decay)
        run()
        if decay is not None and decay.after:
            Optimizer._compensated_shrink(params, states, decay)

    @staticmethod
    def _compensated_shrink(params, states, decay) -> None:
        c = decay.factor * decay.lam
        for p, st in zip(params, states):
            compensated_shrink(_shards.local(p), _shards.local(st["wd_compensation"]), c)

    def _run(self, hp, params, grads, states, scalars, decay=None) -> None:
        """One group's update on plain tensors, on the paths ``impl`` asks for; ``decay``: a
        compensated shrink the shell applies around the kernels (`_kernel_decay`), once every
        path is settled (a refusal writes nothing)."""
        if self.impl == "reference":
            self._around(decay, params, states,
                         lambda: self._reference(hp, params, grads, states, scalars))
            return
        # every bucket's path is settled before any bucket runs: impl="fused" refuses before
        # anything is written
        plan = []
        for key, idx in _gate.buckets(params, grads, states):
            if idx is None:
                part = (params, grads, states, scalars)
            else:
                part = ([params[i] for i in idx], [grads[i] for i in idx],
                        [states[i] for i in idx], [scalars[i] for i in idx])
            path = None
            if self.impl in ("auto", "fused"):
                reason = self._cpu_refusal(key)
                if reason is None:
                    path = "fused-cpu"
                else:
                    reason = self._other_refusal(key, hp, part[2], reason)
                    if reason is None:
                        # torch's kernels have no memory check of their own: overlapping
                        # tensors have one defined result, the reference's
                        path = "reference" if _gate.shares_memory(*part[:3]) else "other"
                    elif self.impl == "fused":
                        raise RuntimeError(f"{type(self).__name__}(impl='fused'): {reason}; use "
                                           "impl='auto' to fall back to foreach")
            if path is None:
                path = "foreach" if self.impl == "foreach" or key.device.type != "cpu" \
                    else "reference"
                if path == "foreach" and _gate.shares_memory(*part[:3]):
                    path = "reference"            # the multi-tensor order would differ
            plan.append((path, key, part))

        def execute() -> None:
            for path, key, part in plan:
                if path == "fused-cpu" and self._run_cpu(key, hp, *part):
                    continue
                if path == "other":
                    self._run_other(key, hp, *part)
                elif path == "foreach":
                    self._foreach(hp, *part)
                else:   # auto on CPU (torch's CPU foreach kernels are per-tensor loops anyway),
                    self._reference(hp, *part)     # or tensors that share memory
        self._around(decay, params, states, execute)

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
        self._used = set()
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
    def _import_state_dict(self, state_dict: dict) -> dict:
        """Another library's state dict of the same algorithm in this optimizer's format (its
        keys and shapes); the shell's default takes torch.optim's as it is (same keys)."""
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        for part in ("state", "param_groups"):
            if not isinstance(state_dict, dict) or part not in state_dict:
                raise ValueError(f"{type(self).__name__}.load_state_dict: not an optimizer "
                                 f"state dict (expected the keys 'state' and 'param_groups', "
                                 f"got {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__})")
        state_dict = self._import_state_dict(state_dict)
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
            expected = self._full_init_state(p, group)
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
