"""Orbax I/O of packed states, and atomic saves of generic pytrees (:func:`save_pytree`).

A state is written as an orbax checkpoint (``StandardCheckpointHandler``) of the packed tree of
:mod:`~ib_lasso_jax.checkpoint.layout`, with its ``state_layout.json`` next to it, inside a
directory written by :func:`~ib_lasso_jax.checkpoint.atomic.atomic_directory`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ib_lasso_jax.checkpoint import layout
from ib_lasso_jax.checkpoint.atomic import _as_target, _resolve, _write_text, atomic_directory
from ib_lasso_jax.checkpoint.files import (
    _JSON_NAME,
    _MAX_LISTED,
    LAYOUT_FILE,
    STATE_DIR,
    CheckpointError,
    _dumps,
    _first_line,
)
from ib_lasso_jax.checkpoint.layout import (
    _ARRAYS,
    _PACKED,
    _check_layout,
    _flat_shapes,
    _is_key,
    _key_str,
    _orbax_tree,
    _pack,
    _raise_mismatches,
    _read_layout,
    _unflatten,
    _unpack,
)

__all__ = [
    "restore_pytree",
    "save_pytree",
]

_log = logging.getLogger("ib_lasso_jax.checkpoint")  # the package's one logger, as documented


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
    its layout as :data:`LAYOUT_FILE` next to it (see :mod:`~ib_lasso_jax.checkpoint.layout`).

    Orbax's cost is per array whatever its size, and higher for a ``jax.Array`` than for a
    NumPy array, so arrays held whole by this process are written from the host and the small
    ones packed. Arrays not fully addressable by this process go to orbax as they are.
    A test seam: save_pytree looks it up in this module.

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


def _restore_target(target: Any) -> Any:
    """What orbax restores into: NumPy arrays (placed on the default device afterwards, which is
    faster than orbax restoring ``jax.Array``s), and typed PRNG keys as abstract keys on the
    default device (not wherever they were saved from)."""
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
        else:  # the unpacked format from before packing: the orbax tree is the pytree
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
        layout._verify_checksums(leaves, values, state_dir)  # on the module: tests patch it there
        if target is None:
            out = _unflatten([(x.path, v) for x, v in zip(leaves, values)], layout_file)
        else:
            by_key = {x.key: v for x, v in zip(leaves, values) if x.empty is None}
            flat, treedef = jax.tree_util.tree_flatten_with_path(target)
            out = jax.tree.unflatten(treedef, [by_key[_key_str(kp)] for kp, _ in flat])
    return _to_device(out)


def _to_device(tree: Any) -> Any:
    """``tree`` with its NumPy arrays as jax arrays on the default device, however they were
    written (one batched ``jax.device_put``, cheaper than one call per array)."""
    leaves, treedef = jax.tree.flatten(tree)
    hosted = [i for i, x in enumerate(leaves) if isinstance(x, np.ndarray)]
    for i, x in zip(hosted, jax.device_put([leaves[i] for i in hosted])):
        leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


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
