"""``optimlab lab adafactor-ablation``: Adafactor's ingredients added one at a time to Adam
without momentum, trained from scratch (Shazeer & Stern 2018, their Table 2).

Seed 002 lists Adafactor's five ingredients: a factored second moment, no momentum, update
clipping U^ = U / max(1, RMS(U) / d), the increasing decay beta2_t = 1 - t^-0.8 and the relative
step size rho_t = min(1e-2, 1/sqrt(t)) max(eps2, RMS(X)).  The paper's ablation: Adam with
beta1 = 0.9 and warmup trains well; with beta1 = 0, beta2 = 0.999 and no warmup it is unstable
("a problem with Adam: out-of-date second moment estimator": after a long quiet stretch v
underestimates a sudden large gradient, and the update is too large); update clipping or the
increasing decay each stabilize it; factoring the second moment costs little; and the
relative step size trains without a tuned learning rate.

What is measured.  A small GPT-2 (optimlab.models.gpt2: random init, no dropout) trained from
scratch as a language model on SST-5 sentences (the setup of ``warmup-variance``), the same
batches and lr schedule (linear decay; warmup only where named) for six configurations, each
an optimlab optimizer: ``adam-b1=0.9+warmup`` (optimlab.Adam, betas (0.9, 0.999), linear
warmup), ``adam-b1=0`` (betas (0, 0.999), no warmup), ``+clip`` (``adam-b1=0`` with update
clipping d = 1), ``+decay`` (``adam-b1=0`` with beta2_t = 1 - t^-0.8 instead of 0.999),
``+clip+decay+factored`` (all three: Adafactor at the same fixed lr) and
``adafactor-relative`` (Adafactor's defaults: relative step, no lr given).  The middle four
are ``optimlab.Adafactor`` with ``factored=False`` where the second moment is whole and
``beta2=0.999`` for Adam's bias-corrected fixed decay (with both, Adafactor is Adam with beta1 =
0, a tested identity), no scaling by RMS(X), the lr as the step.  Per run: the training loss
per update, the relative size of each update; *diverged* (non-finite loss, or a final loss
above the start), the *worst spike* (the largest rise of the loss, averaged over 3 updates,
above its running minimum, in nats; a seed is *unstable* where it diverged or spiked by more
than 0.5 nats, where batch-to-batch noise stays near 0.3) and the final loss
(mean of the last tenth); a fix *stabilizes* where it has fewer unstable seeds than Adam with
beta1 = 0, or at most half its worst spike;
per configuration the optimizer state in bytes per parameter.
"""

from __future__ import annotations

import math

import torch

from ..adafactor import Adafactor
from ..adam import Adam
from ._core import Cell, fmt, how_measured, mean, std
from ._data import UpdateSizes, fit, lm_experiment, lm_loss, tiny_lm
from ._plot import plt, save

NAME = "adafactor-ablation"
SUMMARY = "Adafactor's ingredients added to Adam without momentum, small GPT-2 from scratch"
CONFIGS = ("adam-b1=0.9+warmup", "adam-b1=0", "+clip", "+decay", "+clip+decay+factored",
           "adafactor-relative")
#: a configuration counts as unstable where a seed diverged or its worst spike exceeds this
SPIKE = 0.5           # nats
#: "costs little": a final loss within this fraction of the reference configuration's
CLOSE = 0.03

QUICK = dict(sentences=320, max_vocab=1000, epochs=4, batch_size=32, lr=1e-2, warmup=0.25,
             seeds=2, n_embd=32, n_layer=2, n_head=4)
FULL = dict(sentences=3000, max_vocab=2000, epochs=4, batch_size=32, lr=1e-2, warmup=0.1,
            seeds=3, n_embd=64, n_layer=2, n_head=4)


