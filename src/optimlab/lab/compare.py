"""``optimlab lab compare``: every optimizer of optimlab on SST-5, each at its own best lr.

What is measured.  For each registered optimizer (`optimlab.list_optimizers()`), built as
``optimlab train`` builds it (registry defaults, weight decay 0.01 on weight matrices only,
Adafactor with an external lr), a linear head on frozen MiniLM sentence vectors of SST-5
(``--fine-tune-mode last-linear-layer`` with the encoder run once) is trained with linear
warmup (10%) and decay and gradient clipping at 1.0.  A short lr search: the grid is the
optimizer's ``default_lr`` times a few factors, with seed 0; the lr with the best final dev
accuracy is then run with the other seeds.  Reported: per optimizer the searched lrs and their
accuracies, the chosen lr, final dev accuracy (mean +- std over seeds) and the curves of training
loss and dev accuracy per epoch.  The lr is picked on the dev set that is also reported (no
separate test split here): the numbers are optimistic for every optimizer alike.
"""

from __future__ import annotations

import torch

from ..registry import create_optimizer, list_optimizers, param_groups_weight_decay
from ..train import default_lr
from ._core import Cell, Lab, fmt, how_measured, mean, mode_config, std
from ._data import FEATURE_MODEL, evaluate, fit, linear_head, sst_features
from ._plot import plt, save

NAME = "compare"
SUMMARY = "every optimizer on SST with the embedded model, own lr search, several seeds"

QUICK = dict(n_train=400, n_dev=300, epochs=8, batch_size=32, lr_factors=[1 / 3, 1, 3],
             seeds=2)
FULL = dict(n_train=None, n_dev=None, epochs=6, batch_size=32,
            lr_factors=[0.1, 1 / 3, 1, 3, 10], seeds=3)


def build(name: str, model, lr: float, weight_decay: float = 0.01):
    """The optimizer ``optimlab train --optimizer NAME --lr LR`` builds."""
    return create_optimizer(param_groups_weight_decay(model, weight_decay), name, lr=lr,
                            scheduled=True)


def run(opts):
    cfg = mode_config(opts, QUICK, FULL)
    names = list_optimizers()
    cfg.update(optimizers=names,
               base_lrs={o: default_lr(o, "last-linear-layer") for o in names},
               model=FEATURE_MODEL + " -> linear head", weight_decay=0.01,
               schedule="linear warmup 10%, linear decay, clip 1.0")
    lab = Lab(NAME, opts.out, cfg, progress=opts.progress,
              grid_keys=("seeds", "lr_factors", "base_lrs"))
    data = sst_features(cfg["n_train"], cfg["n_dev"], opts.cache, progress=opts.progress)
    n, dim = data["train_x"].shape
    x, y = data["train_x"], data["train_y"]

    def compute(p: dict) -> dict:
        torch.manual_seed(p["seed"])
        model = linear_head(dim, 5, seed=p["seed"])
        opt = build(p["optimizer"], model, p["lr"])
        res = fit(model, opt, lambda idx: (x[idx], y[idx]), n, epochs=cfg["epochs"],
                  batch_size=cfg["batch_size"], seed=p["seed"], warmup=0.1, max_grad_norm=1.0,
                  evaluate_fn=lambda m: evaluate(m, data["dev_x"], data["dev_y"]))
        return {"epochs": res.epochs, "diverged": res.diverged,
                "dev_acc": res.epochs[-1].get("dev_acc", 0.0)}

    lrs = {o: [cfg["base_lrs"][o] * f for f in cfg["lr_factors"]] for o in names}
    search = [Cell(f"search-{o}-lr{lr:.3g}", {"optimizer": o, "lr": lr, "seed": 0})
              for o in names for lr in lrs[o]]
    found = lab.run_cells(search, compute, desc="lr search")
    best_lr, search_acc = {}, {}
    for o in names:
        pairs = [(c.params["lr"], r["dev_acc"]) for c, r in zip(search, found)
                 if c.params["optimizer"] == o]
        search_acc[o] = pairs
        best_lr[o] = max(pairs, key=lambda t: t[1])[0]
    extra = [Cell(f"seed-{o}-lr{best_lr[o]:.3g}-s{s}", {"optimizer": o, "lr": best_lr[o],
                                                         "seed": s})
             for o in names for s in range(1, cfg["seeds"])]
    more = lab.run_cells(extra, compute, desc="seeds at the best lr")
    runs = {o: [r for c, r in zip(search, found) if c.params["optimizer"] == o
                and c.params["lr"] == best_lr[o]] +
            [r for c, r in zip(extra, more) if c.params["optimizer"] == o] for o in names}
    table = {o: {"lr": best_lr[o], "search": search_acc[o],
                 "dev_acc": [r["dev_acc"] for r in runs[o]],
                 "dev_acc_mean": mean([r["dev_acc"] for r in runs[o]]),
                 "dev_acc_std": std([r["dev_acc"] for r in runs[o]]),
                 "final_train_loss": mean([r["epochs"][-1]["train_loss"] for r in runs[o]])}
             for o in names}
    order = sorted(names, key=lambda o: -table[o]["dev_acc_mean"])
    fig = plot(cfg, runs, order, lab.figure_path("compare.png"))
    conclusion = conclude(table, order)
    rows = ["| rank | optimizer | chosen lr | dev acc (mean +- std) | final train loss | lr "
            "search (seed 0): lr -> dev acc |", "|---|---|---|---|---|---|"]
    for k, o in enumerate(order, 1):
        t = table[o]
        rows.append(f"| {k} | {o} | {t['lr']:.3g} | {fmt(t['dev_acc_mean'])} +- "
                    f"{fmt(t['dev_acc_std'])} | {fmt(t['final_train_loss'])} | " +
                    ", ".join(f"{lr:.3g} -> {fmt(a)}" for lr, a in t["search"]) + " |")
    lab.write_report(
        title="Every optimizer on SST-5, each at its own learning rate",
        claim="(a survey, not a claim of seed 002) how the optimizers of optimlab compare on "
              "the sentiment task once each has its own learning rate.",
        conclusion=conclusion, how=how_measured(__doc__),
        sections=[f"### Ranking ({cfg['seeds']} seeds at the chosen lr)", "", "\n".join(rows)],
        figures=[(fig.name, "Training loss and dev accuracy per epoch at each optimizer's "
                            "chosen lr (mean over seeds)")],
        numbers={"table": table, "ranking": order})
    return lab, conclusion


