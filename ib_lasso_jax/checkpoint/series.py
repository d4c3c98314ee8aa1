"""Training checkpoint series: ``workdir/checkpoints/ckpt_<step>``, listed, pruned and resumed.

A training run saves ``ckpt_<step>`` (9 digits) with :func:`save_checkpoint`: its state through
:func:`~ib_lasso_jax.checkpoint.state.save_pytree` (atomic, checksummed) and the run's
bookkeeping as ``train_state.json`` (format ``ib_lasso_jax.train_state``: step, data-iterator
position, model spec, config, metrics). The newest ``keep`` checkpoints and the best one are
kept. :func:`restore_newest_intact` resumes from the newest readable checkpoint: a damaged one
(unreadable, or an array whose checksum fails) is skipped with a
:class:`DamagedCheckpointWarning` naming it and the older one used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ib_lasso_jax.checkpoint.files import CheckpointError
from ib_lasso_jax.checkpoint.state import save_pytree

__all__ = [
    "CHECKPOINT_DIR",
    "TRAIN_STATE_FILE",
    "TRAIN_STATE_FORMAT",
    "DamagedCheckpointWarning",
    "checkpoint_model_spec",
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "read_train_state",
    "restore_newest_intact",
    "save_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
TRAIN_STATE_FILE = "train_state.json"
TRAIN_STATE_FORMAT = "ib_lasso_jax.train_state"

_CKPT_RE = re.compile(r"^ckpt_(\d{9})$")
_OLD_RE = re.compile(r"^\.(ckpt_\d{9})\.old$")

T = TypeVar("T")


class DamagedCheckpointWarning(UserWarning):
    """A run resumed from an older training checkpoint because the newer ones are damaged."""


class _Damaged(Exception):
    """A checkpoint that cannot be read (as opposed to one written for another run)."""


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint of ``step``: ``ckpt_<step, 9 digits>``."""
    return f"ckpt_{step:09d}"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = {}
    for p in directory.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
        else:  # a save killed between renames leaves only `.ckpt_<step>.old` (complete)
            m = _OLD_RE.match(p.name)
            if m and not (directory / m.group(1)).exists():
                found[int(m.group(1)[5:])] = directory / m.group(1)
    return sorted(found.items())


def latest_checkpoint(workdir: str | os.PathLike) -> Path | None:
    """The newest training checkpoint under ``workdir/checkpoints`` (``None``: none)."""
    ckpts = list_checkpoints(Path(workdir) / CHECKPOINT_DIR)
    return ckpts[-1][1] if ckpts else None


def checkpoint_model_spec(path: str | os.PathLike) -> dict:
    """The model spec (``ModelSpec.to_dict()``) a training checkpoint was written for.

    A run resumes only into the same model; compare this with ``model.spec.to_dict()`` to
    tell, before calling :func:`~ib_lasso_jax.train.training.finetune`, whether ``workdir``
    holds a run of this model (``path``: e.g. :func:`latest_checkpoint` ``(workdir)``). Raises
    ``CheckpointError`` if the checkpoint is damaged or not a training checkpoint.
    """
    return read_train_state(Path(path)).get("model_spec")


def read_train_state(path: Path) -> dict:
    """The ``train_state.json`` of the checkpoint at ``path`` (or of its ``.old``), validated."""
    file = path / TRAIN_STATE_FILE
    if not file.is_file():
        old = path.parent / f".{path.name}.old" / TRAIN_STATE_FILE
        file = old if old.is_file() else file
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"training checkpoint {str(path)!r} has no {TRAIN_STATE_FILE}; it is damaged") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"training checkpoint file {str(file)!r} is corrupted or truncated ({e}); expected the JSON "
            "written by ib_lasso_jax.train.training"
        ) from e
    if not isinstance(data, dict) or data.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{str(file)!r} is not an ib_lasso_jax training checkpoint (format "
                              f"{data.get('format') if isinstance(data, dict) else None!r}, "
                              f"expected {TRAIN_STATE_FORMAT!r})")
    return data


def save_checkpoint(directory: Path, step: int, tree: Any, info: dict, keep: int, best_step: int | None) -> None:
    """Save ``tree`` (host arrays) and ``info`` as the checkpoint of ``step``, then apply retention.

    Retention keeps the newest ``keep`` checkpoints up to ``step`` and the one of ``best_step``.
    Older ones are deleted only after the new one is complete, so a crash never leaves fewer
    good checkpoints than before. Newer ones are damaged checkpoints skipped on resume: neither
    counted nor deleted here (the run replaces each when it reaches its step).
    """
    info = {"format": TRAIN_STATE_FORMAT, "step": step, **info}
    save_pytree(directory / checkpoint_name(step), tree, json_files={TRAIN_STATE_FILE: info}, overwrite=True)
    ckpts = [(s, p) for s, p in list_checkpoints(directory) if s <= step]
    keep_steps = {s for s, _ in ckpts[-keep:]} | ({best_step} if best_step is not None else set())
    for s, p in ckpts:
        if s not in keep_steps:
            shutil.rmtree(p, ignore_errors=True)


def restore_newest_intact(
    directory: Path, restore: Callable[[Path], T], *, stacklevel: int = 1
) -> tuple[T | None, list[int]]:
    """``restore(path)`` of the newest checkpoint under ``directory`` that can be read.

    ``restore`` raises ``_Damaged`` for a checkpoint it cannot read, which is then skipped;
    any other error (e.g. a CheckpointError for a checkpoint of another model or config,
    since resuming past it would mix two runs) propagates at once. ``stacklevel`` is that of
    the DamagedCheckpointWarning as seen from the caller (1: the caller's line).

    Returns:
      ``(restored, damaged)``: ``restore``'s result (``None``: no checkpoint at all) and the
      steps of the newer, unreadable checkpoints, after a DamagedCheckpointWarning naming them
      and the one used.

    Raises:
      CheckpointError: listing every checkpoint, if there are some and none is readable.
    """
    damaged: list[tuple[int, Path, str]] = []
    for step, path in reversed(list_checkpoints(directory)):
        try:
            restored = restore(path)
        except _Damaged as e:
            damaged.append((step, path, str(e)))
            continue
        if damaged:
            listed = "; ".join(f"{str(p)!r}: {why}" for _, p, why in damaged)
            warnings.warn(
                f"resuming from {str(path)!r} (step {step}): the newer training checkpoint"
                f"{'s are' if len(damaged) > 1 else ' is'} damaged and skipped: {listed}; "
                f"{'they are' if len(damaged) > 1 else 'it is'} replaced as the run passes "
                f"{'their steps' if len(damaged) > 1 else 'its step'}",
                DamagedCheckpointWarning, stacklevel=stacklevel + 1)
        return restored, [s for s, _, _ in damaged]
    if damaged:
        listed = "; ".join(f"{str(p)!r}: {why}" for _, p, why in damaged)
        raise CheckpointError(
            f"no intact training checkpoint in {str(directory)!r} to resume from: {len(damaged)} checkpoint(s), "
            f"all damaged: {listed}; restore them from an intact copy, or remove {str(directory)!r} to train "
            "from the start")
    return None, []
