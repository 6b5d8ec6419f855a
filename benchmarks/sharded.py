"""Sharded optimizer state: what each optimizer keeps per rank, what it all-reduces per step,
and its step time, at world size 1 and 2 (gloo, CPU).

The parameters are the GPT-2-small shapes of `optimlab.bench` (``--suite small`` for the
0.9M-parameter suite), laid out as FSDP2 lays them out: each a DTensor sharded on dimension 0
(``distribute_tensor(p, mesh, [Shard(0)])``), with a fixed gradient of the same layout.  Per
optimizer (its defaults, ``impl="auto"``):

* state bytes on rank 0 (the local shards of every state tensor);
* bytes all-reduced per step by rank 0, counted at ``torch.distributed.all_reduce``: the
  non-finite verdict's flag, and Adafactor's statistics and RMS values;
* the step time (median over ``--steps`` steps after one warm-up step), each rank running
  one intra-op thread.

    python benchmarks/sharded.py [--suite gpt2|small] [--steps 5] [--optimizers adamw,...]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch

import optimlab
from optimlab.bench import suite_shapes

DEFAULT = ("sgd", "adagrad", "rmsprop", "adam", "adamw", "radam", "adafactor")


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    counted = [0]
    real = dist.all_reduce

    def counting(tensor, *a, **k):
        counted[0] += tensor.numel() * tensor.element_size()
        return real(tensor, *a, **k)
    dist.all_reduce = counting
    rows = {}
    g = torch.Generator().manual_seed(0)
    for name in args.optimizers:
        params = []
        for _, shape in suite_shapes(args.suite):
            full = torch.empty(shape).normal_(0, 0.02, generator=g)
            grad = torch.empty(shape).normal_(0, 1e-3, generator=g)
            p = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
            p.grad = distribute_tensor(grad, mesh, [Shard(0)])
            params.append(p)
        opt = optimlab.create_optimizer(params, name)
        opt.step()                                    # warm-up: creates the state
        times = []
        counted[0] = 0
        for _ in range(args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        state = sum(v.to_local().numel() * v.element_size() for st in opt.state.values()
                    for v in st.values() if isinstance(v, torch.Tensor))
        local = sum(p.to_local().numel() for p in params)
        rows[name] = dict(state_bytes=state, local_params=local,
                          allreduce_bytes=counted[0] / args.steps,
                          step_ms=1e3 * statistics.median(times))
        del opt, params
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="gpt2", choices=("gpt2", "small"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--optimizers", default=",".join(DEFAULT))
    args = ap.parse_args(argv)
    args.optimizers = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    import tempfile
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            out = os.path.join(tmp, f"w{world}.pt")
            torch.multiprocessing.spawn(_worker, args=(world, _free_port(), args, out),
                                        nprocs=world, join=True)
            results[world] = torch.load(out)
    n = sum(torch.Size(s).numel() for _, s in suite_shapes(args.suite))
    print(f"{args.suite}: {n:,} parameters, Shard(0) DTensors, gloo, 1 thread per rank; "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    print(f"{'optimizer':<10} {'state MB w1':>12} {'state MB w2':>12} {'ratio':>6} "
          f"{'all-reduce B/step w2':>21} {'step ms w1':>11} {'step ms w2':>11}")
    for name in args.optimizers:
        a, b = results[1][name], results[2][name]
        ratio = b["state_bytes"] / a["state_bytes"] if a["state_bytes"] else float("nan")
        print(f"{name:<10} {a['state_bytes'] / 1e6:>12.2f} {b['state_bytes'] / 1e6:>12.2f} "
              f"{ratio:>6.3f} {b['allreduce_bytes']:>21,.0f} {a['step_ms']:>11.1f} "
              f"{b['step_ms']:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
