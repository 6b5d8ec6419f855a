"""optimlab's fused CPU kernels (``csrc/``): a typed boundary, built on first use, called via
ctypes.

The boundary is named, not positional.  Each algorithm declares, in its own module, a frozen
dataclass of its hyper-parameters (``AdamHyper``, ...), one of per-tensor scalars
(``AdamStep``, ...) and a `FusedKernel` that binds them to its C++ entry point and names the
state tensors it takes.  From those declarations this module generates the C header
(`header`: one C struct per dataclass, fields in the same order and of the same name, and the
enums of dtype and return codes), compiles the sources against it, and at load time compares
the library's own account of its structs (``offsetof`` of every field, ``sizeof`` of every
struct) with the ctypes layout of the declarations: a library that disagrees is not used.
Changing an algorithm's hyper-parameters is therefore one edit, in its declaration; the
kernels read ``hp->lr``, never ``hp[0]``.

Every entry point has one signature::

    int optimlab_<name>(const <Name>Hyper* hp, const <Name>Tensor* tensors, int64_t n,
                        const Call* call);

where ``<Name>Tensor`` holds the data pointers of the parameter, its gradient and the declared
state tensors (0 where absent), ``numel`` and the per-tensor scalars, and ``Call`` the
(parameter, gradient, state) dtype codes, the thread count, how many hyper-parameter structs
``hp`` points to (several parameter groups in one call) and whether to skip the whole call
when a gradient holds inf or NaN.  Before writing anything each kernel checks that the dtype
combination is one it was built for and that no tensor it writes shares memory with another
tensor of the call; it returns a `Rc` code otherwise, and the caller runs the reference path.

Why a plain C ABI loaded with ctypes rather than a torch C++ extension: the kernels need
nothing from torch but the tensors' data pointers, so the sources include no torch or Python
header and compile in seconds (a ``torch.utils.cpp_extension`` build includes
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
``g++`` or ``clang++`` on the PATH) compiles each source (in parallel) with ``-O3 -fopenmp``
and the vector flags that match torch's CPU capability (AVX2+FMA, AVX-512 or the baseline),
into ``$OPTIMLAB_CACHE_DIR`` (default ``~/.cache/optimlab``, else a temporary directory),
named by a hash of the sources, the generated header and the flags, so later processes load
it at once.  OpenMP resolves to the ``libgomp`` torch has already loaded, so the kernels share
torch's thread pool; they use ``torch.get_num_threads()`` threads.  Without OpenMP (e.g. Apple
clang) the kernels run on one thread.  Without a compiler, or with ``OPTIMLAB_FUSED_CPU=0`` in
the environment, nothing is built and every optimizer uses its PyTorch paths (`status` says
why).  ``python -c "import optimlab._ext as e; print(e.header())"`` prints the generated
header.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import typing
from array import array
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["available", "status", "load", "set_enabled", "all_finite", "FusedKernel", "Call",
           "Rc", "DTYPE_CODES", "declare", "header", "run", "stream_copy"]

_CSRC = Path(__file__).with_name("csrc")
_ABI_VERSION = 2
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_enabled = os.environ.get("OPTIMLAB_FUSED_CPU", "1").strip().lower() not in ("0", "false", "no", "off")
_status: dict = {"available": False, "reason": "not built yet", "path": None,
                 "build_seconds": None, "compiler": None, "flags": None}

# the one table of dtype codes (C enum DType), for the kernels and the finite check
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2, torch.float16: 3}
_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.float16: "F16"}


class Rc(enum.IntEnum):
    """What a kernel returns (C enum Rc)."""
    OK = 0
    SKIPPED = 1           # a gradient held inf or NaN (Call.check_finite): nothing written
    DTYPES = -1           # a dtype combination the kernel is not built for: nothing written
    OVERLAP = -2          # a tensor it writes shares memory with another: nothing written
    ARGS = -3             # an invalid call (null pointer, group index, an unsupported flag)


# --------------------------------------------------------------------------- declarations
@dataclasses.dataclass(frozen=True)
class Call:
    """How a kernel is called (C struct ``Call``)."""
    param_dtype: int
    grad_dtype: int
    state_dtype: int
    threads: int
    groups: int = 1            # hyper-parameter structs ``hp`` points to
    check_finite: bool = False  # skip everything when a gradient holds inf/NaN (Adafactor)


@dataclasses.dataclass(frozen=True)
class FusedKernel:
    """The binding of an algorithm to its C++ kernel: the entry point ``optimlab_<name>``,
    the hyper-parameter dataclass it takes (``hyper``), the state tensors whose data pointers
    its tensor struct holds after the parameter's and the gradient's (``state``, in this
    order; 0 when a tensor has none), the per-tensor scalar dataclass whose fields follow
    ``numel`` (``scalars``), the (parameter, gradient, state) dtype combinations it is built
    for (``dtypes``), and whether it needs contiguous tensors rather than tensors laid out
    alike (``contiguous_only``).  `optimlab._optimizer.Optimizer` carries it out."""
    name: str
    hyper: type
    state: tuple
    scalars: type
    dtypes: frozenset
    contiguous_only: bool = False

    @property
    def tensor_struct(self) -> str:
        """The C name of the tensor struct: ``AdamHyper`` -> ``AdamTensor``."""
        return self.hyper.__name__.removesuffix("Hyper") + "Tensor"

    def tensor_fields(self) -> list[tuple[str, str]]:
        """(name, C type) of the tensor struct's fields."""
        fields = [("param", "void*"), ("grad", "const void*")]
        fields += [(k, "void*") for k in self.state]
        fields.append(("numel", "int64_t"))
        fields += [(f.name, _c_type(t)) for f, t in _fields(self.scalars)]
        return fields


