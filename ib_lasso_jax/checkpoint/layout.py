"""The packed state format: how a pytree of arrays is laid out in orbax, and its checksums.

*Packed state* (every model and training checkpoint). Orbax has a fixed cost per array
whatever its size, and a model's state is hundreds of small arrays, so every host (NumPy) array
of at most :data:`PACK_MAX_BYTES` is raveled and concatenated into one 1-D array per dtype.
The orbax tree is::

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
unpacked format of ib_lasso_jax before the packing (the pytree itself is the orbax tree) and
is still read.

*Checksums* (layout ``format_version`` 2). Orbax stores no checksum, so a damaged data file
restores as silently changed values. Every array leaf's ``crc32`` is the CRC-32
(``zlib.crc32``) of its bytes in C order and little-endian byte order (a typed PRNG key: of
its key data), computed from the host array at save time, as 8 hex digits. Restoring
recomputes it for every leaf and raises :class:`CheckpointError`, naming the arrays and the
checkpoint, on any difference. ``crc32`` is ``null`` only for an array not held whole by the
saving process (multi-process sharding), which is then restored unverified. Layouts of
``format_version`` 1 (no checksums) and unpacked states are still read, without verification
(logged at debug level by the ``ib_lasso_jax.checkpoint`` logger). An ib_lasso_jax that reads
layout format_version 1 only refuses a checkpoint with checksums with a clear error.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import sys
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ib_lasso_jax.checkpoint.files import _MAX_LISTED, LAYOUT_FILE, STATE_DIR, CheckpointError, _first_line, _read_json

__all__ = [
    "LAYOUT_FORMAT",
    "LAYOUT_VERSION",
    "PACK_MAX_BYTES",
]

LAYOUT_FORMAT = "ib_lasso_jax.state_layout"
LAYOUT_VERSION = 2  # 2: a CRC-32 per array leaf; 1: no checksums, still read (unverified)
_READABLE_LAYOUT_VERSIONS = (1, 2)
_CRC32 = re.compile(r"^[0-9a-f]{8}$")
# Arrays up to 1 MiB are packed: below that, orbax's fixed cost per array outweighs copying the
# array into the packed one; above it the array's own bytes dominate, and packing would only add
# a copy (and its memory) for no gain.
PACK_MAX_BYTES = 1 << 20

_PACKED = "__packed__"
_ARRAYS = "__arrays__"

_log = logging.getLogger("ib_lasso_jax.checkpoint")  # the package's one logger, as documented


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


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


# CRC-32 catches any 1-bit flip and any burst of up to 32 bits, and is faster than sha256 or
# blake2b: it detects damage, not tampering.
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
