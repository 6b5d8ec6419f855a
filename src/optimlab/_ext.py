"""optimlab's fused CPU kernels (``csrc/fused_cpu.cpp``): built on first use, called via ctypes.

Why a plain C ABI loaded with ctypes rather than a torch C++ extension: the kernels need
nothing from torch but the tensors' data pointers, so the source includes no torch or Python
header and compiles in seconds (a ``torch.utils.cpp_extension`` build includes
``torch/extension.h``, takes about a minute on 2 cores before the first kernel line and wants
ninja), and the library works with any torch version and Python ABI.  torch.compile needs a
compile of the whole step per parameter layout at start-up, and torch's own fused Adam kernel
cannot express Adafactor.  The measurements (speed of each option, compile and build times)
come from ``benchmarks/fused_options.py``; the README's performance section has them.

Rounding: the library is compiled with ``-ffp-contract=off`` and calls fma() exactly where
torch's CPU kernels use a fused multiply-add (add/sub with ``alpha=``, addcmul, lerp), so each
kernel rounds as the reference's torch ops do; what remains is torch's CPU sqrt (MKL's, not
always correctly rounded) and the summation order of Adafactor's reductions.

Build: on the first call that needs a kernel, the C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++`` on the PATH) compiles the source with ``-O3 -fopenmp`` and the vector
flags that match torch's CPU capability (AVX2+FMA, AVX-512 or the baseline), into
``$OPTIMLAB_CACHE_DIR`` (default ``~/.cache/optimlab``, else a temporary directory), named by a
hash of the source and the flags, so later processes load it at once.  OpenMP resolves to the
``libgomp`` torch has already loaded, so the kernels share torch's thread pool; they use
``torch.get_num_threads()`` threads.  Without OpenMP (e.g. Apple clang) the kernels run on one
thread.  Without a compiler, or with ``OPTIMLAB_FUSED_CPU=0`` in the environment, nothing is
built and every optimizer uses its PyTorch paths (`status` says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["available", "status", "load", "set_enabled", "all_finite", "call", "dense",
           "same_layout", "DTYPE_CODES"]

_SOURCE = Path(__file__).with_name("csrc") / "fused_cpu.cpp"
_ABI_VERSION = 1
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_enabled = os.environ.get("OPTIMLAB_FUSED_CPU", "1").strip().lower() not in ("0", "false", "no", "off")
_status: dict = {"available": False, "reason": "not built yet", "path": None,
                 "build_seconds": None, "compiler": None, "flags": None}

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2, torch.float16: 3}


def _arch_flags() -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"]
    if cap.startswith("AVX2"):
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cache_dir() -> Path:
    env = os.environ.get("OPTIMLAB_CACHE_DIR")
    candidates = [Path(env)] if env else []
    xdg = os.environ.get("XDG_CACHE_HOME")
    candidates.append(Path(xdg) / "optimlab" if xdg else Path.home() / ".cache" / "optimlab")
    candidates.append(Path(tempfile.gettempdir()) / f"optimlab-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    for d in candidates:
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError("no writable cache directory for optimlab's CPU kernels")


# -ffp-contract=off: no fused multiply-adds where the source writes a multiply and an add, so
# every operation rounds as the reference kernel's torch ops do (with contraction the results
# drift from torch.optim's by a few float32 ulps per step, beyond the parity tests' 1e-6)
_BASE_FLAGS = ["-O3", "-std=gnu++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off"]


def _build(cxx: str, flags: list[str], out: Path) -> None:
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
    base = [cxx, *_BASE_FLAGS, *flags]
    last = None
    for omp in (["-fopenmp"], []):            # retry without OpenMP (e.g. Apple clang)
        cmd = [*base, *omp, str(_SOURCE), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, out)              # atomic: concurrent builders cannot clash
            return
        last = proc.stderr.strip().splitlines()[-5:]
    raise RuntimeError("compiling optimlab's CPU kernels failed: " + " | ".join(last or []))


def load() -> ctypes.CDLL | None:
    """The kernel library, built on the first call; None where it cannot be had."""
    global _lib, _tried
    if not _enabled:
        return None
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        try:
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
            flags = _arch_flags()
            key = hashlib.sha256(_SOURCE.read_bytes() + repr((cxx, _BASE_FLAGS, flags, platform.machine(),
                                                              _ABI_VERSION)).encode()).hexdigest()
            path = _cache_dir() / f"fused_cpu-{key[:16]}.so"
            seconds = 0.0
            if not path.exists():
                t0 = time.perf_counter()
                _build(cxx, flags, path)
                seconds = time.perf_counter() - t0
            lib = ctypes.CDLL(str(path))
            if lib.optimlab_abi_version() != _ABI_VERSION:
                raise RuntimeError(f"stale kernel library {path}")
            for name in ("adam", "sgd", "adagrad", "rmsprop", "radam", "adafactor"):
                fn = getattr(lib, f"optimlab_{name}")
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int]
                fn.restype = ctypes.c_int
            lib.optimlab_stream_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_int64, ctypes.c_int]
            lib.optimlab_stream_copy.restype = None
            lib.optimlab_adafactor_groups.argtypes = [
                ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                ctypes.c_int, ctypes.c_int]
            lib.optimlab_adafactor_groups.restype = ctypes.c_int
            lib.optimlab_all_finite.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
            lib.optimlab_all_finite.restype = ctypes.c_int
            _lib = lib
            _status.update(available=True, reason="ok", path=str(path), build_seconds=seconds,
                           compiler=cxx, flags=" ".join(flags) or "(baseline)",
                           openmp_threads=lib.optimlab_max_threads())
        except Exception as e:   # no compiler, failed build, unwritable cache: PyTorch paths
            _status.update(available=False, reason=f"{type(e).__name__}: {e}")
            _lib = None
    return _lib


def available() -> bool:
    """True when the fused CPU kernels are built (building them on the first call)."""
    return load() is not None


def status() -> dict:
    """Whether the kernels are available, why not, where they live and how long the build
    took (``build_seconds`` is 0.0 when a cached build was loaded)."""
    load()
    if not _enabled:
        return dict(_status, available=False, enabled=False,
                    reason="disabled (OPTIMLAB_FUSED_CPU=0 or set_enabled(False))")
    return dict(_status, enabled=True)


def set_enabled(flag: bool) -> bool:
    """Switch the fused CPU kernels off (or back on) in this process; returns the old value.
    Tests use it to exercise the PyTorch fallbacks."""
    global _enabled
    old, _enabled = _enabled, bool(flag)
    return old


# --------------------------------------------------------------------------- calling
def dense(t: torch.Tensor, like: torch.Tensor | None = None) -> bool:
    """True when ``t``'s elements fill its memory exactly (contiguous, or dense in another
    dimension order such as channels_last), with the same strides as ``like`` (so element i
    of one is element i of the other)."""
    if like is not None and (t.shape != like.shape or t.stride() != like.stride()):
        return False
    if t.is_contiguous():
        return True
    # non-overlapping and dense in some dimension order (e.g. channels_last)
    dims = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def same_layout(params: Sequence[torch.Tensor], states: Sequence[dict],
                keys: Sequence[str]) -> bool:
    """Every parameter, its gradient and its state tensors ``keys`` lay out their elements
    alike (all contiguous, or dense with equal strides), so a kernel may treat them as flat
    arrays."""
    for p, st in zip(params, states):
        g = p.grad
        if p.is_contiguous() and g.is_contiguous() and all(st[k].is_contiguous() for k in keys):
            continue
        if not (dense(p) and dense(g, p) and all(dense(st[k], p) for k in keys)):
            return False
    return True


def call(name: str, dtype_code: int, slots: Sequence[int], width: int,
         hp: Sequence[float]) -> None:
    """Run kernel ``name`` on ``len(slots) // width`` tensors (their slots as int64 values)."""
    lib = load()
    tab = array("q", slots)
    hpa = array("d", hp)
    rc = getattr(lib, f"optimlab_{name}")(dtype_code, len(tab) // width, tab.buffer_info()[0],
                                         hpa.buffer_info()[0], torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"optimlab fused CPU kernel {name} rejected dtype code {dtype_code}")