def make_optimizer(name: str, params, lr: float):
    """The configuration ``name`` (see the module docstring)."""
    fixed = dict(lr=lr, relative_step=False, scale_parameter=False, eps=(1e-30, 1e-3))
    if name == "adam-b1=0.9+warmup":
        return Adam(params, lr=lr, betas=(0.9, 0.999))
    if name == "adam-b1=0":
        return Adam(params, lr=lr, betas=(0.0, 0.999))
    if name == "+clip":
        return Adafactor(params, factored=False, beta2=0.999, clip_threshold=1.0, **fixed)
    if name == "+decay":
        return Adafactor(params, factored=False, decay_rate=-0.8, clip_threshold=math.inf,
                         **fixed)
    if name == "+clip+decay+factored":
        return Adafactor(params, clip_threshold=1.0, decay_rate=-0.8, **fixed)
    if name == "adafactor-relative":
        return Adafactor(params)
    raise ValueError(f"unknown configuration {name!r}")


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def run(opts):
    cfg, lab, corpus = lm_experiment(NAME, opts, QUICK, FULL, adam_betas_b1=[0.9, 0.999],
                                     adam_eps=1e-8)
    ids = corpus["ids"]

    def compute(p: dict) -> dict:
        torch.manual_seed(p["seed"])
        model = tiny_lm(corpus["vocab_size"], p["seed"], n_embd=cfg["n_embd"],
                        n_layer=cfg["n_layer"], n_head=cfg["n_head"])
        opt = make_optimizer(p["config"], model.parameters(), cfg["lr"])
        rel_update = UpdateSizes(model)
        res = fit(model, opt, lambda idx: ids[idx], len(ids), epochs=cfg["epochs"],
                  batch_size=cfg["batch_size"], seed=p["seed"], loss_fn=lm_loss,
                  warmup=cfg["warmup"] if p["config"] == "adam-b1=0.9+warmup" else 0.0,
                  after_step=lambda t, loss: rel_update())
        n_params = sum(q.numel() for q in model.parameters())
        return {"losses": res.step_losses, "diverged": res.diverged,
                "rel_update": rel_update.values,
                "state_bytes_per_param": state_bytes(opt) / n_params}

    seeds = list(range(cfg["seeds"]))
    cells = [Cell(f"{c}-s{s}".replace("=", "").replace("+", "p"), {"config": c, "seed": s})
             for c in CONFIGS for s in seeds]
    results = lab.run_cells(cells, compute)
    runs = {c: [r for cell, r in zip(cells, results) if cell.params["config"] == c]
            for c in CONFIGS}
    summary = analyse(runs)
    verdicts = judge(summary)
    fig = plot(cfg, runs, lab.figure_path("adafactor-ablation.png"))
    conclusion = conclude(cfg, summary, verdicts)
    rows = ["| configuration | final loss (last 10%) | worst spike (nats) | diverged | unstable "
            "| largest update / norm | state bytes / parameter |", "|---|---|---|---|---|---|---|"]
    for c in CONFIGS:
        s = summary[c]
        rows.append(f"| {c} | {fmt(s['final_loss'])} +- {fmt(s['final_loss_std'])} | "
                    f"{fmt(s['worst_spike'])} | {s['diverged_seeds']}/{len(runs[c])} | "
                    f"{s['unstable_seeds']}/{len(runs[c])} | {s['max_rel_update']:.3e} | "
                    f"{s['state_bytes_per_param']:.3f} |")
    lab.write_report(
        title="Adafactor's ingredients, one at a time (Shazeer & Stern 2018, Table 2)",
        claim="Adam with beta1 = 0 and beta2 = 0.999 without warmup is unstable; update "
              "clipping or the increasing decay beta2_t = 1 - t^-0.8 stabilizes it; factoring "
              "the second moment costs little; the relative step size works without a tuned "
              "learning rate (seed 002).",
        conclusion=conclusion, how=how_measured(__doc__),
        sections=["### Per configuration (mean +- std over seeds)", "", "\n".join(rows),
                  "", "### Verdicts", "",
                  "\n".join(f"- {k}: {'yes' if v else 'no'}" for k, v in verdicts.items())],
        figures=[(fig.name, "Training loss per configuration (mean, band min-max over "
                            "seeds), and the relative size of each update")],
        numbers={"summary": summary, "verdicts": verdicts})
    return lab, conclusion


