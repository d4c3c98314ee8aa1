"""Tests of ib_lasso_jax.checkpoint: round trips, pruned widths, atomicity, corruption."""

from __future__ import annotations

import glob
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

_ROOT = Path(__file__).resolve().parents[1]


def _import_registry() -> types.ModuleType:
    """The model registry, even while the zoo modules of the package do not import yet."""
    try:
        from ib_lasso_jax.models import _registry

        return _registry
    except Exception:  # noqa: BLE001 -- the zoo is work in progress elsewhere
        pass
    if "ib_lasso_jax.models" not in sys.modules:
        stub = types.ModuleType("ib_lasso_jax.models")
        stub.__path__ = [str(_ROOT / "ib_lasso_jax" / "models")]
        sys.modules["ib_lasso_jax.models"] = stub
    return importlib.import_module("ib_lasso_jax.models._registry")


_registry = _import_registry()
checkpoint = importlib.import_module("ib_lasso_jax.checkpoint")
# The modules whose own functions the interruption tests replace (each looks them up in itself).
checkpoint_atomic = importlib.import_module("ib_lasso_jax.checkpoint.atomic")
checkpoint_state = importlib.import_module("ib_lasso_jax.checkpoint.state")

NAME = "_ckpt_test_cnn"


class _TinyCNN(nnx.Module):
    """conv -> BN -> relu (x2) -> global mean -> linear; widths {"conv": [c1, c2]}.

    Like the zoo models, only nnx.Conv, nnx.BatchNorm and nnx.Linear (the registry initialises
    exactly these), held in nnx.List so the state has integer keys.
    """

    def __init__(self, num_classes, input_shape, widths, *, rngs):
        c_in = input_shape[-1]
        chans = [c_in] + list(widths["conv"])
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in zip(chans, chans[1:])])
        self.bns = nnx.List([nnx.BatchNorm(b, rngs=rngs) for b in chans[1:]])
        self.head = nnx.Linear(chans[-1], num_classes, rngs=rngs)

    def __call__(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = nnx.relu(bn(conv(x)))
        return self.head(x.mean(axis=(1, 2)))


def _register_tiny_model() -> None:
    if NAME not in _registry.available():
        _registry.register(NAME, default_widths=lambda: {"conv": [6, 8]}, default_dataset="digits")(_TinyCNN)


@pytest.fixture(autouse=True)
def _tiny_model_registered():
    """Register the test model only while a test of this file runs (others list the zoo)."""
    _register_tiny_model()
    yield
    _registry._REGISTRY.pop(NAME, None)


def random_model(spec, seed=0):
    """The model of ``spec`` with random (numpy) values in every variable, batch stats included.

    Filling the abstract model avoids compiling initializers for every new shape, which
    keeps the test file fast on a busy CPU.
    """
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(_registry.abstract_from_spec(spec))

    def fill(sds):
        if jax.dtypes.issubdtype(sds.dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, sds)
            return jax.random.wrap_key_data(jnp.asarray(rng.integers(0, 2**32, data.shape, dtype=np.uint32)))
        if jnp.issubdtype(sds.dtype, jnp.floating):
            return jnp.asarray(rng.uniform(0.1, 1.0, sds.shape).astype(sds.dtype))
        return jnp.asarray(rng.integers(0, 5, sds.shape).astype(sds.dtype))

    nnx.replace_by_pure_dict(state, jax.tree.map(fill, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def make_model(widths=None, seed=0):
    """A tiny registered model with random parameters and batch statistics."""
    return random_model(_registry.make_spec(NAME, 10, (8, 8, 1), widths or {"conv": [6, 8]}), seed)


_forward = nnx.jit(lambda model, x: model(x))


def _batch(shape=(8, 8, 1)):
    return jax.random.normal(jax.random.key(7), (4, *shape))


def _is_key(x):
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _as_numbers(tree):
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if _is_key(x) else x), tree)


def _assert_same_state(a, b):
    fa = jax.tree_util.tree_flatten_with_path(_as_numbers(nnx.to_pure_dict(nnx.state(a))))[0]
    fb = jax.tree_util.tree_flatten_with_path(_as_numbers(nnx.to_pure_dict(nnx.state(b))))[0]
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x, y, err_msg=str(k))


