"""Tests of ib_lasso_jax.config: the one override and key-check mechanism of every config class."""

from __future__ import annotations

import warnings

import pytest

from ib_lasso_jax import config
from ib_lasso_jax.cli import main as cli_main
from ib_lasso_jax.experiment.pipeline import PipelineConfig, PruneConfig
from ib_lasso_jax.train.training import TrainConfig


@pytest.mark.parametrize("text, value", [
    ("true", True), ("False", False), ("TRUE", True), ("null", None), ("None", None), ("3", 3), ("-2", -2),
    ("+3", 3), ("2.5", 2.5), (".5", 0.5), ("5.", 5.0), ("1e-3", 1e-3), ("1E3", 1000.0), ("[1, 2]", [1, 2]),
    ('{"a": 1}', {"a": 1}), ('"7"', "7"), ("R1", "R1"), ("cifar10", "cifar10"), ("", ""),
])
def test_parse_literal(text, value):
    got = config.parse_literal(text)
    assert got == value and type(got) is type(value)


def test_override_types_each_value_by_its_field():
    c = config.override(TrainConfig(), ["num_epochs=3", "learning_rate=1", "nesterov=false", "dataset=digits",
                                        "num_steps=null", "widths={\"conv\": [2, 4], \"fc\": [8, 8]}"])
    assert c.num_epochs == 3 and type(c.num_epochs) is int
    assert c.learning_rate == 1 and not isinstance(c.learning_rate, bool)
    assert c.nesterov is False and c.num_steps is None and c.dataset == "digits"
    assert c.widths == {"conv": [2, 4], "fc": [8, 8]}
    # a str field keeps what was typed
    assert config.override(PipelineConfig(train=TrainConfig()), ["paper=123"]).paper == "123"


@pytest.mark.parametrize("assignment, message", [
    ("nesterov=maybe", r"config.nesterov='maybe' is not valid; valid values: true or false"),
    ("num_epochs=2.5", r"config.num_epochs=2.5 is not valid; valid values: an integer"),
    ("learning_rate=fast", r"config.learning_rate='fast' is not valid; valid values: a number"),
    ("learning_rate=true", r"config.learning_rate=True is not valid; valid values: a number"),
    ("num_epochs", r"--set expects key=value; got 'num_epochs'"),
    ("=3", r"--set expects key=value"),
])
def test_override_refuses_a_bad_value_naming_the_field(assignment, message):
    with pytest.raises(ValueError, match=message):
        config.override(TrainConfig(), [assignment])


def test_unknown_key_is_refused_listing_the_valid_ones():
    with pytest.raises(ValueError) as e:
        config.override(TrainConfig(), ["num_epoch=3"])
    msg = str(e.value)
    assert "unknown config key(s) ['num_epoch']" in msg and "'num_epochs'" in msg and "num_epoch=3" in msg
    with pytest.raises(ValueError, match=r"\['prune.nope'\].*'prune.target_flops'"):
        config.override(PipelineConfig(train=TrainConfig()), ["prune.nope=1"])
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['nope'\]"):
        TrainConfig().replace(nope=1)


def test_nested_keys_sections_and_dicts():
    base = PipelineConfig(train=TrainConfig(), prune=PruneConfig(method="sglp-ib", target_flops=0.5))
    c = config.override(base, ["train.num_epochs=2", "prune.target_flops=0.6", "prune.options.grid=8",
                               "prune.options.response=R1", 'finetune={"dataset": "mnist5k", "num_epochs": 3}',
                               "finetune.learning_rate=0.01"])
    assert c.train.num_epochs == 2 and c.prune.target_flops == 0.6
    assert c.prune.options == {"grid": 8, "response": "R1"}
    assert isinstance(c.finetune, TrainConfig) and c.finetune.num_epochs == 3 and c.finetune.learning_rate == 0.01
    assert base.finetune is None and base.prune.options == {}  # the original is unchanged
    with pytest.raises(ValueError, match=r"config.finetune is null; give the whole section first"):
        config.override(base, ["finetune.num_epochs=3"])
    with pytest.raises(ValueError, match=r"\['finetune.nope'\]"):
        config.override(base, ['finetune={"nope": 1}'])


def test_finetune_none_replaces_the_zero_epoch_sentinel():
    assert PipelineConfig(train=TrainConfig()).validate().finetune is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = PipelineConfig(train=TrainConfig(), finetune=TrainConfig(num_epochs=0))
    assert c.finetune is None and any(issubclass(w.category, DeprecationWarning) for w in caught)
    with pytest.raises(ValueError, match=r"config.train=None and config.finetune=None"):
        PipelineConfig(train=None, checkpoint="base", finetune=None).validate()


def test_parse_options_reads_true_as_a_bool():
    assert config.parse_options(["flag=True", "response=R1", "grid=8", "lam=1e-3", "x=null"]) == {
        "flag": True, "response": "R1", "grid": 8, "lam": 1e-3, "x": None}
    with pytest.raises(ValueError, match=r"--option expects key=value; got 'flag'"):
        config.parse_options(["flag"])


def test_cli_prune_option_typing_reaches_the_method_check(tmp_path, capsys):
    # --option values are typed as the config's are: a bool option given "True" is the bool.
    from ib_lasso_jax import checkpoint, models

    model = models.create("lenet5", 10, (28, 28, 1), widths={"conv": [2, 4], "fc": [8, 8]})
    checkpoint.save_model(tmp_path / "m", model)
    rc = cli_main(["prune", "--checkpoint", str(tmp_path / "m"), "--method", "sglp-ib", "--target-flops", "0.3",
                   "--dataset", "digits", "--per-class", "2", "--option", "grid=maybe", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "grid" in err and "maybe" in err
    assert not (tmp_path / "o").exists()


def test_cli_configs_lists_both_kinds(capsys):
    assert cli_main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "ib-lasso run   mnist5k_vgg_sglp" in out and "ib-lasso train mnist5k_vgg" in out
    assert "sglp_vgg16_cifar10" in out and "cifar10_resnet56" in out
