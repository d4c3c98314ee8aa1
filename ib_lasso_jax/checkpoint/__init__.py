"""Model checkpoints: save a zoo model (width spec + full NNX state) and rebuild it anywhere.

A *model checkpoint* is one directory::

    path/
      spec.json          {"format": "ib_lasso_jax.model", "format_version": 2,
                          "spec": ModelSpec.to_dict()}  -- the (possibly pruned) widths
      metadata.json      optional caller JSON (e.g. a pruning report); absent if none given
      state/             orbax checkpoint (StandardCheckpointHandler) of the packed
                         ``nnx.to_pure_dict(nnx.state(model))``: params, batch statistics,
                         RNG state -- every NNX variable of the model (see below)
      state_layout.json  where each leaf of that pytree is inside ``state/`` (see below)

*Packed state* (:func:`save_pytree`, so every model and training checkpoint). Orbax costs
~1-1.5 ms per array whatever its size and a model's state is hundreds of small arrays, so
every host (NumPy) array of at most :data:`PACK_MAX_BYTES` is raveled and concatenated
into one 1-D array per dtype. The orbax tree is::

    {"__packed__": {"float32": <1-D>, "int32": <1-D>, ...},   # dtypes with elements only
     "__arrays__": {"0": leaf, "1": leaf, ...}}                # stored as they are

``__arrays__`` holds the leaves that are not packed: larger arrays, jax.Arrays not fully
addressable by this process (multi-process sharding) and typed PRNG keys (orbax stores their
key data and restores them as keys), Python scalars. Empty groups are left out.
``state_layout.json`` lists every leaf of the saved pytree in flattening order::

    {"format": "ib_lasso_jax.state_layout", "format_version": 2,
     "packed": {"float32": 646, ...},              # element count of each packed array
     "leaves": [
       {"path": [["d", "convs"], ["d", 0], ["d", "kernel"]],   # "d": dict key (int or
        "shape": [3, 3, 1, 6], "dtype": "float32",             # str as saved), "s": list
        "packed": "float32", "offset": 0,                      # or tuple index
        "crc32": "5f1c09a2"},
       {"path": [["d", "rngs"], ["d", "key"]], "shape": [2], "dtype": "uint32",
        "array": "0", "crc32": "0b8e4d17"},         # stored as __arrays__/0 (key data)
       {"path": [["d", "nothing"]], "empty": "dict"}]}   # empty dict/list/tuple or None

Dtype names are those ``jnp.dtype`` parses (``bfloat16`` included). Restoring checks the
layout against the arrays orbax has stored, then against the expected target, and gives
the same pytrees as the unpacked format. A state without ``state_layout.json`` is the
unpacked format of earlier versions (the pytree itself is the orbax tree) and is still
read.

*Checksums* (layout ``format_version`` 2). Orbax stores no checksum, so a damaged data file
restores as silently changed values. Every array leaf's ``crc32`` is the CRC-32
(``zlib.crc32``) of its bytes in C order and little-endian byte order (a typed PRNG key: of
its key data), computed from the host array at save time, as 8 hex digits. Restoring
recomputes it for every leaf and raises :class:`CheckpointError`, naming the arrays and the
checkpoint, on any difference. ``crc32`` is ``null`` only for an array not held whole by the
saving process (multi-process sharding), which is then restored unverified. Layouts of
``format_version`` 1 (no checksums) and unpacked states are still read, without verification
(logged at debug level by the ``ib_lasso_jax.checkpoint`` logger). An older ib_lasso_jax,
which reads layout format_version 1 only, refuses a checkpoint with checksums with a clear
error. ``spec.json`` has ``format_version`` 2 since the state is packed, so an older
ib_lasso_jax (which reads format_version 1 only) refuses such a model checkpoint with a
clear error instead of misreading it; this version reads 1 and 2.

:func:`restore_model` needs nothing but the directory: it rebuilds the abstract model from
``spec.json`` (:func:`~ib_lasso_jax.models._registry.abstract_from_spec`, no memory, no
compute), checks that every stored array has the shape and dtype that model expects, and
restores the arrays straight into it.

Atomic-write protocol (:func:`atomic_directory`, used by :func:`save_pytree` and so by
:func:`save_model`), for a target ``DIR/NAME``:

1. *Recover* from an earlier crash (see below) and delete stale ``DIR/.NAME.tmp-*``
   directories of crashed saves.
2. Write the complete new checkpoint (orbax state, then the JSON files, fsynced) into a
   fresh temporary sibling ``DIR/.NAME.tmp-<random>``. Orbax itself writes ``state/`` to
   its own temporary name and renames it when complete. Any failure here deletes the
   temporary directory and leaves ``DIR/NAME`` untouched.
3. If ``DIR/NAME`` exists: rename it to ``DIR/.NAME.old``.
4. Rename ``DIR/.NAME.tmp-<random>`` to ``DIR/NAME`` (atomic on POSIX file systems).
   If this rename fails, step 3 is undone.
5. Delete ``DIR/.NAME.old``.

So at every instant either ``DIR/NAME`` or ``DIR/.NAME.old`` is a complete checkpoint.
A process killed between steps 3 and 4 leaves only ``DIR/.NAME.old``: readers
(:func:`restore_model`, :func:`load_spec`, :func:`restore_pytree`, ...) then read the
previous checkpoint from there, and the next save renames it back to ``DIR/NAME`` (step 1)
before going on. If both exist (killed between steps 4 and 5), ``DIR/NAME`` is the new,
complete one and step 1 deletes the stale ``.old``. The protocol assumes one writer per
path at a time on a local file system, single-process JAX (no multi-host saves).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import re
import shutil
import sys
import uuid
import warnings
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ib_lasso_jax.models._registry import ModelSpec, abstract_from_spec

__all__ = [
    "CheckpointError",
    "FORMAT",
    "FORMAT_VERSION",
    "LAYOUT_FILE",
    "METADATA_FILE",
    "PACK_MAX_BYTES",
    "SPEC_FILE",
    "STATE_DIR",
    "atomic_directory",
    "load_metadata",
    "load_spec",
    "restore_model",
    "restore_pytree",
    "save_model",
    "save_pytree",
]

FORMAT = "ib_lasso_jax.model"
FORMAT_VERSION = 2  # 2: packed state (state_layout.json); 1: unpacked state, still read
_READABLE_FORMAT_VERSIONS = (1, 2)
SPEC_FILE = "spec.json"
METADATA_FILE = "metadata.json"
STATE_DIR = "state"
LAYOUT_FILE = "state_layout.json"
MODULE_FILE = "module.json"  # a user's own model: its class (its shapes are in the layout)
LAYOUT_FORMAT = "ib_lasso_jax.state_layout"
LAYOUT_VERSION = 2  # 2: a CRC-32 per array leaf; 1: no checksums, still read (unverified)
_READABLE_LAYOUT_VERSIONS = (1, 2)
_CRC32 = re.compile(r"^[0-9a-f]{8}$")
# Arrays up to 1 MiB are packed: below it orbax's fixed ~1-1.5 ms per array dominates
# (copying 1 MiB into the packed array takes ~0.04 ms); above it the array's own bytes
# dominate, and packing would only add a copy (and its memory) for no gain.
PACK_MAX_BYTES = 1 << 20

_PACKED = "__packed__"
_ARRAYS = "__arrays__"

_TMP_INFIX = ".tmp-"
_OLD_SUFFIX = ".old"
_JSON_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.json$")
_MAX_LISTED = 8

_log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is missing, not one of this library's, corrupted, or does not fit its spec."""


