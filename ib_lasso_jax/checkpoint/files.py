"""What the checkpoint modules share: the error type, names inside a checkpoint directory, JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = [
    "CheckpointError",
    "LAYOUT_FILE",
    "STATE_DIR",
]

STATE_DIR = "state"  # the orbax state of every checkpoint directory
LAYOUT_FILE = "state_layout.json"  # where each leaf of that state is stored (layout.py)
_JSON_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.json$")
_MAX_LISTED = 8  # differences named in one error message


class CheckpointError(ValueError):
    """A checkpoint is missing, not one of this library's, corrupted, or does not fit its spec."""


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


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:500] if lines else ""