_KERNELS: dict[str, FusedKernel] = {}
_CACHE: dict = {}           # what is derived from the declarations (cleared by `declare`)


def declare(kernel: FusedKernel) -> FusedKernel:
    """Register an algorithm's kernel binding (at import of its module)."""
    _KERNELS[kernel.name] = kernel
    _CACHE.clear()
    return kernel


def _fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """(field, resolved type) of a dataclass of the boundary."""
    got = _CACHE.get(("fields", cls))
    if got is None:
        hints = typing.get_type_hints(cls)
        got = _CACHE[("fields", cls)] = [(f, hints[f.name]) for f in dataclasses.fields(cls)]
    return got


def _c_type(t: type) -> str:
    if t is float:
        return "double"
    if t in (bool, int) or (isinstance(t, type) and issubclass(t, enum.IntEnum)):
        return "int64_t"
    if dataclasses.is_dataclass(t):
        return t.__name__
    raise TypeError(f"no C type for {t!r}")


def _ctype(c: str, structs: dict) -> type:
    if c == "double":
        return ctypes.c_double
    if c in ("int64_t",):
        return ctypes.c_int64
    if c.endswith("*"):
        return ctypes.c_void_p
    return structs[c]


def _value_structs() -> list[type]:
    """Every dataclass that crosses the boundary by value, nested ones first."""
    out: list[type] = []

    def visit(cls: type) -> None:
        for _, t in _fields(cls):
            if dataclasses.is_dataclass(t):
                visit(t)
        if cls not in out:
            out.append(cls)
    visit(Call)
    for k in _KERNELS.values():
        visit(k.hyper)
    return out


def _struct_fields() -> list[tuple[str, list[tuple[str, str]]]]:
    """(struct name, [(field, C type)]) of every struct of the boundary, in header order."""
    got = _CACHE.get("structs")
    if got is None:
        got = [(cls.__name__, [(f.name, _c_type(t)) for f, t in _fields(cls)])
               for cls in _value_structs()]
        got += [(k.tensor_struct, k.tensor_fields()) for k in _KERNELS.values()]
        _CACHE["structs"] = got
    return got


