"""Data parallelism over every device of every process, with JAX's own runtime.

Training uses one 1-D mesh ('data') over `jax.devices()` (all hosts after
`jax.distributed.initialize`), ordered process by process. Parameters and
optimiser state are replicated, batches are split along their first axis, and
jit's global view does the rest: gradients and BatchNorm batch statistics are
reduced over the whole global batch, so N devices compute what one device
would on the same batch.

Each process holds only its own data: its rows of a global batch (a
contiguous block, because the mesh is ordered by process) are gathered on its
own devices and joined into the global array without leaving them.
Inference never crosses processes: it uses `local_mesh()`, this process's
devices, so every process can segment different subjects.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcascade.errors import UserError

AXIS = "data"


@functools.lru_cache(maxsize=None)
def mesh() -> Mesh:
    """Every device of every process, process-major, so a process's batch rows are one contiguous block."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    counts = {p: sum(d.process_index == p for d in devices) for p in range(jax.process_count())}
    if len(set(counts.values())) > 1:
        raise UserError(f"processes have different device counts {counts}; give every process the same number")
    # Auto axes: the compiler propagates shardings (gathers, BatchNorm
    # reductions) instead of asking every op to spell out its output sharding.
    return Mesh(np.array(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


@functools.lru_cache(maxsize=None)
def local_mesh() -> Mesh:
    """This process's devices, in the order they take in `mesh()`."""
    return Mesh(np.array(sorted(jax.local_devices(), key=lambda d: d.id)), (AXIS,))


def replicated(on: Mesh | None = None) -> NamedSharding:
    return NamedSharding(on or mesh(), PartitionSpec())


def batch_sharded(on: Mesh | None = None) -> NamedSharding:
    return NamedSharding(on or mesh(), PartitionSpec(AXIS))


def put_replicated(tree):
    """Host arrays (the same on every process) -> global arrays with a full copy on every device."""
    sharding = replicated()

    def put(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def put_local_replicated(tree):
    """This process's host arrays -> a copy on each of its devices."""
    if jax.local_device_count() == 1:  # the plain path: 3x faster for a 70 MB volume than a 1-device mesh
        return jax.device_put(tree, jax.local_devices()[0])
    return jax.device_put(tree, replicated(local_mesh()))


def put_local_batch(tree):
    """This process's host arrays -> split along axis 0 over its devices."""
    return jax.device_put(tree, batch_sharded(local_mesh()))


def global_batch(local_tree):
    """This process's rows of a global batch -> the global batch, split over all devices.

    Host leaves are copied to this process's devices; device leaves split over
    `local_mesh()` (e.g. patches gathered there) stay where they are.
    """
    sharding = batch_sharded()
    processes = jax.process_count()

    def join(leaf):
        if isinstance(leaf, jax.Array):
            shape = (leaf.shape[0] * processes, *leaf.shape[1:])
            return jax.make_array_from_single_device_arrays(shape, sharding, [s.data for s in leaf.addressable_shards])
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    return jax.tree.map(join, local_tree)


def allgather(values) -> np.ndarray:
    """Every process's numpy array, stacked: shape (process_count, *values.shape)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values))


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) global array as one numpy array on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def in_order(tree):
    """tree (a computation's outputs) once computed, where executions on several devices must not overlap;
    tree as it is everywhere else.

    XLA:CPU (jaxlib 0.10.2) can deadlock when executions over several CPU devices of one process are in
    flight together: each device's part is a task of one thread pool, and the devices of one execution's
    collective can wait on threads that another execution's devices hold. Without jaxcascade, 64 jitted
    all-gathers dispatched at once on 4 forced host devices ended in XLA's abort in 7 of 7 runs; waiting
    for each before the next, in 0 of 3. Several CPU devices in one process are forced host devices, there
    to try multi-device code, so waiting costs nothing that matters. GPUs, TPUs and one CPU device keep
    JAX's asynchronous dispatch.
    """
    if jax.local_device_count() > 1 and jax.default_backend() == "cpu":
        return jax.block_until_ready(tree)
    return tree


def round_up_to_devices(size: int) -> int:
    """Internal batch sizes (inference) grow to the next multiple of this process's device count."""
    n = jax.local_device_count()
    return -(-size // n) * n


def map_batches(fn, rows: np.ndarray, batch_size: int, progress=None) -> np.ndarray:
    """fn over fixed-size batches of rows (the last padded), split over this process's devices; host result per row.

    One shape for every call, so fn (jitted) compiles once; batch_size grows to
    a multiple of the device count. Outputs stay on the devices until all
    batches are dispatched, so dispatch overlaps compute. fn's other inputs
    belong on the same devices (`put_local_replicated`).
    """
    batch_size = round_up_to_devices(batch_size)
    n_batches = -(-len(rows) // batch_size)
    padded = np.zeros((n_batches * batch_size, *rows.shape[1:]), rows.dtype)
    padded[: len(rows)] = rows
    batches = range(n_batches) if progress is None else progress(range(n_batches))
    outputs = [in_order(fn(put_local_batch(padded[b * batch_size : (b + 1) * batch_size]))) for b in batches]
    return np.concatenate([np.asarray(o) for o in outputs])[: len(rows)]


def check_divisible(batch_size: int, setting: str, data_shards: int = 1) -> None:
    """A user's global batch must split evenly over the devices (and the data shards)."""
    devices = jax.device_count()
    n = math.lcm(devices, data_shards)
    if batch_size % n:
        lower, upper = batch_size - batch_size % n, batch_size + n - batch_size % n
        suggestion = f"{lower} or {upper}" if lower else str(upper)
        over = f"the {devices} devices" if n == devices else f"{devices} devices and {data_shards} data shards"
        raise UserError(
            f"--config.{setting}={batch_size} is not divisible by {over}; "
            f"use a multiple of {n} (e.g. {suggestion})"
        )


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def describe() -> str:
    """'4 cpu devices' or '8 gpu devices in 2 processes', for logs."""
    where = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"{jax.device_count()} {jax.default_backend()} device{'s' if jax.device_count() > 1 else ''}{where}"


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
    local_mesh.cache_clear()
    return True


def agree(action: Callable, what: str):
    """action() on every process; if it raises a UserError on any of them, every process raises.

    A process that stopped alone would leave the others waiting at the next
    collective, so failures (a bad file only one process reads) are shared first.
    """
    error = None
    result = None
    try:
        result = action()
    except UserError as raised:
        error = raised
    if jax.process_count() > 1:
        failed = allgather(np.array(error is not None))
        if failed.any() and error is None:
            raise UserError(f"process {int(np.argmax(failed))} failed while {what}; its message says why")
    if error is not None:
        raise error
    return result


def owned_shards(num_shards: int) -> range:
    """The data shards this process trains on (a contiguous share of num_shards, see batching)."""
    per_process = num_shards // jax.process_count()
    first = jax.process_index() * per_process
    return range(first, first + per_process)


def subject_shard(subject_number: int, num_shards: int) -> int:
    return subject_number % num_shards
