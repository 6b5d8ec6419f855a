"""``optimlab lab wd-heatmap``: does the best weight decay move with the learning rate?

Seed 002 (AdamW section): PyTorch's AdamW multiplies the decay by the learning rate,
theta <- theta - eta_t * lambda * theta (``wd_mode="decoupled"``), so the shrinkage per step is
eta * lambda and the lambda that regularizes best should scale like 1/eta: change the lr and you
must retune lambda.  Loshchilov & Hutter's "truly decoupled" decay (Composer's, ``wd_mode=
"independent"``) shrinks by (eta_t / eta_0) * lambda, the schedule only, so the best lambda
should stay put when the peak lr changes.

What is measured.  A linear head on frozen MiniLM sentence vectors of SST-5 (cached once; the
same model as ``optimlab train --fine-tune-mode last-linear-layer`` with dropout 0) trained with
optimlab's AdamW (torch semantics otherwise: eps 1e-8 on sqrt(v_hat), decay of theta_{t-1},
weight matrix only) with linear decay of the lr to 0, for every (lr, lambda) of a grid, both
modes, several seeds (initialisation and batch order).  Per mode, the dev accuracy averaged over
seeds is a heatmap; per lr we take

* the best lambda (argmax of mean dev accuracy), and
* the *edge*: the largest lambda whose mean accuracy is within 1 point of that lr's best (where
  decay starts to hurt; less noisy than the argmax on a flat plateau),

and fit log10(lambda) against log10(lr).  Slope -1 means "lambda must scale like 1/lr", slope 0
means "lambda does not care about lr".  The shift reported is that slope and the move in decades
of the best/edge lambda from the smallest to the largest lr.
"""

from __future__ import annotations

import math

import torch

from ..adam import AdamW
from ..registry import param_groups_weight_decay
from ._core import Cell, Lab, fmt, how_measured, mean, parse_grid, std
from ._data import FEATURE_MODEL, evaluate, fit, linear_head, sst_features
from ._plot import plt, save

NAME = "wd-heatmap"
SUMMARY = "AdamW lr x weight-decay grid: lr-coupled (PyTorch) vs independent decay"
MODES = ("decoupled", "independent")
OPTIONS = ("--lrs", "--wds", "--wds-independent")      # the grid options it takes
TOLERANCE = 0.01                  # "within 1 point of the best"

QUICK = dict(n_train=400, n_dev=300, epochs=25, batch_size=100, seeds=3,
             lrs=[1e-3, 2.5e-3, 6.3e-3, 1.6e-2, 4e-2, 1e-1],
             wds={"decoupled": [1e-2, 1e-1, 1, 10, 1e2, 1e3],
                  "independent": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1]})
FULL = dict(n_train=None, n_dev=None, epochs=10, batch_size=64, seeds=3,
            lrs=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
            wds={"decoupled": [1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1, 3, 10],
                 "independent": [1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]})


def config(opts) -> dict:
    base = QUICK if opts.quick else FULL
    cfg = {k: v for k, v in base.items()}
    cfg["wds"] = dict(base["wds"])
    if opts.seeds is not None:
        cfg["seeds"] = opts.seeds
    if opts.lrs is not None:
        cfg["lrs"] = parse_grid("--lrs", opts.lrs, positive=True)
    if opts.wds is not None:
        cfg["wds"]["decoupled"] = parse_grid("--wds", opts.wds, minimum=0.0)
    if opts.wds_independent is not None:
        cfg["wds"]["independent"] = parse_grid("--wds-independent", opts.wds_independent,
                                               minimum=0.0)
    cfg["quick"] = opts.quick
    cfg["model"] = FEATURE_MODEL + " -> linear head"
    cfg["optimizer"] = "optimlab.AdamW(eps=1e-8, eps_placement='sqrt_v_hat', " \
                       "wd_after_update=False), linear decay to 0, no warmup"
    return cfg