# --------------------------------------------------------------------------------------
# Paths and the atomic swap
# --------------------------------------------------------------------------------------


def _old_path(path: Path) -> Path:
    return path.parent / f".{path.name}{_OLD_SUFFIX}"


def _tmp_paths(path: Path) -> list[Path]:
    return [Path(p) for p in glob.glob(str(path.parent / f".{glob.escape(path.name)}{_TMP_INFIX}*"))]


def _rename(src: Path, dst: Path) -> None:
    """``os.rename`` (a separate function so tests can interrupt the protocol)."""
    os.rename(src, dst)


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory entry table (not all file systems support it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _as_target(path: str | os.PathLike) -> Path:
    target = Path(path).expanduser().absolute()
    if not target.name or target.name in (".", ".."):
        raise ValueError(f"path must name a checkpoint directory; got {str(path)!r}")
    return target


def _recover(path: Path) -> None:
    """Repair what a crashed save left behind (step 1 of the protocol)."""
    old = _old_path(path)
    if old.exists():
        if path.exists():  # killed after the swap: `path` is the new, complete checkpoint
            shutil.rmtree(old)
        else:  # killed between the renames: put the previous checkpoint back
            _rename(old, path)
            _fsync_dir(path.parent)
    for stale in _tmp_paths(path):
        shutil.rmtree(stale, ignore_errors=True)


def _is_replaceable(path: Path) -> bool:
    """True for one of our checkpoints (has ``state/``) or an empty directory."""
    return path.is_dir() and ((path / STATE_DIR).is_dir() or not any(path.iterdir()))


def _check_writable(path: Path, overwrite: bool) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(
            f"checkpoint path {str(path)!r} already exists; pass overwrite=True to replace it "
            "(the default overwrite=False never replaces anything)"
        )
    if path.is_symlink() or not _is_replaceable(path):
        raise FileExistsError(
            f"refusing to replace {str(path)!r} even with overwrite=True: it is not an "
            f"ib_lasso_jax checkpoint (expected a directory with a {STATE_DIR!r} subdirectory, "
            "or an empty directory); remove it yourself or choose another path"
        )


def _commit(tmp: Path, path: Path) -> None:
    """Swap the complete ``tmp`` in as ``path`` (steps 3-5 of the protocol)."""
    old = _old_path(path)
    had_previous = path.exists()
    if had_previous:
        _rename(path, old)
    try:
        _rename(tmp, path)
    except BaseException:
        if had_previous and not path.exists():
            _rename(old, path)
        raise
    _fsync_dir(path.parent)
    if had_previous:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded temporary directory, it becomes ``path``.

    The yielded directory is a fresh, empty sibling of ``path``. When the ``with`` block
    ends normally it replaces ``path`` (see the module docstring for the protocol); when the
    block raises, it is deleted and ``path`` is left as it was.

    Args:
      path: the final directory.
      overwrite: whether an existing checkpoint at ``path`` may be replaced.

    Yields:
      The temporary directory to write into.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False, or ``path`` exists and is
        not a checkpoint directory (never replaced).
    """
    target = _as_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    _check_writable(target, overwrite)
    tmp = target.parent / f".{target.name}{_TMP_INFIX}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resolve(path: str | os.PathLike) -> Path:
    """The directory holding the committed checkpoint of ``path`` (``path`` or its ``.old``)."""
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        return target
    if target.exists():
        raise CheckpointError(f"checkpoint path {str(target)!r} is a file; expected a checkpoint directory")
    old = _old_path(target)
    if target.name and old.is_dir():  # a save was interrupted between its two renames
        return old
    raise CheckpointError(f"no checkpoint at {str(target)!r}: the path does not exist")


# --------------------------------------------------------------------------------------
# JSON files
# --------------------------------------------------------------------------------------


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, (tuple, set, frozenset)):
        return list(x)
    raise TypeError(f"object of type {type(x).__name__} is not JSON serialisable")


def _dumps(data: Any, what: str) -> str:
    """``data`` as JSON text (numpy/JAX arrays and scalars become lists/numbers)."""
    try:
        return json.dumps(data, indent=2, sort_keys=True, default=_json_default, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{what} must be JSON-serialisable data (dicts, lists, str, numbers, bool, None, "
            f"numpy arrays); got {type(data).__name__}: {e}"
        ) from e


def _write_text(file: Path, text: str) -> None:
    with open(file, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read_json(file: Path) -> Any:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file {str(file)!r} is missing") from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint file {str(file)!r}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is corrupted or truncated: not valid JSON ({e}); "
            "expected the JSON document written by save_model/save_pytree"
        ) from e


# --------------------------------------------------------------------------------------
# Orbax state
# --------------------------------------------------------------------------------------


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that finishes its pending tasks before it closes.

    Orbax runs each call on a fresh event loop and closes it as soon as one read fails, while
    the reads of the other arrays are still in flight; their completions then reach the closed
    loop and print "Event loop is closed" tracebacks and "Task exception was never retrieved".
    """

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = asyncio.all_tasks(self)
            if pending:
                self.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_SECONDS))
        super().close()

    def call_exception_handler(self, context: dict) -> None:
        # The other reads of a failed call fail on the same damage, which the call's error reports.
        if "exception was never retrieved" in str(context.get("message", "")):
            return
        super().call_exception_handler(context)


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _DrainingEventLoop()


