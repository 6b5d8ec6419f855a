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
