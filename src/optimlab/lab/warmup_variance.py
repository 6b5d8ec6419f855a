"""``optimlab lab warmup-variance``: Adam without warmup, Adam with linear warmup, RAdam, and the
RAdam paper's two other variance-reduction baselines, trained from scratch.

Seed 002/003 (RAdam): in the first steps v_t is an average of very few squared gradients, so the
adaptive learning rate l_t = 1 / (sqrt(v_hat_t) + eps) has a large variance (unbounded at t = 1,
Liu et al. 2020, section 3); Adam's first updates are then large and erratic, which is why
transformers need warmup.  RAdam multiplies by the rectifier r_t (and takes plain momentum steps
while the variance is intractable) instead of a hand-set warmup.  The RAdam paper backs the
variance explanation with two more baselines (seed 003): Adam-2k (for the first 2k updates only
v is updated, with neither a parameter nor a momentum update, so that v has many samples before
it is used) and Adam-eps (a large eps, 1e-4, which bounds l_t); both should tame the first
updates as warmup does.  Ma & Yarats (2021) report that an untuned linear warmup over
2 / (1 - beta2) updates does about as well as RAdam.

What is measured. A small GPT-2 (optimlab.models.gpt2: random init, no dropout) trained from
scratch as a language model on SST-5 sentences (MiniLM's tokenizer, the vocabulary cut to the
tokens that occur), with the same peak lr, betas (0.9, 0.999), batches and linear decay for:
``adam`` (no warmup), ``adam+warmup`` (linear warmup over the first part of the updates),
``radam`` (no warmup), ``adam-2k`` (the first updates, as many as the warmup's, update v only:
the lr is 0 for them and m is reset to 0 after each; the step count runs on, so v's bias
correction counts them, and m starts from 0 after them) and ``adam-eps`` (eps 1e-4, no warmup),
several seeds (the vocabulary is cut to the most frequent ids, the rest one unknown id, to keep
the softmax affordable on a CPU). Per update: the training loss; the spread of the adaptive lr
across the coordinates of the weight matrices, Var[log10 l_t] with l_t = 1 / (sqrt(v_hat_t) +
eps) (the quantity whose early variance the RAdam paper blames); and the relative size of the
update ||theta_t - theta_{t-1}|| / ||theta_{t-1}||. A run *diverged* if its loss became
non-finite or ended above its start; it *lagged* if its mean loss over the first quarter of the
updates is more than 2% above the best method's; it *spiked* if its loss later rose above its
value at the first update (Adam-2k: at its first update that moves the weights).  Ma & Yarats'
rule gives 2,000 updates at beta2 = 0.999, more than the run, so their claim is tested in a
second arm at beta2 = 0.98 (0.9 in the quick mode): ``adam``, ``radam`` and
``adam+untuned-warmup`` (linear warmup over 2 / (1 - beta2) = 100 updates, 20 in the quick
mode), the same seeds; confirmed where the untuned warmup's final loss is at most 3% above
RAdam's.
"""

from __future__ import annotations

import math

import torch

from ..adam import Adam
from ..loop import updates_per_epoch, warmup_updates
from ..radam import RAdam
from ..sam import accumulate_and_step
from ._core import Cell, fmt, how_measured, mean, std
from ._data import UpdateSizes, fit, lm_experiment, lm_loss, tiny_lm
from ._plot import plt, save

NAME = "warmup-variance"
SUMMARY = ("Adam without/with warmup vs RAdam, Adam-2k and Adam-eps from scratch: loss curves, "
           "adaptive-lr variance")
METHODS = ("adam", "adam+warmup", "radam", "adam-2k", "adam-eps")
BIG_EPS = 1e-4          # Adam-eps (Liu et al. 2020)
#: Ma & Yarats' arm: a beta2 whose untuned warmup, 2 / (1 - beta2) updates, fits in the run
UNTUNED_BETA2 = {True: 0.9, False: 0.98}          # quick: 20 of 40 updates; full: 100 of 375
UNTUNED = ("adam", "radam", "adam+untuned-warmup")
CLOSE = 0.03
LAG = 0.02

QUICK = dict(sentences=320, max_vocab=1000, epochs=4, batch_size=32, lr=3e-3, warmup=0.25,
             seeds=2, n_embd=32, n_layer=2, n_head=4, track_steps=40)
FULL = dict(sentences=3000, max_vocab=2000, epochs=4, batch_size=32, lr=1e-2, warmup=0.1,
            seeds=3, n_embd=64, n_layer=2, n_head=4, track_steps=100)


