"""Shared machinery for the parity tests: run two optimizers in lock-step on the same
gradient sequence and report how far their parameters and states drift apart."""

from __future__ import annotations

import math
from typing import Callable

import torch

# 1-D, 2-D and 3-D parameters, including a 1x1 and a non-square matrix
SHAPES = [(7,), (5, 3), (2, 4, 3), (1, 1), (16,)]
STEPS = 500


def make_params(shapes=SHAPES, dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for s in shapes]


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def gradient_sequence(params, steps=STEPS, seed=1, scale=1.0):
    """Yield, per step, one noise tensor per parameter (the same for both optimizers)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale
               for p in params]


def set_grads(params, noise, pull=0.5):
    """grad = noise + pull * p: a noisy quadratic, so the parameters feed back."""
    for p, n in zip(params, noise):
        p.grad = (n + pull * p.detach()).to(p.dtype)


def cosine_lr(step: int, steps: int, base: float) -> float:
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def run_lockstep(make_a: Callable, make_b: Callable, *, shapes=SHAPES, dtype=torch.float32,
                 steps=STEPS, seed=0, scale=1.0, schedule=False, pull=0.5):
    """Build both optimizers on identical parameters, step them ``steps`` times on the same
    gradients (optionally with a cosine lr schedule written into every group), and return
    (params_a, opt_a, params_b, opt_b)."""
    pa = make_params(shapes, dtype, seed)
    pb = clone_params(pa)
    oa, ob = make_a(pa), make_b(pb)
    base_a = [g["lr"] for g in oa.param_groups]
    base_b = [g["lr"] for g in ob.param_groups]
    for t, noise in enumerate(gradient_sequence(pa, steps, seed + 1, scale)):
        if schedule:
            for g, b in zip(oa.param_groups, base_a):
                g["lr"] = cosine_lr(t, steps, b)
            for g, b in zip(ob.param_groups, base_b):
                g["lr"] = cosine_lr(t, steps, b)
        set_grads(pa, noise, pull)
        set_grads(pb, noise, pull)
        oa.step()
        ob.step()
    return pa, oa, pb, ob


# The implementations every parity test runs: the per-tensor reference kernels, the
# multi-tensor kernels, and what ``impl="auto"`` picks (optimlab's fused CPU kernels where they
# are built, torch's fused Adam kernels for the Adam family without them, else the reference).
# The same tolerance holds on every path; the fast paths are measured with ``scaled=True``
# (see `max_param_diff`), the reference path absolutely.
IMPLS = ("reference", "foreach", "auto")


def with_impl(make: Callable, impl: str) -> Callable:
    """``make`` with optimlab's implementation ``impl`` (the parity tests hold on every path;
    tests/test_fast_paths.py also ties the fast paths to the reference directly)."""
    def build(params):
        opt = make(params)
        opt.impl = impl
        return opt
    return build


def _diff(a: torch.Tensor, b: torch.Tensor, scaled: bool) -> torch.Tensor:
    d = (a - b).abs()
    return d / b.abs().clamp(min=1.0) if scaled else d


def max_param_diff(pa, pb, scaled: bool = False) -> float:
    """Largest difference between the parameters.  ``scaled``: |a - b| / max(1, |b|), i.e.
    absolute for values up to 1 and relative above.  The fast paths are compared this way:
    they round differently from the reference (other summation orders in the Adafactor
    reductions; exact sqrt where torch's CPU sqrt, from MKL, is off by an ulp now and then),
    and float32 cannot resolve 1e-6 absolute on a value of 100 (its ulp there is 8e-6), which
    the runs with maximize or large accumulators (AdaGrad's sum) reach."""
    return max(_diff(a.detach().double(), b.detach().double(), scaled).max().item()
               for a, b in zip(pa, pb))


def max_state_diff(oa, pa, ob, pb, key_map: dict, reshape: bool = False,
                   scaled: bool = False) -> float:
    """Largest difference between state tensors; ``key_map`` maps our key -> their key.
    Keys missing on either side for a parameter are an error, numbers compare as floats.
    ``scaled`` as in `max_param_diff`."""
    worst = 0.0
    for a, b in zip(pa, pb):
        sa, sb = oa.state[a], ob.state[b]
        for ka, kb in key_map.items():
            if ka not in sa and kb not in sb:
                continue
            va, vb = sa[ka], sb[kb]
            if isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor):
                va, vb = torch.as_tensor(va).double(), torch.as_tensor(vb).double()
                if reshape:
                    vb = vb.reshape(va.shape)
                worst = max(worst, _diff(va, vb, scaled).max().item() if va.numel() else 0.0)
            else:
                worst = max(worst, abs(float(va) - float(vb)))
    return worst


# --------------------------------------------------------------------------- gloo workers
def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo process group on localhost (a worker of `run_workers`), one intra-op thread."""
    import os
    from datetime import timedelta
    torch.set_num_threads(1)
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world,
                                         timeout=timedelta(seconds=60))


def run_workers(worker: Callable, world: int, out_dir, timeout: float) -> None:
    """``worker(rank, world, port, out_dir)`` in ``world`` spawned processes; fails the test
    (killing them) when they do not finish within ``timeout`` seconds."""
    import socket
    import time

    import pytest
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.start_processes(worker, args=(world, port, str(out_dir)),
                                                nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"the {world} workers did not finish within {timeout:.0f} s")