def _eval_out(model):
    model.eval()
    return np.asarray(_forward(model, _batch(model.spec.input_shape)))


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def _all_names(path: Path) -> list[str]:
    return [p.name for p in path.rglob("*")]


# --------------------------------------------------------------------------------------


def test_round_trip_params_batch_stats_outputs(tmp_path):
    model = make_model()
    bn_mean = np.asarray(model.bns[0].mean[...])
    assert np.abs(bn_mean).max() > 0  # batch statistics are really non-trivial
    path = tmp_path / "ckpt"
    report = {"kept": np.array([1, 0, 1]), "ratio": np.float32(0.5), "note": "hi"}
    assert checkpoint.save_model(path, model, metadata=report) == path

    restored = checkpoint.restore_model(path)
    assert isinstance(restored, _TinyCNN)
    assert restored.spec == model.spec
    _assert_same_state(model, restored)
    np.testing.assert_array_equal(np.asarray(restored.bns[0].mean[...]), bn_mean)
    np.testing.assert_array_equal(np.asarray(restored.bns[1].var[...]), np.asarray(model.bns[1].var[...]))
    # eval mode on return, identical outputs to the original in eval mode
    assert all(bn.use_running_average for bn in restored.bns)
    np.testing.assert_array_equal(_eval_out(restored), _eval_out(model))

    assert checkpoint.load_spec(path) == model.spec
    assert checkpoint.load_metadata(path) == {"kept": [1, 0, 1], "ratio": 0.5, "note": "hi"}
    # no temporary directories anywhere after success
    assert _siblings(path) == ["ckpt"]
    assert sorted(os.listdir(path)) == ["metadata.json", "spec.json", "state", "state_layout.json"]
    assert not [n for n in _all_names(path) if "tmp" in n]


def test_reduced_widths_restore_without_giving_widths(tmp_path):
    pruned = make_model(widths={"conv": [3, 5]}, seed=3)
    path = tmp_path / "pruned"
    checkpoint.save_model(path, pruned)
    assert checkpoint.load_metadata(path) is None
    assert checkpoint.load_spec(path).widths == {"conv": [3, 5]}

    restored = checkpoint.restore_model(str(path))
    assert restored.spec.widths == {"conv": [3, 5]}
    assert restored.convs[0].kernel.shape == (3, 3, 1, 3)
    assert restored.head.kernel.shape == (5, 10)
    _assert_same_state(pruned, restored)
    np.testing.assert_array_equal(_eval_out(restored), _eval_out(pruned))


def test_restore_pytree_round_trip(tmp_path):
    # typed PRNG keys (e.g. nnx.Rngs state) are stored as key data and restored as keys
    tree = {
        "w": jnp.arange(6.0).reshape(2, 3),
        "n": {"count": jnp.array(3, jnp.int32), "key": jax.random.key(3)},
    }
    path = checkpoint.save_pytree(tmp_path / "tree", tree, json_files={"info.json": {"step": 3}})
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    out = checkpoint.restore_pytree(path, target)
    np.testing.assert_array_equal(out["w"], tree["w"])
    assert int(out["n"]["count"]) == 3
    assert _is_key(out["n"]["key"])
    np.testing.assert_array_equal(jax.random.key_data(out["n"]["key"]), jax.random.key_data(tree["n"]["key"]))
    assert json.loads((path / "info.json").read_text()) == {"step": 3}
    bad = {**target, "w": jax.ShapeDtypeStruct((3, 3), jnp.float32)}
    with pytest.raises(checkpoint.CheckpointError, match=r"w: stored \(2, 3\) float32, expected \(3, 3\)"):
        checkpoint.restore_pytree(path, bad)
    with pytest.raises(ValueError, match="json_files keys"):
        checkpoint.save_pytree(tmp_path / "x", tree, json_files={"../evil.json": 1})


