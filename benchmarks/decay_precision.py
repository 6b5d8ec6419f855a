"""How much of the intended weight decay each ``wd_form`` applies in low precision.

    python benchmarks/decay_precision.py [--n 100000] [--steps 1000]

1. Decay alone (zero gradients, ``wd_mode="absolute"``: the shrink per update is c): the
   decay the weights received, sum(|theta_0| - |theta_T|), as a percentage of the intended
   sum(|theta_0|) (1 - (1 - c)^T), for float32 and bfloat16 weights.
2. Ordinary steps: AdamW fine-tuning at lr 1e-5 with weight decay 1e-3 (c = 1e-8 per update,
   torch's decoupled form), and at lr 1e-4 with 1e-2 (c = 1e-6), on noisy-quadratic
   gradients; each run in float32 against the same run in float64 (same gradients): the
   decay applied (the float64 run's decay shrink is the intended one) and how far the weights
   drift from float64, relative to how far they moved.
"""

from __future__ import annotations

import argparse

import torch

import optimlab

FORMS = ("multiply", "add", "fold", "compensated")


def decay_alone(dtype: torch.dtype, form: str, c: float, n: int, steps: int) -> float:
    w0 = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)
    p = w0.clone().requires_grad_()
    opt = optimlab.AdamW([p], lr=1.0, weight_decay=c, wd_mode="absolute",
                         wd_after_update=False, wd_form=form)
    for _ in range(steps):
        p.grad = torch.zeros_like(p)
        opt.step()
    intended = w0.double().abs().sum() * (1 - (1 - c) ** steps)
    return 100 * ((w0.double().abs() - p.detach().double().abs()).sum() / intended).item()


def ordinary(form: str, n: int, steps: int, lr=1e-5, wd=1e-3,
             low=torch.float32) -> tuple[float, float]:
    """(decay applied in %, drift from float64 relative to the movement) of a run with
    weights in ``low``."""
    runs = {}
    for dtype, wd_ in ((torch.float64, wd), (low, wd), (torch.float64, 0.0), (low, 0.0)):
        g = torch.Generator().manual_seed(0)
        w0 = torch.randn(n, generator=g, dtype=torch.float64)
        p = w0.to(dtype).requires_grad_()
        opt = optimlab.AdamW([p], lr=lr, weight_decay=wd_, wd_mode="decoupled",
                             wd_after_update=False, wd_form=form if wd_ else None)
        for _ in range(steps):
            p.grad = (torch.randn(n, generator=g, dtype=torch.float64) + 0.1 * w0).to(dtype)
            opt.step()
        runs[(dtype, wd_)] = p.detach().double()
    # the decay applied: the decayed run against the same run without decay
    want = (runs[(torch.float64, 0.0)].abs() - runs[(torch.float64, wd)].abs()).sum()
    got = (runs[(low, 0.0)].abs() - runs[(low, wd)].abs()).sum()
    moved = (runs[(torch.float64, wd)] - w0).norm()
    drift = (runs[(low, wd)] - runs[(torch.float64, wd)]).norm() / moved
    return 100 * (got / want).item(), drift.item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="weights")
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args(argv)
    print(f"1. decay alone, {args.n} weights, {args.steps} updates: % of the intended decay")
    print(f"| weights | c per update | {' | '.join(FORMS)} |")
    print("|---|---:|" + "---:|" * len(FORMS))
    for dtype, cs in ((torch.float32, (2e-7, 1e-7, 3e-8, 1e-8, 1e-9)),
                      (torch.bfloat16, (1e-2, 3e-3, 1e-3, 1e-4))):
        for c in cs:
            row = [f"{decay_alone(dtype, f, c, args.n, args.steps):.1f}%" for f in FORMS]
            print(f"| {str(dtype).replace('torch.', '')} | {c:g} | {' | '.join(row)} |")
    for lr, wd in ((1e-5, 1e-3), (1e-4, 1e-2)):
        print(f"\n2. AdamW, lr {lr:g}, weight decay {wd:g} (c = {lr * wd:g}), float32 against "
              f"float64, {args.steps} updates")
        print("| wd_form | decay applied | drift from float64 / movement |")
        print("|---|---:|---:|")
        for f in FORMS:
            applied, drift = ordinary(f, args.n, args.steps, lr, wd)
            print(f"| {f} | {applied:.1f}% | {drift:.2e} |")

if __name__ == "__main__":
    main()
