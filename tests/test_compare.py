"""The comparison experiment's paired-difference table (experiments/compare.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import compare  # noqa: E402


def _row(method, budget, seed, acc):
    return {"model": "m", "method": method, "budget": budget, "seed": seed, "acc_pruned": acc}


def test_paired_differences_by_seed():
    rows = [_row("sglp-ib", 0.5, s, a) for s, a in enumerate([0.80, 0.70, 0.90])]
    rows += [_row("l1-norm", 0.5, s, a) for s, a in enumerate([0.75, 0.72, 0.80])]
    rows += [_row("random", 0.5, 0, 0.60)]  # one seed only: paired on that seed
    rows += [_row("sglp-ib", 0.7, 0, 0.50), _row("l1-norm", 0.7, 0, 0.55)]
    rows += [_row("l1-norm", 0.5, 0, 0.10) | {"model": "other"}]  # another model: ignored
    lines = compare._paired(rows, "m", [0.5, 0.7], ["sglp-ib", "l1-norm", "random"])
    text = "\n".join(lines)
    assert "| sglp-ib minus | FLOPs -50% | FLOPs -70% |" in text
    # differences +5, -2, +10 points: mean +4.3, min -2, max +10; at -70%: -5 on the one seed
    assert "| l1-norm | +4.3 [-2.0, +10.0] | -5.0 [-5.0, -5.0] |" in text
    assert "| random | +20.0 [+20.0, +20.0] |  |" in text
    assert "stlp-ib minus" not in text  # not among the methods


def test_paired_without_our_methods_is_empty():
    assert compare._paired([_row("l1-norm", 0.5, 0, 0.5)], "m", [0.5], ["l1-norm"]) == []
