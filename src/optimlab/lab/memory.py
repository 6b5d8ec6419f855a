"""``optimlab lab memory``: how many bytes of optimizer state, and what does saving them cost?

Seed 002 (Adafactor): Adam keeps two full-size moments per parameter (8 bytes per fp32
parameter); Adafactor factors the second moment of an n x m matrix into n + m numbers and can
drop the first moment altogether; SGD with momentum keeps one buffer.  Storing Adam's moments in
bf16 halves them.

What is measured.

* State bytes: each optimizer's own ``_init_state`` is called for every trained parameter of
  GPT-2 small (124M, optimlab.models.gpt2) and of the embedded MiniLM-L6 (22.7M) plus its
  5-way head, both built on the ``meta`` device (shapes only, nothing allocated), with the
  parameter groups ``optimlab train`` uses; the bytes of every tensor in the state are summed.
  ``adamw-bf16`` is ``AdamW(state_dtype=torch.bfloat16)``: moments stored in bf16, computed in
  fp32 and rounded once per step.
* Dev accuracy: each optimizer fine-tunes on SST-5 with the same data, seed and schedule (lr:
  ``optimlab.train.default_lr``).  ``--quick``: the linear head on frozen MiniLM features
  (``--fine-tune-mode last-linear-layer``); full mode: the whole MiniLM on a subset of SST
  train, one epoch, the training pieces of ``optimlab train``.
"""

from __future__ import annotations

import torch

from ..adam import AdamW
from ..registry import create_optimizer, param_groups_weight_decay
from ..sgd import SGD
from ..train import default_lr
from ._core import Cell, Lab, fmt, how_measured, mean, mode_config, std
from ._data import (FEATURE_MODEL, evaluate, finetune_minilm, fit, linear_head, sst_features,
                    sst_token_sets)
from ._plot import plt, save

NAME = "memory"
SUMMARY = "optimizer-state bytes (GPT-2 small, MiniLM) and SST dev accuracy per optimizer"
OPTIMIZERS = ("adamw-fp32", "adamw-bf16", "adafactor+beta1", "adafactor", "sgd-momentum")
_REGISTRY_NAME = {"adamw-fp32": "adamw", "adamw-bf16": "adamw", "adafactor+beta1": "adafactor",
                  "adafactor": "adafactor", "sgd-momentum": "sgd"}

QUICK = dict(mode="last-linear-layer", n_train=400, n_dev=300, epochs=10, batch_size=32, seeds=2)
FULL = dict(mode="full-model", n_train=800, n_dev=500, epochs=1, batch_size=16, seeds=1)


def make_optimizer(name: str, groups, lr: float):
    """The five optimizers as the experiment builds them (train's conventions)."""
    if name.startswith("adamw"):
        return AdamW(groups, lr=lr,
                     state_dtype=torch.bfloat16 if name == "adamw-bf16" else None)
    if name.startswith("adafactor"):
        return create_optimizer(groups, "adafactor", lr=lr, scheduled=True,
                                beta1=0.9 if name == "adafactor+beta1" else None)
    return SGD(groups, lr=lr, momentum=0.9)


def state_bytes(model: torch.nn.Module, name: str) -> dict:
    """Bytes of optimizer state for ``model``'s trained parameters (meta tensors are fine)."""
    groups = param_groups_weight_decay(model, 0.01)
    opt = make_optimizer(name, groups, lr=1e-3)
    total, n_params = 0, 0
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt._init_state(p, g)
            total += sum(v.numel() * v.element_size() for v in st.values()
                         if isinstance(v, torch.Tensor))
            n_params += p.numel()
    return {"state_bytes": total, "params": n_params, "param_bytes_fp32": 4 * n_params}


def _meta_models() -> dict:
    from ..models import BertConfig, BertModel, GPT2Config, GPT2Model, SentimentClassifier
    from ..models import default_model_dir
    from ..models._checkpoint import read_config
    with torch.device("meta"):
        gpt2 = GPT2Model(GPT2Config())
        bert = BertModel(BertConfig.from_hf(read_config(default_model_dir())))
        minilm = SentimentClassifier(bert, 5, fine_tune_mode="full-model")
    if getattr(minilm.encoder, "pooler", None) is not None:
        minilm.encoder.pooler.requires_grad_(False)      # unused by mean pooling (as train)
    return {"GPT-2 small": gpt2, "MiniLM-L6 + head": minilm}