def _as_stored(tree):
    """``tree`` as a restore without target gives it: dict keys as str, tuples as lists."""
    if isinstance(tree, dict):
        return {str(k): _as_stored(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_as_stored(v) for v in tree]
    return tree


def _assert_same_tree(out, expected):
    """Same structure (key types included), and leaves of the same type, dtype, shape and bits."""
    assert jax.tree.structure(out) == jax.tree.structure(expected)
    for (kp, x), y in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(expected)):
        where = jax.tree_util.keystr(kp)
        assert isinstance(x, jax.Array) and _is_key(x) == _is_key(y), where
        assert x.dtype == y.dtype and x.shape == np.shape(y), (where, x.dtype, x.shape)
        assert np.asarray(_as_numbers(x)).tobytes() == np.asarray(_as_numbers(y)).tobytes(), where


def _mixed_tree():
    rng = np.random.default_rng(1)
    big_rows = checkpoint.PACK_MAX_BYTES // (4 * 1024) + 1  # just above the packing threshold
    return {
        "f32": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),  # a jax.Array
        "bf16": jnp.asarray(rng.standard_normal((5,)), jnp.bfloat16),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "i32": np.arange(-3, 3, dtype=np.int32),
        "u8": np.array([0, 7, 255], np.uint8),
        "flags": np.array([True, False, True]),
        "scalars": [np.float32(1.5), np.array(7, np.int32), jnp.array(True), jnp.asarray(2.5, jnp.bfloat16)],
        "empty": {"vec": np.zeros((0,), np.float32), "mat": np.zeros((3, 0), np.int16)},  # only int16
        "edge": np.full(checkpoint.PACK_MAX_BYTES // 4, 0.25, np.float32),  # exactly the threshold
        "big": rng.standard_normal((big_rows, 1024)).astype(np.float32),
        "key": jax.random.key(5),
        "by_index": {
            0: np.ones((2,), np.float32),
            1: {"deep": [np.int32(4), [np.uint8(9), np.ones((1, 1), np.float16)]]},
        },
        "pair": (np.float32(-1.0), np.array([1, 2], np.int32)),
        "nothing": {"d": {}, "l": [], "n": None},  # structure without arrays
    }


def test_packed_round_trip_mixed_tree(tmp_path):
    tree = _mixed_tree()
    path = checkpoint.save_pytree(tmp_path / "mixed", tree)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    _assert_same_tree(checkpoint.restore_pytree(path, target), tree)  # int keys, tuples kept
    _assert_same_tree(checkpoint.restore_pytree(path), _as_stored(tree))  # as stored: str keys

    layout = json.loads((path / checkpoint.LAYOUT_FILE).read_text())
    where = {"/".join(str(k) for _, k in e["path"]): e for e in layout["leaves"]}
    assert where["big"]["array"] and where["key"]["array"]  # too large / a typed key: orbax leaves
    assert where["key"]["dtype"] == "uint32" and where["bf16"]["dtype"] == "bfloat16"
    assert where["edge"]["packed"] == "float32" and where["empty/mat"]["packed"] == "int16"
    assert [k for _, k in where["by_index/1/deep/1/0"]["path"]] == ["by_index", 1, "deep", 1, 0]
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        stored = ckptr.metadata(path / "state").item_metadata.tree
    assert sorted(stored["__packed__"]) == ["bfloat16", "bool", "float16", "float32", "int32", "uint8"]
    assert len(stored["__arrays__"]) == 2
    assert stored["__packed__"]["float32"].shape == (12 + 1 + 2 + 1 + checkpoint.PACK_MAX_BYTES // 4,)


def test_model_state_is_packed(tmp_path):
    model = make_model()
    path = checkpoint.save_model(tmp_path / "ckpt", model)
    leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))
    assert len(leaves) == 14
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        stored = ckptr.metadata(path / "state").item_metadata.tree
    # 14 float32 arrays, one orbax array
    assert len(jax.tree.leaves(stored)) == 1
    assert stored["__packed__"]["float32"].shape == (sum(x.size for x in leaves),)
    layout = json.loads((path / checkpoint.LAYOUT_FILE).read_text())
    assert layout["format"] == "ib_lasso_jax.state_layout"
    assert layout["format_version"] == checkpoint.LAYOUT_VERSION == 2
    assert len(layout["leaves"]) == 14
    assert json.loads((path / "spec.json").read_text())["format_version"] == checkpoint.FORMAT_VERSION == 2


