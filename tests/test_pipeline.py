"""Tests of ib_lasso_jax.experiment.pipeline, the ``ib-lasso run`` command and the paper configs.

Every paper config is checked cheaply (loads, validates, documents its command, its smoke
model fits its data set, its method options exist); end to end under ``tfds.testing.mock_data``
with ``smoke=True`` all fourteen run (20 s to 1.5 min each on 2 CPU cores, almost all of it
XLA compilation: deep networks compile slowly even when shrunk, see docs/pipeline.md).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from ib_lasso_jax import checkpoint, models  # noqa: E402
from ib_lasso_jax.cli import main as cli_main  # noqa: E402
from ib_lasso_jax.experiment import pipeline  # noqa: E402
from ib_lasso_jax.experiment.configs import papers  # noqa: E402
from ib_lasso_jax.experiment.pipeline import PipelineConfig, PruneConfig  # noqa: E402
from ib_lasso_jax.train.training import TrainConfig  # noqa: E402

PAPER_CONFIGS = [n for n in papers.available() if n != "mnist5k_vgg_sglp"]


def _baseline_groups() -> list[tuple[str, ...]]:
    """The paper configs grouped by baseline (equal ``train`` sections), in name order."""
    groups: dict[str, list[str]] = {}
    for name in PAPER_CONFIGS:
        train = papers.load(name).train
        groups.setdefault(json.dumps(None if train is None else train.to_dict(), sort_keys=True, default=str),
                          []).append(name)
    return [tuple(v) for v in groups.values()]


TINY_LENET = {"conv": [2, 4], "fc": [8, 8]}


def _tiny(**kw) -> PipelineConfig:
    """A real (non-smoke) pipeline that runs in seconds: a tiny LeNet on sklearn's digits."""
    base = TrainConfig(dataset="digits", image_size=28, model="lenet5", widths=TINY_LENET, num_steps=3,
                       batch_size=32, eval_batch_size=64, progress=False, log_every_steps=1)
    return PipelineConfig(train=base, prune=PruneConfig(method="l1-norm", target_flops=0.4, per_class=2,
                                                         reestimate_bn_batches=1, bn_batch_size=32),
                          finetune=base.replace(num_steps=2), progress=False, **kw)


def _ints(tree) -> list[int]:
    if isinstance(tree, dict):
        return [i for v in tree.values() for i in _ints(v)]
    if isinstance(tree, list):
        return [i for v in tree for i in _ints(v)]
    return [tree] if isinstance(tree, int) else []


def _method_defaults(method: str) -> dict:
    from ib_lasso_jax.pruning.methods import dwgl, entropic, ib_lasso, ic_shapley

    return {"sglp-ib": ib_lasso.DEFAULTS, "stlp-ib": ib_lasso.DEFAULTS, "hsic-lasso": ib_lasso.DEFAULTS,
            "dwgl": dwgl.DEFAULTS, "entropic": entropic.DEFAULTS, "ic-shapley": ic_shapley.DEFAULTS}.get(method, {})


# ------------------------------------------------------------------------------------------
# Every config: cheap checks.


@pytest.mark.parametrize("name", papers.available())
def test_config_loads_validates_and_documents_itself(name):
    config = papers.load(name).validate()
    doc = importlib.import_module(f"{papers.__name__}.{name}").__doc__
    assert f"ib-lasso run {name} --workdir" in doc
    assert "runtime" in doc.lower() and config.expected_runtime and config.paper_row
    if config.dataset not in ("mnist5k", "digits"):
        assert f"tfds build {config.dataset}" in doc
    assert set(config.prune.options) <= set(_method_defaults(config.prune.method))
    smoke, _ = pipeline.smoke_config(config.replace(smoke=True))
    t = smoke.train
    shape, classes = models.dataset_shape(t.dataset)
    size = t.image_size or shape[0]
    assert size <= 32
    models._registry.abstract_from_spec(models._registry.make_spec(
        t.model, classes, (size, size, shape[2]), t.widths))  # the shrunk model builds
    assert set(smoke.prune.options) <= set(_method_defaults(smoke.prune.method))


def test_shrink_widths_every_zoo_model_builds():
    for name in models.available():
        w = pipeline.shrink_widths(models.default_widths(name), maximum=pipeline.SMOKE_MAX_WIDTH)
        assert all(4 <= v <= 8 for v in _ints(w)), (name, w)
        models._registry.abstract_from_spec(models._registry.make_spec(
            name, 10, models.dataset_shape(models.default_dataset(name))[0], w))
    assert pipeline.shrink_widths({"features": [64, "M", 128], "classifier": [512]}) == {
        "features": [8, "M", 16], "classifier": [64]}


