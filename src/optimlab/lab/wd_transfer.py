"""``optimlab lab wd-transfer``: does the best weight decay transfer across lr, data and width?

Issue 15 (seed 002, "weight decay" and muP): torch's lambda is coupled to the lr (the shrink
per update is c = eta lambda), Composer's ``independent`` lambda is c itself, Wang & Aitchison
(2024) set tau = 1 / c, the EMA timescale of the weights, and report that the best tau
*measured in epochs* stays put as model and data grow; Loshchilov & Hutter's normalized
lambda_norm = c sqrt(T) (T updates) is their answer to "the best weight decay depends on the
number of updates".  They are one quantity, c, in four units, so one grid of runs over c
answers for all of them: along each axis, the parametrization whose best value stays put is
the one that transfers.

What is measured.  An MLP head (Linear-GELU-Linear, hidden width w) on frozen MiniLM sentence
vectors of SST-5 (cached once, as wd-heatmap), trained with optimlab's AdamW (torch semantics:
eps 1e-8 on sqrt(v_hat), decay of theta_{t-1}; ``wd_mode="independent"`` so the grid is in c,
the shrink per update at the peak lr, on both weight matrices; biases undecayed) and linear
decay of the lr to 0, for every c of a grid and several seeds (initialisation and batch
order), along three axes from one baseline (peak lr eta, n training sentences, w), one axis at
a time: the peak lr; the training-set size at a fixed number of epochs (so the number of
updates grows with n); the width, with muP's Adam rule for the output layer (its lr scaled by
w_base / w; the input layer's fan-in does not change).  At each point the best c is the
minimum of the mean dev loss over seeds (smoother than accuracy; accuracy is reported beside
it) among the c whose mean accuracy is at least 1 point above the dev majority class's share
(a head decayed to the prior can beat an overconfident one on loss without classifying
anything), refined by a parabola in log c through the grid's best point and its neighbours;
a point whose curve is flat (dev loss within 0.01 nats over the whole grid) or whose best
lies at the grid's edge has no interior optimum and is left out of the fits.  Each axis gets the
least-squares slope of log10(best c) against log10(axis value); each parametrization's slope
follows: coupled lambda = c / eta (the output layer's eta on the width axis), independent
lambda = c, tau in epochs = 1 / (c K) for K updates per epoch, normalized lambda = c sqrt(T).
A parametrization transfers along an axis when its slope is within 0.3 of 0.
"""

from __future__ import annotations

import math

import torch

from ..adam import AdamW
from ._core import Cell, Lab, fmt, how_measured, mean, std
from ._data import FEATURE_MODEL, evaluate, fit, linear_head, sst_features
from ._plot import plt, save

NAME = "wd-transfer"
SUMMARY = "best weight decay across lr, data size and width: coupled vs independent vs timescale"
AXES = ("lr", "n_train", "width")
PARAMETRIZATIONS = ("coupled", "independent", "timescale", "normalized")
FLAT = 0.01                       # nats: a dev-loss curve flatter than this has no optimum
ABOVE_CHANCE = 0.01               # a head no more accurate than this over the majority class
                                  # has collapsed to the prior
TRANSFERS = 0.3                   # |slope| within which a parametrization "transfers"

QUICK = dict(n_dev=200, epochs=8, batch_size=32, seeds=2,
             base={"lr": 3e-3, "n_train": 300, "width": 64},
             axes={"lr": [1e-3, 3e-3, 1e-2], "n_train": [150, 300], "width": [32, 64]},
             cs=[1e-4, 1e-3, 1e-2, 1e-1])
FULL = dict(n_dev=None, epochs=10, batch_size=64, seeds=3,
            base={"lr": 3e-3, "n_train": 8000, "width": 256},
            axes={"lr": [1e-3, 3e-3, 1e-2, 3e-2], "n_train": [1000, 2000, 4000, 8000],
                  "width": [64, 256, 1024]},
            cs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1])


def config(opts) -> dict:
    base = QUICK if opts.quick else FULL
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    if opts.seeds is not None:
        cfg["seeds"] = opts.seeds
    cfg["quick"] = opts.quick
    cfg["model"] = FEATURE_MODEL + " -> Linear-GELU-Linear head"
    cfg["optimizer"] = ("optimlab.AdamW(eps=1e-8, eps_placement='sqrt_v_hat', "
                        "wd_after_update=False, wd_mode='independent'), linear decay to 0")
    return cfg


def _points(cfg: dict) -> list[dict]:
    """Every (lr, n_train, width) the axes visit (the baseline once)."""
    out = []
    for axis in AXES:
        for v in cfg["axes"][axis]:
            p = dict(cfg["base"], **{axis: v})
            if p not in out:
                out.append(p)
    return out