# How long a closing orbax loop waits for reads still in flight (local reads take milliseconds).
_DRAIN_SECONDS = 60.0


class _ItemMetadataFilter(logging.Filter):
    """Drops orbax's "Failed to get item metadata" warning: _stored_metadata raises a clearer error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to get item metadata")


@contextlib.contextmanager
def _checkpointer() -> Iterator[ocp.Checkpointer]:
    """A synchronous orbax checkpointer for plain pytrees of arrays, closed however the block ends.

    Inside the block, the event loops orbax creates finish their pending reads and writes before
    closing (:class:`_DrainingEventLoop`), so a failed call leaves nothing running behind it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # event loop policies: deprecated in 3.14
        previous = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(_DrainingPolicy())
    absl, quiet = logging.getLogger("absl"), _ItemMetadataFilter()
    absl.addFilter(quiet)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        yield ckptr
    finally:
        try:
            ckptr.close()
        finally:
            absl.removeFilter(quiet)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                asyncio.set_event_loop_policy(previous)


def _to_host(x: Any) -> Any:
    """A fully addressable ``jax.Array`` as a NumPy array (typed PRNG keys stay as they are)."""
    if isinstance(x, jax.Array) and x.is_fully_addressable and not _is_key(x):
        return np.asarray(jax.device_get(x))
    return x


def _write_state(directory: Path, tree: Any) -> None:
    """Write ``tree`` (a pure pytree of arrays) packed: orbax state at new ``directory``,
    its layout as :data:`LAYOUT_FILE` next to it (see the module docstring).

    Orbax's cost is per array: ~1.1 ms to save and ~1.5 ms to restore each NumPy array
    (~2.9 ms to save a ``jax.Array``) whatever its size, so arrays held whole by this
    process are written from the host and the small ones packed. Measured on a busy 2-core
    CPU (medians of 5, three runs), unpacked -> packed: 500 arrays of 8x8 float32: save
    ~0.55 -> ~0.06 s, restore ~0.8 -> ~0.08 s; ResNet-56 (277 arrays): save_model
    ~0.45 -> ~0.12 s, the state part of restore_model ~0.5 -> ~0.05 s (rebuilding the
    abstract model, ~0.4 s, is the rest). Arrays not fully addressable by this process go
    to orbax as they are.

    Raises:
      ValueError: ``tree`` holds no array with elements (orbax stores no empty tree).
    """
    stored, layout = _pack(jax.tree.map(_to_host, tree))
    if not stored:
        shapes = [tuple(x["shape"]) for x in layout["leaves"] if "shape" in x][:_MAX_LISTED]
        raise ValueError(f"tree must hold at least one array with elements to be saved; got only empty "
                         f"arrays and containers (array shapes: {shapes})")
    with _checkpointer() as ckptr:
        ckptr.save(directory, args=ocp.args.StandardSave(stored))
    _write_text(directory.parent / LAYOUT_FILE, json.dumps(layout, separators=(",", ":")))


def _is_packable(x: Any) -> bool:
    """A small host array of numbers or bools (what :func:`_write_state` packs)."""
    return (isinstance(x, (np.ndarray, np.generic)) and x.nbytes <= PACK_MAX_BYTES
            and (jnp.issubdtype(x.dtype, jnp.number) or x.dtype == np.bool_))


def _is_empty_node(x: Any) -> bool:
    """None or an empty dict/list/tuple: part of the structure, but no leaf of it."""
    return x is None or (type(x) in (dict, list, tuple) and not x)


def _path_entry(k: Any) -> list:
    """A key of a pytree path as JSON: ``["s", index]`` for sequences, else ``["d", key]``."""
    if isinstance(k, jax.tree_util.SequenceKey):
        return ["s", k.idx]
    key = getattr(k, "key", getattr(k, "name", k))
    return ["d", key if type(key) is int else str(key)]


