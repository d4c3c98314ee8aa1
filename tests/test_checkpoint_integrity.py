"""Checksums of saved states: a damaged data file never restores as silently changed values."""

import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from ib_lasso_jax import checkpoint
from ib_lasso_jax.checkpoint import CheckpointError
from ib_lasso_jax.cli import main
from ib_lasso_jax.models import create
from ib_lasso_jax.train import training
from ib_lasso_jax.train.training import TrainConfig

TINY_LENET = {"conv": [4, 8], "fc": [16, 16]}

# orbax's own metadata, not array data, is left out of the flips: _METADATA (the tree's shapes
# and dtypes; a damaged one fails orbax or the check against state_layout.json, tested in
# test_checkpoint.py by _junk_array_metadata and the layout cases), _CHECKPOINT_METADATA
# (timestamps and the handler's name, not used to read any value) and commit_success.txt
# (orbax's completion marker). Every other file under state/ (ocdbt manifests, b-tree nodes,
# the compressed chunks) is flipped.
_METADATA_FILES = {"_METADATA", "_CHECKPOINT_METADATA", "commit_success.txt"}

# orbax/tensorstore may report "Event loop is closed" from background callbacks of a failed
# read; that is orbax's noise, not a failure of the test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _data_files(ckpt: Path) -> list[Path]:
    return sorted(f for f in (ckpt / "state").rglob("*") if f.is_file() and f.name not in _METADATA_FILES)


def _flip(file: Path, byte: int, bit: int) -> None:
    """Flip one bit in place (flipping it again restores the file)."""
    with open(file, "r+b") as fh:
        fh.seek(byte)
        value = fh.read(1)[0]
        fh.seek(byte)
        fh.write(bytes([value ^ (1 << bit)]))


def _as_bytes(tree) -> dict[str, bytes]:
    """Every leaf's dtype, shape and raw bytes, by its "a/b/c" path (keys: their key data)."""
    def raw(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        a = np.asarray(x)
        return (a.dtype.str, a.shape, a.tobytes())

    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp): raw(x)
            for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _model_bytes(model) -> dict[str, bytes]:
    return _as_bytes(nnx.to_pure_dict(nnx.state(model)))


def _outcome(restore, original: dict) -> tuple[str, object]:
    """("error", message) or ("values", the paths whose bytes differ from ``original``)."""
    try:
        got = restore()
    except CheckpointError as e:
        return "error", str(e)
    assert got.keys() == original.keys()
    return "values", [k for k in original if got[k] != original[k]]


def _unverified(monkeypatch, restore, original):
    with monkeypatch.context() as m:
        m.setattr(checkpoint.layout, "_verify_checksums", lambda *args: None)
        return _outcome(restore, original)


def _damage_a_value(path: Path, monkeypatch, restore, original, seed=0) -> list[str]:
    """Flip seeded random bits of the largest data file until an unverified restore returns
    changed values (a flip may instead break orbax's decoding); the paths changed."""
    chunk = max(_data_files(path), key=lambda f: f.stat().st_size)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        byte, bit = int(rng.integers(chunk.stat().st_size)), int(rng.integers(8))
        _flip(chunk, byte, bit)
        kind, changed = _unverified(monkeypatch, restore, original)
        if kind == "values" and changed:
            return changed
        _flip(chunk, byte, bit)
    raise AssertionError(f"no flip in {chunk} changed a value")


# --------------------------------------------------------------------------------------


