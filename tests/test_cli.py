"""The ib-lasso command line: count, groups, prune; what its writing commands never lose."""

import json
from pathlib import Path

import pytest

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


# ------------------------------------------------------------------------------------------
# Nothing lost: the input checkpoint is never modified, existing files are never replaced
# without --overwrite, an interrupted prune leaves nothing half-written, one writer per workdir.

TINY_LENET = {"conv": [4, 8], "fc": [16, 16]}
# The smallest training run: 6 steps of a tiny LeNet on 16x16 digits.
SMOKE_SETS = ["dataset=digits", "image_size=16", "smoke=true", "data_parallel=false", "prefetch=0"]


class Killed(BaseException):
    """Stands for the process being killed: nothing catches it."""


def _sets(items):
    return [a for s in items for a in ("--set", s)]


def _prune_argv(src, out, *extra):
    return ["prune", "--checkpoint", str(src), "--method", "l1-norm", "--target-flops", "0.5",
            "--dataset", "mnist5k", "--per-class", "2", "--reestimate-bn", "0", "--out", str(out), *extra]


def _snapshot(directory):
    """Every file under ``directory`` with its bytes: equal snapshots mean nothing was modified."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _lenet(tmp_path, name="model"):
    src = tmp_path / name
    checkpoint.save_model(src, create("lenet5", rngs=0))
    return src


def _tiny_lenet(path):
    checkpoint.save_model(path, create("lenet5", 10, (16, 16, 1), TINY_LENET, rngs=0))
    return path


def test_prune_refuses_an_out_that_would_overwrite_the_checkpoint(tmp_path, capsys, monkeypatch):
    import ib_lasso_jax.pruning

    run = tmp_path / "run"
    src = _lenet(run)
    before = _snapshot(run)
    monkeypatch.setattr(ib_lasso_jax.pruning, "prune", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    (tmp_path / "link").symlink_to(run)
    nested = _lenet(tmp_path / "o" / "model", "base")  # OUT/model would contain the checkpoint
    for ckpt, out in [(src, run), (src, tmp_path / "link"), (src, src / "sub"), (src, src), (nested, tmp_path / "o")]:
        assert main(_prune_argv(ckpt, out, "--overwrite")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--out" in err and "--checkpoint" in err and str(ckpt) in err, err
        assert "never modified" in err
    assert _snapshot(run) == before
    assert not (src / "sub").exists() and not (tmp_path / "o" / "report.md").exists()


def test_finetune_refuses_a_workdir_that_would_overwrite_the_checkpoint(tmp_path, capsys):
    work = tmp_path / "w"
    src = _tiny_lenet(work / "model")
    before = _snapshot(work)
    for workdir in (work, src, src / "inner"):
        argv = ["finetune", "--config", "mnist5k_lenet", "--checkpoint", str(src), "--workdir", str(workdir),
                "--no-progress", *_sets(SMOKE_SETS)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--workdir" in err and "--checkpoint" in err and str(src) in err, err
    assert _snapshot(work) == before
    assert sorted(p.name for p in work.iterdir()) == ["model"]


def test_prune_never_replaces_existing_files_without_overwrite(tmp_path, capsys, monkeypatch):
    import ib_lasso_jax.pruning

    src = _lenet(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("my own notes\n")
    real_prune = ib_lasso_jax.pruning.prune
    monkeypatch.setattr(ib_lasso_jax.pruning, "prune", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert main(_prune_argv(src, out)) == 2  # refused before any work
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "report.md" in err and "--overwrite" in err, err
    assert (out / "report.md").read_text() == "my own notes\n"
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]

    monkeypatch.setattr(ib_lasso_jax.pruning, "prune", real_prune)
    (out / "report.md").unlink()
    assert main(_prune_argv(src, out)) == 0
    first = (out / "report.json").read_text()
    capsys.readouterr()
    assert main(_prune_argv(src, out, "--target-flops", "0.3")) == 2  # a complete output is there
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "overwrite=True" not in err and "complete" in err, err
    assert (out / "report.json").read_text() == first
    assert main(_prune_argv(src, out, "--target-flops", "0.3", "--overwrite")) == 0
    report = json.loads((out / "report.json").read_text())
    assert abs(report["flops_reduction"] - 0.3) <= 0.005
    assert checkpoint.load_metadata(out / "model")["flops_reduction"] == report["flops_reduction"]
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.json", "report.md"]


def test_interrupted_prune_leaves_nothing_half_written(tmp_path, monkeypatch):
    from ib_lasso_jax.pruning import PruneReport

    src = _lenet(tmp_path)
    out = tmp_path / "out"
    calls = []
    real = PruneReport.to_markdown

    def killed_after_the_model(self):  # the old code had saved model/ and report.json by now
        calls.append(1)
        if len(calls) == 1:
            raise Killed
        return real(self)

    monkeypatch.setattr(PruneReport, "to_markdown", killed_after_the_model)
    with pytest.raises(Killed):
        main(_prune_argv(src, out))
    assert not out.exists() or not any(out.iterdir())  # it was made by the killed run: nothing is left
    assert main(_prune_argv(src, out)) == 0  # the rerun proceeds, without --overwrite
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.json", "report.md"]
    checkpoint.restore_model(out / "model")


def test_prune_interrupted_while_publishing_is_finished_by_the_rerun(tmp_path, capsys, monkeypatch):
    import os

    from ib_lasso_jax import cli

    src = _lenet(tmp_path)
    out = tmp_path / "out"
    real = os.rename

    def rename(a, b, *args, **kwargs):  # killed after the reports are in place, before model/
        if Path(a).name == "model" and Path(a).parent.name == cli.PRUNE_PENDING:
            raise Killed
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        main(_prune_argv(src, out))
    monkeypatch.setattr(os, "rename", real)
    assert (out / "report.json").exists() and not (out / "model").exists()
    assert main(_prune_argv(src, out)) == 2
    err = capsys.readouterr().err
    assert "complete" in err and "interrupted" in err and "--overwrite" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.json", "report.md"]
    assert checkpoint.load_metadata(out / "model") == json.loads((out / "report.json").read_text())


def _command(name, tmp_path, workdir):
    if name == "train":
        return ["train", "--config", "mnist5k_lenet", "--workdir", str(workdir), "--no-progress",
                *_sets(SMOKE_SETS + [f"widths={json.dumps(TINY_LENET)}"])]
    if name == "finetune":
        src = _tiny_lenet(tmp_path / "input")
        return ["finetune", "--config", "mnist5k_lenet", "--checkpoint", str(src), "--workdir", str(workdir),
                "--no-progress", *_sets(SMOKE_SETS)]
    if name == "run":
        return ["run", "mnist5k_vgg_sglp", "--workdir", str(workdir), "--smoke", "--no-progress"]
    return _prune_argv(_lenet(tmp_path), workdir)


@pytest.mark.parametrize("name", ["prune", "train", "finetune", "run"])
def test_a_workdir_locked_by_a_live_process_is_refused(name, tmp_path, capsys):
    import os
    import socket

    work = tmp_path / "work"
    work.mkdir()
    lock = work / ".lock"
    holder = {"pid": os.getpid(), "hostname": socket.gethostname(), "command": "ib-lasso train --workdir work"}
    lock.write_text(json.dumps(holder))
    assert main(_command(name, tmp_path, work)) == 2
    err = capsys.readouterr().err
    flag = "--out" if name == "prune" else "--workdir"
    assert err.count("\n") == 1 and f"pid {os.getpid()}" in err and str(lock) in err, err
    assert f"{flag} {str(work)!r} is in use" in err, err
    assert json.loads(lock.read_text()) == holder  # still the holder's
    assert sorted(p.name for p in work.iterdir()) == [".lock"]


def test_a_stale_lock_is_taken_over_and_every_lock_released(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    src = _lenet(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": gone.pid, "hostname": socket.gethostname(), "command": "x"}))
    assert main(_prune_argv(src, out)) == 0
    err = capsys.readouterr().err
    assert "stale lock" in err and f"pid {gone.pid}" in err, err
    assert not (out / ".lock").exists()
    assert main(_prune_argv(src, tmp_path / "bad", "--target-flops", "1.5")) == 2  # released on errors too
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------
# Nothing silently wrong: every bad argument is one line naming it, its value and what is
# valid, before any work; no traceback.


def _one_error_line(capsys, command="prune"):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith(f"ib-lasso {command}: error: "), err
    return err


def _read_only(directory: Path, monkeypatch) -> None:
    """Make ``directory`` read-only; for root, whom permissions do not stop, refuse what the
    kernel refuses others: creating entries in it and write access to it."""
    import os

    directory.chmod(0o555)
    if not os.access(directory, os.W_OK):
        return
    real_mkdir, real_open, real_access = os.mkdir, os.open, os.access
    target = directory.absolute()

    def inside(p):
        return Path(p).absolute().parent == target

    def mkdir(p, *args, **kwargs):
        if inside(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_mkdir(p, *args, **kwargs)

    def open_(p, flags, *args, **kwargs):
        if inside(p) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, flags, *args, **kwargs)

    def access(p, mode, *args, **kwargs):
        if Path(p).absolute() == target and mode & os.W_OK:
            return False
        return real_access(p, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("name", ["prune", "train"])
def test_a_read_only_output_or_work_folder_is_one_line(name, tmp_path, capsys, monkeypatch):
    import ib_lasso_jax.pruning

    src = _lenet(tmp_path)
    locked = tmp_path / "ro"
    locked.mkdir()
    _read_only(locked, monkeypatch)
    monkeypatch.setattr(ib_lasso_jax.pruning, "prune", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    try:
        if name == "prune":  # an existing read-only --out
            rc = main(_prune_argv(src, locked))
            flag, where = "--out", locked
        else:  # a --workdir to be created in a read-only folder
            rc = main(_command("train", tmp_path, locked / "new"))
            flag, where = "--workdir", locked / "new"
        assert rc == 2
        err = _one_error_line(capsys, name)
        assert f"{flag} {str(where)!r}" in err and f"{str(locked)!r} is not writable" in err, err
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_a_permission_error_deep_inside_is_one_line(tmp_path, capsys, monkeypatch):
    import ib_lasso_jax.train.training

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/checkpoints/ckpt_000000003")

    monkeypatch.setattr(ib_lasso_jax.train.training, "train_and_evaluate", denied)
    assert main(_command("train", tmp_path, tmp_path / "w")) == 2
    err = _one_error_line(capsys, "train")
    assert "'/data/checkpoints/ckpt_000000003'" in err and "Permission denied" in err, err


@pytest.mark.parametrize("method, option, named", [
    ("sglp-ib", "grid=1.5", ["grid=1.5", "an integer >= 2"]),
    ("stlp-ib", "grid=1", ["grid=1", "an integer >= 2"]),
    ("sglp-ib", "batch_size=0", ["batch_size=0", "a positive integer"]),
    ("hsic-lasso", "maxiter=2.5", ["maxiter=2.5", "a positive integer"]),
    ("sglp-ib", "nonneg=maybe", ["nonneg='maybe'", "true or false"]),
    ("sglp-ib", "lam_range=2", ["lam_range=2", "(0, 1)"]),
    ("hsic-lasso", "lam_range=0", ["lam_range=0", "(0, 1)"]),
    ("stlp-ib", "structure_weight=-1", ["structure_weight=-1", ">= 0"]),
    ("sglp-ib", "mu=0", ["mu=0", "> 0"]),
    ("hrank", "batch_size=0", ["batch_size=0", "a positive integer"]),
    ("hrank", "bogus=1", ["bogus", "hrank", "batch_size"]),
    ("l1-norm", "bogus=1", ["bogus", "l1-norm", "none"]),
    ("bn-scale", "response=R1", ["response", "bn-scale"]),
    ("random", "bogus=1", ["bogus", "random"]),
    ("l1-norm", "tolerance=-1", ["tolerance=-1", "(0, 1)"]),
    ("l1-norm", "floor=2", ["--option floor", "--floor"]),
])
def test_bad_method_options_are_refused_before_any_work(method, option, named, tmp_path, capsys, monkeypatch):
    import ib_lasso_jax.pruning

    src = _lenet(tmp_path)
    monkeypatch.setattr(ib_lasso_jax.pruning, "prune", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    argv = _prune_argv(src, tmp_path / "out", "--option", option)
    argv[argv.index("--method") + 1] = method
    assert main(argv) == 2
    err = _one_error_line(capsys)
    for text in named:
        assert text in err, (text, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, named", [
    ("--floor", "1.5", ["--floor 1.5", "an integer >= 0", "[0, 1)"]),
    ("--floor", "-1", ["--floor -1", "[0, 1)"]),
    ("--reestimate-bn", "-3", ["--reestimate-bn -3", "an integer >= 0"]),
    ("--round-to", "0", ["--round-to 0", "a positive integer"]),
    ("--per-class", "0", ["--per-class 0", "a positive integer"]),
])
def test_bad_prune_arguments_are_refused_before_any_work(flag, value, named, tmp_path, capsys, monkeypatch):
    import ib_lasso_jax.pruning

    src = _lenet(tmp_path)
    monkeypatch.setattr(ib_lasso_jax.pruning, "prune", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert main(_prune_argv(src, tmp_path / "out", flag, value)) == 2
    err = _one_error_line(capsys)
    for text in named:
        assert text in err, (text, err)


def test_an_integral_floor_is_a_channel_count(tmp_path, monkeypatch):
    import ib_lasso_jax.pruning

    src = _lenet(tmp_path)
    seen = {}

    def prune(*args, **kwargs):
        seen.update(kwargs)
        raise AssertionError

    monkeypatch.setattr(ib_lasso_jax.pruning, "prune", prune)
    for value, floor in (("2", 2), ("3.0", 3), ("0.25", 0.25), ("0", 0.0)):
        with pytest.raises(AssertionError):
            main(_prune_argv(src, tmp_path / "out", "--floor", value))
        assert seen["floor"] == floor and type(seen["floor"]) is type(floor), (value, seen["floor"])


def test_round_to_and_tolerance_errors_name_themselves(tmp_path, capsys):
    src = _lenet(tmp_path)
    assert main(_prune_argv(src, tmp_path / "out", "--round-to", "1000")) == 2
    err = _one_error_line(capsys)
    assert "round_to=1000" in err and "floor" not in err.split("round_to=1000")[0], err
    from ib_lasso_jax.pruning import prune

    with pytest.raises(ValueError, match=r"tolerance=-1 is not valid.*\(0, 1\)"):
        prune(checkpoint.restore_model(src), None, "l1-norm", target_flops=0.5, tolerance=-1)


def test_prune_help_lists_every_registered_method(capsys):
    from ib_lasso_jax.pruning import available_methods

    with pytest.raises(SystemExit) as e:
        main(["prune", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    methods = available_methods()
    assert {"dwgl", "entropic", "ic-shapley", "sglp-ib", "l1-norm"} <= set(methods)
    for m in methods:
        assert m in out, (m, out)


@pytest.mark.parametrize("assignment, named", [
    ("nesterov=maybe", "config.nesterov='maybe' is not valid; valid values: true or false"),
    ("warmup_epochs=1e9", "config.warmup_epochs=1000000000.0 is not valid"),
    ("learning_rate=1e999", "config.learning_rate=inf is not valid"),
])
def test_bad_training_settings_are_one_line(assignment, named, tmp_path, capsys, monkeypatch):
    argv = ["train", "--config", "mnist5k_lenet", "--workdir", str(tmp_path / "w"), "--no-progress",
            *_sets(["dataset=digits", "image_size=16", f"widths={json.dumps(TINY_LENET)}", "num_steps=2",
                    "data_parallel=false", "prefetch=0", assignment])]
    assert main(argv) == 2
    err = _one_error_line(capsys, "train")
    assert named in err, err
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize("assignment, named", [
    ("prune.options.mu=0", "mu=0"),
    ("prune.options.bogus=1", "bogus"),
    ('prune.options.nonneg="maybe"', "nonneg='maybe'"),
])
def test_run_checks_the_prune_options_before_training(assignment, named, tmp_path, capsys, monkeypatch):
    import ib_lasso_jax.train.training

    monkeypatch.setattr(ib_lasso_jax.train.training, "train_and_evaluate",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained before checking")))
    assert main(["run", "mnist5k_vgg_sglp", "--workdir", str(tmp_path / "w"), "--smoke", "--no-progress",
                 "--set", assignment]) == 2
    err = _one_error_line(capsys, "run")
    assert named in err and "prune.options" in err, err


def test_prune_to_a_latency_target(tmp_path, capsys, monkeypatch):
    """--target-latency / --latency-batch reach prune(); a stand-in timer (layers 80% of a 1 s model,
    cost by input size x output width) keeps it deterministic; the second run reads the cached table."""
    import math

    import jax
    import numpy as np

    from ib_lasso_jax.deploy import latency
    from ib_lasso_jax.graph import coupling

    src = _lenet(tmp_path)
    ops = coupling.trace_channels(checkpoint.restore_model(src), strict=False).layers
    k = 0.8 / sum(2 * math.prod(op.in_shape) * op.out_shape[-1] for op in ops)
    timed = []

    def fake(calls, *, repeats, warmup, min_sample_seconds):
        timed.append(len(calls))
        out = {}
        for name, (f, x) in calls.items():
            t = {"overhead": 0.0, "model": 1.0}.get(name)
            out[name] = np.full(repeats, k * np.prod(x.shape) * jax.eval_shape(f, x).shape[-1] if t is None else t)
        return out, dict.fromkeys(calls, 1)

    monkeypatch.setattr(latency, "_time_samples", fake)
    monkeypatch.setenv(latency.CACHE_ENV_VAR, str(tmp_path / "cache"))
    argv = ["prune", "--checkpoint", str(src), "--method", "l1-norm", "--target-latency", "0.4", "--latency-batch",
            "2", "--dataset", "mnist5k", "--per-class", "2", "--reestimate-bn", "0"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["target"] == {"latency": 0.4} and report["info"]["latency"]["batch"] == 2
    assert abs(report["predicted_latency_reduction"] - 0.4) <= 0.01
    assert not report["info"]["latency"]["from_cache"] and timed
    n = len(timed)
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "report.json").read_text())
    assert len(timed) == n and again["info"]["latency"]["from_cache"]
    capsys.readouterr()
    # --latency-batch alone, and prune()'s latency arguments as --option, are refused by name.
    assert main([*_prune_argv(src, tmp_path / "c"), "--latency-batch", "4"]) == 2
    assert "--latency-batch 4" in _one_error_line(capsys) and not (tmp_path / "c").exists()
    assert main([*_prune_argv(src, tmp_path / "c"), "--option", "target_latency=0.5"]) == 2
    assert "--target-latency" in _one_error_line(capsys)
