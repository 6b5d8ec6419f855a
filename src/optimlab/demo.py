"""A toy job for any optimizer: a small MLP learns a three-armed spiral (2-D points, 3 classes).

It runs in seconds on a CPU and shows the optimizer's progress: ``optimlab demo --optimizer
adafactor``.  The data and the model are generated from ``seed``, so runs are repeatable.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from .registry import create_optimizer

# a learning rate that trains the spiral in a few hundred full-batch steps
DEMO_LR = {"sgd": 0.3, "sgdw": 0.3, "adagrad": 0.1, "rmsprop": 3e-3, "adam": 1e-2,
           "adamw": 1e-2, "amsgrad": 1e-2, "radam": 1e-2, "adafactor": 1e-2}


def spiral(n_per_class: int = 200, classes: int = 3, noise: float = 0.15, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(classes):
        r = torch.linspace(0.05, 1.0, n_per_class)
        angle = c * 2 * math.pi / classes + 4.0 * r + noise * torch.randn(n_per_class, generator=g)
        xs.append(torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1))
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def run_demo(optimizer: str = "adamw", *, lr: float | None = None, steps: int = 500,
             weight_decay: float | None = None, wd_mode: str | None = None, seed: int = 0,
             log: Callable[[str], None] = print, log_every: int | None = None) -> dict:
    """Train the spiral MLP with ``optimizer`` and return the final loss and accuracy."""
    if steps < 1:
        raise ValueError(f"Invalid steps: {steps}; expected steps >= 1")
    x, y = spiral(seed=seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, 3))
    options = {}
    if wd_mode is not None:
        options["wd_mode"] = wd_mode
    opt = create_optimizer(model, optimizer, lr=DEMO_LR.get(optimizer.lower(), 1e-2) if lr is None else lr,
                           weight_decay=weight_decay, **options)
    log(f"optimlab demo: {optimizer} on a 3-class spiral ({len(x)} points), MLP 2-64-64-3, "
        f"{steps} full-batch steps, lr {opt.param_groups[0]['lr']:g}")
    log_every = log_every or max(1, steps // 10)
    start = time.perf_counter()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    for step in range(1, steps + 1):
        loss = opt.step(closure)
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                acc = (model(x).argmax(1) == y).float().mean().item()
            log(f"step {step:5d}/{steps}  loss {loss.item():.4f}  train acc {acc:.3f}  "
                f"({time.perf_counter() - start:.1f} s)")
    return {"loss": loss.item(), "accuracy": acc}