def test_every_bit_flip_that_changes_a_value_is_detected(tmp_path, monkeypatch):
    model = create("lenet5", 10, (16, 16, 1), TINY_LENET, rngs=0)
    path = checkpoint.save_model(tmp_path / "ckpt", model)
    original = _model_bytes(model)
    files = _data_files(path)
    sizes = np.array([f.stat().st_size for f in files])
    assert len(files) >= 3 and sizes.max() > 10 * np.median(sizes)  # chunks, b-tree nodes, manifests

    def restore():
        return _model_bytes(checkpoint.restore_model(path))

    rng = np.random.default_rng(23)
    changed_flips = detected = harmless = 0
    for trial in range(40):
        # half the flips uniform over the bytes (mostly the chunks), half over the files (every
        # small ocdbt file is hit too)
        i = int(rng.integers(len(files))) if trial % 2 else int(rng.choice(len(files), p=sizes / sizes.sum()))
        byte, bit = int(rng.integers(sizes[i])), int(rng.integers(8))
        where = f"bit {bit} of byte {byte} of {files[i].relative_to(path)}"
        _flip(files[i], byte, bit)
        try:
            raw_kind, raw = _unverified(monkeypatch, restore, original)
            kind, result = _outcome(restore, original)
        finally:
            _flip(files[i], byte, bit)
        if kind == "values":  # a flip restored without error must have changed nothing
            assert result == [], f"{where} restored changed values of {result} without an error"
            assert raw_kind == "values" and raw == [], where
            harmless += 1
            continue
        detected += 1
        assert str(path) in result, (where, result)
        if raw_kind == "values":  # orbax read it: the checksum caught it, naming the array
            assert raw, f"{where} changed no value but failed verification: {result}"
            assert "CRC-32" in result and f"{raw[0]}, " in result, (where, raw, result)
            changed_flips += 1
    print(f"40 flips: {detected} detected ({changed_flips} by checksum, changing values), {harmless} harmless")
    # ocdbt.process_0/'s own manifest and b-tree node are not read on restore (the root b-tree
    # points at the chunks), so some flips are harmless; but most must really change values.
    assert changed_flips >= 10 and detected + harmless == 40
    assert restore() == original  # every flip undone: the checkpoint reads as saved


