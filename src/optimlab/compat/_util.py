"""Shared checks for the compatibility constructors."""

from __future__ import annotations


def reject_unsupported(reference: str, **flags) -> None:
    """Raise ValueError for reference flags that optimlab does not implement when set."""
    for name, value in flags.items():
        if value:
            raise ValueError(f"{reference}: {name}={value!r} is not supported by optimlab "
                             f"(leave it at its default)")


def impl_from_flags(reference: str, foreach: bool | None, fused: bool | None) -> str:
    """torch.optim's ``foreach``/``fused`` flags as optimlab's ``impl``: ``fused=True`` ->
    ``"fused"``, ``foreach=True`` -> ``"foreach"``, ``foreach=False`` -> ``"reference"`` (the
    for-loop), ``fused=False`` -> ``"foreach"`` (anything but fused), both None -> ``"auto"``."""
    if foreach and fused:
        raise ValueError(f"{reference}: `fused` and `foreach` cannot be `True` together.")
    if fused:
        return "fused"
    if foreach:
        return "foreach"
    if foreach is not None:
        return "reference"
    if fused is not None:
        return "foreach"
    return "auto"
