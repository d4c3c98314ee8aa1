"""Model checkpoints: save a model (width spec + full NNX state) and rebuild it anywhere.

A *model checkpoint* is one directory::

    path/
      spec.json          {"format": "ib_lasso_jax.model", "format_version": 2,
                          "spec": ModelSpec.to_dict()}  -- the (possibly pruned) widths
                         (module.json instead, naming the class, for a user's own model)
      metadata.json      optional caller JSON (e.g. a pruning report); absent if none given
      state/             orbax checkpoint of the packed ``nnx.to_pure_dict(nnx.state(model))``:
                         params, batch statistics, RNG state -- every NNX variable
      state_layout.json  where each leaf of that pytree is inside ``state/``, with its CRC-32
                         (:mod:`~ib_lasso_jax.checkpoint.layout`)

``spec.json`` has ``format_version`` 2 since the state is packed, so an ib_lasso_jax that reads
format_version 1 only refuses such a model checkpoint with a clear error instead of misreading
it; this version reads 1 and 2.

:func:`restore_model` needs nothing but the directory: it rebuilds the abstract model from
``spec.json`` (:func:`~ib_lasso_jax.models._registry.abstract_from_spec`, no memory, no
compute), checks that every stored array has the shape and dtype that model expects, and
restores the arrays straight into it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from ib_lasso_jax.checkpoint.atomic import _resolve
from ib_lasso_jax.checkpoint.files import (
    _MAX_LISTED,
    LAYOUT_FILE,
    STATE_DIR,
    CheckpointError,
    _dumps,
    _first_line,
    _read_json,
)
from ib_lasso_jax.checkpoint.layout import _read_layout
from ib_lasso_jax.checkpoint.state import _restore_state, save_pytree
from ib_lasso_jax.models._registry import ModelSpec, abstract_from_spec

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "MODULE_FILE",
    "SPEC_FILE",
    "load_metadata",
    "load_spec",
    "restore_model",
    "save_model",
]

FORMAT = "ib_lasso_jax.model"
FORMAT_VERSION = 2  # 2: packed state (state_layout.json); 1: unpacked state, still read
_READABLE_FORMAT_VERSIONS = (1, 2)
SPEC_FILE = "spec.json"
METADATA_FILE = "metadata.json"
MODULE_FILE = "module.json"  # a user's own model: its class (its shapes are in the layout)


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
