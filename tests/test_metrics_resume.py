"""metrics.jsonl of a resumed run: the same lines as an uninterrupted run's (training.py)."""

import json
import shutil

import pytest

from ib_lasso_jax.train import training
from ib_lasso_jax.train.training import TrainConfig

# lenet5 at tiny widths on `digits` (44 steps per epoch): a checkpoint every 7 steps, a train
# line every 10, so the checkpoint the run resumes from (step 14) is inside a line's window.
CONFIG = TrainConfig(
    dataset="digits", image_size=16, model="lenet5", widths={"conv": [4, 8], "fc": [16, 16]}, batch_size=32,
    eval_batch_size=120, learning_rate=0.05, warmup_epochs=0.5, progress=False, prefetch=0, log_every_steps=10,
    num_steps=30, checkpoint_every_steps=7, eval_max_batches=1, data_parallel=False,
)


class _Crash(Exception):
    pass


def _crash_at(n):
    def on_step(step):
        if step == n:
            raise _Crash

    return on_step


def _lines(workdir):
    # "time" is the wall clock since the process started training: it differs between any two runs.
    return [{k: v for k, v in json.loads(ln).items() if k != "time"}
            for ln in (workdir / training.METRICS_FILE).read_text().splitlines()]


def test_resumed_metrics_lines_equal_an_uninterrupted_runs(tmp_path):
    full = training.train_and_evaluate(CONFIG, tmp_path / "full")
    with pytest.raises(_Crash):  # killed at step 17, after the line of step 10 and the checkpoint of step 14
        training.train_and_evaluate(CONFIG, tmp_path / "resumed", on_step=_crash_at(17))
    assert training.latest_checkpoint(tmp_path / "resumed").name == "ckpt_000000014"
    legacy = tmp_path / "legacy"  # the same checkpoints as written before they held the log window
    shutil.copytree(tmp_path / "resumed", legacy)
    for state in (legacy / "checkpoints").glob("ckpt_*/train_state.json"):
        info = json.loads(state.read_text())
        assert info.pop("log_window") is not None or info["step"] % 10 == 0
        state.write_text(json.dumps(info))

    resumed = training.train_and_evaluate(CONFIG, tmp_path / "resumed")
    expected = _lines(tmp_path / "full")
    assert [ln["step"] for ln in expected if ln["split"] == "train"] == [10, 20, 30]
    assert _lines(tmp_path / "resumed") == expected
    assert resumed.metrics["accuracy"] == full.metrics["accuracy"]

    # An older checkpoint still resumes to the same parameters; the one line whose window it
    # cut (step 20: steps 15-20 instead of 11-20) says so.
    old = training.train_and_evaluate(CONFIG, legacy)
    assert old.metrics["accuracy"] == full.metrics["accuracy"]
    got = _lines(legacy)
    marked = [ln for ln in got if ln.get("resumed")]
    assert [ln["step"] for ln in marked] == [20] and marked[0]["split"] == "train"
    assert [{k: v for k, v in ln.items() if k != "resumed"} if ln.get("resumed") else ln for ln in got
            if ln["step"] != 20 or ln["split"] != "train"] == [ln for ln in expected
                                                                if ln["step"] != 20 or ln["split"] != "train"]
