"""``optimlab lab NAME``: seed 002's claims about the Adam family as experiments with plots.

Each experiment (one module here) runs a grid of small, cached *cells*, draws PNGs, and writes
``reports/NAME/report.md`` (claim, the conclusion computed from the numbers, tables, figures,
config, seeds, wall time, versions) and ``results.json``; the conclusion is also printed.
``--quick`` shrinks every experiment to well under two minutes on two CPU cores.  Finished
cells are kept in ``reports/NAME/cells/``: an interrupted run, rerun, skips them.  MiniLM
sentence features are cached next to the reports (``reports/.cache/``), shared by experiments.

======================  ====================================================================
``wd-heatmap``          AdamW lr x weight decay, lr-coupled vs independent decay
``warmup-variance``     Adam without / with warmup vs RAdam, Adam-2k, Adam-eps; adaptive-lr variance
``memory``              optimizer-state bytes (GPT-2 small, MiniLM) and dev accuracy per optimizer
``epsilon``             eps on sqrt(v) (TensorFlow) vs sqrt(v_hat) (PyTorch): drift over steps
``sam-accumulation``    SAM with seed 004's naive accumulation vs the correct helper vs AdamW
``compare``             every optimizer on SST with its own lr search, several seeds
``wd-transfer``         the best weight decay across lr, data size and width, in four units
``adafactor-ablation``  Adafactor's ingredients added one at a time to Adam without momentum
``bias-correction``     AdamW with vs without bias correction, MiniLM fine-tunes on small sets
======================  ====================================================================
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EXPERIMENTS", "LabOptions", "run_experiment", "add_arguments", "main"]

#: name -> module (imported when run)
EXPERIMENTS = {
    "wd-heatmap": "wd_heatmap",
    "warmup-variance": "warmup_variance",
    "memory": "memory",
    "epsilon": "epsilon",
    "sam-accumulation": "sam_accumulation",
    "compare": "compare",
    "wd-transfer": "wd_transfer",
    "adafactor-ablation": "adafactor_ablation",
    "bias-correction": "bias_correction",
}


@dataclass
class LabOptions:
    """What ``optimlab lab`` passes to an experiment.  ``None`` means the mode's default."""

    name: str
    quick: bool = False
    out: str | None = None                 # default reports/NAME
    cache: str | None = None               # default <out>/../.cache
    seeds: int | None = None
    lrs: str | None = None                 # wd-heatmap: comma-separated learning rates
    wds: str | None = None                 # wd-heatmap: the lr-coupled grid
    wds_independent: str | None = None     # wd-heatmap: the independent grid
    progress: bool = True


def _module(name: str):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{EXPERIMENTS[name]}")


def run_experiment(opts: LabOptions):
    """Run one experiment; returns its `Lab` (out, computed/cached cell counts) and the
    conclusion paragraph."""
    module = _module(opts.name)
    if opts.seeds is not None and (isinstance(opts.seeds, bool) or opts.seeds < 1):
        raise ValueError(f"--seeds must be a positive integer, got {opts.seeds}")
    unused = [o for o, v in (("--lrs", opts.lrs), ("--wds", opts.wds),
                             ("--wds-independent", opts.wds_independent))
              if v is not None and o not in getattr(module, "OPTIONS", ())]
    if unused:
        raise ValueError(f"{opts.name} does not take {', '.join(unused)}")
    opts.out = str(Path(opts.out) if opts.out else Path("reports") / opts.name)
    if opts.cache is None:
        opts.cache = str(Path(opts.out).resolve().parent / ".cache")
    return module.run(opts)


def add_arguments(p) -> None:
    p.add_argument("name", metavar="NAME", type=_experiment_name,
                   help="one of: " + ", ".join(EXPERIMENTS))
    p.add_argument("--quick", action="store_true",
                   help="a small version (under ~2 minutes on 2 CPU cores)")
    p.add_argument("--out", metavar="DIR", help="report directory (default reports/NAME)")
    p.add_argument("--cache", metavar="DIR",
                   help="where cached MiniLM features go (default: .cache next to --out)")
    p.add_argument("--seeds", type=int, metavar="N", help="number of seeds, 0..N-1 (default: per mode)")
    p.add_argument("--lrs", metavar="LIST",
                   help="wd-heatmap: learning rates, comma-separated, e.g. 1e-3,3e-3,1e-2")
    p.add_argument("--wds", metavar="LIST", help="wd-heatmap: lr-coupled weight decays")
    p.add_argument("--wds-independent", metavar="LIST",
                   help="wd-heatmap: independent weight decays")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")


def _experiment_name(value: str) -> str:
    import argparse
    if value not in EXPERIMENTS:
        raise argparse.ArgumentTypeError(
            f"unknown experiment {value!r}; choose from {', '.join(EXPERIMENTS)}")
    return value


def main(args) -> None:
    """``optimlab lab``: run, then print where the report is and the conclusion."""
    opts = LabOptions(name=args.name, quick=args.quick, out=args.out, cache=args.cache,
                      seeds=args.seeds, lrs=args.lrs, wds=args.wds,
                      wds_independent=args.wds_independent, progress=args.progress)
    lab, conclusion = run_experiment(opts)
    print(f"optimlab lab {opts.name}{' --quick' if opts.quick else ''}: {lab.computed} cells "
          f"computed, {lab.cached} cached, {lab.wall_time:.0f} s; report: "
          f"{Path(lab.out) / 'report.md'}")
    print(conclusion)