def run(opts):
    cfg = config(opts)
    lab = Lab(NAME, opts.out, cfg, progress=opts.progress,
              grid_keys=("lrs", "wds", "seeds"))
    data = sst_features(cfg["n_train"], cfg["n_dev"], opts.cache, progress=opts.progress)
    n, dim = data["train_x"].shape
    seeds = list(range(cfg["seeds"]))

    def compute(p: dict) -> dict:
        torch.manual_seed(p["seed"])
        model = linear_head(dim, 5, seed=p["seed"])
        opt = AdamW(param_groups_weight_decay(model, p["wd"]), lr=p["lr"], eps=1e-8,
                    eps_placement="sqrt_v_hat", wd_after_update=False, wd_mode=p["mode"])
        x, y = data["train_x"], data["train_y"]
        res = fit(model, opt, lambda idx: (x[idx], y[idx]), n, epochs=cfg["epochs"],
                  batch_size=cfg["batch_size"], seed=p["seed"],
                  evaluate_fn=lambda m: evaluate(m, data["dev_x"], data["dev_y"]))
        last = res.epochs[-1]
        acc = last.get("dev_acc", float("nan")) if not res.diverged else float("nan")
        return {"dev_acc": acc, "dev_loss": last.get("dev_loss", float("nan")),
                "train_loss": last["train_loss"], "diverged": res.diverged,
                "weight_norm": model[0].weight.norm().item()}

    cells = [Cell(f"{mode}-lr{lr:g}-wd{wd:g}-s{s}", {"mode": mode, "lr": lr, "wd": wd, "seed": s})
             for mode in MODES for lr in cfg["lrs"] for wd in cfg["wds"][mode] for s in seeds]
    results = lab.run_cells(cells, compute)
    acc = {}                                        # (mode, lr, wd) -> [acc per seed]
    for cell, r in zip(cells, results):
        p = cell.params
        acc.setdefault((p["mode"], p["lr"], p["wd"]), []).append(
            r["dev_acc"] if r["dev_acc"] is not None else float("nan"))
    summary = analyse(cfg, acc)
    figure = plot(cfg, acc, summary, lab.figure_path("heatmaps.png"))
    conclusion = conclude(cfg, summary)
    sections = [table(cfg, acc, summary, mode) for mode in MODES]
    lab.write_report(
        title="Weight decay x learning rate: lr-coupled vs independent AdamW decay",
        claim="with PyTorch's lr-coupled decay (`decoupled`) the best weight decay shifts with "
              "the learning rate; with truly decoupled (`independent`) decay it does not "
              "(seed 002, AdamW section).",
        conclusion=conclusion, how=how_measured(__doc__),
        sections=sections, figures=[(figure.name, "Mean dev accuracy over seeds; the star marks "
                                    "each lr's best weight decay, the dot its edge")],
        numbers={"summary": summary,
                 "mean_dev_acc": {f"{m}|{lr:g}|{wd:g}": mean(v) for (m, lr, wd), v in
                                  acc.items()}})
    return lab, conclusion


def _nanmean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return mean(xs) if xs else float("nan")


def analyse(cfg: dict, acc: dict) -> dict:
    """Per mode: best and edge lambda per lr, their least-squares slopes in log-log, moves."""
    out = {}
    for mode in MODES:
        wds = cfg["wds"][mode]
        best, edge, best_acc = [], [], []
        for lr in cfg["lrs"]:
            row = [_nanmean(acc[(mode, lr, wd)]) for wd in wds]
            finite = [(a, wd) for a, wd in zip(row, wds) if not math.isnan(a)]
            if not finite:
                best.append(None), edge.append(None), best_acc.append(None)
                continue
            top, top_wd = max(finite, key=lambda t: (t[0], -t[1]))
            best.append(top_wd)
            best_acc.append(top)
            edge.append(max(wd for a, wd in finite if a >= top - TOLERANCE))
        out[mode] = {"lrs": cfg["lrs"], "best_wd": best, "best_acc": best_acc, "edge_wd": edge,
                     "best_slope": _slope(cfg["lrs"], best), "edge_slope": _slope(cfg["lrs"], edge),
                     "best_move_decades": _move(best), "edge_move_decades": _move(edge)}
    return out


def _log(wd: float, floor: float = 1e-12) -> float:
    return math.log10(max(wd, floor))


def _slope(lrs, wds) -> float | None:
    pts = [(math.log10(lr), _log(wd)) for lr, wd in zip(lrs, wds) if wd is not None and wd > 0]
    if len(pts) < 2:
        return None
    mx, my = mean([p[0] for p in pts]), mean([p[1] for p in pts])
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def _move(wds) -> float | None:
    pts = [w for w in wds if w is not None and w > 0]
    return _log(pts[-1]) - _log(pts[0]) if len(pts) >= 2 else None