def _stored_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a leaf as orbax's metadata will give it (Python scalars: NumPy's)."""
    if hasattr(leaf, "dtype"):
        return _shape_dtype(leaf)
    a = np.asarray(leaf)
    return a.shape, a.dtype


def _pack(tree: Any) -> tuple[dict, dict]:
    """``tree`` as the orbax tree of the packed format and its layout (module docstring)."""
    chunks: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    arrays: dict[str, Any] = {}
    leaves = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_empty_node)[0]:
        entry: dict[str, Any] = {"path": [_path_entry(k) for k in kp]}
        if _is_empty_node(leaf):
            entry["empty"] = "none" if leaf is None else "dict" if isinstance(leaf, dict) else "list"
        elif _is_packable(leaf):
            name = leaf.dtype.name
            entry.update(shape=list(leaf.shape), dtype=name, packed=name, offset=sizes.get(name, 0),
                         crc32=_crc32(leaf))
            chunks.setdefault(name, []).append(np.ravel(leaf))
            sizes[name] = entry["offset"] + leaf.size
        else:
            shape, dtype = _stored_shape_dtype(leaf)
            # another process holds part of it: no bytes here to checksum
            held = not isinstance(leaf, jax.Array) or leaf.is_fully_addressable
            entry.update(shape=list(shape), dtype=dtype.name, array=str(len(arrays)),
                         crc32=_crc32(leaf) if held else None)
            arrays[entry["array"]] = leaf
        leaves.append(entry)
    packed = {name: np.concatenate(c) for name, c in chunks.items() if sizes[name]}
    layout = {"format": LAYOUT_FORMAT, "format_version": LAYOUT_VERSION, "packed": sizes, "leaves": leaves}
    return _orbax_tree(packed, arrays), layout


# CRC-32: catches any 1-bit flip or <=32-bit burst at ~2.3 GB/s (sha256 ~1.4, blake2b ~0.9); damage, not tampering
def _crc32(x: Any) -> str:
    """CRC-32 of an array's bytes, C order, little-endian (a typed PRNG key: its key data), as 8 hex digits."""
    if _is_key(x):
        x = jax.random.key_data(x)
    a = np.ascontiguousarray(np.asarray(x)).reshape(-1)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.byteswap()  # same checksum whichever machine saved or restores
    return f"{zlib.crc32(a.view(np.uint8)):08x}"


