"""Data parallelism over every device of every process, with JAX's own runtime.

One 1-D mesh ('data') spans `jax.devices()` (all hosts after
`jax.distributed.initialize`). Parameters and optimiser state are replicated,
batches are split along their first axis, and jit's global view does the rest:
gradients and BatchNorm batch statistics are reduced over the whole global
batch, so N devices compute what one device would on the same batch.

Every process builds the same host arrays (same seed, same data), and each
device receives only its shard of a batch; arrays are created with
`make_array_from_callback`, which works unchanged across processes.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxcascade.errors import UserError

AXIS = "data"


@functools.lru_cache(maxsize=None)
def mesh() -> jax.sharding.Mesh:
    # Auto axes: the compiler propagates shardings (gathers, BatchNorm
    # reductions) instead of asking every op to spell out its output sharding.
    return jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated() -> NamedSharding:
    return NamedSharding(mesh(), PartitionSpec())


def batch_sharded() -> NamedSharding:
    return NamedSharding(mesh(), PartitionSpec(AXIS))


def _put(tree, sharding):
    def put(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def put_replicated(tree):
    """Host arrays -> global arrays with a full copy on every device."""
    return _put(tree, replicated())


def put_batch(tree):
    """Host arrays -> global arrays split along axis 0 over the devices."""
    return _put(tree, batch_sharded())


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) global array as one numpy array on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def round_up_to_devices(size: int) -> int:
    """Internal batch sizes (inference) grow to the next multiple of the device count."""
    n = jax.device_count()
    return -(-size // n) * n


def map_batches(fn, rows: np.ndarray, batch_size: int, progress=None) -> np.ndarray:
    """fn over fixed-size batches of rows (the last padded), split over the devices; host result per row.

    One shape for every call, so fn (jitted) compiles once; batch_size grows to
    a multiple of the device count. Outputs stay on the devices until all
    batches are dispatched, so dispatch overlaps compute.
    """
    batch_size = round_up_to_devices(batch_size)
    n_batches = -(-len(rows) // batch_size)
    padded = np.zeros((n_batches * batch_size, *rows.shape[1:]), rows.dtype)
    padded[: len(rows)] = rows
    batches = range(n_batches) if progress is None else progress(range(n_batches))
    outputs = [fn(put_batch(padded[b * batch_size : (b + 1) * batch_size])) for b in batches]
    return np.concatenate([to_host(o) for o in outputs])[: len(rows)]


def check_divisible(batch_size: int, setting: str) -> None:
    """A user's global batch must split evenly over the devices."""
    n = jax.device_count()
    if batch_size % n:
        lower, upper = batch_size - batch_size % n, batch_size + n - batch_size % n
        suggestion = f"{lower} or {upper}" if lower else str(upper)
        raise UserError(
            f"--config.{setting}={batch_size} is not divisible by the {n} devices; "
            f"use a multiple of {n} (e.g. {suggestion})"
        )


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
    """Process 0 writes metrics, figures and configs; every process takes part in checkpoints."""
    return jax.process_index() == 0


def initialize(distributed_config) -> bool:
    """Join a multi-process run if configured (config or JAX_* environment); True if joined.

    Settings: config.distributed.coordinator_address / num_processes /
    process_id, or the environment variables JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID; config.distributed.auto=True lets
    JAX detect a cluster (SLURM, Open MPI, TPU pods, ...).
    """
    address = distributed_config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = distributed_config.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    process_id = distributed_config.process_id
    if process_id < 0:
        process_id = int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    if not (address or distributed_config.auto):
        return False
    if jax.distributed.is_initialized():
        return True
    if address and (num_processes < 1 or not 0 <= process_id < num_processes):
        raise UserError(
            f"multi-process training at {address} needs num_processes >= 1 and 0 <= process_id < num_processes "
            f"(got {num_processes} and {process_id}); set --config.distributed.* or JAX_NUM_PROCESSES/JAX_PROCESS_ID"
        )
    kwargs = dict(coordinator_address=address, num_processes=num_processes, process_id=process_id) if address else {}
    jax.distributed.initialize(**kwargs)
    mesh.cache_clear()
    return True
