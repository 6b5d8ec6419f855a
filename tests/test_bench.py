"""``optimlab bench`` runs end to end on the small suite (timings are never asserted: only that
every contender ran, what it ran, and the state bytes it reports)."""

from __future__ import annotations

import math

import pytest

from optimlab import bench, cli


def test_bench_small_suite_rows_and_state_bytes():
    lines: list[str] = []
    out = bench.run(suites=("small",), families=("sgd", "sam"), repeat=1, log=lines.append)
    rows = {r["contender"]: r for r in out["rows"]}
    assert set(rows) == {c.name for f in ("sgd", "sam") for c in bench.contenders(f)}
    for r in rows.values():
        assert r["ms"] > 0 and math.isfinite(r["ratio"]) and r["gbps"] > 0
    assert rows["optimlab.SGD momentum=0.9"]["state_bytes_per_param"] == pytest.approx(4.0)
    assert rows["torch SGD fused"]["ratio"] >= 1.0 or rows["torch SGD foreach"]["ratio"] >= 1.0
    # SAM's rows report the base optimizer's state (AdamW: two fp32 moments)
    assert rows["SAM(optimlab.AdamW), optimizer side"]["state_bytes_per_param"] == \
        pytest.approx(8.0)
    assert rows["SAM(torch AdamW fused), optimizer side"]["state_bytes_per_param"] == \
        pytest.approx(8.0, rel=1e-3)           # + torch's per-tensor step counters
    text = "\n".join(lines)
    assert "### sam" in text and "## targets (this run)" in text


def test_bench_cli_rejects_an_unknown_family(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--optimizers", "lion"])
    assert e.value.code == 2
    assert "invalid choice: 'lion'" in capsys.readouterr().err


def test_targets_compare_each_family_with_its_own_torch_rows():
    """A contender name that two families share (torch AdamW fused is also SAM's baseline) is
    looked up in the family being checked, timed in the same interleaved rounds."""
    def row(family, contender, ms, torch_optim=False):
        return dict(suite="gpt2", family=family, contender=contender, ms=ms, gbps=40.0,
                    state_bytes_per_param=8.0, torch_optim=torch_optim)
    rows = [row("adamw", "optimlab.AdamW (CS224N semantics)", 12.0),
            row("adamw", "optimlab.AdamW nonfinite='ignore'", 9.0),
            row("adamw", "torch AdamW fused", 10.0, True),
            row("sam", "torch AdamW fused", 5.0, True)]
    lines = bench.targets(rows, copy_gbps=50.0)
    assert any("AdamW (CS224N semantics) vs torch fused AdamW, same algorithm "
               "(nonfinite='ignore'): 0.90x (target <= 1.0x) met; default nonfinite='skip' 1.20x"
               in line for line in lines), lines
    assert any("AdamW effective bandwidth: 40.0 GB/s = 80% of copy" in line for line in lines)


def test_bench_rejects_an_unwritable_json_path_before_it_times_anything(capsys, tmp_path):
    for bad in (tmp_path / "missing" / "out.json", tmp_path):
        assert cli.main(["bench", "--suite", "small", "--json", str(bad)]) == 2
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and "not a file that can be written" in captured.err
        assert captured.out == ""                  # nothing was benchmarked first
