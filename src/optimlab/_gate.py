"""The gate before every fast path: which tensors a kernel may take, decided in one place.

A step's parameters are split into *buckets* of tensors that one kernel call can take
together (`buckets`); each bucket has a key (`Bucket`) that says everything a kernel needs to
know about its tensors, so the eligibility tests (`cpu_kernel_refusal`,
`torch_fused_refusal`) look at the key, never at the tensors again:

* ``plain``: every parameter, gradient and state tensor is a plain ``torch.Tensor`` (or
  ``nn.Parameter``), not a subclass (DTensor, FakeTensor, a wrapper), strided, non-empty,
  not on the ``meta`` device and without a negative-view bit.  Only plain tensors have data
  pointers that mean what a kernel assumes; everything else runs the reference or foreach path.
* ``layout``: ``"contiguous"`` (every tensor contiguous), ``"dense"`` (the gradient and the
  full-size state tensors are dense, with no gaps, overlaps or zero strides, and have the
  parameter's strides, e.g. all channels_last: element i of one is element i of the others),
  or ``"strided"`` (anything else).
* the device, and the parameter, gradient and state dtypes: a kernel is built for exact
  combinations of them (the gradient may have another dtype than its parameter since torch
  2.13, after ``p.grad_dtype = None``).

What the key cannot say, the kernel checks before it writes anything: that no tensor it
writes shares memory with another tensor of the call (aliased gradients, overlapping views).
It then refuses the call and the reference path runs, with the reference's result.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_STRIDED = torch.strided


class Bucket(NamedTuple):
    """What one kernel call's tensors have in common (see the module docstring)."""
    device: torch.device
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    state: tuple                 # ((key, dtype), ...) of the state's tensors, in state order
    plain: bool
    layout: str                  # "contiguous", "dense" or "strided"

    def state_dtype(self, keys: Sequence[str]) -> torch.dtype | None:
        """The one dtype of the state tensors ``keys`` (those present; the parameter's when
        none is), None if they differ."""
        dtypes = {dt for k, dt in self.state if k in keys}
        if not dtypes:
            return self.param_dtype
        return dtypes.pop() if len(dtypes) == 1 else None


def is_plain(t: torch.Tensor) -> bool:
    """A tensor whose data pointer a kernel may use: exactly ``torch.Tensor`` or
    ``nn.Parameter``, strided, non-empty, with data (not meta), no negative-view bit."""
    tp = type(t)
    return (tp is _Tensor or tp is _Parameter) and t.layout is _STRIDED and t.numel() > 0 \
        and not t.is_meta and not t.is_neg()


def dense(t: torch.Tensor, like: torch.Tensor | None = None) -> bool:
    """True when ``t``'s elements fill its memory exactly (contiguous, or dense in another
    dimension order such as channels_last: no gaps, no overlap, no zero strides on dimensions
    of size > 1), with the same strides as ``like`` (so element i of one is element i of the
    other)."""
    if like is not None and (t.shape != like.shape or t.stride() != like.stride()):
        return False
    if t.is_contiguous():
        return True
    dims = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _uniform(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
             states: Sequence[dict]
             ) -> list[tuple[Bucket, list[int] | None]] | None:
    """The common case in one cheap pass: every tensor plain and contiguous on the CPU, the
    parameters and gradients of one dtype; the buckets are then the states' signatures (one,
    or e.g. Adafactor's factored and unfactored states).  None when any tensor is not of that
    case (then `buckets` looks at each tensor)."""
    p0 = params[0]
    if not p0.is_cpu:
        return None
    dtype = p0.dtype
    sigs: dict[tuple, tuple[tuple, list[int]]] = {}
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        tp = type(p)
        if (tp is not _Parameter and tp is not _Tensor) or type(g) is not _Tensor or \
                p.dtype is not dtype or g.dtype is not dtype or not p.is_cpu or \
                not p.is_contiguous() or not g.is_contiguous() or p.numel() == 0 or \
                p.layout is not _STRIDED or p.is_neg() or g.is_neg():
            return None
        names = tuple(st)
        entry = sigs.get(names)
        if entry is None:
            entry = sigs[names] = (tuple((k, v.dtype) for k, v in st.items()
                                         if isinstance(v, _Tensor)), [])
        for k, dt in entry[0]:
            v = st[k]
            if type(v) is not _Tensor or v.dtype is not dt or not v.is_contiguous() or \
                    v.is_neg():
                return None
        entry[1].append(i)
    whole = len(sigs) == 1
    return [(Bucket(p0.device, dtype, dtype, sig, True, "contiguous"), None if whole else idx)
            for sig, idx in sigs.values()]


def _key(p: torch.Tensor, g: torch.Tensor, st: dict) -> Bucket:
    shape = p.shape
    sig = []
    tensors = [g]
    full = [g]                  # the tensors an element-wise kernel walks with p
    for k, v in st.items():
        if isinstance(v, _Tensor):
            sig.append((k, v.dtype))
            tensors.append(v)
            if v.shape == shape:
                full.append(v)
    plain = is_plain(p) and all(is_plain(t) for t in tensors)
    if p.is_contiguous() and all(t.is_contiguous() for t in tensors):
        layout = "contiguous"
    elif dense(p) and all(dense(t, p) for t in full):
        layout = "dense"
    else:
        layout = "strided"
    return Bucket(p.device, p.dtype, g.dtype, tuple(sig), plain, layout)


