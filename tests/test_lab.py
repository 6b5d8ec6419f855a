"""``optimlab lab``: every experiment's --quick mode produces its files, its report's numbers
are the cached cells' numbers, a rerun skips finished cells, and bad input is one line.

The quick runs share one directory (and so one cache of MiniLM features) per session;
together they take about a minute and a half on two cores.  What is checked is that the files
exist and the numbers are the run's, never that a claim of the seeds holds.
"""

from __future__ import annotations

import json
import math

import pytest

from optimlab.cli import main
from optimlab.lab import EXPERIMENTS, LabOptions, run_experiment
from optimlab.lab import adafactor_ablation, wd_heatmap, wd_transfer
from optimlab.lab._core import fmt, mean, parse_grid, std

PNGS = {"wd-heatmap": ["heatmaps.png"], "warmup-variance": ["warmup.png", "untuned-warmup.png"],
        "memory": ["memory.png"], "epsilon": ["drift.png"], "sam-accumulation": ["sam.png"],
        "compare": ["compare.png"], "wd-transfer": ["wd-transfer.png"],
        "adafactor-ablation": ["adafactor-ablation.png"],
        "bias-correction": ["bias-correction.png"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(scope="module")
def runs(base):
    """Each experiment's quick run, once: name -> (lab, conclusion)."""
    done = {}

    def get(name):
        if name not in done:
            done[name] = run_experiment(LabOptions(name, quick=True, out=str(base / name),
                                                   progress=False))
        return done[name]
    return get


def cells(out) -> list[tuple[dict, dict]]:
    found = []
    for path in sorted((out / "cells").glob("*.json")):
        blob = json.loads(path.read_text())
        found.append((blob["params"], blob["result"]))
    return found


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_quick_run_writes_report_plots_and_cells(name, runs, base):
    lab, conclusion = runs(name)
    out = base / name
    for png in PNGS[name]:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert conclusion in report and results["conclusion"] == conclusion
    assert "wall time of this run" in report and "torch 2" in report and "### Config" in report
    assert results["config"]["quick"] is True
    found = cells(out)
    assert len(found) == lab.computed + lab.cached > 0
    assert not [p for p in (out / "cells").iterdir() if p.name.startswith(".")]   # no temp left


def test_wd_heatmap_numbers_are_the_cells(runs, base):
    lab, conclusion = runs("wd-heatmap")
    found = cells(base / "wd-heatmap")
    acc = {}
    for p, r in found:
        acc.setdefault((p["mode"], p["lr"], p["wd"]), []).append(r["dev_acc"])
    cfg = lab.config
    assert len(found) == 2 * len(cfg["lrs"]) * len(cfg["wds"]["decoupled"]) * cfg["seeds"]
    report = (base / "wd-heatmap" / "report.md").read_text()
    summary = json.loads((base / "wd-heatmap" / "results.json").read_text())["numbers"]["summary"]
    for mode in wd_heatmap.MODES:
        for k, lr in enumerate(cfg["lrs"]):
            row = [mean(acc[(mode, lr, wd)]) for wd in cfg["wds"][mode]]
            best = max(range(len(row)), key=lambda i: (row[i], -i))
            assert summary[mode]["best_wd"][k] == cfg["wds"][mode][best]
        lr, wd = cfg["lrs"][2], cfg["wds"][mode][3]
        v = acc[(mode, lr, wd)]
        assert f"{fmt(mean(v))} +- {fmt(std(v))}" in report
        assert f"{summary[mode]['best_wd'][0]:g}" in conclusion


def test_epsilon_numbers_are_the_cells(runs, base):
    lab, conclusion = runs("epsilon")
    found = cells(base / "epsilon")
    assert len(found) == 6
    report = (base / "epsilon" / "report.md").read_text()
    p, r = next((p, r) for p, r in found if p["eps"] == 1e-3 and p["scale"] == 1.0)
    assert f"{r['rel_weight_diff'][-1]:.3e}" in report
    assert f"{r['rel_weight_diff'][-1]:.1e} (eps 0.001)" in conclusion
    # the same seed, data and schedule: the two placements start from the same weights, so
    # the drift after the first update is the first update's difference, and it is finite
    assert all(math.isfinite(x) for x in r["rel_weight_diff"])


def test_warmup_numbers_are_the_cells(runs, base):
    lab, conclusion = runs("warmup-variance")
    found = cells(base / "warmup-variance")
    report = (base / "warmup-variance" / "report.md").read_text()
    main = [(p, r) for p, r in found if "beta2" not in p]
    for method in ("adam", "adam+warmup", "radam", "adam-2k", "adam-eps"):
        rs = [r for p, r in main if p["method"] == method]
        first = mean([r["losses"][0] for r in rs])
        early = mean([mean(r["losses"][:max(1, len(r["losses"]) // 4)]) for r in rs])
        assert f"| {method} | {fmt(first)} | {fmt(early)} +- " in report
    adam = [r for p, r in main if p["method"] == "adam"]
    assert f"{mean([r['var_log_adaptive_lr'][0] for r in adam]):.3f} at update 1" in conclusion
    # Ma & Yarats' arm: its own cells (beta2 0.9 in the quick mode), its own sentence
    arm = [(p, r) for p, r in found if p.get("beta2") == 0.9]
    assert sorted({p["method"] for p, _ in arm}) == ["adam", "adam+untuned-warmup", "radam"]
    final = mean([mean(r["losses"][-max(1, len(r["losses"]) // 10):]) for p, r in arm
                  if p["method"] == "adam+untuned-warmup"])
    assert f"Untuned warmup (Ma & Yarats) at beta2 = 0.9, 20 updates: final loss {final:.3f}" \
        in conclusion


def test_adafactor_ablation_numbers_are_the_cells(runs, base):
    """The table's final losses and spikes are recomputed from the cells; the state bytes are
    the configurations' (Adam 8 per parameter, unfactored without momentum 4, factored far
    less); the verdict counts the parts that held."""
    lab, conclusion = runs("adafactor-ablation")
    found = cells(base / "adafactor-ablation")
    report = (base / "adafactor-ablation" / "report.md").read_text()
    for config in adafactor_ablation.CONFIGS:
        rs = [r for p, r in found if p["config"] == config]
        final = mean([mean(r["losses"][-max(1, len(r["losses"]) // 10):]) for r in rs])
        spike = max(adafactor_ablation.worst_spike(r["losses"]) for r in rs)
        assert f"| {config} | {fmt(final)} +- " in report
        assert f"worst spike {spike:.2f} nats" in conclusion
    bytes_of = {p["config"]: r["state_bytes_per_param"] for p, r in found}
    assert bytes_of["adam-b1=0.9+warmup"] == 8.0 and bytes_of["+clip"] == 4.0
    assert bytes_of["+clip+decay+factored"] < 1.0
    held = sum(json.loads((base / "adafactor-ablation" / "results.json").read_text())
               ["numbers"]["verdicts"].values())
    assert conclusion.startswith("Confirmed" if held == 5 else "Not confirmed" if held == 0
                                 else f"Partly confirmed ({held} of 5)")


def test_adafactor_ablation_verdict_follows_the_numbers():
    """A spike that a fix halves counts as stabilized; a flat curve has no spike."""
    assert adafactor_ablation.worst_spike([5.0 - 0.1 * t for t in range(40)]) == 0.0
    bumpy = [5.0 - 0.01 * t for t in range(20)] + [6.0] * 10 + [4.5] * 10
    # (averaged over 3 updates: the minimum before the jump is mean(4.83, 4.82, 4.81))
    assert adafactor_ablation.worst_spike(bumpy) == pytest.approx(6.0 - 4.82, abs=1e-9)
    one_batch = [5.0] * 10 + [8.0] + [5.0] * 10           # one bad batch: a third of it
    assert adafactor_ablation.worst_spike(one_batch) == pytest.approx(1.0)

    def summary(spike, unstable, final=4.0):
        return {"worst_spike": spike, "unstable_seeds": unstable, "final_loss": final}
    s = {"adam-b1=0.9+warmup": summary(0.1, 0), "adam-b1=0": summary(1.5, 2),
         "+clip": summary(0.2, 0), "+decay": summary(1.4, 2), "+clip+decay+factored":
         summary(0.2, 0, 4.05), "adafactor-relative": summary(0.0, 0, 5.0)}
    v = list(adafactor_ablation.judge(s).values())
    assert v == [True, True, False, True, False]
    s["+clip+decay+factored"] = summary(0.8, 1, 4.0)        # as good, but one seed spiked
    assert list(adafactor_ablation.judge(s).values())[3] is False


def test_bias_correction_numbers_are_the_cells(runs, base):
    """Each row's mean accuracy and failed runs are the cells'; the two settings ran the same
    seeds on the same data and differ (the correction changes the updates)."""
    lab, conclusion = runs("bias-correction")
    found = cells(base / "bias-correction")
    results = json.loads((base / "bias-correction" / "results.json").read_text())
    majority = results["numbers"]["majority"]
    report = (base / "bias-correction" / "report.md").read_text()
    for setting in ("corrected", "uncorrected"):
        accs = [r["dev_acc"] for p, r in found if p["setting"] == setting]
        failed = sum(a <= majority + 0.02 for a in accs)
        assert f"| 48 | {setting} | {fmt(mean(accs))} +- {fmt(std(accs))} | {failed}/2 |" \
            in report
    by = {(p["setting"], p["seed"]): r["losses"] for p, r in found}
    assert by[("corrected", 0)][0] == pytest.approx(by[("uncorrected", 0)][0])   # same start
    assert by[("corrected", 0)][1:] != by[("uncorrected", 0)][1:]


def test_memory_counts_bytes_exactly(runs, base):
    lab, conclusion = runs("memory")
    table = json.loads((base / "memory" / "results.json").read_text())["numbers"]["table"]
    n = 124_439_808                                  # GPT-2 small without the (tied) LM head
    g = {o: table[o]["GPT-2 small"] for o in table}
    assert g["adamw-fp32"]["params"] == n and g["adamw-fp32"]["state_bytes"] == 8 * n
    assert g["adamw-bf16"]["state_bytes"] == 4 * n
    assert g["sgd-momentum"]["state_bytes"] == 4 * n
    assert g["adafactor"]["state_bytes"] < g["adafactor+beta1"]["state_bytes"] - 4 * n + 1
    assert g["adafactor"]["state_bytes"] < n // 50           # factored: rows + columns
    report = (base / "memory" / "report.md").read_text()
    for p, r in cells(base / "memory"):
        if p["kind"] == "accuracy":
            assert r["dev_acc"] in table[p["optimizer"]]["dev_acc"]
    assert f"{table['adafactor']['dev_acc_mean']:.3f}" in conclusion
    assert f"| adamw-fp32 | {8 * n / 2**20:.1f} |" in report


def test_sam_and_compare_numbers_are_the_cells(runs, base):
    lab, conclusion = runs("sam-accumulation")
    found = cells(base / "sam-accumulation")
    report = (base / "sam-accumulation" / "report.md").read_text()
    for method in ("adamw", "sam", "sam-naive"):
        accs = [r["dev_acc"] for p, r in sorted(found, key=lambda t: t[0]["seed"])
                if p["method"] == method]
        assert f"| {method} | {fmt(mean(accs))} +- {fmt(std(accs))} | " + \
            ", ".join(fmt(a) for a in accs) in report
    dist = [d for p, r in found if p["method"] == "sam" for d in r["update_distance"]]
    assert f"{mean(dist):.3f} of its length" in conclusion

    lab, conclusion = runs("compare")
    found = cells(base / "compare")
    table = json.loads((base / "compare" / "results.json").read_text())["numbers"]["table"]
    for name, t in table.items():
        search = [(p["lr"], r["dev_acc"]) for p, r in found
                  if p["optimizer"] == name and p["seed"] == 0]
        assert t["lr"] == max(search, key=lambda s: s[1])[0]
        assert len(t["dev_acc"]) == lab.config["seeds"]
    assert len(table) == 9


def test_rerun_skips_finished_cells(runs, base, capsys):
    runs("epsilon")
    out = base / "epsilon"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    report = (out / "report.md").read_text()
    # the command line, all cells cached: nothing is recomputed, the same numbers come out
    assert main(["lab", "epsilon", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "0 cells computed, 6 cached" in printed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == before
    strip = lambda text: text.split("## Run")[0]          # noqa: E731 (wall time differs)
    assert strip((out / "report.md").read_text()) == strip(report)
    # an interrupted run: one cell missing -> exactly that one is computed
    victim = sorted((out / "cells").glob("*.json"))[0]
    victim.unlink()
    lab, _ = run_experiment(LabOptions("epsilon", quick=True, out=str(out), progress=False))
    assert (lab.computed, lab.cached) == (1, 5) and victim.is_file()
    assert strip((out / "report.md").read_text()) == strip(report)     # deterministic cells
    # cells that are valid JSON but not this cell's (a list, no result, another cell's): each
    # is computed again, no traceback
    files = sorted((out / "cells").glob("*.json"))
    files[0].write_text("[]")
    files[1].write_text('{"result": 5}')
    files[2].write_text(files[3].read_text())
    lab, _ = run_experiment(LabOptions("epsilon", quick=True, out=str(out), progress=False))
    assert (lab.computed, lab.cached) == (3, 3)
    assert strip((out / "report.md").read_text()) == strip(report)
    # more seeds: the finished cells are reused, only the new seed's are computed
    lab, _ = run_experiment(LabOptions("epsilon", quick=True, out=str(out), seeds=2,
                                       progress=False))
    assert (lab.computed, lab.cached) == (6, 6)


@pytest.mark.parametrize("argv, message", [
    (["lab", "nope"], "unknown experiment 'nope'"),
    (["lab", "wd-heatmap", "--quick", "--lrs", "1e-3"], "--lrs needs at least 2 values"),
    (["lab", "wd-heatmap", "--quick", "--lrs", "1e-3,-1"], "every value must be a finite"),
    (["lab", "wd-heatmap", "--quick", "--lrs", "1e-3,abc"], "comma-separated numbers"),
    (["lab", "wd-heatmap", "--quick", "--wds", "0.1,0.1"], "repeated values"),
    (["lab", "epsilon", "--quick", "--wds", "1,2"], "epsilon does not take --wds"),
    (["lab", "memory", "--quick", "--seeds", "0"], "--seeds must be a positive integer"),
])
def test_bad_input_is_one_line(argv, message, capsys, tmp_path):
    try:
        code = main(argv + ["--out", str(tmp_path / "r")])
    except SystemExit as e:                            # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "r" / "cells").exists() or not any((tmp_path / "r" / "cells").iterdir())


def test_parse_grid():
    assert parse_grid("--lrs", "3e-3, 1e-3") == [1e-3, 3e-3]
    with pytest.raises(ValueError, match="finite"):
        parse_grid("--lrs", "1e-3,nan")
    with pytest.raises(ValueError, match=">= 0"):
        parse_grid("--wds", "-1,0", minimum=0.0)


def test_wd_conclusion_follows_the_numbers():
    """The verdict is computed: lambda ~ 1/lr for the coupled mode and flat for the
    independent one reads as confirmed; the reverse does not."""
    lrs = [1e-3, 1e-2, 1e-1]
    wds = {"decoupled": [1e-2, 1e-1, 1, 10], "independent": [1e-4, 1e-3, 1e-2, 1e-1]}
    cfg = {"lrs": lrs, "wds": wds}

    def accs(peak):            # accuracy peaked at the given wd index per lr, 3 seeds
        return {(m, lr, wd): [0.5 if j == peak[m][i] else 0.3] * 3
                for m in wds for i, lr in enumerate(lrs) for j, wd in enumerate(wds[m])}
    confirmed = wd_heatmap.analyse(cfg, accs({"decoupled": [3, 2, 1], "independent": [1, 1, 1]}))
    assert confirmed["decoupled"]["best_wd"] == [10, 1, 1e-1]
    assert confirmed["decoupled"]["best_slope"] == pytest.approx(-1.0)
    assert confirmed["independent"]["edge_slope"] == pytest.approx(0.0)
    assert "The claim holds" in wd_heatmap.conclude(cfg, confirmed)
    reverse = wd_heatmap.analyse(cfg, accs({"decoupled": [1, 1, 1], "independent": [0, 1, 2]}))
    text = wd_heatmap.conclude(cfg, reverse)
    assert "not clearly confirmed" in text and "slope 1.00" in text


def test_wd_transfer_numbers_are_the_cells(runs, base):
    """The best c of every point and the slopes in results.json follow from the cells' dev
    losses (recomputed here), and each parametrization's slope is the best c's plus its
    offset."""
    lab, conclusion = runs("wd-transfer")
    found = cells(base / "wd-transfer")
    losses, accs = {}, {}
    for p, r in found:
        key = (p["lr"], p["n_train"], p["width"], p["c"])
        losses.setdefault(key, []).append(r["dev_loss"])
        accs.setdefault(key, []).append(r["dev_acc"])
    cfg = lab.config
    summary = json.loads((base / "wd-transfer" / "results.json").read_text())["numbers"]["summary"]
    for axis in wd_transfer.AXES:
        for pt in summary[axis]["points"]:
            p = dict(cfg["base"], **{axis: pt["value"]})
            keys = [(p["lr"], p["n_train"], p["width"], c) for c in cfg["cs"]]
            curve = [mean(losses[k]) for k in keys]
            assert curve == pytest.approx(pt["losses"], rel=1e-12)
            acc = [mean(accs[k]) for k in keys]
            assert wd_transfer.best_c(cfg["cs"], curve, acc, cfg["chance"])["status"] == \
                pt["status"]
        s = summary[axis]
        if s["c_slope"] is not None:
            assert s["slopes"]["independent"] == pytest.approx(s["c_slope"])
            assert s["slopes"]["coupled"] == pytest.approx(
                s["c_slope"] + wd_transfer.OFFSETS[axis]["coupled"])


def test_wd_transfer_finds_the_optimum_between_grid_points():
    """A dev loss that is a parabola in log10 c with its minimum at c = 2e-3: the refined best
    c is 2e-3, not the grid's 1e-3; a flat curve and a minimum at the grid's edge have none."""
    cs = [1e-4, 1e-3, 1e-2, 1e-1]
    curve = [(math.log10(c) - math.log10(2e-3)) ** 2 + 1.0 for c in cs]
    got = wd_transfer.best_c(cs, curve)
    assert got["status"] == "interior" and got["c"] == pytest.approx(2e-3, rel=1e-9)
    assert wd_transfer.best_c(cs, [1.0, 1.001, 1.002, 1.0])["status"] == "flat"
    assert wd_transfer.best_c(cs, [1.0, 1.1, 1.2, 1.3])["status"] == "edge"
    assert wd_transfer.best_c(cs, [float("nan")] * 3 + [1.0])["status"] == "diverged"
    # a collapsed head (chance accuracy) does not win on loss
    collapsed = wd_transfer.best_c(cs, [2.0, 1.8, 1.9, 1.6], accs=[0.40, 0.41, 0.40, 0.25],
                                   chance=0.25)
    assert collapsed["status"] == "interior" and 1e-4 < collapsed["c"] < 1e-2
