"""``optimlab lab bias-correction``: AdamW with and without bias correction, fine-tuning MiniLM
on small training sets.

The CS224N AdamW corrects the bias of Adam's moments; BERT's original optimizer (BertAdam) did
not.  Zhang et al. ("Revisiting Few-sample BERT Fine-tuning", ICLR 2021) report that dropping
the correction makes fine-tuning on small datasets unstable: without it the first updates are
larger (at step 1, m_1 / sqrt(v_1) = (1 - beta1) / sqrt(1 - beta2) ~ 3.2 times the corrected
step with the default betas), and more seeds fail.

What is measured.  The whole embedded MiniLM-L6 (mean pooling, dropout 0.1, a 5-way head)
fine-tuned on SST-5 subsets of a few sizes with ``optimlab.AdamW`` (the CS224N semantics: eps
1e-6 on sqrt(v), decay of the updated weights, weight decay 0.01 off biases and LayerNorms)
at ``optimlab train``'s default lr for the whole model, with ``correct_bias=True`` and
``correct_bias=False`` (BertAdam), ``optimlab train``'s loop (linear warmup over 10% of the
updates, linear decay, clipping at 1.0), the same data order and initialization per seed; dev
accuracy on a fixed dev subset.  A run *failed* if its dev accuracy is at most the majority
class's rate on that dev subset plus 2 points (the degenerate solutions Zhang et al. count).
Per size and setting: mean and std of dev accuracy over seeds, failed runs, and the mean
training loss over the first fifth of the updates.
"""

from __future__ import annotations

from ..adam import AdamW
from ..train import default_lr
from ._core import Cell, Lab, fmt, how_measured, mean, mode_config, std
from ._data import finetune_minilm, sst_token_sets
from ._plot import plt, save

NAME = "bias-correction"
SUMMARY = "AdamW with vs without bias correction (BertAdam), MiniLM fine-tunes on small SST sets"
SETTINGS = ("corrected", "uncorrected")
MARGIN = 0.02

QUICK = dict(sizes=[48], n_dev=64, epochs=1, batch_size=16, seeds=2)
FULL = dict(sizes=[100, 300, 1000], n_dev=500, epochs=3, batch_size=16, seeds=3)


def run(opts):
    cfg = mode_config(opts, QUICK, FULL)
    cfg.update(lr=default_lr("adamw", "full-model"), weight_decay=0.01,
               model="embedded MiniLM-L6, full model, mean pooling, dropout 0.1",
               optimizer="optimlab.AdamW (CS224N semantics), correct_bias True/False")
    lab = Lab(NAME, opts.out, cfg, progress=opts.progress, grid_keys=("seeds",))
    sets = {n: sst_token_sets(n, cfg["n_dev"]) for n in cfg["sizes"]}
    dev = sets[cfg["sizes"][0]]["dev"]
    counts = [sum(e.label == k for e in dev) for k in range(5)]
    majority = max(counts) / len(dev)

    def compute(p: dict) -> dict:
        def make(groups):
            return AdamW(groups, lr=cfg["lr"], correct_bias=p["setting"] == "corrected")
        res = finetune_minilm(sets[p["size"]], make, seed=p["seed"], epochs=cfg["epochs"],
                              batch_size=cfg["batch_size"])
        return {"dev_acc": res["dev_acc"], "losses": res["losses"],
                "diverged": res["diverged"]}

    cells = [Cell(f"n{n}-{s}-s{k}", {"size": n, "setting": s, "seed": k})
             for n in cfg["sizes"] for s in SETTINGS for k in range(cfg["seeds"])]
    results = lab.run_cells(cells, compute, desc="fine-tunes", threads=None)
    table = analyse(cfg, cells, results, majority)
    fig = plot(cfg, table, lab.figure_path("bias-correction.png"))
    conclusion = conclude(cfg, table, majority)
    rows = ["| training sentences | setting | dev acc (mean +- std) | failed runs | "
            "early training loss |", "|---|---|---|---|---|"]
    for n in cfg["sizes"]:
        for s in SETTINGS:
            t = table[n][s]
            rows.append(f"| {n} | {s} | {fmt(t['acc_mean'])} +- {fmt(t['acc_std'])} | "
                        f"{t['failed']}/{len(t['accs'])} | {fmt(t['early_loss'])} |")
    lab.write_report(
        title="Bias correction in AdamW for few-sample fine-tuning",
        claim="fine-tuning with Adam without bias correction (BERT's original optimizer) is "
              "less stable on small training sets than with it: lower and more variable "
              "accuracy over seeds, more failed runs (Zhang et al. 2021).",
        conclusion=conclusion, how=how_measured(__doc__),
        sections=[f"Majority class on the dev subset: {majority:.3f}; a run failed at or "
                  f"below {majority + MARGIN:.3f}.", "",
                  "### Per training-set size (over seeds)", "", "\n".join(rows)],
        figures=[(fig.name, "Dev accuracy per seed (dots) and mean, per training-set size")],
        numbers={"table": {str(n): v for n, v in table.items()}, "majority": majority})
    return lab, conclusion