def run(opts):
    cfg, lab, corpus = lm_experiment(NAME, opts, QUICK, FULL, betas=[0.9, 0.999], eps=1e-8)
    ids = corpus["ids"]

    def compute(p: dict) -> dict:
        torch.manual_seed(p["seed"])
        model = tiny_lm(corpus["vocab_size"], p["seed"], n_embd=cfg["n_embd"],
                        n_layer=cfg["n_layer"], n_head=cfg["n_head"])
        eps = BIG_EPS if p["method"] == "adam-eps" else cfg["eps"]
        beta2 = p.get("beta2", cfg["betas"][1])
        kw = dict(lr=cfg["lr"], betas=(cfg["betas"][0], beta2), eps=eps)
        opt = RAdam(model.parameters(), **kw) if p["method"] == "radam" else \
            Adam(model.parameters(), **kw)
        warmup = warmup_updates(cfg["warmup"], cfg["epochs"] *
                                updates_per_epoch(len(ids), cfg["batch_size"]))
        n_frozen = warmup if p["method"] == "adam-2k" else 0
        frozen = [n_frozen]
        matrices = [q for q in model.parameters() if q.ndim == 2]
        var_log_l, rel_update = [], UpdateSizes(model)

        def track(t, loss):
            rel_update()
            if t < cfg["track_steps"]:
                with torch.no_grad():
                    logs = []
                    for q in matrices:
                        st = opt.state[q]
                        vhat = st["exp_avg_sq"] / (1 - beta2 ** st["step"])
                        logs.append(torch.log10(1.0 / (vhat.sqrt() + eps)).flatten())
                    var_log_l.append(torch.cat(logs).var().item())

        def step(model, opt, micro):
            if frozen[0] == 0:
                return accumulate_and_step(model, opt, micro, lm_loss)
            frozen[0] -= 1                 # Adam-2k: v only (lr 0, m back to 0)
            lrs = [g["lr"] for g in opt.param_groups]
            for g in opt.param_groups:
                g["lr"] = 0.0
            loss = accumulate_and_step(model, opt, micro, lm_loss)
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr
            for st in opt.state.values():
                st["exp_avg"].zero_()
            return loss
        warm = {"adam+warmup": cfg["warmup"],                  # a fraction of the updates
                "adam+untuned-warmup": round(2 / (1 - beta2))}   # Ma & Yarats: 2/(1-beta2)
        res = fit(model, opt, lambda idx: ids[idx], len(ids), epochs=cfg["epochs"],
                  batch_size=cfg["batch_size"], seed=p["seed"], loss_fn=lm_loss,
                  warmup=warm.get(p["method"], 0.0), after_step=track, step=step)
        return {"losses": res.step_losses, "diverged": res.diverged,
                "var_log_adaptive_lr": var_log_l, "rel_update": rel_update.values,
                "frozen_updates": n_frozen}

    seeds = list(range(cfg["seeds"]))
    b2 = UNTUNED_BETA2[cfg["quick"]]
    cells = [Cell(f"{m}-s{s}", {"method": m, "seed": s}) for m in METHODS for s in seeds]
    arm = [Cell(f"b2-{b2}-{m}-s{s}", {"method": m, "seed": s, "beta2": b2})
           for m in UNTUNED for s in seeds]
    results = lab.run_cells(cells + arm, compute)
    runs = {m: [r for c, r in zip(cells, results) if c.params["method"] == m] for m in METHODS}
    arm_runs = {m: [r for c, r in zip(arm, results[len(cells):]) if c.params["method"] == m]
                for m in UNTUNED}
    summary, arm_summary = analyse(runs), analyse(arm_runs)
    fig = plot(cfg, runs, lab.figure_path("warmup.png"))
    fig2 = plot(cfg, arm_runs, lab.figure_path("untuned-warmup.png"), beta2=b2)
    conclusion = conclude(cfg, summary) + " " + conclude_untuned(b2, arm_summary)

    def table(summary, runs):
        rows = ["| method | loss at update 1 | mean loss, first quarter | final loss (last 10%) "
                "| largest update / norm | diverged | lagged | spiked above update 1 |",
                "|---|---|---|---|---|---|---|---|"]
        for m, s in summary.items():
            rows.append(f"| {m} | {fmt(s['first_loss'])} | {fmt(s['early_loss'])} +- "
                        f"{fmt(s['early_loss_std'])} | {fmt(s['final_loss'])} +- "
                        f"{fmt(s['final_loss_std'])} | {s['max_rel_update']:.3e} | "
                        f"{s['diverged_seeds']}/{len(runs[m])} | "
                        f"{'yes' if s['lagged'] else 'no'} | {s['spiked_seeds']}/{len(runs[m])} |")
        return "\n".join(rows)
    lab.write_report(
        title="Warmup, RAdam and the variance of Adam's adaptive learning rate",
        claim="the adaptive learning rate has a large variance in the first steps; without "
              "warmup Adam's early updates are too large and training diverges or lags, and "
              "RAdam's rectification removes the need for warmup; reducing the variance "
              "otherwise (Adam-2k, Adam-eps) tames the first updates too (seeds 002, 003).",
        conclusion=conclusion, how=how_measured(__doc__),
        sections=["### Per method (mean +- std over seeds)", "", table(summary, runs), "",
                  f"### Ma & Yarats' untuned warmup, beta2 = {b2} (warmup over 2 / (1 - beta2) "
                  f"= {round(2 / (1 - b2))} updates)", "", table(arm_summary, arm_runs)],
        figures=[(fig.name, "Training loss (mean and min-max over seeds), spread of the "
                            "adaptive lr, and update size, per update"),
                 (fig2.name, f"The same at beta2 = {b2}: Adam, RAdam and Adam with the untuned "
                             f"warmup")],
        numbers={"summary": summary, "untuned_warmup": {"beta2": b2, "summary": arm_summary}})
    return lab, conclusion


