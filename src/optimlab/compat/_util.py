"""Shared checks for the compatibility constructors."""

from __future__ import annotations


def reject_unsupported(reference: str, **flags) -> None:
    """Raise ValueError for reference flags that optimlab does not implement when set."""
    for name, value in flags.items():
        if value:
            raise ValueError(f"{reference}: {name}={value!r} is not supported by optimlab "
                             f"(leave it at its default)")
