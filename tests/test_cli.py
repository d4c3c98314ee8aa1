"""The ib-lasso command line: count, groups, prune."""

import json

from ib_lasso_jax import checkpoint
from ib_lasso_jax.cli import main
from ib_lasso_jax.models import create


def test_count_json(capsys):
    assert main(["count", "--model", "resnet56", "--dataset", "cifar10", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == 853018 and d["flops"] == 125485696
    assert d["layers"][0]["name"] == "stem_conv" and len(d["layers"]) == 56


def test_count_table_and_errors(capsys):
    assert main(["count", "--model", "vgg16", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert "features/0/conv" in out and "313,463,808" in out
    assert main(["count", "--model", "vgg17"]) == 2
    assert "unknown model 'vgg17'" in capsys.readouterr().err


def test_groups(capsys):
    assert main(["groups", "--model", "resnet20", "--policy", "coupled", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert len(groups) == 12 and sum(g["residual"] for g in groups) == 3


def test_prune_cli_leaves_input_untouched(tmp_path, capsys):
    src = tmp_path / "model"
    checkpoint.save_model(src, create("lenet5", rngs=0))
    before = sorted(p.name for p in src.rglob("*"))
    out = tmp_path / "pruned"
    rc = main(["prune", "--checkpoint", str(src), "--method", "l1-norm", "--target-flops", "0.5",
               "--dataset", "mnist5k", "--per-class", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert abs(report["flops_reduction"] - 0.5) <= 0.005
    small = checkpoint.restore_model(out / "model")
    assert small.spec.widths != create("lenet5").spec.widths
    assert sorted(p.name for p in src.rglob("*")) == before
    assert main(["prune", "--checkpoint", str(src), "--method", "l1-norm", "--target-flops", "1.5",
                 "--dataset", "mnist5k", "--per-class", "2", "--out", str(tmp_path / "x")]) == 2
    assert "target_flops" in capsys.readouterr().err
