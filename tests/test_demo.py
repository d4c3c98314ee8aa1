"""The main job (``make demo``) runs end to end, shrunk to a few steps."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import demo  # noqa: E402


@pytest.mark.heavy(seconds=83)
def test_demo_smoke(tmp_path):
    assert demo.main(["--out", str(tmp_path), "--smoke", "--target-flops", "0.4"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert set(rows) == {"baseline", "sglp-ib", "l1-norm"}
    for name in ("sglp-ib", "l1-norm"):
        assert abs(1 - rows[name]["flops"] / rows["baseline"]["flops"] - 0.4) <= 0.004
    for f in ("results.md", "training_curves.png", "widths.png", "report_sglp-ib.md"):
        assert (tmp_path / f).stat().st_size > 0