# ------------------------------------------------------------------------------------------
# Config errors.


def test_override_dotted_keys_and_errors():
    c = _tiny().override(["prune.target_flops=0.6", "finetune.num_epochs=3", "prune.options.grid=8",
                          "train.learning_rate=0.05", "smoke=true", 'checkpoint="x/y"', "published.accuracy=0.9"])
    assert (c.prune.target_flops, c.finetune.num_epochs, c.prune.options, c.train.learning_rate, c.smoke,
            c.checkpoint, c.published) == (0.6, 3, {"grid": 8}, 0.05, True, "x/y", {"accuracy": 0.9})
    with pytest.raises(ValueError, match=r"unknown config key.*'bogus'"):
        _tiny().override(["bogus=1"])
    with pytest.raises(ValueError, match=r"prune.nope"):
        _tiny().override(["prune.nope=1"])
    with pytest.raises(ValueError, match=r"finetune.nope"):
        _tiny().override(["finetune.nope=1"])
    with pytest.raises(ValueError, match="key=value"):
        _tiny().override(["prune.method"])


@pytest.mark.parametrize("assignment, pattern", [
    ("prune.target_flops=1.5", r"config.prune.target_flops=1.5 is not valid.*\(0, 1\)"),
    ("prune.target_flops=0", r"config.prune.target_flops=0 is not valid"),
    ("prune.target_params=0.5", r"exactly one of target_flops and target_params"),
    ('prune.method="nope"', r"config.prune.method='nope' is not valid; valid values: \[.*'sglp-ib'"),
    ('prune.policy="outer"', r"config.prune.policy='outer' is not valid"),
    ("prune.per_class=0", r"config.prune.per_class=0 is not valid"),
    ('finetune.optimizer="lion"', r"config.finetune.optimizer='lion' is not valid"),
    ("train.batch_size=-1", r"config.train.batch_size=-1 is not valid"),
    ("published.bogus=1", r"config.published=.* valid keys"),
    ('finetune.dataset="cifar10"', r"config.finetune.dataset='cifar10' differs"),
])
def test_validation_errors_name_key_value_and_valid(assignment, pattern):
    with pytest.raises(ValueError, match=pattern):
        _tiny().override([assignment]).validate()


def test_no_baseline_is_an_error():
    with pytest.raises(ValueError, match="config.train=None and config.checkpoint=None"):
        PipelineConfig().validate()


def test_checkpoint_that_is_not_a_model(tmp_path):
    (tmp_path / "notamodel").mkdir()
    config = _tiny().replace(checkpoint=str(tmp_path / "notamodel"))
    with pytest.raises(ValueError, match=r"config.checkpoint=.*notamodel.* is not valid.*spec.json"):
        pipeline.run(config, tmp_path / "work")
    with pytest.raises(ValueError, match=r"config.checkpoint=.*missing.* is not valid"):
        pipeline.run(config.replace(checkpoint=str(tmp_path / "missing")), tmp_path / "work")


# ------------------------------------------------------------------------------------------
# Real (tiny) runs: from a checkpoint, resume, the input checkpoint untouched.


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_run_from_checkpoint_leaves_it_untouched_and_resumes(tmp_path):
    base = models.create("lenet5", 10, (28, 28, 1), TINY_LENET, rngs=0)
    ckpt = checkpoint.save_model(tmp_path / "base", base)
    before = _tree_digest(ckpt)
    config = _tiny().replace(checkpoint=str(ckpt))
    with pytest.raises(ValueError, match="overlap"):
        pipeline.run(config, ckpt / "inside")
    result = pipeline.run(config, tmp_path / "work")
    assert _tree_digest(ckpt) == before
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    assert 0.3 < report["ours"]["flops_reduction"] < 0.6  # 2- and 4-channel layers: coarse steps
    assert report["ours"]["params_before"] == report["prune_report"]["params_before"]
    assert "FLOPs reduction" in (tmp_path / "work" / "report.md").read_text()
    again = checkpoint.restore_model(tmp_path / "work" / "model")
    assert again.spec == result.model.spec
    # A rerun reuses the pruned model and the finetuning checkpoints; other prune settings are refused.
    second = pipeline.run(config, tmp_path / "work")
    assert second.report["ours"]["params_after"] == report["ours"]["params_after"]
    assert _tree_digest(ckpt) == before
    with pytest.raises(ValueError, match=r"different settings.*prune"):
        pipeline.run(config.override(["prune.target_flops=0.3"]), tmp_path / "work")