def analyse(cfg: dict, cells, results, majority: float) -> dict:
    table: dict = {}
    for n in cfg["sizes"]:
        table[n] = {}
        for s in SETTINGS:
            rs = [r for c, r in zip(cells, results)
                  if c.params["size"] == n and c.params["setting"] == s]
            accs = [r["dev_acc"] for r in rs]
            early = [mean(r["losses"][:max(1, len(r["losses"]) // 5)]) for r in rs]
            table[n][s] = {"accs": accs, "acc_mean": mean(accs), "acc_std": std(accs),
                           "failed": sum(a <= majority + MARGIN or r["diverged"]
                                         for a, r in zip(accs, rs)),
                           "early_loss": mean(early)}
    return table


def conclude(cfg: dict, table: dict, majority: float) -> str:
    """Per size: is the uncorrected run's mean accuracy lower, and is it less stable (more
    failed runs, or more spread over seeds)?  Confirmed where both hold at every size."""
    lower, unstable = [], []
    for n in cfg["sizes"]:
        c, u = table[n]["corrected"], table[n]["uncorrected"]
        if u["acc_mean"] < c["acc_mean"]:
            lower.append(n)
        if u["failed"] > c["failed"] or u["acc_std"] > c["acc_std"]:
            unstable.append(n)
    both = [n for n in cfg["sizes"] if n in lower and n in unstable]
    head = ("Confirmed" if len(both) == len(cfg["sizes"]) else
            "Not confirmed" if not lower and not unstable else "Partly confirmed")
    text = (f"{head}. " + "; ".join(
        f"{n} sentences: corrected {table[n]['corrected']['acc_mean']:.3f} +- "
        f"{table[n]['corrected']['acc_std']:.3f} ({table[n]['corrected']['failed']} failed), "
        f"uncorrected {table[n]['uncorrected']['acc_mean']:.3f} +- "
        f"{table[n]['uncorrected']['acc_std']:.3f} ({table[n]['uncorrected']['failed']} failed)"
        for n in cfg["sizes"]) + ". ")

    def listed(sizes):
        return ", ".join(f"{n}" for n in sizes) if sizes else "none"
    text += (f"Lower mean without the correction at: {listed(lower)} sentences; less stable "
             f"(more failed runs or more spread) at: {listed(unstable)}. Majority class: "
             f"{majority:.3f}.")
    return text


def plot(cfg: dict, table: dict, path):
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    colors = {"corrected": "tab:blue", "uncorrected": "tab:red"}
    for j, s in enumerate(SETTINGS):
        for i, n in enumerate(cfg["sizes"]):
            x = i + (j - 0.5) * 0.25
            accs = table[n][s]["accs"]
            ax.scatter([x] * len(accs), accs, color=colors[s], alpha=0.6,
                       label=s if i == 0 else None)
            ax.plot([x - 0.08, x + 0.08], [table[n][s]["acc_mean"]] * 2, color=colors[s])
    ax.set_xticks(range(len(cfg["sizes"])), [str(n) for n in cfg["sizes"]])
    ax.set(xlabel="training sentences", ylabel="SST-5 dev accuracy",
           title=f"MiniLM fine-tuned with AdamW, lr {cfg['lr']:g}, {cfg['epochs']} epoch(s), "
                 f"{cfg['seeds']} seeds")
    ax.legend()
    return save(fig, path)
