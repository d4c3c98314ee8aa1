"""Tests of ib_lasso_jax.train.training: real learning, exact resume, BatchNorm re-estimation,
schedules, losses, optimiser conventions, config errors and damaged checkpoints."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ib_lasso_jax import checkpoint, models
from ib_lasso_jax.checkpoint import CheckpointError
from ib_lasso_jax.data import load_dataset
from ib_lasso_jax.train import training
from ib_lasso_jax.train.training import TrainConfig

TINY_LENET = {"conv": [4, 8], "fc": [16, 16]}
TINY_VGG = {"features": [4, "M", 8, "M", 8, 8, "M", 8, 8, "M", 8, 8], "classifier": [8]}

# lenet5 at tiny widths on the 1437 real 8x8 `digits`, upsampled to 16x16.
BASE = TrainConfig(
    dataset="digits", image_size=16, model="lenet5", widths=TINY_LENET, batch_size=32, eval_batch_size=120,
    learning_rate=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=0.5,
    progress=False, prefetch=0, log_every_steps=10,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=16)


def _params(model):
    return {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))}


# --------------------------------------------------------------------------------------
# End to end


def test_training_on_digits_learns_and_saves_model(tmp_path, digits):
    config = BASE.replace(num_epochs=5)
    result = training.train_and_evaluate(config, tmp_path)
    acc = result.metrics["accuracy"]
    print(f"digits lenet5-tiny 5 epochs: test accuracy {acc:.4f}, {result.metrics['train_seconds']} s")
    assert acc > 0.85, result.metrics  # chance is 0.1
    assert result.metrics["num_examples"] == 360 and result.metrics["step"] == 5 * (1437 // 32)
    # The metrics log: train lines every 10 steps, one eval line per epoch.
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [ln for ln in lines if ln["split"] == "eval"]
    assert len(evals) == 5 and evals[-1]["accuracy"] == acc
    assert [ln["step"] for ln in lines if ln["split"] == "train"][:2] == [10, 20]
    # The final model round-trips through checkpoint.restore_model and evaluates the same.
    restored = checkpoint.restore_model(tmp_path / "model")
    assert restored.spec == result.model.spec
    again = training.evaluate(restored, digits, batch_size=120)
    assert again["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert checkpoint.load_metadata(tmp_path / "model")["metrics"]["accuracy"] == acc
    # Kept: the last 3 checkpoints (best is among them here).
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, digits):
    config = BASE.replace(num_steps=40, checkpoint_every_steps=7, eval_max_batches=1, data_parallel=False)
    full = training.train_and_evaluate(config, tmp_path / "full")

    class Crash(Exception):
        pass

    def crash_at_17(step):
        if step == 17:
            raise Crash

    with pytest.raises(Crash):  # killed mid-epoch (44 steps per epoch), 3 steps after a checkpoint
        training.train_and_evaluate(config, tmp_path / "resumed", on_step=crash_at_17)
    assert training.latest_checkpoint(tmp_path / "resumed").name == "ckpt_000000014"
    resumed = training.train_and_evaluate(config, tmp_path / "resumed")
    a, b = _params(full.model), _params(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)
    assert resumed.metrics["accuracy"] == full.metrics["accuracy"]
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(20) == 1  # lines past the restored step were dropped

    # The same workdir with another model is refused, naming both; callers can tell beforehand.
    other = models.create("lenet5", 10, (16, 16, 1), {"conv": [4, 8], "fc": [16, 8]})
    latest = training.latest_checkpoint(tmp_path / "resumed")
    assert training.checkpoint_model_spec(latest) == resumed.model.spec.to_dict() != other.spec.to_dict()
    with pytest.raises(CheckpointError, match="was written for model"):
        training.finetune(other, config, tmp_path / "resumed")
    # ... and so are different trajectory settings.
    with pytest.raises(CheckpointError, match="learning_rate"):
        training.train_and_evaluate(config.replace(learning_rate=0.01), tmp_path / "resumed")

    # Damaged checkpoints give CheckpointError, not a crash deep inside orbax (every one damaged:
    # an intact older one is resumed from, see test_checkpoint_integrity).
    bad = tmp_path / "bad_json"
    shutil.copytree(tmp_path / "resumed", bad)
    for ckpt in (bad / "checkpoints").iterdir():
        (ckpt / "train_state.json").write_text('{"format": "ib_lasso_jax.tr')
    with pytest.raises(CheckpointError, match="no intact training checkpoint.*corrupted or truncated"):
        training.train_and_evaluate(config, bad)
    bad = tmp_path / "bad_state"
    shutil.copytree(tmp_path / "resumed", bad)
    for f in (bad / "checkpoints").rglob("state/**/*"):
        if f.is_file() and f.name != "_CHECKPOINT_METADATA":
            f.write_bytes(b"\0garbage")
    with pytest.raises(CheckpointError, match="no intact training checkpoint"):
        training.train_and_evaluate(config, bad)


def test_finetune_trains_a_given_model_in_place(tmp_path, digits):
    model = models.create("lenet5", 10, (16, 16, 1), TINY_LENET, rngs=3)
    before = training.evaluate(model, digits, batch_size=120)["accuracy"]
    result = training.finetune(model, BASE.replace(num_steps=44, data_parallel=False), tmp_path)
    assert result.model is model
    assert result.metrics["accuracy"] > before
    with pytest.raises(ValueError, match="image_size"):
        training.finetune(model, BASE.replace(image_size=None, num_steps=2), tmp_path / "x")


# --------------------------------------------------------------------------------------
# BatchNorm


def test_reestimate_batchnorm_gives_exact_population_statistics(digits, monkeypatch):
    model = models.create("vgg11", 10, (16, 16, 1), TINY_VGG, rngs=1)
    it = digits.batches("train", 50, training=True, num_epochs=1, seed=4)
    batches = [next(it) for _ in range(3)]
    training.reestimate_batchnorm(model, batches)

    # Reference: the input of every BatchNorm of the model in train mode, per batch, recorded
    # by a patched BatchNorm.__call__ inside one jitted lax.map over the batches (eager
    # execution would compile every primitive separately, which is slower).
    ref = models.create("vgg11", 10, (16, 16, 1), TINY_VGG, rngs=1)
    ref.train()
    graphdef, state = nnx.split(ref)
    original = nnx.BatchNorm.__call__
    recorded = []

    def recording(self, x, *args, **kwargs):
        recorded.append((id(self), x.reshape(-1, x.shape[-1])))
        return original(self, x, *args, **kwargs)

    def bn_inputs(images):
        recorded.clear()
        m = nnx.merge(graphdef, state, copy=True)
        paths = {id(bn): path for path, bn in nnx.iter_modules(m) if isinstance(bn, nnx.BatchNorm)}
        m(images)
        return {"/".join(map(str, paths[i])): x for i, x in recorded}

    monkeypatch.setattr(nnx.BatchNorm, "__call__", recording)
    inputs = jax.jit(lambda xs: jax.lax.map(bn_inputs, xs))(jnp.stack([b[0] for b in batches]))
    monkeypatch.undo()
    bns = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)}
    assert bns.keys() == inputs.keys() and len(bns) == 9
    for name, bn in bns.items():
        x = np.asarray(inputs[name], np.float64)
        x = x.reshape(-1, x.shape[-1])  # all batches, all positions
        np.testing.assert_allclose(bn.mean.get_value(), x.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn.var.get_value(), x.var(0), rtol=1e-4, atol=1e-5)
    # Weights are untouched.
    fresh = models.create("vgg11", 10, (16, 16, 1), TINY_VGG, rngs=1)
    np.testing.assert_array_equal(model.fc2.kernel.get_value(), fresh.fc2.kernel.get_value())
    with pytest.raises(ValueError, match="at least one batch"):
        training.reestimate_batchnorm(model, [])


# --------------------------------------------------------------------------------------
# Pure pieces


def test_warmup_then_cosine_and_step_schedules():
    c = TrainConfig(learning_rate=0.2, warmup_epochs=1, schedule="cosine", min_lr_ratio=0.1)
    s = training.create_schedule(c, steps_per_epoch=10, total_steps=50)  # warm-up 10, cosine over 40
    for step, want in [(0, 0.0), (5, 0.1), (10, 0.2), (30, 0.2 * (0.1 + 0.9 * 0.5)), (50, 0.02)]:
        assert float(s(step)) == pytest.approx(want, abs=1e-7), step
    t = 15
    assert float(s(10 + t)) == pytest.approx(0.2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 40))), rel=1e-6)

    c = TrainConfig(learning_rate=0.1, schedule="step", milestones=(2, 3), decay_factor=0.1)
    s = training.create_schedule(c, steps_per_epoch=10, total_steps=40)
    assert [float(s(i)) for i in (0, 19, 20, 29, 30, 39)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    c = c.replace(warmup_epochs=1)
    s = training.create_schedule(c, steps_per_epoch=10, total_steps=40)
    assert [float(s(i)) for i in (5, 10, 19, 20, 30)] == pytest.approx([0.05, 0.1, 0.1, 0.01, 0.001])


def test_label_smoothing_cross_entropy():
    logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    labels = jnp.array([0, 1])
    logp = np.asarray(jax.nn.log_softmax(logits))
    a = 0.1
    want = -((1 - a) * logp[np.arange(2), [0, 1]] + a / 3 * logp.sum(1))
    np.testing.assert_allclose(training.cross_entropy(logits, labels, a), want, rtol=1e-6)
    np.testing.assert_allclose(training.cross_entropy(logits, labels), -logp[np.arange(2), [0, 1]], rtol=1e-6)


def test_sgd_is_pytorch_sgd_with_coupled_weight_decay():
    """torch.optim.SGD(lr, momentum, weight_decay, nesterov): d = g + wd*w; b = mu*b + d."""
    params = {"conv": {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])}}
    grads = [{"conv": {"kernel": jnp.array([0.3, 0.1]), "bias": jnp.array([0.2])}},
             {"conv": {"kernel": jnp.array([-0.1, 0.4]), "bias": jnp.array([0.0])}}]
    for nesterov, on in [(False, "all"), (True, "kernels")]:
        c = TrainConfig(learning_rate=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov,
                        weight_decay_on=on, schedule="constant")
        tx = training.create_optimizer(c, 10, 100)
        state, p = tx.init(params), params
        w = {k: np.asarray(v, np.float64) for k, v in params["conv"].items()}
        buf = {k: np.zeros_like(v) for k, v in w.items()}
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
            for k in w:
                d = np.asarray(g["conv"][k]) + (0.01 * w[k] if (on == "all" or k == "kernel") else 0.0)
                buf[k] = 0.9 * buf[k] + d
                w[k] = w[k] - 0.1 * (d + 0.9 * buf[k] if nesterov else buf[k])
        for k in w:
            np.testing.assert_allclose(p["conv"][k], w[k], rtol=1e-6, err_msg=f"{k} nesterov={nesterov}")


@pytest.mark.parametrize("key, value", [
    ("optimizer", "lamb"), ("schedule", "poly"), ("dataset", "svhn"), ("model", "alexnet"),
    ("weight_decay_on", "bn"),
])
def test_bad_config_values_name_key_value_and_valid_values(key, value):
    config = TrainConfig().replace(**{key: value})
    with pytest.raises(ValueError) as e:
        config.validate()
    msg = str(e.value)
    assert f"config.{key}={value!r}" in msg and "valid values" in msg
    valid = {"optimizer": "sgd", "schedule": "cosine", "dataset": "mnist5k", "model": "lenet5",
             "weight_decay_on": "kernels"}[key]
    assert repr(valid) in msg
    with pytest.raises(ValueError, match="config.dataset='svhn'"):
        training.train_and_evaluate(TrainConfig(dataset="svhn"), "/nonexistent-never-created")


def test_config_override_and_json_round_trip():
    c = TrainConfig().override(["learning_rate=0.05", "schedule=step", "milestones=[5, 8]",
                                'widths={"conv": [4, 8], "fc": [16, 16]}', "num_steps=null", "nesterov=true"])
    assert (c.learning_rate, c.schedule, c.milestones, c.num_steps, c.nesterov) == (0.05, "step", (5, 8), None, True)
    assert c.widths == TINY_LENET
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['lr'\]; valid keys"):
        c.override(["lr=0.1"])
    with pytest.raises(ValueError, match="key=value"):
        c.override(["lr"])
    smoke = c.replace(smoke=True).resolved()
    assert smoke.num_steps == 6 and smoke.eval_max_batches == 2 and smoke.batch_size <= 32


def test_experiment_configs_load_and_validate():
    from ib_lasso_jax.experiment.configs import examples as configs

    names = configs.available()
    assert set(names) >= {"mnist5k_lenet", "mnist5k_vgg", "mnist5k_resnet20", "cifar10_vgg16", "cifar10_resnet56"}
    for name in names:
        c = configs.load(name).validate()
        shape, classes = models.dataset_shape(c.dataset)
        size = c.image_size or shape[0]
        nnx.eval_shape(lambda c=c, classes=classes, size=size, shape=shape:
                       models.create(c.model, classes, (size, size, shape[2]), c.widths))
        assert c.replace(smoke=True).resolved().num_steps == 6
    with pytest.raises(ValueError, match="config='nope' is not valid; valid configs"):
        configs.load("nope")


def test_cli_train_then_evaluate(tmp_path, capsys):
    from ib_lasso_jax.cli import main

    sets = ["dataset=digits", "image_size=16", f"widths={json.dumps(TINY_LENET)}", "smoke=true",
            "data_parallel=false", "prefetch=0"]
    argv = ["train", "--config", "mnist5k_lenet", "--workdir", str(tmp_path), "--json", "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["step"] == 6
    assert main(["evaluate", "--checkpoint", str(tmp_path / "model"), "--dataset", "digits", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_examples"] == 360
    assert main(["train", "--config", "mnist5k_lenet", "--workdir", str(tmp_path / "y"),
                 "--set", "optimizer=lamb"]) == 2
    assert "config.optimizer='lamb'" in capsys.readouterr().err


def test_checkpoint_retention_keeps_last_n_and_best(tmp_path):
    model = models.create("lenet5", 10, (16, 16, 1), TINY_LENET)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.1, momentum=0.9)
    for step in range(1, 6):
        training._save_checkpoint(tmp_path, step, params, rest, tx.init(params), {"data": {"epoch": 0, "step": step}},
                                  keep=2, best_step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000002", "ckpt_000000004", "ckpt_000000005"]


@pytest.mark.parametrize("key, value, valid", [
    ("nesterov", "maybe", "true or false"), ("data_parallel", 1, "true or false"), ("progress", "no", "true or false"),
    ("smoke", None, "true or false"), ("learning_rate", math.inf, "a finite number >= 0"),
    ("warmup_epochs", math.nan, "a finite number >= 0"), ("warmup_epochs", 1e9, "a number in [0, 10]"),
    ("milestones", (5, math.inf), "positive epochs"),
])
def test_bad_field_types_and_ranges_name_key_value_and_valid(key, value, valid):
    with pytest.raises(ValueError) as e:
        TrainConfig().replace(**{key: value}).validate()
    shown = list(value) if key == "milestones" else value
    assert f"config.{key}={shown!r} is not valid" in str(e.value) and valid in str(e.value), str(e.value)


def test_schedule_refuses_a_warmup_longer_than_the_run_and_skips_milestones_past_it():
    c = TrainConfig(num_steps=30, warmup_epochs=1e9)
    c.validate()  # the run's length in epochs is known only with the data set
    with pytest.raises(ValueError, match=r"config.warmup_epochs=1000000000.0 is not valid: the warm-up \(10000000000 "
                                         r"steps\) is longer than the run \(30 steps, 3 epochs\).*\[0, 3\]"):
        training.create_schedule(c, steps_per_epoch=10, total_steps=30)
    c = TrainConfig(learning_rate=0.1, schedule="step", milestones=(2, 1e9), decay_factor=0.1)
    s = training.create_schedule(c, steps_per_epoch=10, total_steps=40)  # 1e9 epochs: never reached
    assert [float(s(i)) for i in (0, 19, 20, 39)] == pytest.approx([0.1, 0.1, 0.01, 0.01])


def test_retention_never_counts_checkpoints_newer_than_the_one_saved(tmp_path):
    # a run resumed past a damaged newer checkpoint: the one it just saved must survive retention
    model = models.create("lenet5", 10, (16, 16, 1), TINY_LENET)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.1)
    for step in (1, 2, 5, 3):
        training._save_checkpoint(tmp_path, step, params, rest, tx.init(params), {"data": {"epoch": 0, "step": step}},
                                  keep=1, best_step=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000003", "ckpt_000000005"]