def run(opts):
    cfg = mode_config(opts, QUICK, FULL)
    cfg.update(optimizers=list(OPTIMIZERS),
               lrs={o: default_lr(_REGISTRY_NAME[o], cfg["mode"]) for o in OPTIMIZERS},
               model=(FEATURE_MODEL + " -> linear head" if cfg["mode"] == "last-linear-layer"
                      else "embedded MiniLM-L6, full model, mean pooling, dropout 0.1"),
               schedule="linear warmup 10% then linear decay, clip 1.0 (train's defaults)")
    lab = Lab(NAME, opts.out, cfg, progress=opts.progress,
              grid_keys=("seeds",))
    models = _meta_models()
    sizes = lab.run_cells([Cell(f"bytes-{o}", {"kind": "bytes", "optimizer": o})
                           for o in OPTIMIZERS],
                          lambda p: {m: state_bytes(model, p["optimizer"])
                                     for m, model in models.items()}, desc="state bytes")
    compute = _accuracy_cell(cfg, opts)
    cells = [Cell(f"acc-{o}-s{s}", {"kind": "accuracy", "optimizer": o, "seed": s,
                                     **({"state_dtype": "bfloat16"} if o == "adamw-bf16"
                                        else {})})
             for o in OPTIMIZERS for s in range(cfg["seeds"])]
    accs = lab.run_cells(cells, compute, desc="fine-tunes",
                         threads=1 if cfg["mode"] == "last-linear-layer" else None)
    acc = {o: [r["dev_acc"] for c, r in zip(cells, accs) if c.params["optimizer"] == o]
           for o in OPTIMIZERS}
    table = {o: {**{m: sizes[i][m] for m in models}, "dev_acc_mean": mean(acc[o]),
                 "dev_acc_std": std(acc[o]), "dev_acc": acc[o], "lr": cfg["lrs"][o]}
             for i, o in enumerate(OPTIMIZERS)}
    fig = plot(cfg, table, list(models), lab.figure_path("memory.png"))
    conclusion = conclude(table, list(models))
    rows = ["| optimizer | " + " | ".join(f"state, {m} (MiB)" for m in models) +
            " | bytes / parameter (GPT-2) | dev acc (mean +- std) | lr |",
            "|---|" + "---|" * (len(models) + 3)]
    for o in OPTIMIZERS:
        t = table[o]
        g = t["GPT-2 small"]
        rows.append(f"| {o} | " + " | ".join(f"{t[m]['state_bytes'] / 2**20:.1f}"
                                              for m in models) +
                    f" | {g['state_bytes'] / g['params']:.3f} | {fmt(t['dev_acc_mean'])} +- "
                    f"{fmt(t['dev_acc_std'])} | {t['lr']:g} |")
    lab.write_report(
        title="Optimizer-state memory and what it costs in accuracy",
        claim="Adafactor's factored second moment (and dropping the first moment) cuts the "
              "optimizer state from Adam's 8 bytes per parameter to almost nothing; bf16 "
              "moments halve Adam's (seed 002).",
        conclusion=conclusion, how=how_measured(__doc__),
        sections=["### State bytes and dev accuracy", "", "\n".join(rows)],
        figures=[(fig.name, "Optimizer state per model (left) and SST-5 dev accuracy (right)")],
        numbers={"table": table})
    return lab, conclusion


def _accuracy_cell(cfg: dict, opts):
    if cfg["mode"] == "last-linear-layer":
        data = sst_features(cfg["n_train"], cfg["n_dev"], opts.cache, progress=opts.progress)
        n, dim = data["train_x"].shape

        def compute(p):
            torch.manual_seed(p["seed"])
            model = linear_head(dim, 5, seed=p["seed"])
            opt = make_optimizer(p["optimizer"], param_groups_weight_decay(model, 0.01),
                                 cfg["lrs"][p["optimizer"]])
            x, y = data["train_x"], data["train_y"]
            res = fit(model, opt, lambda idx: (x[idx], y[idx]), n, epochs=cfg["epochs"],
                      batch_size=cfg["batch_size"], seed=p["seed"], warmup=0.1,
                      max_grad_norm=1.0)
            return {"dev_acc": evaluate(model, data["dev_x"], data["dev_y"])["acc"],
                    "train_loss": res.epochs[-1]["train_loss"]}
        return compute
    return _full_model_cell(cfg)