def conclude(table: dict, order: list[str]) -> str:
    top, last = order[0], order[-1]
    noise = max(table[o]["dev_acc_std"] for o in order)
    tied = [o for o in order if table[top]["dev_acc_mean"] - table[o]["dev_acc_mean"] <=
            max(2 * noise, 0.005)]
    text = ("Ranking by mean dev accuracy at each optimizer's own lr: " +
            ", ".join(f"{o} {table[o]['dev_acc_mean']:.3f} (lr {table[o]['lr']:.3g})"
                      for o in order) + ". ")
    text += (f"Within twice the largest seed std ({noise:.3f}) of the best: "
             f"{', '.join(tied)}; {last} is last, "
             f"{table[top]['dev_acc_mean'] - table[last]['dev_acc_mean']:.3f} behind {top}.")
    edge = [o for o in order if table[o]["lr"] in (table[o]["search"][0][0],
                                                   table[o]["search"][-1][0])]
    if edge:
        text += (" The chosen lr lies at the edge of the searched grid for " + ", ".join(edge) +
                 ": a wider search might change their place.")
    return text


def plot(cfg: dict, runs: dict, order: list[str], path):
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    cmap = plt.get_cmap("tab10")
    for k, o in enumerate(order):
        rs = runs[o]
        L = np.array([[e["train_loss"] for e in r["epochs"]] for r in rs])
        A = np.array([[e.get("dev_acc", np.nan) for e in r["epochs"]] for r in rs])
        ep = np.arange(1, L.shape[1] + 1)
        axes[0].plot(ep, L.mean(0), marker=".", color=cmap(k), label=o)
        axes[1].plot(ep, A.mean(0), marker=".", color=cmap(k), label=o)
    axes[0].set(xlabel="epoch", ylabel="training loss (cross-entropy, nats)",
                title="Training loss at each optimizer's chosen lr")
    axes[1].set(xlabel="epoch", ylabel="SST-5 dev accuracy",
                title=f"Dev accuracy (mean over {cfg['seeds']} seeds)")
    axes[1].legend(loc="lower right", ncol=2, fontsize=8)
    return save(fig, path)