def conclude(cfg: dict, s: dict) -> str:
    d, i = s["decoupled"], s["independent"]
    lo, hi = cfg["lrs"][0], cfg["lrs"][-1]
    decades = math.log10(hi / lo)

    def describe(m, label):
        return (f"with {label} decay the best weight decay goes from {m['best_wd'][0]:g} at lr "
                f"{lo:g} to {m['best_wd'][-1]:g} at lr {hi:g} (log-log slope "
                f"{fmt(m['best_slope'], 2)}), and the edge where decay starts to cost over 1 "
                f"point from {m['edge_wd'][0]:g} to {m['edge_wd'][-1]:g} (slope "
                f"{fmt(m['edge_slope'], 2)})")
    text = (f"Over {decades:.1f} decades of lr, " + describe(d, "lr-coupled (`decoupled`)") +
            "; " + describe(i, "`independent`") + ". ")
    ds, is_ = d["edge_slope"], i["edge_slope"]
    if ds is None or is_ is None:
        return text + "Too many diverged cells to compare the modes."
    if ds <= -0.5 and abs(is_) <= 0.5 * abs(ds):
        verdict = (f"The claim holds on this task: the coupled optimum moves like lr^"
                   f"{ds:.2f} while the independent one moves like lr^{is_:.2f}.")
    elif abs(ds) <= 0.25 and abs(is_) <= 0.25:
        verdict = ("Neither optimum moved measurably here: weight decay hardly matters on this "
                   "task at this grid, so the run neither confirms nor refutes the claim.")
    else:
        verdict = (f"The claim is not clearly confirmed here: edge slopes {ds:.2f} (coupled) vs "
                   f"{is_:.2f} (independent), where the claim predicts about -1 vs 0.")
    edges = [f"`{m}` at lr {lr:g}" for m in MODES for lr, b in zip(cfg["lrs"], s[m]["best_wd"])
             if b is not None and b == max(cfg["wds"][m]) and len(cfg["wds"][m]) > 2]
    if edges:
        verdict += (" Caveat: the best weight decay is the largest of the grid for " +
                    ", ".join(edges) + ", so the optimum there may lie beyond it (widen "
                    "--wds/--wds-independent).")
    return text + verdict


def table(cfg: dict, acc: dict, summary: dict, mode: str) -> str:
    wds = cfg["wds"][mode]
    head = "| lr \\ weight decay | " + " | ".join(f"{wd:g}" for wd in wds) + " | best | edge |"
    lines = [f"### Mean dev accuracy, `{mode}` ({cfg['seeds']} seeds; +- = std over seeds)", "",
             head, "|" + "---|" * (len(wds) + 3)]
    for k, lr in enumerate(cfg["lrs"]):
        cells = []
        for wd in wds:
            v = acc[(mode, lr, wd)]
            m = _nanmean(v)
            cells.append(f"{fmt(m)} +- {fmt(std([x for x in v if not math.isnan(x)]))}"
                         if not math.isnan(m) else "diverged")
        s = summary[mode]
        lines.append(f"| {lr:g} | " + " | ".join(cells) + f" | {s['best_wd'][k]} | "
                     f"{s['edge_wd'][k]} |")
    return "\n".join(lines)


def plot(cfg: dict, acc: dict, summary: dict, path):
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    grids = {m: np.array([[_nanmean(acc[(m, lr, wd)]) for lr in cfg["lrs"]]
                          for wd in cfg["wds"][m]]) for m in MODES}
    vmax = max(np.nanmax(g) for g in grids.values())
    vmin = min(np.nanmin(g) for g in grids.values())
    titles = {"decoupled": "lr-coupled decay (PyTorch AdamW):\n"
                           r"$\theta \leftarrow \theta - \eta_t\lambda\theta$",
              "independent": "independent decay (Loshchilov & Hutter, Composer):\n"
                             r"$\theta \leftarrow \theta - (\eta_t/\eta_0)\lambda\theta$"}
    for ax, mode in zip(axes, MODES):
        g = grids[mode]
        im = ax.imshow(g, origin="lower", cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for (r, c), v in np.ndenumerate(g):
            ax.text(c + 0.12, r, "diverged" if np.isnan(v) else f"{v:.3f}", ha="center",
                    va="center", fontsize=7,
                    color="black" if np.isnan(v) or v > (vmin + vmax) / 2 else "white")
        s = summary[mode]
        wds = cfg["wds"][mode]
        for k, (b, e) in enumerate(zip(s["best_wd"], s["edge_wd"])):
            if b is not None:
                ax.plot(k - 0.36, wds.index(b) + 0.2, marker="*", color="red", markersize=10,
                        markeredgecolor="white", label="best λ" if k == 0 else None)
                ax.plot(k - 0.36, wds.index(e) - 0.2, marker="o", color="orange", markersize=6,
                        markeredgecolor="black", label="edge λ (≤1 pt below best)"
                        if k == 0 else None)
        ax.set_xticks(range(len(cfg["lrs"])), [f"{lr:g}" for lr in cfg["lrs"]], rotation=30)
        ax.set_yticks(range(len(wds)), [f"{wd:g}" for wd in wds])
        ax.set_xlabel("peak learning rate η₀")
        ax.set_ylabel("weight decay λ")
        ax.set_facecolor("#dddddd")                 # diverged cells (NaN) show grey
        ax.grid(False)
        ax.set_title(titles[mode] + f"\nedge slope d log λ / d log η = {fmt(s['edge_slope'], 2)}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    fig.colorbar(im, ax=axes, label="dev accuracy (SST-5, mean over seeds)", shrink=0.9)
    fig.suptitle(f"AdamW on frozen MiniLM features, {cfg['n_train'] or 'all'} SST train "
                 f"sentences, {cfg['epochs']} epochs, {cfg['seeds']} seeds")
    return save(fig, path)