def _full_model_cell(cfg: dict):
    """A short full-model fine-tune of MiniLM with `optimlab.train`'s pieces."""
    sets = sst_token_sets(cfg["n_train"], cfg["n_dev"])

    def compute(p):
        res = finetune_minilm(sets, lambda groups: make_optimizer(
            p["optimizer"], groups, cfg["lrs"][p["optimizer"]]), seed=p["seed"],
            epochs=cfg["epochs"], batch_size=cfg["batch_size"])
        return {"dev_acc": res["dev_acc"], "train_loss": res["train_loss"]}
    return compute


def conclude(table: dict, models: list[str]) -> str:
    g = "GPT-2 small"
    base = table["adamw-fp32"][g]["state_bytes"]
    parts = [f"{o} {table[o][g]['state_bytes'] / 2**20:.0f} MiB "
             f"({table[o][g]['state_bytes'] / base:.3f}x)" for o in OPTIMIZERS]
    best = max(OPTIMIZERS, key=lambda o: table[o]["dev_acc_mean"])
    worst = min(OPTIMIZERS, key=lambda o: table[o]["dev_acc_mean"])
    spread = table[best]["dev_acc_mean"] - table[worst]["dev_acc_mean"]
    noise = max(table[o]["dev_acc_std"] for o in OPTIMIZERS)
    text = ("Optimizer state on GPT-2 small (124M parameters): " + ", ".join(parts) + ". "
            f"On MiniLM the factored Adafactor keeps "
            f"{table['adafactor']['MiniLM-L6 + head']['state_bytes'] / 2**20:.2f} MiB against "
            f"AdamW's {table['adamw-fp32']['MiniLM-L6 + head']['state_bytes'] / 2**20:.1f} MiB. "
            f"SST-5 dev accuracy: " + ", ".join(f"{o} {table[o]['dev_acc_mean']:.3f}"
                                                for o in OPTIMIZERS) + "; ")
    seeds = min(len(table[o]["dev_acc"]) for o in OPTIMIZERS)
    if seeds < 2:
        text += (f"best {best}, worst {worst}, {spread:.3f} apart, from one seed: no estimate "
                 f"of the seed noise, so read differences of a point or two as unresolved.")
    elif spread <= max(2 * noise, 0.01):
        text += (f"the spread ({spread:.3f}) is within the seed noise (std up to {noise:.3f}): "
                 f"no measurable accuracy cost of the smaller states in this fine-tune.")
    else:
        text += (f"best {best}, worst {worst}, {spread:.3f} apart (seed std up to "
                 f"{noise:.3f}), so in this short fine-tune the optimizers do differ.")
    return text


def plot(cfg: dict, table: dict, models: list[str], path):
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1.6, 1]})
    x = np.arange(len(OPTIMIZERS))
    w = 0.38
    for k, m in enumerate(models):
        vals = [table[o][m]["state_bytes"] / 2**20 for o in OPTIMIZERS]
        bars = axes[0].bar(x + (k - 0.5) * w, vals, w, label=m)
        for b, v in zip(bars, vals):
            axes[0].text(b.get_x() + b.get_width() / 2, v, f"{v:.3g}", ha="center",
                         va="bottom", fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_xticks(x, OPTIMIZERS, rotation=15)
    axes[0].set(ylabel="optimizer state (MiB, log scale)",
                title="Optimizer-state memory (parameters themselves not included)")
    axes[0].legend(loc="lower left")
    means = [table[o]["dev_acc_mean"] for o in OPTIMIZERS]
    errs = [table[o]["dev_acc_std"] for o in OPTIMIZERS]
    axes[1].bar(x, means, yerr=errs, capsize=4, color="tab:gray")
    for xi, v, e in zip(x, means, errs):
        axes[1].text(xi + 0.12, v + e, f"{v:.3f}", ha="left", va="bottom", fontsize=8)
    axes[1].set_xticks(x, OPTIMIZERS, rotation=15)
    lo = min(means) - 0.05
    axes[1].set_ylim(max(0.0, lo), min(1.0, max(means) + 0.05))
    axes[1].set(ylabel="SST-5 dev accuracy",
                title=f"Short fine-tune ({cfg['mode']}, {cfg['seeds']} seed(s); bar: std)")
    return save(fig, path)