def _orbax_tree(packed: dict[str, Any], arrays: dict[str, Any]) -> dict:
    """The orbax tree of the packed format (orbax refuses empty dicts: they are left out)."""
    return {k: v for k, v in ((_PACKED, packed), (_ARRAYS, arrays)) if v}


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One entry of ``state_layout.json``: where a leaf of the saved pytree is stored."""

    path: tuple[tuple[str, int | str], ...]
    shape: tuple[int, ...] = ()
    dtype: np.dtype | None = None
    packed: str | None = None  # in __packed__/<packed> from `offset` on
    offset: int = 0
    array: str | None = None  # stored whole as __arrays__/<array>
    empty: str | None = None  # "dict", "list" or "none": no array at all
    crc32: str | None = None  # None: not verified (layout version 1, or not held whole at save)

    @property
    def key(self) -> str:
        """The ``"a/b/0"`` name of the leaf (as in mismatch messages)."""
        return "/".join(str(k) for _, k in self.path)


def _parse_leaf(e: dict, sizes: dict[str, int], version: int) -> _Leaf:
    """A ``leaves`` entry of the layout, validated (ValueError/TypeError/KeyError if not)."""
    path = tuple((kind, key) for kind, key in e["path"])
    if any(not (kind == "d" and type(key) in (int, str) or kind == "s" and type(key) is int)
           for kind, key in path):
        raise ValueError(f"invalid path {e['path']!r}: expected [\"d\", int or str] or [\"s\", int] keys")
    if "empty" in e:
        if e["empty"] not in ("dict", "list", "none"):
            raise ValueError(f"invalid empty {e['empty']!r}: expected 'dict', 'list' or 'none'")
        return _Leaf(path, empty=e["empty"])
    shape = tuple(e["shape"])
    if any(type(d) is not int or d < 0 for d in shape) or type(e["dtype"]) is not str:
        raise ValueError(f"invalid shape {e['shape']!r} or dtype {e['dtype']!r} at {e['path']!r}: "
                         "expected non-negative ints and a dtype name")
    crc32 = e["crc32"] if version >= 2 else None  # a version-2 leaf without one is damaged
    if crc32 is not None and (type(crc32) is not str or not _CRC32.match(crc32)):
        raise ValueError(f"invalid crc32 {crc32!r} at {e['path']!r}: expected 8 lowercase hex digits or null")
    leaf = _Leaf(path, shape, jnp.dtype(e["dtype"]), e.get("packed"), e.get("offset", 0), e.get("array"),
                 crc32=crc32)
    if leaf.packed is not None:
        size, total = math.prod(shape), sizes.get(leaf.packed)
        if leaf.packed != leaf.dtype.name:
            raise ValueError(f"leaf {leaf.key!r} of dtype {leaf.dtype.name!r} is packed in {leaf.packed!r}: "
                             "expected the packed array of its own dtype")
        if type(leaf.offset) is not int:
            raise ValueError(f"leaf {leaf.key!r} has offset {leaf.offset!r}: expected an int")
        if total is None or not 0 <= leaf.offset <= total - size:
            raise ValueError(
                f"leaf {leaf.key!r} ({size} {leaf.dtype.name}) at offset {leaf.offset} lies outside the "
                f"packed arrays {sizes!r}")
    elif "array" not in e:
        raise ValueError(f"leaf {leaf.key!r} has neither 'packed', 'array' nor 'empty'")
    elif type(leaf.array) is not str:
        raise ValueError(f"leaf {leaf.key!r} has array {leaf.array!r}: expected a str key of {_ARRAYS}")
    return leaf


def _read_layout(file: Path) -> tuple[dict[str, int], list[_Leaf]]:
    """The packed element counts and the leaves of a ``state_layout.json``, validated."""
    data = _read_json(file)
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    if found != LAYOUT_FORMAT:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is not an ib_lasso_jax state layout: format is "
            f"{found!r}, expected {LAYOUT_FORMAT!r}"
        )
    version = data.get("format_version")
    if type(version) is not int or version not in _READABLE_LAYOUT_VERSIONS:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} has format_version {version!r}; this version of "
            f"ib_lasso_jax reads state layouts of format_version "
            f"{' or '.join(map(str, _READABLE_LAYOUT_VERSIONS))}"
        )
    if version < 2:
        _log.debug("%s: state layout format_version %d has no checksums; the arrays are restored "
                   "unverified", file, version)
    try:
        sizes = dict(data["packed"])
        if any(type(n) is not int or n < 0 for n in sizes.values()):
            raise ValueError(f"invalid packed sizes {sizes!r}: expected non-negative ints")
        bad = [name for name in sizes if type(name) is not str or jnp.dtype(name).name != name]
        if bad:
            raise ValueError(f"invalid packed dtype names {bad!r}: expected dtype names such as 'float32'")
        return sizes, [_parse_leaf(e, sizes, version) for e in data["leaves"]]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} holds an invalid state layout ({type(e).__name__}: "
            f"{_first_line(e)}); expected the layout written by save_model/save_pytree"
        ) from e


def _check_layout(
    sizes: dict[str, int], leaves: list[_Leaf], stored: Any, file: Path, state_dir: Path
) -> None:
    """Raise CheckpointError unless orbax holds exactly the arrays the layout describes."""
    want = {f"{_PACKED}/{name}": ((n,), jnp.dtype(name)) for name, n in sizes.items() if n}
    want.update({f"{_ARRAYS}/{x.array}": (x.shape, x.dtype) for x in leaves if x.array is not None})
    _raise_mismatches(_flat_shapes(stored), want, state_dir,
                      f"its layout {str(file)!r}; the state and the layout must come from the same save")


def _unflatten(items: list[tuple[tuple, Any]], file: Path) -> Any:
    """The pytree of ``(path, value)`` pairs, as stored: dicts with str keys, lists."""
    if len(items) == 1 and not items[0][0]:
        return items[0][1]
    kinds = {path[0][0] if path else None for path, _ in items}
    if len(kinds) != 1 or None in kinds:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} holds an invalid state layout: the paths "
            f"{[p for p, _ in items][:_MAX_LISTED]} do not form a tree; expected the layout "
            "written by save_model/save_pytree"
        )
    groups: dict[int | str, list] = {}
    for path, value in items:
        groups.setdefault(path[0][1], []).append((path[1:], value))
    children = {key: _unflatten(group, file) for key, group in groups.items()}
    if kinds == {"d"}:
        return {str(key): child for key, child in children.items()}
    if sorted(children) != list(range(len(children))):
        raise CheckpointError(
            f"checkpoint file {str(file)!r} holds an invalid state layout: list indices "
            f"{sorted(children)} are not 0..{len(children) - 1}; expected the layout written by "
            "save_model/save_pytree"
        )
    return [children[i] for i in range(len(children))]


def _unpack(out: dict, sizes: dict[str, int], leaves: list[_Leaf]) -> list[Any]:
    """The value of every layout entry, from the restored orbax tree of the packed format."""
    packed = {name: np.asarray(out[_PACKED][name]) if n else np.empty(0, jnp.dtype(name))
              for name, n in sizes.items()}
    empty = {"dict": dict, "list": list, "none": lambda: None}
    return [
        empty[x.empty]() if x.empty is not None
        else out[_ARRAYS][x.array] if x.array is not None
        else packed[x.packed][x.offset:x.offset + math.prod(x.shape)].reshape(x.shape)
        for x in leaves
    ]


def _verify_checksums(leaves: list[_Leaf], values: list[Any], state_dir: Path) -> None:
    """Raise CheckpointError naming every restored array whose CRC-32 is not the one saved."""
    bad = [f"{x.key}, {_fmt((x.shape, x.dtype))}: CRC-32 {got}, saved {x.crc32}"
           for x, v in zip(leaves, values) if x.crc32 is not None and (got := _crc32(v)) != x.crc32]
    if bad:
        listed = "; ".join(bad[:_MAX_LISTED])
        more = f"; and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise CheckpointError(
            f"checkpoint {str(state_dir.parent)!r} is corrupted: {len(bad)} array(s) in {STATE_DIR}/ differ "
            f"from what was saved (checksum not the one {LAYOUT_FILE} recorded): {listed}{more}; its files "
            "were damaged after the save (disk, copy or transfer): restore the checkpoint from an intact copy"
        )


def _key_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype | None]:
    """``(shape, dtype)`` of an array, ShapeDtypeStruct or orbax metadata; keys as key data."""
    dtype = getattr(leaf, "dtype", None)
    if _is_key(leaf):
        leaf = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, dtype))
        dtype = leaf.dtype
    return tuple(getattr(leaf, "shape", ())), None if dtype is None else np.dtype(dtype)


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype | None]]:
    """``{"a/b/c": (shape, dtype)}`` of every leaf; typed PRNG keys as their stored key data."""
    return {_key_str(kp): _shape_dtype(leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fmt(shape_dtype: tuple) -> str:
    shape, dtype = shape_dtype
    return f"{shape} {dtype}"


def _mismatches(have: dict[str, tuple], want: dict[str, tuple]) -> list[str]:
    """Human-readable differences between stored and expected ``_flat_shapes``."""
    problems = [f"{k}: expected {_fmt(want[k])}, missing from the checkpoint" for k in want if k not in have]
    problems += [f"{k}: stored {_fmt(have[k])}, not expected" for k in have if k not in want]
    problems += [
        f"{k}: stored {_fmt(have[k])}, expected {_fmt(want[k])}"
        for k in want
        if k in have and have[k] != want[k]
    ]
    return problems


def _raise_mismatches(
    have: dict[str, tuple], want: dict[str, tuple], state_dir: Path, expected_from: str
) -> None:
    """Raise CheckpointError listing the differences if the stored arrays are not as expected."""
    problems = _mismatches(have, want)
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError(
            f"checkpoint state {str(state_dir)!r} does not match {expected_from}: "
            f"{len(problems)} array(s) differ: {listed}{more}"
        )


def _stored_metadata(ckptr: ocp.Checkpointer, state_dir: Path) -> Any:
    try:
        meta = ckptr.metadata(state_dir).item_metadata
    except Exception as e:  # noqa: BLE001 -- any orbax/tensorstore failure means corruption
        raise CheckpointError(
            f"checkpoint state {str(state_dir)!r} is corrupted or truncated: orbax cannot read "
            f"its metadata ({type(e).__name__}: {_first_line(e)}); expected a complete orbax "
            "checkpoint written by save_model/save_pytree"
        ) from e
    if meta is None:
        raise CheckpointError(
            f"checkpoint state {str(state_dir)!r} is corrupted or truncated: orbax cannot read "
            "its array metadata (_METADATA or the array store is damaged); expected a complete "
            "orbax checkpoint written by save_model/save_pytree"
        )
    return meta.tree


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:500] if lines else ""


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _restore_target(target: Any) -> Any:
    """What orbax restores into: NumPy arrays (placed on the default device afterwards: ~2.4x
    faster than orbax restoring ``jax.Array``s, per small array), and typed PRNG keys as
    abstract keys on the default device (not wherever they were saved from)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) if _is_key(x)
                        else np.empty(x.shape, x.dtype), target)