def adafactor_groups(dtype_code: int, ngroups: int, hp: Sequence[float],
                     slots: Sequence[int]) -> bool:
    """Adafactor's whole step over several parameter groups (11 slots per tensor: the
    adafactor layout, then the group index) with the non-finite check; True when a gradient
    held inf or NaN and the step was skipped (nothing written)."""
    lib = load()
    tab = array("q", slots)
    hpa = array("d", hp)
    rc = lib.optimlab_adafactor_groups(dtype_code, ngroups, hpa.buffer_info()[0], len(tab) // 11,
                                       tab.buffer_info()[0], torch.get_num_threads(), 1)
    if rc < 0:
        raise RuntimeError(f"optimlab fused CPU kernel adafactor rejected dtype code {dtype_code}")
    return rc == 1


def all_finite(tensors: Sequence[torch.Tensor]) -> bool | None:
    """True/False when every tensor could be checked by the kernel (CPU, dense, a float
    dtype), else None (the caller checks with PyTorch)."""
    lib = load()
    if lib is None:
        return None
    slots = []
    for t in tensors:
        code = DTYPE_CODES.get(t.dtype)
        if code is None or not dense(t):
            return None
        slots += (t.data_ptr(), t.numel(), code)
    tab = array("q", slots)
    rc = lib.optimlab_all_finite(len(tensors), tab.buffer_info()[0], torch.get_num_threads())
    if rc < 0:
        return None
    return rc == 1


def stream_copy(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Copy ``src`` into ``dst`` (contiguous CPU tensors of the same size in bytes) with
    non-temporal stores; False when the kernels are unavailable.  Used by the benchmark to
    measure the machine's copy bandwidth."""
    lib = load()
    if lib is None or not (dst.is_contiguous() and src.is_contiguous()) or \
            dst.numel() * dst.element_size() != src.numel() * src.element_size():
        return False
    lib.optimlab_stream_copy(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size(),
                             torch.get_num_threads())
    return True