def header() -> str:
    """The C++ header the kernels are compiled against, generated from the declarations."""
    lines = ["// Generated by optimlab._ext from the Python declarations (the hyper-parameter",
             "// and per-tensor scalar dataclasses of each algorithm): do not edit; print it",
             "// with python -c \"import optimlab._ext as e; print(e.header())\".",
             "#pragma once", "#include <cstdint>", "", "namespace optimlab {", ""]
    lines.append("enum DType : int64_t { " + ", ".join(
        f"{_DTYPE_NAMES[d]} = {c}" for d, c in DTYPE_CODES.items()) + " };")
    lines.append("enum Rc : int { " + ", ".join(f"RC_{r.name} = {int(r)}" for r in Rc) + " };")
    lines.append("")
    for name, fields in _struct_fields():
        lines.append(f"struct {name} {{")
        lines += [f"  {c} {f};" for f, c in fields]
        lines += ["};", ""]
    lines.append("}  // namespace optimlab")
    lines.append("")
    lines.append("// every struct and field, for optimlab_layout() (checked against ctypes at load)")
    lines.append("#define OPTIMLAB_STRUCTS(S, F) \\")
    body = []
    for name, fields in _struct_fields():
        body.append(f"  S({name})" + "".join(f" F({name}, {f})" for f, _ in fields))
    lines.append(" \\\n".join(body))
    lines.append("")
    return "\n".join(lines)


def _ctypes_structs() -> dict[str, type]:
    """ctypes.Structure classes for every struct of the header."""
    got = _CACHE.get("ctypes")
    if got is None:
        got = _CACHE["ctypes"] = {}
        for name, fields in _struct_fields():
            got[name] = type(name, (ctypes.Structure,),
                             {"_fields_": [(f, _ctype(c, got)) for f, c in fields]})
    return got


def _expected_layout() -> str:
    out = []
    for name, fields in _struct_fields():
        st = _ctypes_structs()[name]
        out.append(f";{name} {ctypes.sizeof(st)}" +
                   "".join(f" {f}@{getattr(st, f).offset}" for f, _ in fields))
    return "".join(out)


def _to_c(obj) -> ctypes.Structure:
    """The ctypes struct of a declaration's instance (nested dataclasses included)."""
    cls = type(obj)
    plan = _CACHE.get(("to_c", cls))
    if plan is None:
        plan = _CACHE[("to_c", cls)] = (
            _ctypes_structs()[cls.__name__],
            [(f.name, dataclasses.is_dataclass(t)) for f, t in _fields(cls)])
    st, fields = plan
    return st(*[_to_c(getattr(obj, name)) if nested else getattr(obj, name)
                for name, nested in fields])


def _packer(kernel: FusedKernel) -> struct.Struct:
    """A `struct.Struct` that packs one row of ``kernel``'s tensor struct (faster than
    filling ctypes fields); its layout is the ctypes struct's (a test checks it)."""
    p = _CACHE.get(("packer", kernel.name))
    if p is None:
        codes = {"void*": "q", "const void*": "q", "int64_t": "q", "double": "d"}
        p = _CACHE[("packer", kernel.name)] = struct.Struct(
            "=" + "".join(codes[c] for _, c in kernel.tensor_fields()))
    return p


# --------------------------------------------------------------------------- building
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
# drift from torch.optim's by a few float32 ulps per step, beyond the parity tests' 1e-6).
# -fno-trapping-math: no floating-point traps are ever enabled here, and without the flag GCC
# keeps a select on an ordered comparison (std::max in Adafactor's clamp placement) as a branch
# where the CPU has no masked vector operations (AVX2), and leaves that loop scalar; the
# results are the same with or without it
_BASE_FLAGS = ["-O3", "-std=gnu++17", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
               "-ffp-contract=off"]


def _sources() -> list[Path]:
    return sorted(_CSRC.glob("*.cpp"))