def _restore_state(state_dir: Path, target: Any | None, expected_from: str) -> Any:
    """Restore the orbax state at ``state_dir`` (packed or not), checked against ``target`` if given."""
    if not state_dir.is_dir():
        raise CheckpointError(
            f"checkpoint state {str(state_dir)!r} is missing; expected the {STATE_DIR!r} "
            "directory written by save_model/save_pytree"
        )
    layout_file = state_dir.parent / LAYOUT_FILE
    with _checkpointer() as ckptr:
        stored = _stored_metadata(ckptr, state_dir)
        if layout_file.exists():
            sizes, leaves = _read_layout(layout_file)
            _check_layout(sizes, leaves, stored, layout_file, state_dir)
            have = {x.key: (x.shape, x.dtype) for x in leaves if x.empty is None}
        elif isinstance(stored, dict) and (_PACKED in stored or _ARRAYS in stored):
            raise CheckpointError(
                f"checkpoint file {str(layout_file)!r} is missing: the state {str(state_dir)!r} is "
                f"packed and cannot be read without it; expected the {LAYOUT_FILE} written by "
                "save_model/save_pytree"
            )
        else:  # unpacked state of earlier versions: the orbax tree is the pytree
            _log.debug("%s: unpacked state without %s has no checksums; restored unverified", state_dir, LAYOUT_FILE)
            sizes, leaves, have = None, None, _flat_shapes(stored)
        orbax_target = None
        if target is not None:
            _raise_mismatches(have, _flat_shapes(target), state_dir, expected_from)
            orbax_target = target
            if leaves is not None:
                wanted = {_key_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(target)[0]}
                orbax_target = _orbax_tree({name: jax.ShapeDtypeStruct((n,), jnp.dtype(name))
                                            for name, n in sizes.items() if n},
                                           {x.array: wanted[x.key] for x in leaves if x.array is not None})
            orbax_target = _restore_target(orbax_target)
        try:
            out = ckptr.restore(state_dir, args=ocp.args.StandardRestore(orbax_target))
        except Exception as e:  # noqa: BLE001 -- any orbax/tensorstore failure means corruption
            raise CheckpointError(
                f"checkpoint state {str(state_dir)!r} is corrupted or truncated: restoring it "
                f"failed ({type(e).__name__}: {_first_line(e)}); expected a complete orbax "
                "checkpoint written by save_model/save_pytree"
            ) from e
    if leaves is not None:
        values = _unpack(out, sizes, leaves)
        _verify_checksums(leaves, values, state_dir)
        if target is None:
            out = _unflatten([(x.path, v) for x, v in zip(leaves, values)], layout_file)
        else:
            by_key = {x.key: v for x, v in zip(leaves, values) if x.empty is None}
            flat, treedef = jax.tree_util.tree_flatten_with_path(target)
            out = jax.tree.unflatten(treedef, [by_key[_key_str(kp)] for kp, _ in flat])
    return _to_device(out)


def _to_device(tree: Any) -> Any:
    """``tree`` with its NumPy arrays as jax arrays on the default device, however they were
    written (one batched ``jax.device_put``: ~3x faster than one call per array)."""
    leaves, treedef = jax.tree.flatten(tree)
    hosted = [i for i, x in enumerate(leaves) if isinstance(x, np.ndarray)]
    for i, x in zip(hosted, jax.device_put([leaves[i] for i in hosted])):
        leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