def buckets(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            states: Sequence[dict]) -> list[tuple[Bucket, list[int] | None]]:
    """The parameters with their gradients in buckets that one kernel call can take:
    ``(key, indices)``, indices None for "all of them" (the common case, found in one cheap
    pass, `_uniform`).  One odd tensor (a subclass, another dtype or layout) gets a bucket of its own
    and does not keep its neighbours off a fast kernel."""
    cheap = _uniform(params, grads, states)
    if cheap is not None:
        return cheap
    out: dict[Bucket, list[int]] = {}
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        out.setdefault(_key(p, g, st), []).append(i)
    return list(out.items())


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte that ``t`` may touch in its storage (a superset for gappy strides)."""
    size = t.element_size()
    lo = t.storage_offset() * size
    span = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
    return lo, lo + (span + 1) * size - 1


def shares_memory(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  states: Sequence[dict]) -> bool:
    """True when a tensor a step writes (a parameter or a state tensor) may share memory
    with another tensor of the bucket (overlapping parameter views, a gradient that aliases
    its parameter).  The reference kernel applies its operations tensor by tensor, the
    multi-tensor kernels operation by operation across the list, and on overlapping tensors
    the two disagree: such a bucket runs the reference.  Cheap in the common case (every
    tensor in its own storage); tensors of one storage are compared by extent."""
    by_storage: dict[int, list[tuple[torch.Tensor, bool]]] = {}
    shared = False
    for p, g, st in zip(params, grads, states):
        entries = [(p, True), (g, False)]
        entries += [(v, True) for v in st.values() if isinstance(v, _Tensor)]
        for t, written in entries:
            if t.numel() == 0:
                continue
            key = t.untyped_storage().data_ptr()
            group = by_storage.get(key)
            if group is None:
                by_storage[key] = [(t, written)]
            else:
                group.append((t, written))
                shared = True
    if not shared:
        return False
    for group in by_storage.values():
        if len(group) < 2 or not any(w for _, w in group):
            continue
        spans = sorted((*_extent(t), w) for t, w in group)
        end_any = end_written = -1
        for lo, hi, w in spans:
            if lo <= end_written or (w and lo <= end_any):
                return True
            end_any = max(end_any, hi)
            if w:
                end_written = max(end_written, hi)
    return False


def cpu_kernel_refusal(key: Bucket, name: str, state_keys: Sequence[str],
                       dtypes: frozenset, contiguous_only: bool = False) -> str | None:
    """Why optimlab's CPU kernel ``name`` cannot take a bucket, or None when it can:
    plain CPU tensors, laid out alike (``contiguous_only``: all contiguous), in one of the
    (parameter, gradient, state) dtype combinations ``dtypes`` the kernel is built for (the
    state dtype is that of the tensors ``state_keys``)."""
    if key.device.type != "cpu":
        return f"optimlab's CPU kernels do not run on {key.device.type}"
    if not key.plain:
        return ("a tensor is not a plain, non-empty, strided torch.Tensor (a subclass such as "
                "DTensor, a zero-size, meta or negative-view tensor)")
    if key.layout == "strided" or (contiguous_only and key.layout != "contiguous"):
        return ("the gradient or state is laid out differently from its parameter"
                if not contiguous_only else "the kernel needs contiguous tensors")
    combo = (key.param_dtype, key.grad_dtype, key.state_dtype(state_keys))
    if combo not in dtypes:
        built = ", ".join(f"({_short(p)}, {_short(g)}, {_short(s)})" for p, g, s in
                          sorted(dtypes, key=str))
        return (f"no {name} kernel for (parameter, gradient, state) dtypes "
                f"({', '.join(_short(d) for d in combo)}); built for {built}")
    return None


def torch_fused_refusal(key: Bucket, state_keys: Sequence[str]) -> str | None:
    """Why torch's ``_fused_adam_``/``_fused_adamw_`` cannot take a bucket, or None: plain
    CPU or CUDA tensors laid out alike, parameter, gradient and moments in one fp32/fp64
    dtype."""
    if key.device.type not in ("cpu", "cuda"):
        return f"torch's fused Adam kernels do not run on {key.device.type}"
    if not key.plain or key.layout == "strided":
        return "torch's fused kernels need plain tensors laid out alike"
    dt = key.param_dtype
    if dt not in (torch.float32, torch.float64) or key.grad_dtype != dt or \
            key.state_dtype(state_keys) != dt:
        return (f"torch's fused kernels need the parameter, gradient and moments in one "
                f"fp32/fp64 dtype (here {_short(dt)}, {_short(key.grad_dtype)}, "
                f"{_short(key.state_dtype(state_keys))})")
    return None


def _short(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "mixed"
