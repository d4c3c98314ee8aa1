"""Data parallelism over all devices with ``jax.sharding``: one mesh axis, ``'data'``.

The batch is split along its leading axis over the ``'data'`` axis; parameters, BatchNorm
statistics and optimiser state are replicated. A jitted step whose inputs carry these
shardings is partitioned by XLA (GSPMD): every device computes the gradient of its slice
and the cross-device mean is inserted as an all-reduce, so the step computes the same
function of the global batch as on one device (up to float summation order).

Several hosts: start one process per host and call :func:`maybe_initialize_distributed`
first (it reads ``--coordinator``-style arguments or the ``IB_LASSO_COORDINATOR_ADDRESS``,
``IB_LASSO_NUM_PROCESSES``, ``IB_LASSO_PROCESS_ID`` environment variables). Each process
then reads only its own slice of every global batch (``shard_index, num_shards =``
:func:`process_shard`, passed to :meth:`ib_lasso_jax.data.Dataset.batches`) and
:func:`shard_batch` assembles the global array from the per-process slices.

Example::

    mesh = data_mesh()                               # all devices, axis 'data'
    params = replicate(params, mesh)
    images, labels = shard_batch((images, labels), mesh)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "check_batch_size",
    "data_mesh",
    "maybe_initialize_distributed",
    "process_shard",
    "replicate",
    "replicated_sharding",
    "shard_batch",
]

DATA_AXIS = "data"
"""Name of the one mesh axis; the batch dimension is sharded along it."""

_ENV = ("IB_LASSO_COORDINATOR_ADDRESS", "IB_LASSO_NUM_PROCESSES", "IB_LASSO_PROCESS_ID")


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all devices of all hosts).

    The axis type is ``Auto`` (sharding propagated by the compiler): plain data parallelism
    needs no explicit-sharding annotations in the model code.

    Args:
      devices: the devices to use; default ``jax.devices()``.

    Returns:
      A :class:`jax.sharding.Mesh`.

    >>> data_mesh().axis_names
    ('data',)
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must be a non-empty sequence of jax devices; got []")
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimiser state, metrics)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split over ``'data'``; other axes are whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` on all devices of ``mesh`` (same value everywhere)."""
    return jax.device_put(tree, replicated_sharding(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Global arrays from this process's slice of a batch (a pytree of numpy arrays).

    With one process the slice is the whole batch. With several, each process passes its
    own rows (``Dataset.batches(..., shard_index=, num_shards=)`` gives them in process
    order) and the result is the global batch, sharded along ``'data'``.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def check_batch_size(batch_size: int, mesh: Mesh | None, name: str = "batch_size") -> None:
    """Raise ValueError unless the global ``batch_size`` splits evenly over the mesh."""
    n = 1 if mesh is None else mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"{name}={batch_size} must be divisible by the number of devices of the data-parallel "
            f"mesh ({n}); valid values are multiples of {n}, e.g. {max(n, batch_size - batch_size % n)}"
        )


def process_shard() -> tuple[int, int]:
    """``(shard_index, num_shards)`` of this process for the data iterators."""
    return jax.process_index(), jax.process_count()


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Start multi-host JAX if asked to, by arguments or environment; otherwise do nothing.

    Arguments win over the environment variables ``IB_LASSO_COORDINATOR_ADDRESS``
    (``host:port`` of process 0), ``IB_LASSO_NUM_PROCESSES`` and ``IB_LASSO_PROCESS_ID``.
    All three must be given together, or none (single process). Must be called before
    any other JAX call of the program.

    Args:
      coordinator_address: ``host:port`` of process 0.
      num_processes: total number of processes (hosts).
      process_id: this process's index in ``[0, num_processes)``.

    Returns:
      True if ``jax.distributed.initialize`` was called, False for a single process.
    """
    env = {k: os.environ.get(k) for k in _ENV}
    address = coordinator_address or env[_ENV[0]]
    n = num_processes if num_processes is not None else env[_ENV[1]]
    pid = process_id if process_id is not None else env[_ENV[2]]
    given = {"coordinator_address": address, "num_processes": n, "process_id": pid}
    if all(v is None for v in given.values()):
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"multi-host setup needs coordinator_address, num_processes and process_id together "
            f"(arguments or the environment variables {', '.join(_ENV)}); missing {missing}, got {given}"
        )
    try:
        n, pid = int(n), int(pid)
    except (TypeError, ValueError) as e:
        raise ValueError(f"num_processes and process_id must be integers; got {given}") from e
    if n < 1 or not 0 <= pid < n:
        raise ValueError(f"process_id must be in [0, num_processes={n}); got process_id={pid}")
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)
    return True