def test_layout_file_name_is_reserved(tmp_path):
    with pytest.raises(ValueError, match=r"json_files key 'state_layout.json' is reserved"):
        checkpoint.save_pytree(tmp_path / "x", {"w": np.ones(2)}, json_files={"state_layout.json": {}})
    assert not (tmp_path / "x").exists()


def test_tree_of_empty_arrays_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"tree must hold at least one array with elements.*\(0, 3\)"):
        checkpoint.save_pytree(tmp_path / "x", {"w": np.zeros((0, 3)), "b": {}})
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def _save_legacy(path, tree, json_files):
    """A checkpoint as written before packing: the pytree itself is the orbax tree, no layout."""
    path.mkdir(parents=True)
    host = jax.tree.map(lambda x: x if _is_key(x) else np.asarray(x), tree)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(path / "state", args=ocp.args.StandardSave(host))
    for name, data in json_files.items():
        (path / name).write_text(json.dumps(data))


def test_legacy_unpacked_checkpoint_restores(tmp_path):
    model = make_model(seed=2)
    path = tmp_path / "legacy_model"
    spec_doc = {"format": checkpoint.FORMAT, "format_version": 1, "spec": model.spec.to_dict()}
    _save_legacy(path, nnx.to_pure_dict(nnx.state(model)), {"spec.json": spec_doc})
    assert sorted(os.listdir(path)) == ["spec.json", "state"]
    restored = checkpoint.restore_model(path)
    assert restored.spec == model.spec
    _assert_same_state(model, restored)
    np.testing.assert_array_equal(_eval_out(restored), _eval_out(model))

    tree = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "layers": {0: {"b": np.ones(2, np.int32)}, 1: {"b": np.zeros(2, np.int32)}},
        "seq": [np.float16(1.0), [np.uint8(3), jnp.asarray([1.5], jnp.bfloat16)]],
        "key": jax.random.key(4),
    }
    _save_legacy(tmp_path / "legacy_tree", tree, {})
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    _assert_same_tree(checkpoint.restore_pytree(tmp_path / "legacy_tree", target), tree)
    _assert_same_tree(checkpoint.restore_pytree(tmp_path / "legacy_tree"), _as_stored(tree))
    bad = {**target, "w": jax.ShapeDtypeStruct((3, 3), jnp.float32)}
    with pytest.raises(checkpoint.CheckpointError, match=r"w: stored \(2, 3\) float32, expected \(3, 3\)"):
        checkpoint.restore_pytree(tmp_path / "legacy_tree", bad)

    # a legacy checkpoint is replaced by a packed one like any other
    checkpoint.save_model(path, restored, overwrite=True)
    assert (path / checkpoint.LAYOUT_FILE).is_file()
    _assert_same_state(model, checkpoint.restore_model(path))


