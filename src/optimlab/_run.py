"""What every run (``optimlab train``, ``optimlab lab``) shares: files that a crash cannot leave
half-written, and the record of what produced them."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["atomic_write", "atomic_save", "environment", "RunLock", "remove_temp_files",
           "json_safe"]


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
    """``torch.save(obj, path)`` via a temporary file and an atomic rename.  A failed write (a
    full disk: torch raises RuntimeError "file write failed") is an OSError naming the file;
    the previous file is intact."""
    def write(f):
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            raise OSError(f"writing {path} failed ({str(e).splitlines()[0]}); the previous "
                          f"{Path(path).name} is intact") from None
    atomic_write(path, write)


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files `atomic_write` leaves when a process dies mid-write
    (``.NAME.tmp-PID``) in ``directory`` and its direct subdirectories; returns them."""
    d = Path(directory)
    found = [*d.glob(".*.tmp-*"), *d.glob("*/.*.tmp-*")] if d.is_dir() else []
    for f in found:
        with contextlib.suppress(OSError):
            f.unlink()
    return found


def json_safe(obj: Any, path: str = "", found: list | None = None) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN or
    Infinity); the paths of the replaced values are appended to ``found``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if found is not None:
            found.append(path or "/")
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v, f"{path}/{k}", found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, f"{path}/{i}", found) for i, v in enumerate(obj)]
    return obj


class RunLock:
    """An exclusive lock on a run directory while a run uses it: the file ``.lock`` in it,
    locked with ``flock`` and holding the holder's pid, host and start time.  A second run on
    the directory fails at once, naming the holder.  The kernel releases the lock of a process
    that dies (kill -9, a crash), so a lock left by a dead run is taken over; `acquire` says so.
    Where ``flock`` does not exist (Windows) the directory is not locked."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / ".lock"
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a dead run's lock was taken over.  Raises
        ValueError when another live run holds it, OSError when the directory is not
        writable."""
        try:
            import fcntl
        except ImportError:          # no flock: no lock
            return None
        import socket
        import time as _time
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            holder = holder or "holder unknown"
            raise ValueError(f"{self.directory} is in use by another run ({holder}): wait for "
                             f"it to end, or choose another --out") from None
        previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()} since "
                       f"{_time.strftime('%Y-%m-%d %H:%M:%S')}").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return f"took over the lock of a run that ended without releasing it ({previous})" \
            if previous else None

    @property
    def held(self) -> bool:
        """True while this object holds the lock (always, where there is no flock)."""
        try:
            import fcntl  # noqa: F401
        except ImportError:
            return True
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)    # empty: released cleanly (the file stays: a process
            fcntl.flock(self._fd, fcntl.LOCK_UN)   # may already have it open)
        os.close(self._fd)
        self._fd = None



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