# --------------------------------------------------------------------------------------
# Generic pytrees
# --------------------------------------------------------------------------------------


def save_pytree(
    path: str | os.PathLike,
    tree: Any,
    *,
    json_files: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Atomically save a pytree of arrays (plus small JSON files) as directory ``path``.

    Args:
      path: the checkpoint directory to create or replace.
      tree: a pure pytree (nested dicts/lists) of arrays, e.g. ``nnx.to_pure_dict(state)``.
      json_files: ``{"name.json": data}`` written next to the state as JSON (not
        :data:`LAYOUT_FILE`, which holds the state's layout).
      overwrite: whether an existing checkpoint at ``path`` may be replaced.

    Returns:
      The absolute path of the checkpoint.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False (or it is not a checkpoint).
      ValueError: a JSON file name is invalid or reserved, its data is not
        JSON-serialisable, or ``tree`` holds no array with elements.
    """
    texts = {}
    for name, data in (json_files or {}).items():
        if not isinstance(name, str) or not _JSON_NAME.match(name):
            raise ValueError(f"json_files keys must be plain file names ending in '.json'; got {name!r}")
        if name == LAYOUT_FILE:
            raise ValueError(
                f"json_files key {name!r} is reserved: save_pytree writes the state layout to "
                f"{LAYOUT_FILE!r}; choose another file name"
            )
        texts[name] = _dumps(data, f"json_files[{name!r}]")
    target = _as_target(path)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        _write_state(tmp / STATE_DIR, tree)
        for name, text in texts.items():
            _write_text(tmp / name, text)
    return target


def restore_pytree(path: str | os.PathLike, target: Any | None = None) -> Any:
    """Restore the pytree saved by :func:`save_pytree`.

    Args:
      path: the checkpoint directory.
      target: optional pytree of arrays or ``jax.ShapeDtypeStruct`` giving the expected
        structure, shapes and dtypes; every stored array must match it exactly.

    Returns:
      The restored pytree (as ``target``'s structure if given, else as stored, with string
      keys).

    Raises:
      CheckpointError: missing, corrupted, or not matching ``target``.
    """
    state_dir = _resolve(path) / STATE_DIR
    return _restore_state(state_dir, target, "the given target")


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def _model_spec(model: nnx.Module) -> ModelSpec:
    spec = getattr(model, "spec", None)
    if not isinstance(spec, ModelSpec):
        raise ValueError(
            f"model must be a zoo model with a ModelSpec in `model.spec` (built by "
            f"ib_lasso_jax.models.create or create_from_spec); got {type(model).__name__} with "
            f"spec={spec!r}"
        )
    return spec


def save_model(
    path: str | os.PathLike,
    model: nnx.Module,
    *,
    metadata: Any = None,
    overwrite: bool = False,
) -> Path:
    """Atomically save a model: its width spec (zoo models), its full NNX state and optional metadata.

    A user's own NNX model (no ``model.spec``) is saved with ``module.json`` naming its class
    instead of ``spec.json``; every array's shape is in the state layout, so
    ``restore_model(path, like=MyNet(...))`` rebuilds it at the saved (e.g. pruned) widths.

    Args:
      path: the checkpoint directory to create or replace.
      model: a zoo model (has ``model.spec``) or any NNX module; its current variables are
        saved as they are (train/eval mode is not recorded; :func:`restore_model` returns eval
        mode).
      metadata: optional JSON-serialisable data (e.g. a pruning report) for
        :func:`load_metadata`.
      overwrite: whether an existing checkpoint at ``path`` may be replaced.

    Returns:
      The absolute path of the checkpoint.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False (or it is not a checkpoint).
      ValueError: ``model`` has no ModelSpec or ``metadata`` is not JSON-serialisable.
    """
    if isinstance(getattr(model, "spec", None), ModelSpec):
        files: dict[str, Any] = {
            SPEC_FILE: {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": model.spec.to_dict()}
        }
    else:  # a user's own module: the class for the error messages, the shapes are in the layout
        cls = type(model)
        files = {MODULE_FILE: {"format": FORMAT, "format_version": FORMAT_VERSION,
                               "class": f"{cls.__module__}.{cls.__qualname__}"}}
    if metadata is not None:
        _dumps(metadata, "metadata")
        files[METADATA_FILE] = metadata
    state = nnx.to_pure_dict(nnx.state(model))
    return save_pytree(path, state, json_files=files, overwrite=overwrite)


def _spec_from_dir(ckpt: Path) -> ModelSpec:
    file = ckpt / SPEC_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{str(ckpt)!r} is not an ib_lasso_jax model checkpoint: it has no {SPEC_FILE}; "
            f"expected a directory written by save_model (with {SPEC_FILE} and {STATE_DIR}/)"
        )
    data = _read_json(file)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is not an ib_lasso_jax model spec: format is "
            f"{found!r}, expected {FORMAT!r}"
        )
    if data.get("format_version") not in _READABLE_FORMAT_VERSIONS:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} has format_version {data.get('format_version')!r}; "
            f"this version of ib_lasso_jax reads format_version "
            f"{' or '.join(map(str, _READABLE_FORMAT_VERSIONS))}"
        )
    try:
        return ModelSpec.from_dict(data["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} holds an invalid model spec ({e}); expected "
            "ModelSpec.to_dict() under the key 'spec'"
        ) from e


def load_spec(path: str | os.PathLike) -> ModelSpec:
    """The :class:`ModelSpec` (name, classes, input shape, widths) stored in a checkpoint.

    Args:
      path: a model checkpoint directory written by :func:`save_model`.

    Returns:
      The stored ModelSpec.

    Raises:
      CheckpointError: missing, not a model checkpoint, or ``spec.json`` corrupted.
    """
    return _spec_from_dir(_resolve(path))


def load_metadata(path: str | os.PathLike) -> Any:
    """The metadata saved with a model checkpoint (``None`` if it was saved without).

    Args:
      path: a model checkpoint directory written by :func:`save_model`.

    Returns:
      The JSON data given as ``metadata`` to :func:`save_model`, or None.

    Raises:
      CheckpointError: missing, not a model checkpoint, or ``metadata.json`` corrupted.
    """
    ckpt = _resolve(path)
    _spec_from_dir(ckpt)
    file = ckpt / METADATA_FILE
    return _read_json(file) if file.exists() else None


def _abstract_model(spec: ModelSpec, ckpt: Path) -> nnx.Module:
    try:
        return abstract_from_spec(spec)
    except Exception as e:  # noqa: BLE001 -- unknown model, widths the builder rejects, ...
        raise CheckpointError(
            f"cannot rebuild the model of checkpoint {str(ckpt)!r} from its {SPEC_FILE} "
            f"(model {spec.name!r}, widths {spec.widths_json}): {type(e).__name__}: "
            f"{_first_line(e)}; expected a registered model name and widths it accepts"
        ) from e


def restore_model(path: str | os.PathLike, *, like: nnx.Module | None = None) -> nnx.Module:
    """Rebuild a saved model, widths and all, with its saved variables, in eval mode.

    Args:
      path: a model checkpoint directory written by :func:`save_model`.
      like: for a user's own model (saved without a spec): an instance of the same module,
        at any widths (e.g. the unpruned one); its structure is kept and every array takes the
        saved shape and values, then the layers' size attributes follow
        (:func:`ib_lasso_jax.graph.surgery.sync_layer_sizes`). ``like`` itself is not modified.

    Returns:
      The model (``model.spec`` as saved for a zoo model), set to eval mode (``model.eval()``).

    Raises:
      CheckpointError: missing, not a model checkpoint, corrupted or truncated files, stored
        arrays whose shapes/dtypes do not fit the model built from the stored spec, a
        user-model checkpoint without ``like``, or ``like`` of another structure (naming the
        variables that differ).
    """
    ckpt = _resolve(path)
    if like is not None:
        return _restore_like(ckpt, like)
    if not (ckpt / SPEC_FILE).is_file() and (ckpt / MODULE_FILE).is_file():
        cls = _read_json(ckpt / MODULE_FILE).get("class", "?")
        raise CheckpointError(
            f"{str(ckpt)!r} holds a user-defined model ({cls}), not a zoo model: restore it with "
            f"restore_model(path, like=<an instance of {cls.rsplit('.', 1)[-1]}>) (any widths)")
    spec = _spec_from_dir(ckpt)
    graphdef, abstract_state = nnx.split(_abstract_model(spec, ckpt))
    expected_from = (
        f"the model rebuilt from {str(ckpt / SPEC_FILE)!r} (model {spec.name!r}, widths "
        f"{spec.widths_json}); spec.json and the state must come from the same save"
    )
    restored = _restore_state(ckpt / STATE_DIR, nnx.to_pure_dict(abstract_state), expected_from)
    nnx.replace_by_pure_dict(abstract_state, restored)
    model = nnx.merge(graphdef, abstract_state)
    model.eval()
    return model


def _restore_like(ckpt: Path, like: nnx.Module) -> nnx.Module:
    """:func:`restore_model` with a template module: its structure, the saved shapes and values."""
    from ib_lasso_jax.graph.surgery import sync_layer_sizes

    layout = ckpt / LAYOUT_FILE
    if not layout.is_file():
        raise CheckpointError(f"{str(ckpt)!r} has no {LAYOUT_FILE}: restore_model(like=...) needs a "
                              "checkpoint written by this version's save_model")
    try:
        _, leaves = _read_layout(layout)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {str(layout)!r} is not a valid state layout ({e})") from e
    stored = {tuple(str(k) for _, k in leaf.path): leaf for leaf in leaves if leaf.empty is None}
    graphdef, state = nnx.split(like)
    pure = nnx.to_pure_dict(state)
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    names = [tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in flat]
    missing = sorted("/".join(n) for n in set(names) - set(stored))
    unexpected = sorted("/".join(n) for n in set(stored) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"like={type(like).__name__}(...) does not have the structure of the model saved in {str(ckpt)!r}: "
            f"variables missing from the checkpoint: {missing[:_MAX_LISTED]}, in the checkpoint but not in like: "
            f"{unexpected[:_MAX_LISTED]}; pass an instance of the saved module")
    target = []
    for n, (_, leaf) in zip(names, flat):
        s = stored[n]
        if len(s.shape) != np.ndim(leaf):
            raise CheckpointError(f"variable {'/'.join(n)} is {len(s.shape)}-d in {str(ckpt)!r} but {np.ndim(leaf)}-d "
                                  f"in like={type(like).__name__}(...); pass an instance of the saved module")
        target.append(jax.ShapeDtypeStruct(tuple(s.shape), s.dtype))
    expected_from = f"like={type(like).__name__}(...) at the checkpoint's shapes"
    restored = _restore_state(ckpt / STATE_DIR, jax.tree_util.tree_unflatten(treedef, target), expected_from)
    state = jax.tree_util.tree_map(lambda x: x, state)  # a copy: like keeps its own arrays
    nnx.replace_by_pure_dict(state, restored)
    model = sync_layer_sizes(nnx.merge(graphdef, state))
    model.eval()
    return model

