"""What every run (``optimlab train``, ``optimlab lab``) shares: files that a crash cannot leave
half-written, and the record of what produced them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["atomic_write", "atomic_save", "environment"]


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """Write ``path`` through a temporary file in the same directory and ``os.replace``: a
    reader (or a crash) sees the old file or the new one, never half of one.  ``write(f)``
    writes to the binary file object ``f``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):          # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` via a temporary file and an atomic rename."""
    atomic_write(path, lambda f: torch.save(obj, f))


def environment() -> dict:
    """Package versions, the git revision of this checkout (and whether it is dirty), the
    platform and torch's thread count."""
    from importlib import metadata
    versions = {"python": sys.version.split()[0]}
    for pkg in ("optimlab", "torch", "tokenizers", "safetensors", "tqdm", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    root = Path(__file__).resolve().parents[2]
    git = {"revision": None, "dirty": None}
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode == 0:
            git["revision"] = rev.stdout.strip()
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                     "--untracked-files=no"], capture_output=True, text=True,
                                    timeout=10)
            git["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "git": git, "platform": sys.platform,
            "torch_threads": torch.get_num_threads()}
