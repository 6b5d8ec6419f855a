"""The multi-tensor path without a second copy of the math: `TensorList`.

Each optimizer's reference kernel (``adam_update``, ``sgd_update``, ...) is written with
Tensor methods (``m.lerp_(g, 1 - beta1)``, ``p.addcdiv_(m, d, value=-a)``).  A `TensorList`
offers the same methods over a bucket of tensors, each one torch's multi-tensor kernel of
that name (``torch._foreach_lerp_``, ``torch._foreach_addcdiv_``, ...), so ``impl="foreach"``
runs the reference kernel itself on TensorLists: one statement of the math, two execution
paths.  Scalars are Python floats shared by the whole list (the optimizer shell groups
tensors whose per-tensor scalars are equal, `optimlab._optimizer`).

On CPU torch's foreach kernels run the per-tensor operation on each tensor, so the two paths
agree bit for bit, with one exception that `TensorList` removes: ``torch._foreach_mul_`` rounds
a Python scalar to a float16/bfloat16 list's dtype (0.99 becomes 0.98828125) where
``Tensor.mul_`` multiplies by it in float32, so such a scalar goes to it as a 0-dim float64
tensor, which it applies as the per-tensor op does (torch 2.13: the two then agree on every
element).  On CUDA the kernels are fused and agree to float rounding (and in float16 and
bfloat16 they round scalar operands to the tensor's dtype).  A method without a foreach
kernel (``to``) loops over the tensors.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["TensorList", "maximum_", "zeros_like"]


def _other(x):
    return x.ts if isinstance(x, TensorList) else x


_LOW = (torch.float16, torch.bfloat16)


def _factor(ts: list, x):
    """A multiplier for ``torch._foreach_mul``: a Python number multiplying a float16/bfloat16
    list on CPU as a 0-dim float64 tensor (see the module docstring), else as it is."""
    if isinstance(x, TensorList):
        return x.ts
    if isinstance(x, (int, float)) and ts and ts[0].dtype in _LOW and \
            ts[0].device.type == "cpu":
        return torch.tensor(float(x), dtype=torch.float64)
    return x


class TensorList:
    """A list of tensors of one device and dtype, with Tensor methods that act on every
    tensor (see the module docstring).  In-place methods return the list itself."""

    __slots__ = ("ts",)

    def __init__(self, tensors: Iterable[torch.Tensor]):
        self.ts = list(tensors)

    def __len__(self) -> int:
        return len(self.ts)

    def __iter__(self):
        return iter(self.ts)

    @property
    def dtype(self) -> torch.dtype:
        return self.ts[0].dtype

    # ---- conversions
    def to(self, dtype: torch.dtype) -> "TensorList":
        if all(t.dtype == dtype for t in self.ts):
            return self
        return TensorList(t.to(dtype) for t in self.ts)

    def copy_(self, src: "TensorList") -> "TensorList":
        torch._foreach_copy_(self.ts, src.ts)
        return self

    # ---- in place
    def mul_(self, other) -> "TensorList":
        torch._foreach_mul_(self.ts, _factor(self.ts, other))
        return self

    def div_(self, other) -> "TensorList":
        torch._foreach_div_(self.ts, _other(other))
        return self

    def add_(self, other, *, alpha: float = 1) -> "TensorList":
        if isinstance(other, TensorList):
            torch._foreach_add_(self.ts, other.ts, alpha=alpha)
        else:
            torch._foreach_add_(self.ts, other)
        return self

    def sub_(self, other) -> "TensorList":
        torch._foreach_sub_(self.ts, _other(other))
        return self

    def lerp_(self, end: "TensorList", weight: float) -> "TensorList":
        torch._foreach_lerp_(self.ts, end.ts, weight)
        return self

    def addcmul_(self, a: "TensorList", b: "TensorList", *, value: float = 1) -> "TensorList":
        torch._foreach_addcmul_(self.ts, a.ts, b.ts, value=value)
        return self

    def addcdiv_(self, a: "TensorList", b: "TensorList", *, value: float = 1) -> "TensorList":
        torch._foreach_addcdiv_(self.ts, a.ts, b.ts, value=value)
        return self

    def sqrt_(self) -> "TensorList":
        torch._foreach_sqrt_(self.ts)
        return self

    def reciprocal_(self) -> "TensorList":
        torch._foreach_reciprocal_(self.ts)
        return self

    # ---- new lists
    def add(self, other, *, alpha: float = 1) -> "TensorList":
        if isinstance(other, TensorList):
            return TensorList(torch._foreach_add(self.ts, other.ts, alpha=alpha))
        return TensorList(torch._foreach_add(self.ts, other))

    def addcmul(self, a: "TensorList", b: "TensorList", *, value: float = 1) -> "TensorList":
        return TensorList(torch._foreach_addcmul(self.ts, a.ts, b.ts, value=value))

    def sqrt(self) -> "TensorList":
        return TensorList(torch._foreach_sqrt(self.ts))

    def __neg__(self) -> "TensorList":
        return TensorList(torch._foreach_neg(self.ts))

    def __mul__(self, other) -> "TensorList":
        return TensorList(torch._foreach_mul(self.ts, _factor(self.ts, other)))

    __rmul__ = __mul__

    def __truediv__(self, other) -> "TensorList":
        return TensorList(torch._foreach_div(self.ts, _other(other)))

    def __rtruediv__(self, other: float) -> "TensorList":
        # torch's Tensor.__rtruediv__: other / t is t.reciprocal() * other
        out = torch._foreach_reciprocal(self.ts)
        torch._foreach_mul_(out, _factor(out, other))
        return TensorList(out)


def maximum_(a, b):
    """a <- max(a, b) element-wise, NaN propagating (torch.maximum), on tensors or lists."""
    if isinstance(a, TensorList):
        torch._foreach_maximum_(a.ts, b.ts)
    else:
        torch.maximum(a, b, out=a)
    return a


def zeros_like(x, dtype: torch.dtype):
    """Zeros of ``x``'s shape (each tensor's, for a list) in ``dtype``."""
    if isinstance(x, TensorList):
        return TensorList(torch.zeros_like(t, dtype=dtype) for t in x.ts)
    return torch.zeros_like(x, dtype=dtype)