def analyse(runs: dict) -> dict:
    out = {}
    for m, rs in runs.items():
        n = min(len(r["losses"]) for r in rs)
        q, tail = max(1, n // 4), max(1, n // 10)
        early = [mean(r["losses"][:q]) for r in rs]
        final = [mean(r["losses"][-tail:]) for r in rs]
        div = sum(1 for r in rs if r["diverged"] or not math.isfinite(r["losses"][-1])
                  or mean(r["losses"][-tail:]) > r["losses"][0])
        v = [r["var_log_adaptive_lr"] for r in rs]
        k = min(len(x) for x in v)
        # (from Adam-2k's first moving update: before it the loss only varies with the batch)
        spikes = [max(r["losses"][f + 1:], default=float("-inf")) - r["losses"][f]
                  for r in rs for f in [r.get("frozen_updates", 0)]]
        out[m] = {"first_loss": mean([r["losses"][0] for r in rs]), "early_loss": mean(early),
                  "spiked_seeds": sum(1 for x in spikes if x > 0),
                  "worst_spike": max(spikes),
                  "early_loss_std": std(early), "final_loss": mean(final),
                  "final_loss_std": std(final), "diverged_seeds": div,
                  "max_rel_update": mean([max(r["rel_update"]) for r in rs]),
                  "var_log_l_first": mean([x[0] for x in v]),
                  "var_log_l_last_tracked": mean([x[k - 1] for x in v]), "tracked": k}
    best_early = min(s["early_loss"] for s in out.values())
    for s in out.values():
        s["lagged"] = s["early_loss"] > best_early * (1 + LAG)
    return out


def conclude(cfg: dict, s: dict) -> str:
    a = s["adam"]
    text = (f"The spread of Adam's adaptive lr across coordinates, Var[log10 l_t], is "
            f"{a['var_log_l_first']:.3f} at update 1 and {a['var_log_l_last_tracked']:.3f} at "
            f"update {a['tracked']} ({a['var_log_l_first'] / max(a['var_log_l_last_tracked'], 1e-12):.1f}x). "
            f"Largest relative update: adam {a['max_rel_update']:.2e}, adam+warmup "
            f"{s['adam+warmup']['max_rel_update']:.2e}, radam {s['radam']['max_rel_update']:.2e}. "
            f"Mean loss over the first quarter: " + ", ".join(
                f"{m} {s[m]['early_loss']:.3f}" for m in METHODS) +
            "; final loss: " + ", ".join(f"{m} {s[m]['final_loss']:.3f}" for m in METHODS) + ". ")
    diverged = [m for m in METHODS if s[m]["diverged_seeds"]]
    lagged = [m for m in METHODS if s[m]["lagged"]]
    text += ("Diverged: " + (", ".join(f"{m} ({s[m]['diverged_seeds']} seed(s))"
                                       for m in diverged) if diverged else "none") + ". ")
    text += ("Lagged (early loss over 2% above the best): " +
             (", ".join(lagged) if lagged else "none") + ". ")
    spiked = [m for m in METHODS if s[m]["spiked_seeds"]]
    text += ("Loss spiked above its value at update 1: " +
             (", ".join(f"{m} ({s[m]['spiked_seeds']} seed(s), by up to "
                        f"{s[m]['worst_spike']:.2f} nats)" for m in spiked)
              if spiked else "none") + ". ")
    best_final = min(METHODS, key=lambda m: s[m]["final_loss"])
    text += f"Lowest final loss: {best_final}. "
    tamed = [m for m in ("adam-2k", "adam-eps")
             if s[m]["max_rel_update"] < a["max_rel_update"] / 2 and not s[m]["spiked_seeds"]]
    text += ("The RAdam paper's variance-reduction baselines: largest relative update adam-2k "
             f"{s['adam-2k']['max_rel_update']:.2e}, adam-eps "
             f"{s['adam-eps']['max_rel_update']:.2e} (adam {a['max_rel_update']:.2e}); "
             "at most half of Adam's and no spike: " + (", ".join(tamed) if tamed else "none")
             + ".")
    if not diverged and "adam" not in lagged:
        text += (f" At lr {cfg['lr']:g} Adam without warmup neither diverged nor lagged "
                 f"here" + (", but its loss spiked early" if "adam" in spiked else
                            ", so this run does not show warmup to be necessary") + ".")
    return text


def conclude_untuned(beta2: float, s: dict) -> str:
    """Ma & Yarats (2021): an untuned linear warmup over 2 / (1 - beta2) updates does about as
    well as RAdam (here: a final loss at most 3% above RAdam's)."""
    u, r = s["adam+untuned-warmup"], s["radam"]
    close = u["final_loss"] <= (1 + CLOSE) * r["final_loss"]
    return (f"Untuned warmup (Ma & Yarats) at beta2 = {beta2}, {round(2 / (1 - beta2))} "
            f"updates: final loss {u['final_loss']:.3f} vs RAdam {r['final_loss']:.3f} and Adam "
            f"without warmup {s['adam']['final_loss']:.3f}; largest relative update "
            f"{u['max_rel_update']:.2e} (RAdam {r['max_rel_update']:.2e}, Adam "
            f"{s['adam']['max_rel_update']:.2e}); " +
            ("at least about as well as RAdam (at most 3% above): confirmed." if close else
             "more than 3% above RAdam: not confirmed."))


def plot(cfg: dict, runs: dict, path, beta2: float | None = None):
    import numpy as np
    colors = {"adam": "tab:red", "adam+warmup": "tab:blue", "radam": "tab:green",
              "adam-2k": "tab:orange", "adam-eps": "tab:purple",
              "adam+untuned-warmup": "tab:cyan"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for m, rs in runs.items():
        n = min(len(r["losses"]) for r in rs)
        L = np.array([r["losses"][:n] for r in rs], dtype=float)
        t = np.arange(1, n + 1)
        axes[0].plot(t, L.mean(0), color=colors[m], label=f"{m} (mean of {len(rs)})")
        axes[0].fill_between(t, L.min(0), L.max(0), color=colors[m], alpha=0.2)
        k = min(len(r["var_log_adaptive_lr"]) for r in rs)
        V = np.array([r["var_log_adaptive_lr"][:k] for r in rs])
        axes[1].plot(np.arange(1, k + 1), V.mean(0), color=colors[m], label=m)
        U = np.array([r["rel_update"][:n] for r in rs])
        axes[2].plot(t, U.mean(0), color=colors[m], label=m)
    axes[0].set(xlabel="update", ylabel="training loss (nats/token)",
                title="Training loss (band: min-max over seeds)")
    axes[1].set(xlabel="update", ylabel="Var over coordinates of log10 l_t",
                title="Spread of the adaptive lr l_t = 1/(√v̂_t+ε)")
    axes[2].set(xlabel="update", ylabel="||Δθ|| / ||θ||", yscale="log",
                title="Relative size of each update")
    for ax in axes:
        ax.legend()
    if beta2 is None:
        fig.suptitle(f"Small GPT-2 from scratch on SST sentences: lr {cfg['lr']:g}, warmup "
                     f"{cfg['warmup']:g} of the updates (adam+warmup only), {cfg['seeds']} "
                     f"seeds")
    else:
        fig.suptitle(f"The same at beta2 = {beta2:g}: untuned warmup over 2/(1-beta2) = "
                     f"{round(2 / (1 - beta2))} updates, {cfg['seeds']} seeds")
    return save(fig, path)
