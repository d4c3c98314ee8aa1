"""Checkpoints: save a model (width spec + full NNX state) or any pytree, and rebuild it anywhere.

* :mod:`~ib_lasso_jax.checkpoint.model`: model checkpoints (:func:`save_model`,
  :func:`restore_model`, :func:`load_spec`, :func:`load_metadata`): ``spec.json``, optional
  ``metadata.json``, ``state/`` and ``state_layout.json``.
* :mod:`~ib_lasso_jax.checkpoint.state`: any pytree of arrays (:func:`save_pytree`,
  :func:`restore_pytree`), through orbax.
* :mod:`~ib_lasso_jax.checkpoint.layout`: the packed state format (small arrays concatenated
  into one array per dtype) and its CRC-32 checksums, verified on every restore.
* :mod:`~ib_lasso_jax.checkpoint.atomic`: the atomic-write protocol (:func:`atomic_directory`):
  at every instant the path or its ``.old`` sibling is a complete checkpoint.
* :mod:`~ib_lasso_jax.checkpoint.series`: the numbered checkpoints of a training run, their
  retention and the resume from the newest intact one.

Every reading function raises :class:`CheckpointError` naming the checkpoint and what is wrong
(missing, not one of this library's, damaged, or not matching the expected model).
"""

from ib_lasso_jax.checkpoint.atomic import _fsync_dir as _fsync_dir
from ib_lasso_jax.checkpoint.atomic import _write_text as _write_text
from ib_lasso_jax.checkpoint.atomic import atomic_directory
from ib_lasso_jax.checkpoint.files import LAYOUT_FILE, STATE_DIR, CheckpointError
from ib_lasso_jax.checkpoint.layout import LAYOUT_FORMAT, LAYOUT_VERSION, PACK_MAX_BYTES
from ib_lasso_jax.checkpoint.model import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    MODULE_FILE,
    SPEC_FILE,
    load_metadata,
    load_spec,
    restore_model,
    save_model,
)
from ib_lasso_jax.checkpoint.state import restore_pytree, save_pytree

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LAYOUT_FILE",
    "LAYOUT_FORMAT",
    "LAYOUT_VERSION",
    "METADATA_FILE",
    "MODULE_FILE",
    "PACK_MAX_BYTES",
    "SPEC_FILE",
    "STATE_DIR",
    "CheckpointError",
    "atomic_directory",
    "load_metadata",
    "load_spec",
    "restore_model",
    "restore_pytree",
    "save_model",
    "save_pytree",
]