# ------------------------------------------------------------------------------------------
# The CLI on the offline config (smoke), and resume.


@pytest.mark.heavy(seconds=38)
def test_cli_run_offline_config_smoke_and_resume(tmp_path, capsys):
    work = tmp_path / "run"
    argv = ["run", "mnist5k_vgg_sglp", "--workdir", str(work), "--smoke", "--no-progress", "--json",
            "--set", "prune.target_flops=0.4"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/5]" in out and "[5/5]" in out
    ours = json.loads(out.strip().splitlines()[-1])
    assert ours["flops_reduction"] == pytest.approx(0.4, abs=0.02)
    report = json.loads((work / "report.json").read_text())
    assert report["smoke"] and report["config"]["prune"]["target_flops"] == 0.4
    assert any("widths" in s for s in report["smoke_substitutions"])
    ckpts = sorted((work / "baseline" / "checkpoints").iterdir())
    mtimes = {p.name: p.stat().st_mtime for p in ckpts}
    assert cli_main(argv) == 0  # second run: the baseline is reused, nothing retrained
    out = capsys.readouterr().out
    assert "reusing the pruned model" in out
    assert {p.name: p.stat().st_mtime for p in sorted((work / "baseline" / "checkpoints").iterdir())} == mtimes


def test_cli_run_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["run", "no_such_config", "--workdir", str(tmp_path)]) == 2
    assert "valid configs" in capsys.readouterr().err
    assert cli_main(["run", "mnist5k_vgg_sglp", "--workdir", str(tmp_path), "--set", "prune.target_flops=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.prune.target_flops=2 is not valid" in err


# ------------------------------------------------------------------------------------------
# Paper configs end to end under mocked TFDS data (smoke).


def _mock_examples(dataset: str) -> int:
    # Enough examples that every class holds the smoke calibration's images (1-2 per class).
    return {"cifar100": 1000, "imagenet2012": 64}.get(dataset, 200)


# Seconds each config's smoke run took in its group on 2 cores (2026-11-22, `make test` with all
# fourteen; a group's later members reuse its baseline); they only order the schedule
# (conftest: longest first), nothing is asserted on them.
SMOKE_SECONDS = {"dwgl_resnet50_imagenet": 60, "ic_resnet50_imagenet": 40, "sglp_resnet50_imagenet": 40,
                 "dwgl_resnet56_cifar10": 50, "ic_resnet56_cifar10": 37, "sglp_resnet56_cifar10": 37,
                 "sglp_googlenet_cifar10": 91, "entropic_vgg16_cifar10": 42, "sglp_vgg16_cifar10": 35,
                 "sglp_resnet110_cifar10": 71, "sglp_resnet56_cifar100": 53, "sglp_vgg16_cifar100": 44,
                 "dwgl_resnet20_cifar10": 26, "entropic_lenet_mnist": 18}


@pytest.mark.parametrize("names", [
    pytest.param(g, id="+".join(g), marks=pytest.mark.heavy(seconds=sum(SMOKE_SECONDS.get(n, 60) for n in g)))
    for g in _baseline_groups()])
def test_paper_config_smoke_end_to_end(names, tmp_path):
    """Paper configs end to end in smoke mode. Configs that share a baseline (equal ``train``
    sections) run in one test: the first trains the (shrunk) baseline, the others start from a
    copy of its finished baseline directory, as a user running several methods on one baseline
    does; the pipeline reuses it (nothing retrained, checked) and goes on from there."""
    first_baseline = None
    for name in names:
        config = papers.load(name).replace(smoke=True, data_dir=str(tmp_path / "tfds"))
        work = tmp_path / name
        if first_baseline is not None:
            shutil.copytree(first_baseline, work / "baseline")
            log = (work / "baseline" / "metrics.jsonl").read_text()
        with tfds.testing.mock_data(num_examples=_mock_examples(config.dataset),
                                    policy=tfds.testing.MockPolicy.USE_CODE):
            result = pipeline.run(config, work)
        r = result.report
        target = config.prune.target_flops or config.prune.target_params
        got = r["ours"]["flops_reduction" if config.prune.target_flops else "params_reduction"]
        assert got == pytest.approx(target, abs=0.05), name
        assert r["published"] == config.published and r["paper_row"] == config.paper_row
        assert np.isfinite(r["ours"]["accuracy"]), name
        assert (work / "report.md").is_file() and (work / "model" / "spec.json").is_file()
        if first_baseline is None:
            first_baseline = work / "baseline"
        else:  # the copied baseline was reused: no training step ran again
            assert (work / "baseline" / "metrics.jsonl").read_text() == log, name
