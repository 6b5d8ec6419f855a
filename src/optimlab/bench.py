"""``optimlab bench``: every optimlab optimizer against its torch.optim counterparts.

For each algorithm (a *family*) the contenders are optimlab's optimizer (``impl="auto"``, the
fused kernel on CPU) and torch.optim's for-loop (``foreach=False``), ``foreach=True`` and
``fused=True`` where torch has them, plus transformers' Adafactor when transformers is
installed.  All contenders of a family step the *same* parameter and gradient tensors (each
keeps its own state), so they read the same memory; after a warm-up of 6 steps each (RAdam
takes its rectified branch from step 6 on, so every timed step runs the steady-state branch)
they are timed round-robin, one step each per round, the order rotated every round, in one
process.  Reported per contender: the median ms per step; the ratio to the fastest
torch.optim implementation of the family; the effective bandwidth, the bytes the algorithm
cannot avoid (parameters read and written, gradients read, full-size state read and written:
28 bytes per parameter for fp32 AdamW) divided by the time, also as a fraction of the measured
copy bandwidth; and the optimizer state in bytes per parameter.

Suites: ``gpt2`` is the parameter set of GPT-2 small (124.4M parameters, the real shapes:
2 GB of p, g, m, v for fp32 AdamW, far beyond the caches: a memory-bandwidth benchmark);
``small`` is a 2-layer GPT-2 (d_model 128, vocabulary 4096; 0.94M parameters, cache resident:
per-step overhead and arithmetic).  Weight matrices decay (0.01 where the family decays),
vectors do not, as `optimlab.param_groups_weight_decay` sets it up.

Timings on a shared machine are noisy: compare the ratios, which come from one process and
the same tensors, and never put these numbers in pass/fail tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__, _ext
from . import compat
from ._run import atomic_write

SUITES = ("gpt2", "small")
FAMILIES = ("adamw", "adam", "sgd", "adagrad", "rmsprop", "radam", "adafactor", "sam")
WARMUP = 6


# --------------------------------------------------------------------------- parameter sets
def gpt2_shapes(vocab: int = 50257, n_ctx: int = 1024, d: int = 768, n_layer: int = 12
                ) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter shapes of GPT-2 (Hugging Face layout): wte, wpe, per block ln_1,
    attn.c_attn (d x 3d + 3d), attn.c_proj (d x d + d), ln_2, mlp.c_fc (d x 4d + 4d),
    mlp.c_proj (4d x d + d), then ln_f.  The defaults are GPT-2 small: 124,439,808."""
    shapes = [("wte", (vocab, d)), ("wpe", (n_ctx, d))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [(h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
                   (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
                   (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
                   (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
                   (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
                   (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,))]
    return shapes + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def suite_shapes(suite: str) -> list[tuple[str, tuple[int, ...]]]:
    if suite == "gpt2":
        return gpt2_shapes()
    if suite == "small":
        return gpt2_shapes(vocab=4096, n_ctx=128, d=128, n_layer=2)
    raise ValueError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")


def make_params(shapes, seed: int = 0) -> list[torch.Tensor]:
    """Parameters with N(0, 0.02) values and N(0, 1e-3) gradients (fixed for the run)."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = torch.empty(shape).normal_(0, 0.02, generator=g).requires_grad_()
        p.grad = torch.empty(shape).normal_(0, 1e-3, generator=g)
        params.append(p)
    return params


def groups(params: list[torch.Tensor], wd: float) -> list[dict]:
    """Decay on matrices, none on vectors (biases, LayerNorm)."""
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


# --------------------------------------------------------------------------- contenders
@dataclass
class Contender:
    name: str
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    torch_optim: bool = False          # a torch.optim implementation (the ratios' baseline)
    opt: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    inner: int = 1


class _SAMSteps:
    """SAM's optimizer-side work per update, for timing: ``first_step`` (gradient norm, save w,
    move to w + e) then ``second_step`` (check, restore w, the base step), on the same
    gradients (the model's two forward/backward passes are not part of the optimizer)."""

    def __init__(self, sam):
        self.sam = sam
        self.state = sam.base_optimizer.state

    def step(self):
        self.sam.first_step()
        self.sam.second_step()

    @property
    def last_step_impls(self):
        return getattr(self.sam.base_optimizer, "last_step_impls", None)


def _hf_adafactor():
    try:
        from transformers.optimization import Adafactor
    except Exception:                  # transformers is optional
        return None
    return Adafactor


def contenders(family: str) -> list[Contender]:
    import optimlab
    T = torch.optim
    if family == "adamw":
        return [
            Contender("optimlab.AdamW (CS224N semantics)",
                      lambda p: optimlab.AdamW(groups(p, 0.01), lr=1e-3)),
            Contender("optimlab.AdamW nonfinite='ignore'",
                      lambda p: optimlab.AdamW(groups(p, 0.01), lr=1e-3, nonfinite="ignore")),
            Contender("optimlab.AdamW state_dtype=bf16",
                      lambda p: optimlab.AdamW(groups(p, 0.01), lr=1e-3,
                                               state_dtype=torch.bfloat16)),
            Contender("optimlab.compat.torch.AdamW (torch semantics)",
                      lambda p: compat.torch.AdamW(groups(p, 0.01), lr=1e-3)),
            Contender("torch AdamW for-loop", lambda p: T.AdamW(groups(p, 0.01), lr=1e-3,
                                                                foreach=False), True),
            Contender("torch AdamW foreach", lambda p: T.AdamW(groups(p, 0.01), lr=1e-3,
                                                               foreach=True), True),
            Contender("torch AdamW fused", lambda p: T.AdamW(groups(p, 0.01), lr=1e-3,
                                                             fused=True), True),
        ]
    if family == "adam":
        return [
            Contender("optimlab.Adam", lambda p: optimlab.Adam(p, lr=1e-3)),
            Contender("optimlab.Adam nonfinite='ignore'",
                      lambda p: optimlab.Adam(p, lr=1e-3, nonfinite="ignore")),
            Contender("torch Adam for-loop", lambda p: T.Adam(p, lr=1e-3, foreach=False), True),
            Contender("torch Adam foreach", lambda p: T.Adam(p, lr=1e-3, foreach=True), True),
            Contender("torch Adam fused", lambda p: T.Adam(p, lr=1e-3, fused=True), True),
        ]
    if family == "sgd":
        kw = dict(lr=1e-3, momentum=0.9)
        return [
            Contender("optimlab.SGD momentum=0.9", lambda p: optimlab.SGD(p, **kw)),
            Contender("optimlab.SGD nonfinite='ignore'",
                      lambda p: optimlab.SGD(p, **kw, nonfinite="ignore")),
            Contender("torch SGD for-loop", lambda p: T.SGD(p, **kw, foreach=False), True),
            Contender("torch SGD foreach", lambda p: T.SGD(p, **kw, foreach=True), True),
            Contender("torch SGD fused", lambda p: T.SGD(p, **kw, fused=True), True),
        ]
    if family == "adagrad":
        return [
            Contender("optimlab.AdaGrad", lambda p: optimlab.AdaGrad(p)),
            Contender("optimlab.AdaGrad nonfinite='ignore'",
                      lambda p: optimlab.AdaGrad(p, nonfinite="ignore")),
            Contender("torch Adagrad for-loop", lambda p: T.Adagrad(p, foreach=False), True),
            Contender("torch Adagrad foreach", lambda p: T.Adagrad(p, foreach=True), True),
            Contender("torch Adagrad fused", lambda p: T.Adagrad(p, fused=True), True),
        ]
    if family == "rmsprop":
        return [
            Contender("optimlab.RMSProp", lambda p: optimlab.RMSProp(p, lr=1e-3)),
            Contender("optimlab.RMSProp nonfinite='ignore'",
                      lambda p: optimlab.RMSProp(p, lr=1e-3, nonfinite="ignore")),
            Contender("torch RMSprop for-loop", lambda p: T.RMSprop(p, lr=1e-3, foreach=False),
                      True),
            Contender("torch RMSprop foreach", lambda p: T.RMSprop(p, lr=1e-3, foreach=True),
                      True),
        ]
    if family == "radam":
        return [
            Contender("optimlab.RAdam", lambda p: optimlab.RAdam(p, lr=1e-3)),
            Contender("optimlab.RAdam nonfinite='ignore'",
                      lambda p: optimlab.RAdam(p, lr=1e-3, nonfinite="ignore")),
            Contender("torch RAdam for-loop", lambda p: T.RAdam(p, lr=1e-3, foreach=False), True),
            Contender("torch RAdam foreach", lambda p: T.RAdam(p, lr=1e-3, foreach=True), True),
        ]
    if family == "adafactor":
        out = [
            Contender("optimlab.Adafactor (paper = transformers defaults)",
                      lambda p: optimlab.Adafactor(p)),
            Contender("optimlab.Adafactor nonfinite='ignore'",
                      lambda p: optimlab.Adafactor(p, nonfinite="ignore")),
            Contender("optimlab.compat.torch.Adafactor (torch semantics)",
                      lambda p: compat.torch.Adafactor(p)),
            Contender("torch Adafactor for-loop", lambda p: T.Adafactor(p, foreach=False), True),
            Contender("torch Adafactor foreach", lambda p: T.Adafactor(p, foreach=True), True),
        ]
        hf = _hf_adafactor()
        if hf is not None:
            out.append(Contender("transformers Adafactor", lambda p: hf(p)))
        return out
    if family == "sam":
        sam = optimlab.SAM
        return [
            Contender("optimlab.AdamW alone", lambda p: optimlab.AdamW(groups(p, 0.01), lr=1e-3)),
            Contender("SAM(optimlab.AdamW), optimizer side",
                      lambda p: _SAMSteps(sam(groups(p, 0.01), optimlab.AdamW, lr=1e-3))),
            Contender("SAM(torch AdamW fused), optimizer side",
                      lambda p: _SAMSteps(sam(groups(p, 0.01), T.AdamW, lr=1e-3, fused=True))),
            Contender("torch AdamW fused", lambda p: T.AdamW(groups(p, 0.01), lr=1e-3,
                                                             fused=True), True),
        ]
    raise ValueError(f"unknown optimizer family {family!r}; expected one of {', '.join(FAMILIES)}")


# --------------------------------------------------------------------------- measurements
def _full_size_state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> tuple[int, int]:
    """(all state bytes of p, bytes of its state tensors as large as p)."""
    total = full = 0
    for v in opt.state[p].values():
        if isinstance(v, torch.Tensor):
            nbytes = v.numel() * v.element_size()
            total += nbytes
            if v.numel() == p.numel() and v.numel() > 1:
                full += nbytes
    return total, full


def traffic_and_state(opt, params) -> tuple[float, float]:
    """(bytes per step the algorithm cannot avoid, state bytes per parameter): parameters
    read and written, gradients read, full-size state read and written (row/column factors
    and step counters are negligible)."""
    n = sum(p.numel() for p in params)
    traffic = state = 0
    for p in params:
        total, full = _full_size_state_bytes(opt, p)
        traffic += 2 * p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size() \
            + 2 * full
        state += total
    return float(traffic), state / n


def copy_bandwidth(nbytes: int, repeat: int = 7) -> dict:
    """GB/s of a large copy, counting read + write (2 bytes moved per byte copied): torch's
    ``copy_`` and optimlab's non-temporal STREAM copy; the best is the reference."""
    n = max(1, nbytes // 4)
    src = torch.randn(n)
    dst = torch.empty(n)
    out = {}
    ways = {"torch copy_": lambda: dst.copy_(src)}
    if _ext.available():
        ways["stream copy (non-temporal)"] = lambda: _ext.stream_copy(dst, src)
    for name, fn in ways.items():
        fn()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = 2 * 4 * n / statistics.median(ts) / 1e9
    del src, dst
    gc.collect()
    return out


def run_family(suite: str, family: str, repeat: int, params: list[torch.Tensor],
               log=print) -> list[dict]:
    """Build the family's contenders on ``params``, warm them up, time them round-robin."""
    cs = contenders(family)
    for c in cs:
        c.opt = c.make(params)
    # warm-up (allocates state) and the inner step count for fast steps
    for c in cs:
        t0 = time.perf_counter()
        for _ in range(WARMUP):
            c.opt.step()
        per = (time.perf_counter() - t0) / WARMUP
        c.inner = max(1, min(200, int(0.005 / max(per, 1e-7))))   # samples of >= ~5 ms
    for r in range(repeat):
        order = cs[r % len(cs):] + cs[:r % len(cs)]
        for c in order:
            t0 = time.perf_counter()
            for _ in range(c.inner):
                c.opt.step()
            c.times.append((time.perf_counter() - t0) / c.inner)
    rows = []
    torch_best = min((statistics.median(c.times) for c in cs if c.torch_optim), default=None)
    for c in cs:
        med = statistics.median(c.times)
        traffic, state = traffic_and_state(c.opt, params)
        impls = getattr(c.opt, "last_step_impls", None)
        rows.append(dict(suite=suite, family=family, contender=c.name, ms=med * 1e3,
                         ratio=med / torch_best if torch_best else float("nan"),
                         gbps=traffic / med / 1e9, state_bytes_per_param=state,
                         impl=",".join(impls) if impls else "",
                         torch_optim=c.torch_optim))
    for c in cs:
        c.opt = None
    gc.collect()
    return rows


# --------------------------------------------------------------------------- report
def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "optimlab": __version__,
            "torch threads": torch.get_num_threads(), "cpu count": os.cpu_count(),
            "cpu capability": torch.backends.cpu.get_cpu_capability()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["memory"] = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    except OSError:
        info["cpu"] = platform.processor()
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except Exception:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(__file__), timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=os.path.dirname(__file__),
                               timeout=5)
        if rev.returncode == 0:
            info["git"] = rev.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")
    except Exception:
        pass
    st = _ext.status()
    info["fused CPU kernels"] = (f"{st['compiler']} {st['flags']}, built in "
                                 f"{st['build_seconds']:.1f} s" if st["available"]
                                 else f"unavailable: {st['reason']}")
    if hasattr(os, "getloadavg"):
        info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def format_table(rows: list[dict], copy_gbps: float) -> str:
    head = ("| contender | ran | ms/step | vs fastest torch.optim | eff. GB/s | % of copy BW "
            "| state B/param |\n|---|---|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['contender']} | {r['impl'] or ('torch' if r['torch_optim'] else '')} "
                     f"| {r['ms']:.2f} | {r['ratio']:.2f}x | {r['gbps']:.1f} "
                     f"| {100 * r['gbps'] / copy_gbps:.0f}% | {r['state_bytes_per_param']:.3f} |")
    return "\n".join(lines)


def targets(rows: list[dict], copy_gbps: float) -> list[str]:
    """The issue's targets, checked on this run's numbers (each against the torch.optim rows of
    its own family, timed in the same interleaved rounds)."""
    out = []
    by = {(r["suite"], r["family"], r["contender"]): r for r in rows}
    for suite in SUITES:
        def ms(family, name):
            r = by.get((suite, family, name))
            return r["ms"] if r else None

        def best(family):
            xs = [r["ms"] for r in rows if r["suite"] == suite and r["family"] == family
                  and r["torch_optim"]]
            return min(xs) if xs else None

        def check(label, ours, ref, limit):
            if ours is not None and ref:
                ratio = ours / ref
                out.append(f"[{suite}] {label}: {ratio:.2f}x (target <= {limit}x) "
                           f"{'met' if ratio <= limit else 'NOT met'}")
        # torch.optim makes no non-finite check: the same algorithm is nonfinite='ignore'; the
        # default's check (one more read of the gradients) is shown beside it
        for family, label, plain, default_name, ref in (
                ("adamw", "AdamW (CS224N semantics) vs torch fused AdamW", "optimlab.AdamW",
                 "optimlab.AdamW (CS224N semantics)", ms("adamw", "torch AdamW fused")),
                ("adam", "Adam vs torch fused Adam", "optimlab.Adam", "optimlab.Adam",
                 ms("adam", "torch Adam fused")),
                ("sgd", "SGD momentum vs fastest torch SGD", "optimlab.SGD",
                 "optimlab.SGD momentum=0.9", best("sgd")),
                ("adagrad", "AdaGrad vs fastest torch Adagrad", "optimlab.AdaGrad",
                 "optimlab.AdaGrad", best("adagrad")),
                ("rmsprop", "RMSProp vs fastest torch RMSprop", "optimlab.RMSProp",
                 "optimlab.RMSProp", best("rmsprop")),
                ("radam", "RAdam vs fastest torch RAdam", "optimlab.RAdam", "optimlab.RAdam",
                 best("radam"))):
            default = ms(family, default_name)
            same = ms(family, f"{plain} nonfinite='ignore'")
            if same is not None and ref:
                note = (f"; default nonfinite='skip' {default / ref:.2f}x"
                        if default is not None else "")
                out.append(f"[{suite}] {label}, same algorithm (nonfinite='ignore'): "
                           f"{same / ref:.2f}x (target <= 1.0x) "
                           f"{'met' if same / ref <= 1.0 else 'NOT met'}{note}")
        af = ms("adafactor", "optimlab.Adafactor (paper = transformers defaults)")
        check("Adafactor vs torch Adafactor (fastest)", af, best("adafactor"), 0.3)
        check("Adafactor vs transformers Adafactor", af,
              ms("adafactor", "transformers Adafactor"), 0.3)
        r = by.get((suite, "adamw", "optimlab.AdamW (CS224N semantics)"))
        if r and suite == "gpt2":
            frac = r["gbps"] / copy_gbps
            out.append(f"[{suite}] AdamW effective bandwidth: {r['gbps']:.1f} GB/s = "
                       f"{100 * frac:.0f}% of copy (target >= 70%) "
                       f"{'met' if frac >= 0.7 else 'NOT met'}")
        for name, limit in (("optimlab.AdamW (CS224N semantics)", 8.0),
                            ("optimlab.AdamW state_dtype=bf16", 4.0)):
            r = by.get((suite, "adamw", name))
            if r:
                out.append(f"[{suite}] {name}: {r['state_bytes_per_param']:.3f} state B/param "
                           f"(target {limit:g})")
        r = by.get((suite, "adafactor", "optimlab.Adafactor (paper = transformers defaults)"))
        if r:
            out.append(f"[{suite}] Adafactor without first moment: "
                       f"{r['state_bytes_per_param']:.4f} state B/param (target < 0.05 on gpt2)")
    return out


def run(suites=SUITES, families=FAMILIES, repeat: int = 10, log=print) -> dict:
    info = machine()
    log("# optimlab bench")
    for k, v in info.items():
        log(f"- {k}: {v}")
    all_rows = []
    copy = None
    for suite in suites:
        shapes = suite_shapes(suite)
        params = make_params(shapes)
        n = sum(p.numel() for p in params)
        if copy is None:
            copy = copy_bandwidth(max(n * 4, 256 * 2**20))
            log("- copy bandwidth (read + write): " +
                ", ".join(f"{k} {v:.1f} GB/s" for k, v in copy.items()))
        copy_best = max(copy.values())
        log(f"\n## suite {suite}: {len(shapes)} tensors, {n:,} parameters "
            f"({n * 4 / 2**20:.0f} MiB per fp32 copy), repeat {repeat}\n")
        rows = []
        for family in families:
            fam_rows = run_family(suite, family, repeat, params, log)
            rows += fam_rows
            log(f"### {family}\n")
            log(format_table(fam_rows, copy_best))
            log("")
        all_rows += rows
        del params
        gc.collect()
    copy_best = max(copy.values()) if copy else float("nan")
    log("## targets (this run)\n")
    for line in targets(all_rows, copy_best):
        log(f"- {line}")
    return {"machine": info, "copy_gbps": copy, "rows": all_rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=SUITES + ("all",), default="all",
                        help="gpt2: GPT-2 small's 124.4M parameters; small: a 0.94M-parameter "
                             "GPT-2; all: both (default)")
    parser.add_argument("--optimizers", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        metavar="NAME", help=f"families to run (default all: {' '.join(FAMILIES)})")
    parser.add_argument("--repeat", type=int, default=10,
                        help="timed rounds per contender (default 10); the median is reported")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the machine description and all rows as JSON")


def main_args(args) -> int:
    if args.repeat < 1:
        raise ValueError(f"Invalid --repeat: {args.repeat}; expected >= 1")
    if args.json:                       # before minutes of timing, not after
        target = Path(args.json)
        parent = target.parent if str(target.parent) else Path(".")
        if target.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ValueError(f"--json {args.json}: not a file that can be written (its directory "
                             f"must exist and be writable)")
    suites = SUITES if args.suite == "all" else (args.suite,)
    result = run(suites, tuple(args.optimizers), args.repeat)
    if args.json:
        text = json.dumps(result, indent=1, default=str)
        atomic_write(args.json, lambda f: f.write(text.encode("utf-8")))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_optimizers", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