def analyse(runs: dict) -> dict:
    out = {}
    for c, rs in runs.items():
        spikes, finals, div, unstable = [], [], 0, 0
        for r in rs:
            losses = r["losses"]
            n = len(losses)
            bad = r["diverged"] or not all(math.isfinite(x) for x in losses)
            tail = losses[-max(1, n // 10):]
            final = mean(tail) if not bad else float("inf")
            bad = bad or final > losses[0]
            spike = worst_spike(losses)
            spikes.append(spike)
            finals.append(final)
            div += bad
            unstable += bad or spike > SPIKE
        finite = [f for f in finals if math.isfinite(f)]
        out[c] = {"final_loss": mean(finite) if finite else float("inf"),
                  "final_loss_std": std(finite), "worst_spike": max(spikes),
                  "diverged_seeds": div, "unstable_seeds": unstable,
                  "max_rel_update": mean([max(r["rel_update"]) for r in rs]),
                  "state_bytes_per_param": rs[0]["state_bytes_per_param"]}
    return out


def worst_spike(losses: list) -> float:
    """The largest rise of the loss, averaged over 3 updates (one batch's loss is noisy: about
    0.3 nats here), above its running minimum, in nats; non-finite losses are skipped
    (divergence is counted apart).  A falling loss never counts, so the fast start does not."""
    xs = [x for x in losses if math.isfinite(x)]
    smooth = [mean(xs[max(0, t - 2):t + 1]) for t in range(len(xs))]
    low, spike = float("inf"), 0.0
    for x in smooth:
        spike = max(spike, x - low)
        low = min(low, x)
    return spike


def judge(s: dict) -> dict:
    """The claim's four parts, each a yes/no from the numbers."""
    base, plain = s["adam-b1=0.9+warmup"], s["adam-b1=0"]
    plain_unstable = plain["unstable_seeds"] > base["unstable_seeds"] or \
        plain["final_loss"] > base["final_loss"] * (1 + CLOSE)
    fixes = {k: s[k]["unstable_seeds"] < plain["unstable_seeds"] or
             s[k]["worst_spike"] <= plain["worst_spike"] / 2 for k in ("+clip", "+decay")}
    best_unfactored = min(s["+clip"]["final_loss"], s["+decay"]["final_loss"])
    factored = s["+clip+decay+factored"]
    return {
        "adam with beta1 = 0 and no warmup is unstable (or worse than the baseline)":
            plain_unstable,
        "update clipping stabilizes it": plain_unstable and fixes["+clip"],
        "the increasing decay stabilizes it": plain_unstable and fixes["+decay"],
        "factoring costs little (final loss within 3% of the better unfactored fix, no more "
        "unstable seeds than either)":
            factored["final_loss"] <= best_unfactored * (1 + CLOSE) and
            factored["unstable_seeds"] <= min(s["+clip"]["unstable_seeds"],
                                              s["+decay"]["unstable_seeds"]),
        "the relative step trains without a tuned lr (final loss within 3% of the baseline)":
            s["adafactor-relative"]["final_loss"] <= base["final_loss"] * (1 + CLOSE),
    }


def conclude(cfg: dict, s: dict, verdicts: dict) -> str:
    held = sum(verdicts.values())
    head = ("Confirmed" if held == len(verdicts) else
            "Not confirmed" if held == 0 else f"Partly confirmed ({held} of {len(verdicts)})")
    text = (f"{head}. " + "; ".join(
        f"{c}: final loss {s[c]['final_loss']:.3f}, worst spike {s[c]['worst_spike']:.2f} "
        f"nats, unstable on {s[c]['unstable_seeds']} seed(s)" for c in CONFIGS) + ". ")
    text += "Held: " + (", ".join(k for k, v in verdicts.items() if v) or "none") + ". "
    text += "Did not hold: " + (", ".join(k for k, v in verdicts.items() if not v)
                                or "none") + ". "
    text += (f"State per parameter: Adam {s['adam-b1=0.9+warmup']['state_bytes_per_param']:.2f} "
             f"bytes, unfactored without momentum {s['+clip']['state_bytes_per_param']:.2f}, "
             f"factored {s['+clip+decay+factored']['state_bytes_per_param']:.3f}.")
    return text


def plot(cfg: dict, runs: dict, path):
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    colors = dict(zip(CONFIGS, ("tab:blue", "tab:red", "tab:orange", "tab:purple", "tab:green",
                                "tab:gray")))
    for c, rs in runs.items():
        n = min(len(r["losses"]) for r in rs)
        L = np.array([r["losses"][:n] for r in rs], dtype=float)
        t = np.arange(1, n + 1)
        axes[0].plot(t, L.mean(0), color=colors[c], label=c)
        axes[0].fill_between(t, L.min(0), L.max(0), color=colors[c], alpha=0.15)
        U = np.array([r["rel_update"][:n] for r in rs])
        axes[1].plot(t, U.mean(0), color=colors[c], label=c)
    axes[0].set(xlabel="update", ylabel="training loss (nats/token)",
                title="Training loss (band: min-max over seeds)")
    axes[1].set(xlabel="update", ylabel="||Δθ|| / ||θ||", yscale="log",
                title="Relative size of each update")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"Small GPT-2 from scratch on SST sentences: lr {cfg['lr']:g} (Adafactor's "
                 f"relative step: none), {cfg['seeds']} seeds")
    return save(fig, path)
