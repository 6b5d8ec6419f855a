"""The measurements behind optimlab's choice of fused kernel for CPU (README, "Performance").

On the GPT-2-small parameter set (124.4M fp32 parameters), AdamW with optimlab's default
(CS224N) semantics, no non-finite check, timed round-robin in one process after warm-up:

* ``torch fused AdamW``: ``torch.optim.AdamW(fused=True)`` (torch's semantics; the target);
* ``optimlab kernel``: optimlab's compiled CPU kernel (``impl="fused"``);
* ``torch._fused_adamw_ mapping``: optimlab's algebraic mapping of its semantics onto torch's own
  kernel (what ``impl="fused"`` runs without a C++ compiler, and on CUDA);
* ``torch.compile``: the same step written with torch ops, compiled by inductor, with lr and
  the bias corrections passed as 0-dim tensors so that changing them does not recompile;
  the compile time is reported;

and, for the build cost, the time to compile optimlab's kernel source and a
``torch.utils.cpp_extension.load_inline`` module that only includes ``torch/extension.h``
(what a torch C++ extension pays before its first kernel line).

    python benchmarks/fused_options.py [--repeat 10] [--no-compile] [--no-cpp-extension]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import optimlab
from optimlab import _ext
from optimlab.bench import gpt2_shapes, groups, make_params


def compiled_adamw():
    def step(ps, gs, ms, vs, lr, step_size, eps, beta1, beta2, decay):
        for p, g, m, v in zip(ps, gs, ms, vs):
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).add_(g * g * (1 - beta2))
            p.sub_(step_size * m / (v.sqrt() + eps))
            p.mul_(decay)
    return torch.compile(step, fullgraph=True, dynamic=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-cpp-extension", action="store_true")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    # build costs
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        cxx = _ext._compiler()
        if cxx:
            _ext._build(cxx, _ext._arch_flags(), Path(d) / "k.so")
            print(f"optimlab kernel source compiled in {time.perf_counter() - t0:.1f} s ({cxx})")
    if not args.no_cpp_extension:
        from torch.utils.cpp_extension import load_inline
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            try:
                load_inline("optimlab_empty_probe", cpp_sources="int probe() { return 1; }",
                            functions=["probe"], build_directory=d, verbose=False)
                print(f"torch.utils.cpp_extension.load_inline of an empty function: "
                      f"{time.perf_counter() - t0:.1f} s")
            except Exception as e:
                print(f"torch.utils.cpp_extension.load_inline failed: {e}")

    params = make_params(gpt2_shapes())
    n = sum(p.numel() for p in params)
    lr, wd = 1e-3, 0.01
    contenders = {}
    contenders["torch fused AdamW"] = torch.optim.AdamW(groups(params, wd), lr=lr, fused=True).step
    contenders["optimlab kernel"] = optimlab.AdamW(groups(params, wd), lr=lr, impl="fused",
                                                   nonfinite="ignore").step

    mapped = optimlab.AdamW(groups(params, wd), lr=lr, impl="fused", nonfinite="ignore")

    def mapped_step():
        old = _ext.set_enabled(False)
        try:
            mapped.step()
        finally:
            _ext.set_enabled(old)
    contenders["torch._fused_adamw_ mapping"] = mapped_step

    if not args.no_compile:
        fn = compiled_adamw()
        ms = [torch.zeros_like(p) for p in params]
        vs = [torch.zeros_like(p) for p in params]
        gs = [p.grad for p in params]
        state = {"t": 0}

        @torch.no_grad()                    # an optimizer step: in-place on leaf parameters
        def compiled_step():
            state["t"] += 1
            t = state["t"]
            bc1, bc2 = 1 - 0.9 ** t, 1 - 0.999 ** t
            fn(params, gs, ms, vs, torch.tensor(lr), torch.tensor(lr * math.sqrt(bc2) / bc1),
               torch.tensor(1e-6), torch.tensor(0.9), torch.tensor(0.999),
               torch.tensor(1 - lr * wd))
        t0 = time.perf_counter()
        compiled_step()
        print(f"torch.compile (inductor) first call: {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        compiled_step()
        print(f"torch.compile second call (step 2: new scalar values): "
              f"{time.perf_counter() - t0:.2f} s")
        contenders["torch.compile"] = compiled_step

    for f in contenders.values():
        for _ in range(3):
            f()
    times = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(args.repeat):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            contenders[k]()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["torch fused AdamW"])
    print(f"\n{n:,} parameters, 28 bytes each per AdamW step\n")
    print("| AdamW step | ms | vs torch fused | GB/s (28 B/param) |\n|---|---:|---:|---:|")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"| {k} | {m * 1e3:.1f} | {m / base:.2f}x | {28 * n / m / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