def test_cli_evaluate_refuses_a_damaged_checkpoint(tmp_path, capsys, monkeypatch):
    model = create("lenet5", 10, (16, 16, 1), TINY_LENET, rngs=0)
    path = checkpoint.save_model(tmp_path / "model", model)
    original = _model_bytes(model)
    changed = _damage_a_value(path, monkeypatch, lambda: _model_bytes(checkpoint.restore_model(path)), original)
    rc = main(["evaluate", "--checkpoint", str(path), "--dataset", "mnist5k"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("ib-lasso evaluate: error: ")]
    assert len(lines) == 1, err
    assert f"checkpoint {str(path)!r} is corrupted" in lines[0] and f"{changed[0]}, " in lines[0], lines[0]
    assert "CRC-32" in lines[0] and "intact copy" in lines[0]


def test_damaged_training_checkpoint_is_refused_on_resume(tmp_path, monkeypatch):
    config = TrainConfig(dataset="digits", image_size=16, model="lenet5", widths=TINY_LENET, batch_size=32,
                         eval_batch_size=120, num_steps=3, checkpoint_every_steps=3, eval_max_batches=1,
                         data_parallel=False, progress=False, prefetch=0)
    workdir = tmp_path / "run"
    training.train_and_evaluate(config, workdir)
    latest = training.latest_checkpoint(workdir)
    assert latest.name == "ckpt_000000003"
    layout = json.loads((latest / checkpoint.LAYOUT_FILE).read_text())
    assert layout["format_version"] == 2
    assert all(len(e["crc32"]) == 8 for e in layout["leaves"] if "empty" not in e)
    original = _as_bytes(checkpoint.restore_pytree(latest))
    assert training.train_and_evaluate(config, workdir).metrics["step"] == 3  # intact: resumes, verified
    assert any(k.startswith("opt_state/") for k in original) and any(k.startswith("params/") for k in original)

    changed = _damage_a_value(latest, monkeypatch, lambda: _as_bytes(checkpoint.restore_pytree(latest)), original)
    with pytest.raises(CheckpointError, match=r"is corrupted: \d+ array\(s\) in state/ differ") as info:
        training.train_and_evaluate(config, workdir)  # resumes from `latest`
    message = str(info.value)
    assert f"checkpoint {str(latest)!r}" in message and f"{changed[0]}, " in message and "CRC-32" in message
    with pytest.raises(CheckpointError, match="CRC-32"):
        checkpoint.restore_pytree(latest)


def test_layout_version_1_restores_unverified(tmp_path, caplog, monkeypatch):
    model = create("lenet5", 10, (16, 16, 1), TINY_LENET, rngs=0)
    path = checkpoint.save_model(tmp_path / "old", model)
    original = _model_bytes(model)
    layout = json.loads((path / checkpoint.LAYOUT_FILE).read_text())
    for e in layout["leaves"]:
        e.pop("crc32", None)
    (path / checkpoint.LAYOUT_FILE).write_text(json.dumps({**layout, "format_version": 1}))
    with caplog.at_level(logging.DEBUG, logger="ib_lasso_jax.checkpoint"):
        assert _model_bytes(checkpoint.restore_model(path)) == original
    assert "format_version 1 has no checksums" in caplog.text
    with caplog.at_level(logging.INFO, logger="ib_lasso_jax.checkpoint"):
        caplog.clear()
        checkpoint.restore_model(path)
    assert caplog.text == ""  # not above debug level

    # without checksums a damaged value restores as it is (what version 2 prevents)
    changed = _damage_a_value(path, monkeypatch, lambda: _model_bytes(checkpoint.restore_model(path)), original)
    assert _model_bytes(checkpoint.restore_model(path))[changed[0]] != original[changed[0]]


def _edit_layout(path: Path, edit) -> None:
    layout = json.loads((path / checkpoint.LAYOUT_FILE).read_text())
    edit(layout["leaves"])
    (path / checkpoint.LAYOUT_FILE).write_text(json.dumps(layout))


def test_checksum_entries_of_the_layout_are_checked(tmp_path):
    tree = {"w": np.arange(6, dtype=np.float32), "big": np.ones((300, 1024), np.float32),
            "key": jax.random.key(1), "n": np.int32(3)}
    path = checkpoint.save_pytree(tmp_path / "t", tree)
    assert _as_bytes(checkpoint.restore_pytree(path)) == _as_bytes(tree)

    def wrong_big(leaves):  # a damaged checksum refuses the array, as damaged data does
        (e,) = [e for e in leaves if e["path"] == [["d", "big"]]]
        e["crc32"] = f"{int(e['crc32'], 16) ^ 1:08x}"

    _edit_layout(path, wrong_big)
    with pytest.raises(CheckpointError, match=r"1 array\(s\) in state/ differ .*: big, \(300, 1024\) float32: CRC-32"):
        checkpoint.restore_pytree(path)

    path = checkpoint.save_pytree(tmp_path / "t", tree, overwrite=True)
    _edit_layout(path, lambda leaves: leaves[0].pop("crc32"))
    with pytest.raises(CheckpointError, match=r"invalid state layout \(KeyError: 'crc32'\)"):
        checkpoint.restore_pytree(path)
    _edit_layout(path, lambda leaves: leaves[0].update(crc32="xyz"))
    with pytest.raises(CheckpointError, match=r"invalid state layout.*invalid crc32 'xyz'"):
        checkpoint.restore_pytree(path)
    # null: an array the saving process did not hold whole, restored unverified
    _edit_layout(path, lambda leaves: leaves[0].update(crc32=None))
    assert _as_bytes(checkpoint.restore_pytree(path)) == _as_bytes(tree)


# --------------------------------------------------------------------------------------
# Resume falls back past damaged checkpoints

_RESUME = TrainConfig(dataset="digits", image_size=16, model="lenet5", widths=TINY_LENET, batch_size=32,
                      eval_batch_size=120, num_steps=6, checkpoint_every_steps=2, eval_max_batches=1,
                      data_parallel=False, progress=False, prefetch=0, keep_checkpoints=3)


def _crashed_run(workdir: Path, at: int) -> None:
    """A run of _RESUME killed after step ``at`` (checkpoints every 2 steps)."""
    class Crash(Exception):
        pass

    def crash(step):
        if step == at:
            raise Crash

    with pytest.raises(Crash):
        training.train_and_evaluate(_RESUME, workdir, on_step=crash)


@pytest.mark.parametrize("damage", ["checksum", "no state"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(damage, tmp_path, monkeypatch):
    import shutil

    full = training.train_and_evaluate(_RESUME, tmp_path / "full")
    workdir = tmp_path / "run"
    _crashed_run(workdir, 5)
    ckpts = workdir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt_000000002", "ckpt_000000004"]
    newest, older = ckpts / "ckpt_000000004", ckpts / "ckpt_000000002"
    if damage == "checksum":
        original = _as_bytes(checkpoint.restore_pytree(newest))
        _damage_a_value(newest, monkeypatch, lambda: _as_bytes(checkpoint.restore_pytree(newest)), original)
        why = "CRC-32"
    else:  # what is left is not even replaceable by save_pytree (no state/)
        shutil.rmtree(newest / "state")
        why = "is missing"

    with pytest.warns(training.DamagedCheckpointWarning) as record:
        resumed = training.train_and_evaluate(_RESUME, workdir)
    (warning,) = [str(w.message) for w in record if w.category is training.DamagedCheckpointWarning]
    assert f"{str(newest)!r}" in warning and why in warning, warning
    assert f"resuming from {str(older)!r}" in warning, warning
    # resumed from step 2: the same trajectory as the uninterrupted run
    assert resumed.metrics["step"] == 6
    a, b = _model_bytes(full.model), _model_bytes(resumed.model)
    assert a == b
    # the damaged step was saved again, intact; retention kept the newest three
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt_000000002", "ckpt_000000004", "ckpt_000000006"]
    checkpoint.restore_pytree(newest)


def test_resume_with_no_intact_checkpoint_lists_them_all(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    _crashed_run(workdir, 5)
    ckpts = workdir / "checkpoints"
    newest, older = ckpts / "ckpt_000000004", ckpts / "ckpt_000000002"
    original = _as_bytes(checkpoint.restore_pytree(newest))
    _damage_a_value(newest, monkeypatch, lambda: _as_bytes(checkpoint.restore_pytree(newest)), original)
    (older / training.TRAIN_STATE_FILE).write_text('{"format": "ib_lasso_jax.tr')  # truncated
    with pytest.raises(CheckpointError) as info:
        training.train_and_evaluate(_RESUME, workdir)
    message = str(info.value)
    assert "no intact training checkpoint" in message, message
    assert f"{str(newest)!r}" in message and "CRC-32" in message, message
    assert f"{str(older)!r}" in message and "corrupted or truncated" in message, message
    # a config mismatch is not damage: it is refused at once, not skipped
    checkpoint_dir = tmp_path / "other"
    _crashed_run(checkpoint_dir, 5)
    with pytest.raises(CheckpointError, match="written with different settings"):
        training.train_and_evaluate(_RESUME.replace(learning_rate=0.01), checkpoint_dir)


def test_cli_train_warns_and_resumes_past_a_damaged_checkpoint(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    _crashed_run(workdir, 5)
    newest, older = workdir / "checkpoints" / "ckpt_000000004", workdir / "checkpoints" / "ckpt_000000002"
    for f in (newest / "state").rglob("*"):
        if f.is_file() and f.name != "_CHECKPOINT_METADATA":
            f.write_bytes(b"\0garbage")
    argv = ["train", "--workdir", str(workdir), "--no-progress", "--json"]
    for key, value in _RESUME.to_dict().items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["step"] == 6
    lines = [ln for ln in err.splitlines() if ln.startswith("ib-lasso train: warning: ")]
    assert len(lines) == 1, err
    assert f"{str(newest)!r}" in lines[0] and f"resuming from {str(older)!r}" in lines[0], lines[0]
    assert "Traceback" not in err, err


def test_a_failed_orbax_read_leaves_no_noise(tmp_path, monkeypatch, caplog):
    """Damage that fails orbax while its other reads are in flight raises CheckpointError and
    nothing else: no "Event loop is closed" from those reads, no "exception was never retrieved"."""
    import gc
    import sys
    import time

    # arrays above PACK_MAX_BYTES are stored one by one: many reads in flight at once
    tree = {f"a{i}": np.full((300, 1024), i, np.float32) for i in range(8)}
    path = checkpoint.save_pytree(tmp_path / "t", tree)
    noise = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: noise.append(repr(u.exc_value)))
    files = [f for f in (path / "state").rglob("*") if f.is_file() and f.name not in _METADATA_FILES]
    failures = 0
    with caplog.at_level(logging.WARNING):
        for f in files:
            for byte in (3, f.stat().st_size // 2):
                _flip(f, byte, 4)
                try:
                    checkpoint.restore_pytree(path)
                except CheckpointError:
                    failures += 1
                finally:
                    _flip(f, byte, 4)
        gc.collect()
        time.sleep(0.5)  # reads left in flight would complete now
        gc.collect()
    assert failures >= 3
    assert noise == [], noise[:3]
    assert "never retrieved" not in caplog.text and "Failed to get item metadata" not in caplog.text, caplog.text
    assert _as_bytes(checkpoint.restore_pytree(path)) == _as_bytes(tree)