def test_overwrite_protection(tmp_path):
    path = tmp_path / "ckpt"
    first, second = make_model(seed=0), make_model(seed=1)
    checkpoint.save_model(path, first)
    with pytest.raises(FileExistsError, match=r"ckpt.*overwrite=True"):
        checkpoint.save_model(path, second)
    _assert_same_state(first, checkpoint.restore_model(path))  # untouched

    checkpoint.save_model(path, second, overwrite=True)
    _assert_same_state(second, checkpoint.restore_model(path))
    assert _siblings(path) == ["ckpt"]

    # a directory that is not a checkpoint is never replaced, even with overwrite=True
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not an ib_lasso_jax checkpoint"):
        checkpoint.save_model(other, first, overwrite=True)
    assert (other / "keep.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        checkpoint.save_model(tmp_path / "m", first, metadata={"f": object()})
    assert not (tmp_path / "m").exists()


def test_interrupted_state_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old = make_model(seed=0)
    checkpoint.save_model(path, old, metadata={"v": 1})
    real_write = checkpoint_state._write_state

    def write_then_fail(directory, tree):
        real_write(directory, tree)  # the state is (partially) there ...
        (Path(directory) / "half_written.bin").write_bytes(b"\0" * 100)
        raise OSError("simulated: disk full while writing the state")

    monkeypatch.setattr(checkpoint_state, "_write_state", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_model(path, make_model(seed=1), metadata={"v": 2}, overwrite=True)

    _assert_same_state(old, checkpoint.restore_model(path))
    assert checkpoint.load_metadata(path) == {"v": 1}
    assert _siblings(path) == ["ckpt"]  # the temporary directory was removed


def test_failed_swap_is_rolled_back(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old = make_model(seed=0)
    checkpoint.save_model(path, old)
    real_rename, calls = checkpoint_atomic._rename, []

    def rename_fails_second_time(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("simulated: rename of the new checkpoint failed")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint_atomic, "_rename", rename_fails_second_time)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save_model(path, make_model(seed=1), overwrite=True)
    monkeypatch.setattr(checkpoint_atomic, "_rename", real_rename)
    _assert_same_state(old, checkpoint.restore_model(path))
    assert _siblings(path) == ["ckpt"]


_CRASH_SCRIPT = textwrap.dedent(
    """
    import importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("ckpt_test_in_child", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._register_tiny_model()
    ckpt, atomic = mod.checkpoint, mod.checkpoint_atomic
    real_rename, calls = atomic._rename, []

    def rename_then_die(src, dst):
        calls.append(src)
        if len(calls) == 2:  # after `path -> .path.old`, before `tmp -> path`
            os._exit(17)  # a hard crash: no except/finally blocks run
        real_rename(src, dst)

    atomic._rename = rename_then_die
    new_model = ckpt.restore_model(sys.argv[3])
    ckpt.save_model(sys.argv[2], new_model, metadata={"v": 2}, overwrite=True)
    """
)


def test_crash_between_renames_keeps_previous_restorable(tmp_path):
    path, source = tmp_path / "run" / "ckpt", tmp_path / "new"
    old, new = make_model(seed=0), make_model(seed=1)
    checkpoint.save_model(path, old, metadata={"v": 1})
    checkpoint.save_model(source, new)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, __file__, str(path), str(source)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    # on disk: the previous checkpoint (as .ckpt.old) and the complete new temporary one
    names = _siblings(path)
    assert "ckpt" not in names and ".ckpt.old" in names
    assert any(n.startswith(".ckpt.tmp-") for n in names), names

    # readers find the previous checkpoint
    _assert_same_state(old, checkpoint.restore_model(path))
    assert checkpoint.load_metadata(path) == {"v": 1}
    assert checkpoint.load_spec(path) == old.spec

    # the next save recovers it first: the previous checkpoint still counts as existing
    with pytest.raises(FileExistsError):
        checkpoint.save_model(path, new)
    assert _siblings(path) == ["ckpt"]
    _assert_same_state(old, checkpoint.restore_model(path))
    checkpoint.save_model(path, new, overwrite=True)
    _assert_same_state(new, checkpoint.restore_model(path))
    assert _siblings(path) == ["ckpt"]


def test_stale_old_after_completed_swap_is_ignored_and_cleaned(tmp_path):
    # killed after the second rename, before deleting .old: `path` is the new checkpoint
    path = tmp_path / "ckpt"
    old, new = make_model(seed=0), make_model(seed=1)
    checkpoint.save_model(tmp_path / "elsewhere", old)
    checkpoint.save_model(path, new)
    os.rename(tmp_path / "elsewhere", tmp_path / ".ckpt.old")
    _assert_same_state(new, checkpoint.restore_model(path))
    with pytest.raises(FileExistsError):
        checkpoint.save_model(path, old)
    assert _siblings(path) == ["ckpt"]  # the stale .old was deleted
    _assert_same_state(new, checkpoint.restore_model(path))


def _corrupt_data_files(path):
    files = glob.glob(str(path / "state" / "d" / "*"))
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(10)


def _junk_array_metadata(path):
    (path / "state" / "_METADATA").write_text("junk{")


def _broken_spec_json(path):
    text = (path / "spec.json").read_text()
    (path / "spec.json").write_text(text[: len(text) // 2])


def _wrong_format(path):
    (path / "spec.json").write_text(json.dumps({"format": "something-else"}))


def _state_removed(path):
    shutil.rmtree(path / "state")


def _future_format_version(path):
    doc = json.loads((path / "spec.json").read_text())
    (path / "spec.json").write_text(json.dumps({**doc, "format_version": 3}))


def _edit_layout(edit):
    def corrupt(path):
        layout = json.loads((path / "state_layout.json").read_text())
        edit(layout)
        (path / "state_layout.json").write_text(json.dumps(layout))

    corrupt.__name__ = edit.__name__
    return corrupt


def _truncated_layout(path):
    text = (path / "state_layout.json").read_text()
    (path / "state_layout.json").write_text(text[: len(text) // 2])


def _layout_removed(path):
    (path / "state_layout.json").unlink()


def _layout_longer_than_stored(layout):
    layout["packed"]["float32"] += 10  # the stored packed array is too short for it


def _layout_dtype_not_stored(layout):
    layout["packed"]["int32"] = 4


def _layout_wrong_version(layout):
    layout["format_version"] = 99


def _layout_leaf_outside_packed(layout):
    layout["leaves"][-1]["offset"] = layout["packed"]["float32"]


def _layout_leaf_without_dtype(layout):
    del layout["leaves"][0]["dtype"]


def _layout_unknown_dtype(layout):
    layout["packed"]["float33"] = 0


def _layout_leaf_in_other_dtype(layout):
    layout["leaves"][0]["packed"] = "int32"


def _layout_leaf_array_not_a_key(layout):
    leaf = layout["leaves"][0]
    del leaf["packed"], leaf["offset"]
    leaf["array"] = 0


# orbax/tensorstore may report "Event loop is closed" from background callbacks of the
# failed read; that is orbax's noise, not a failure of the test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (_corrupt_data_files, "corrupted or truncated"),
        (_junk_array_metadata, "corrupted or truncated"),
        (_broken_spec_json, "spec.json.*corrupted or truncated: not valid JSON"),
        (_wrong_format, "not an ib_lasso_jax model spec"),
        (_state_removed, "state.*is missing"),
        (_future_format_version,
         "spec.json.*format_version 3; this version of ib_lasso_jax reads format_version 1 or 2"),
        (_truncated_layout, "state_layout.json.*corrupted or truncated: not valid JSON"),
        (_layout_removed, "state_layout.json.*is missing: the state .* is packed"),
        (_edit_layout(_layout_longer_than_stored),
         r"does not match its layout .*state_layout.json.*__packed__/float32: stored \(\d+,\) float32, "
         r"expected \(\d+,\) float32"),
        (_edit_layout(_layout_dtype_not_stored),
         r"state_layout.json.*__packed__/int32: expected \(4,\) int32, missing from the checkpoint"),
        (_edit_layout(_layout_wrong_version), "state_layout.json.*format_version 99"),
        (_edit_layout(_layout_leaf_outside_packed), "state_layout.json.*invalid state layout.*lies outside"),
        (_edit_layout(_layout_leaf_without_dtype),
         r"state_layout.json.*invalid state layout \(KeyError: 'dtype'"),
        (_edit_layout(_layout_unknown_dtype), r"state_layout.json.*invalid state layout.*float33"),
        (_edit_layout(_layout_leaf_in_other_dtype),
         r"state_layout.json.*invalid state layout.*packed in 'int32': expected the packed array of its own"),
        (_edit_layout(_layout_leaf_array_not_a_key),
         r"state_layout.json.*invalid state layout.*has array 0: expected a str key"),
    ],
)
def test_corrupted_checkpoint_raises_checkpoint_error(tmp_path, corrupt, expected):
    path = tmp_path / "ckpt"
    checkpoint.save_model(path, make_model())
    corrupt(path)
    with pytest.raises(checkpoint.CheckpointError, match=expected) as info:
        checkpoint.restore_model(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_spec_not_matching_stored_arrays(tmp_path):
    path = tmp_path / "ckpt"
    checkpoint.save_model(path, make_model(widths={"conv": [3, 5]}))
    doc = json.loads((path / "spec.json").read_text())
    doc["spec"]["widths"] = {"conv": [4, 5]}
    (path / "spec.json").write_text(json.dumps(doc))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore_model(path)
    msg = str(info.value)
    assert str(path) in msg and "does not match" in msg
    assert "convs/0/kernel: stored (3, 3, 1, 3) float32, expected (3, 3, 1, 4) float32" in msg

    doc["spec"]["name"] = "_no_such_model"
    (path / "spec.json").write_text(json.dumps(doc))
    with pytest.raises(checkpoint.CheckpointError, match="cannot rebuild the model.*_no_such_model"):
        checkpoint.restore_model(path)


def test_missing_and_not_a_checkpoint(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(checkpoint.CheckpointError, match="does not exist") as info:
        checkpoint.restore_model(missing)
    assert str(missing) in str(info.value)

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "weights.npz").write_bytes(b"x")
    for fn in (checkpoint.restore_model, checkpoint.load_spec, checkpoint.load_metadata):
        not_ours = "not an ib_lasso_jax model checkpoint.*no spec.json"
        with pytest.raises(checkpoint.CheckpointError, match=not_ours) as info:
            fn(plain)
        assert str(plain) in str(info.value)

    a_file = tmp_path / "file.ckpt"
    a_file.write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="is a file"):
        checkpoint.restore_model(a_file)
    with pytest.raises(ValueError, match="at least one array"):  # a user module with nothing to save
        checkpoint.save_model(tmp_path / "x", nnx.Dropout(0.5))


def _zoo():
    try:
        from ib_lasso_jax import models

        if {"lenet5", "resnet20"} <= set(models.available()):
            return models
    except Exception:  # noqa: BLE001 -- the zoo may not be finished yet
        pass
    return None


@pytest.mark.skipif(_zoo() is None, reason="the model zoo (lenet5, resnet20) does not import yet")
@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_zoo_model_round_trip(tmp_path, name):
    reg = _zoo()._registry
    input_shape, num_classes = reg.dataset_shape(reg.default_dataset(name))
    model = random_model(reg.make_spec(name, num_classes, input_shape, reg.default_widths(name)), seed=5)
    path = checkpoint.save_model(tmp_path / name, model, metadata={"model": name})
    restored = checkpoint.restore_model(path)
    assert restored.spec == model.spec
    _assert_same_state(model, restored)
    np.testing.assert_array_equal(_eval_out(restored), _eval_out(model))