def _build(cxx: str, flags: list[str], out: Path) -> None:
    """Compile every source against the generated header (in parallel), link ``out``."""
    with tempfile.TemporaryDirectory(prefix="optimlab-build-") as tmp:
        tmpd = Path(tmp)
        (tmpd / "optimlab_structs.h").write_text(header())
        base = [cxx, *_BASE_FLAGS, *flags, f"-I{tmpd}", f"-I{_CSRC}"]
        last = None
        for omp in (["-fopenmp"], []):            # retry without OpenMP (e.g. Apple clang)
            objs, procs = [], []
            for src in _sources():
                obj = tmpd / (src.stem + ".o")
                objs.append(obj)
                procs.append(subprocess.Popen([*base, *omp, "-c", str(src), "-o", str(obj)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                              text=True))
            errors = [p.communicate()[1] for p in procs]
            if all(p.returncode == 0 for p in procs):
                so = tmpd / "k.so"
                link = subprocess.run([cxx, "-shared", *omp, *map(str, objs), "-o", str(so)],
                                      capture_output=True, text=True)
                if link.returncode == 0:
                    tmp_out = out.with_name(f"{out.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
                    shutil.copyfile(so, tmp_out)
                    os.replace(tmp_out, out)      # atomic: concurrent builders cannot clash
                    return
                errors = [link.stderr]
            last = [line for e in errors if e for line in e.strip().splitlines()][-5:]
    raise RuntimeError("compiling optimlab's CPU kernels failed: " + " | ".join(last or []))


def _build_key(cxx: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    for src in [*_sources(), *sorted(_CSRC.glob("*.h"))]:
        h.update(src.name.encode() + src.read_bytes())
    h.update(header().encode())
    h.update(repr((cxx, _BASE_FLAGS, flags, platform.machine(), _ABI_VERSION)).encode())
    return h.hexdigest()


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
            import optimlab  # noqa: F401  (every algorithm's declaration is registered)
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
            flags = _arch_flags()
            path = _cache_dir() / f"fused_cpu-{_build_key(cxx, flags)[:16]}.so"
            seconds = 0.0
            if not path.exists():
                t0 = time.perf_counter()
                _build(cxx, flags, path)
                seconds = time.perf_counter() - t0
            lib = ctypes.CDLL(str(path))
            if lib.optimlab_abi_version() != _ABI_VERSION:
                raise RuntimeError(f"stale kernel library {path}")
            lib.optimlab_layout.restype = ctypes.c_char_p
            got, want = lib.optimlab_layout().decode(), _expected_layout()
            if got != want:
                raise RuntimeError(f"the kernel library's structs differ from the Python "
                                   f"declarations ({path}): {got!r} != {want!r}")
            for k in _KERNELS.values():
                fn = getattr(lib, f"optimlab_{k.name}")
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
                fn.restype = ctypes.c_int
            lib.optimlab_stream_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_int64, ctypes.c_int]
            lib.optimlab_stream_copy.restype = None
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
def run(kernel: FusedKernel, hypers: Sequence, rows: Sequence[tuple], call: Call) -> Rc:
    """Run ``kernel`` on the tensors described by ``rows`` (one tuple per tensor, the fields
    of its tensor struct in order) with the hyper-parameter object(s) ``hypers``.  Returns
    the kernel's `Rc`; ``DTYPES`` and ``ARGS`` (a declaration the library does not honour)
    raise RuntimeError."""
    lib = load()
    packer = _packer(kernel)
    size = packer.size
    buf = bytearray(size * len(rows))
    pack = packer.pack_into
    for i, row in enumerate(rows):
        pack(buf, i * size, *row)
    hp_t = _ctypes_structs()[kernel.hyper.__name__] * len(hypers)
    hp = hp_t(*[_to_c(h) for h in hypers])
    tab = (ctypes.c_char * len(buf)).from_buffer(buf) if buf else None
    rc = Rc(getattr(lib, f"optimlab_{kernel.name}")(
        ctypes.addressof(hp), ctypes.addressof(tab) if tab is not None else None, len(rows),
        ctypes.byref(_to_c(call))))
    if rc in (Rc.DTYPES, Rc.ARGS):
        raise RuntimeError(f"optimlab's {kernel.name} kernel refused a call its declaration "
                           f"allows ({rc.name}): {call}")
    return rc


def all_finite(tensors: Sequence[torch.Tensor]) -> bool | None:
    """True/False when every tensor could be checked by the kernel (plain dense CPU tensors of
    a float dtype), else None (the caller checks with PyTorch)."""
    lib = load()
    if lib is None:
        return None
    from ._gate import dense, is_plain
    slots = []
    for t in tensors:
        code = DTYPE_CODES.get(t.dtype)
        if code is None or not is_plain(t) or not t.is_cpu or not dense(t):
            if code is not None and t.numel() == 0 and t.is_cpu:
                continue
            return None
        slots += (t.data_ptr(), t.numel(), code)
    tab = array("q", slots)
    rc = lib.optimlab_all_finite(len(tab) // 3, tab.buffer_info()[0], torch.get_num_threads())
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