def run(opts):
    cfg = config(opts)
    # which cells run, not what a cell computes (the width muP scales from is in each cell)
    lab = Lab(NAME, opts.out, cfg, progress=opts.progress,
              grid_keys=("axes", "cs", "seeds", "base", "chance"))
    n_max = max(cfg["axes"]["n_train"] + [cfg["base"]["n_train"]])
    data = sst_features(n_max, cfg["n_dev"], opts.cache, progress=opts.progress)
    dim = data["train_x"].shape[1]
    # the majority class's share of dev: what a head decayed to the prior scores
    cfg["chance"] = round(torch.bincount(data["dev_y"]).max().item() / len(data["dev_y"]), 4)

    def compute(p: dict) -> dict:
        torch.manual_seed(p["seed"])
        model = linear_head(dim, 5, seed=p["seed"], hidden=p["width"])
        hidden, out = model[0], model[2]
        groups = [  # muP (Adam): the output layer's lr scales with 1 / width
            {"params": [hidden.weight], "lr": p["lr"], "weight_decay": p["c"]},
            {"params": [out.weight], "lr": p["lr"] * p["w_base"] / p["width"],
             "weight_decay": p["c"]},
            {"params": [hidden.bias, out.bias], "lr": p["lr"], "weight_decay": 0.0}]
        opt = AdamW(groups, eps=1e-8, eps_placement="sqrt_v_hat", wd_after_update=False,
                    wd_mode="independent")
        n = p["n_train"]
        x, y = data["train_x"][:n], data["train_y"][:n]
        res = fit(model, opt, lambda idx: (x[idx], y[idx]), n, epochs=cfg["epochs"],
                  batch_size=cfg["batch_size"], seed=p["seed"],
                  evaluate_fn=lambda m: evaluate(m, data["dev_x"], data["dev_y"]))
        last = res.epochs[-1]
        nan = float("nan")
        return {"dev_loss": nan if res.diverged else last.get("dev_loss", nan),
                "dev_acc": nan if res.diverged else last.get("dev_acc", nan),
                "train_loss": last["train_loss"], "diverged": res.diverged}

    cells = [Cell(f"lr{p['lr']:g}-n{p['n_train']}-w{p['width']}-c{c:g}-s{s}",
                  {**p, "w_base": cfg["base"]["width"], "c": c, "seed": s})
             for p in _points(cfg) for c in cfg["cs"] for s in range(cfg["seeds"])]
    results = lab.run_cells(cells, compute)
    runs: dict = {}                     # (lr, n, width, c) -> [(dev_loss, dev_acc) per seed]
    for cell, r in zip(cells, results):
        p = cell.params
        runs.setdefault((p["lr"], p["n_train"], p["width"], p["c"]), []).append(
            (_num(r["dev_loss"]), _num(r["dev_acc"])))
    summary = analyse(cfg, runs)
    figure = plot(cfg, runs, summary, lab.figure_path("wd-transfer.png"))
    conclusion = conclude(cfg, summary)
    lab.write_report(
        title="Does the best weight decay transfer? Coupled, independent, timescale, normalized",
        claim="the best weight decay, expressed as the weights' EMA timescale in epochs (Wang & "
              "Aitchison 2024), stays put as the lr, the data and the width change, while "
              "torch's lr-coupled lambda must be retuned for each (seed 002; issue 15).",
        conclusion=conclusion, how=how_measured(__doc__),
        sections=[slope_table(summary)] + [axis_table(cfg, runs, summary, a) for a in AXES],
        figures=[(figure.name, "Top: mean dev loss over seeds against the shrink per update "
                  "c, one curve per point of each axis, each interior optimum's c dotted.  "
                  "Bottom: each parametrization's best value along the axis, relative to the "
                  "baseline (flat = transfers)")],
        numbers={"summary": summary,
                 "mean_dev_loss": {f"{lr:g}|{n}|{w}|{c:g}": mean([v[0] for v in vs])
                                   for (lr, n, w, c), vs in runs.items()}})
    return lab, conclusion


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _nanmean(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return mean(xs) if xs else float("nan")


def best_c(cs: list[float], losses: list[float], accs: list[float] | None = None,
           chance: float = 0.0) -> dict:
    """The grid's best c (lowest mean dev loss), refined by a parabola in log10 c through it and
    its neighbours; ``status``: "interior", "edge" (best at the end of the grid, or of the c
    whose head still classifies), "flat" (the curve varies by less than `FLAT`) or
    "diverged".  ``accs``, ``chance``: a c whose mean accuracy is not `ABOVE_CHANCE` above the
    majority class's rate ``chance`` is left out: a head decayed to the prior can have a lower
    loss than an overconfident one without classifying anything."""
    if accs is not None:
        keep = [i for i, a in enumerate(accs) if not math.isnan(a) and a >= chance + ABOVE_CHANCE]
        cs, losses = [cs[i] for i in keep], [losses[i] for i in keep]
    pts = [(c, l) for c, l in zip(cs, losses) if not math.isnan(l)]
    if len(pts) < 3:
        return {"c": None, "status": "diverged", "loss": None}
    k = min(range(len(pts)), key=lambda i: pts[i][1])
    spread = max(l for _, l in pts) - pts[k][1]
    if spread < FLAT:
        return {"c": None, "status": "flat", "loss": pts[k][1]}
    if k in (0, len(pts) - 1):
        return {"c": pts[k][0], "status": "edge", "loss": pts[k][1]}
    (x0, y0), (x1, y1), (x2, y2) = [(math.log10(c), l) for c, l in pts[k - 1:k + 2]]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    x = x1 if a <= 0 else min(max(-b / (2 * a), x0), x2)
    return {"c": 10 ** x, "status": "interior", "loss": pts[k][1]}


def _slope(xs, ys) -> float | None:
    pts = [(math.log10(x), math.log10(y)) for x, y in zip(xs, ys) if y is not None]
    if len(pts) < 2:
        return None
    mx, my = mean([p[0] for p in pts]), mean([p[1] for p in pts])
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


#: d log(parametrization) / d log(axis) - d log c / d log(axis): coupled = c / eta (eta moves
#: with lr, and with 1 / width for the output layer), tau_epochs = 1 / (c K) (K ~ n),
#: normalized = c sqrt(T) (T ~ n)
OFFSETS = {"lr": {"coupled": -1.0, "independent": 0.0, "timescale": 0.0, "normalized": 0.0},
           "n_train": {"coupled": 0.0, "independent": 0.0, "timescale": None, "normalized": 0.5},
           "width": {"coupled": 1.0, "independent": 0.0, "timescale": None, "normalized": 0.0}}


def analyse(cfg: dict, runs: dict) -> dict:
    """Per axis: the best c at each point, the slope of log best c, and each
    parametrization's slope (the timescale's is -(slope of c) - (1 on the data axis))."""
    out = {}
    for axis in AXES:
        points = []
        for v in cfg["axes"][axis]:
            p = dict(cfg["base"], **{axis: v})
            key = (p["lr"], p["n_train"], p["width"])
            losses = [_nanmean([r[0] for r in runs[(*key, c)]]) for c in cfg["cs"]]
            accs = [_nanmean([r[1] for r in runs[(*key, c)]]) for c in cfg["cs"]]
            points.append({"value": v, "losses": losses, "accs": accs,
                           **best_c(cfg["cs"], losses, accs, cfg["chance"])})
        fitted = [(pt["value"], pt["c"]) for pt in points if pt["status"] == "interior"]
        s = _slope([f[0] for f in fitted], [f[1] for f in fitted])
        slopes = {}
        for par in PARAMETRIZATIONS:
            if s is None:
                slopes[par] = None
            elif par == "timescale":      # tau_epochs = 1 / (c K): -slope_c, minus 1 when K ~ n
                slopes[par] = -s - (1.0 if axis == "n_train" else 0.0)
            else:
                slopes[par] = s + OFFSETS[axis][par]
        out[axis] = {"points": points, "fitted": len(fitted), "c_slope": s, "slopes": slopes}
    return out


def conclude(cfg: dict, s: dict) -> str:
    parts, verdict = [], {}
    for axis in AXES:
        a = s[axis]
        if a["c_slope"] is None:
            parts.append(f"along {_axis_label(axis)} too few points had an interior optimum "
                         f"({a['fitted']} of {len(a['points'])}: "
                         f"{', '.join(pt['status'] for pt in a['points'])})")
            continue
        best = min(PARAMETRIZATIONS, key=lambda p: abs(a["slopes"][p]))
        ok = [p for p in PARAMETRIZATIONS if abs(a["slopes"][p]) <= TRANSFERS]
        verdict[axis] = ok
        parts.append(f"along {_axis_label(axis)} the best c moved with slope "
                     f"{a['c_slope']:.2f} ({a['fitted']} points), so " +
                     ", ".join(f"{p} {a['slopes'][p]:+.2f}" for p in PARAMETRIZATIONS) +
                     f": {'transfers: ' + ', '.join(ok) if ok else 'none transfers'}"
                     f" (closest: {best})")
    text = "In slopes of log(best value) against log(axis): " + "; ".join(parts) + ". "
    if len(verdict) < len(AXES):
        return text + ("The claim cannot be judged on every axis at this scale (a flat dev loss "
                       "means the decay does not matter there; an edge means the grid is too "
                       "narrow).")
    if all("timescale" in verdict[a] for a in AXES):
        others = [p for p in PARAMETRIZATIONS if p != "timescale"
                  and not all(p in verdict[a] for a in AXES)]
        return text + ("Confirmed: the timescale in epochs transferred along all three axes"
                       + (f", which {', '.join(others)} did not." if others else "."))
    failed = [a for a in AXES if "timescale" not in verdict[a]]
    return text + ("Not confirmed: the timescale in epochs did not transfer along " +
                   ", ".join(_axis_label(a) for a in failed) + ".")


def _axis_label(axis: str) -> str:
    return {"lr": "the lr", "n_train": "the training-set size", "width": "the width (muP)"}[axis]


def slope_table(s: dict) -> str:
    lines = ["### Slopes of log(best value) against log(axis value) (0: transfers)", "",
             "| axis | points with an optimum | best c | " +
             " | ".join(PARAMETRIZATIONS) + " |", "|---|---:|---:|" + "---:|" * 4]
    for axis in AXES:
        a = s[axis]
        lines.append(f"| {_axis_label(axis)} | {a['fitted']} of {len(a['points'])} | "
                     f"{fmt(a['c_slope'], 2)} | " +
                     " | ".join(fmt(a["slopes"][p], 2) for p in PARAMETRIZATIONS) + " |")
    return "\n".join(lines)


def axis_table(cfg: dict, runs: dict, s: dict, axis: str) -> str:
    cs = cfg["cs"]
    lines = [f"### Along {_axis_label(axis)} (others at the baseline {cfg['base']}): mean dev "
             f"loss (dev accuracy) over {cfg['seeds']} seeds", "",
             f"| {axis} \\ c | " + " | ".join(f"{c:g}" for c in cs) + " | best c |",
             "|---|" + "---|" * (len(cs) + 1)]
    for pt in s[axis]["points"]:
        cells = [f"{fmt(l)} ({fmt(a)})" if not math.isnan(l) else "diverged"
                 for l, a in zip(pt["losses"], pt["accs"])]
        best = f"{pt['c']:.3g}" if pt["c"] is not None else "-"
        lines.append(f"| {pt['value']:g} | " + " | ".join(cells) + f" | {best} ({pt['status']}) |")
    return "\n".join(lines)


def plot(cfg: dict, runs: dict, s: dict, path):
    fig, axes = plt.subplots(2, 3, figsize=(14, 8), layout="constrained")
    colors = plt.cm.viridis
    for j, axis in enumerate(AXES):
        ax = axes[0, j]
        pts = s[axis]["points"]
        for k, pt in enumerate(pts):
            col = colors(k / max(1, len(pts) - 1))
            ax.plot(cfg["cs"], pt["losses"], marker="o", color=col, label=f"{axis} {pt['value']:g}")
            if pt["status"] == "interior":
                ax.axvline(pt["c"], color=col, ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("shrink per update at the peak lr, c")
        ax.set_ylabel("dev loss (mean over seeds)")
        ax.set_title(f"along {_axis_label(axis)}")
        ax.legend(fontsize=8)
        ax = axes[1, j]
        fitted = [pt for pt in pts if pt["status"] == "interior"]
        if fitted:
            v0, c0 = fitted[0]["value"], fitted[0]["c"]
            for par, marker in zip(PARAMETRIZATIONS, "osv^"):
                rel = [_in(par, axis, pt["value"], pt["c"], cfg) / _in(par, axis, v0, c0, cfg)
                       for pt in fitted]
                ax.plot([pt["value"] for pt in fitted], rel, marker=marker, label=par)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("best value / its value at the first point")
        ax.legend(fontsize=8)
    fig.suptitle(f"AdamW on frozen MiniLM features, MLP head; baseline {cfg['base']}, "
                 f"{cfg['epochs']} epochs, {cfg['seeds']} seeds")
    return save(fig, path)


def _in(par: str, axis: str, value: float, c: float, cfg: dict) -> float:
    """The best c in parametrization ``par`` at ``value`` of ``axis`` (for the plot)."""
    p = dict(cfg["base"], **{axis: value})
    k = math.ceil(p["n_train"] / cfg["batch_size"])            # updates per epoch
    eta = p["lr"] * (cfg["base"]["width"] / p["width"] if axis == "width" else 1.0)
    return {"coupled": c / eta, "independent": c, "timescale": 1 / (c * k),
            "normalized": c * math.sqrt(k * cfg["epochs"])}[par]
