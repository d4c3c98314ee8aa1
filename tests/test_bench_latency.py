"""The latency benchmark runs end to end in smoke mode; its table has the promised structure.

Timings are never asserted (STYLE.md: benchmarks print ratios, tests check structure).
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import bench_latency  # noqa: E402


def test_round_widths_rounds_up_and_never_exceeds_the_original():
    original = {"features": [64, 64, "M", 128], "classifier": [512]}
    pruned = {"features": [9, 64, "M", 121], "classifier": [300]}
    assert bench_latency.round_widths(pruned, original, 16) == {"features": [16, 64, "M", 128], "classifier": [304]}


def test_smoke_table(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = bench_latency.main(["--smoke", "--json", str(out), "--policy", "coupled"])
    printed = capsys.readouterr().out
    header = "| " + " | ".join(bench_latency.COLUMNS) + " |"
    assert header in printed
    # one row per (batch, pruned variant): batches 1 and 4; the pruned, the coupled-policy and the
    # rounded-to-8 model
    assert [(r["batch"], r["variant"]) for r in rows] == [
        (b, v) for b in (1, 4)
        for v in ("pruned (l1-norm)", "pruned, policy=coupled", "pruned, widths rounded up to x8")]
    for r in rows:
        assert set(r) == set(bench_latency.COLUMNS)
        assert r["original ms"] > 0 and r["variant ms"] > 0
        assert math.isclose(r["speed-up"], r["original ms"] / r["variant ms"], rel_tol=1e-9)
        assert math.isclose(r["speed-up / FLOPs ratio"], r["speed-up"] / r["FLOPs ratio"], rel_tol=1e-9)
    pruned = [r for r in rows if r["variant"] == "pruned (l1-norm)"]
    rounded = [r for r in rows if "rounded" in r["variant"]]
    # FLOPs -50% within 1% (both policies): the ratio original/pruned is about 2; rounding up
    # adds FLOPs back.
    assert all(abs(1 - 1 / r["FLOPs ratio"] - 0.5) <= 0.005 for r in rows if "rounded" not in r["variant"])
    assert all(1 <= r["FLOPs ratio"] <= p["FLOPs ratio"] for r, p in zip(rounded, pruned))
    assert len(printed.strip().splitlines()) >= 6 and json.loads(out.read_text())["rows"] == rows
