"""matplotlib helpers: a headless backend, one style, PNGs written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from .._run import atomic_write

__all__ = ["plt", "save"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("optimlab lab needs matplotlib: pip install 'optimlab[lab]'") from None
    matplotlib.use("Agg", force=True)          # no display needed; same PNGs everywhere
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "axes.grid": True,
                         "grid.alpha": 0.3, "font.size": 10, "axes.titlesize": 11,
                         "legend.fontsize": 9, "figure.constrained_layout.use": True})
    return plt


class _Lazy:
    def __getattr__(self, name):
        return getattr(_pyplot(), name)


plt = _Lazy()


def save(fig, path: str | os.PathLike) -> Path:
    """``fig`` as a PNG at ``path`` (written atomically), and close it."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return path
