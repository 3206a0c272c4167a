"""Device mesh, multi-process start-up and coordination, host -> global arrays.

One mesh axis `data` over every device of every process. Parameters and optimizer state are
replicated; batches are sharded on their leading axis. Work that must happen once per directory
(writing a dataset, preparing it, caching its index) runs in one process per directory while the
others wait (`run_once_per_directory`).
"""

import itertools
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# Followers wait this long for a directory's leader (preparing a large COCO folder takes a while).
WAIT_FOR_LEADER_S = 12 * 3600
_COORDINATION_ROUND = itertools.count()

log = logging.getLogger(__name__)


class LeaderFailedError(RuntimeError):
    """The process doing shared work for this one (`run_once_per_directory`) failed."""


def initialize_distributed(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
) -> None:
    """Starts `jax.distributed` for a multi-process job, or leaves a single process alone.

    Arguments left empty come from `FCOS_COORDINATOR`, `FCOS_NUM_PROCESSES`, `FCOS_PROCESS_ID`.
    When none of them is given either, JAX's own cluster detection decides
    (`jax.distributed.initialize()` without arguments): a TPU pod slice, a SLURM step (`srun`),
    Open MPI (`mpirun`), a Kubernetes JobSet, or `JAX_COORDINATOR_ADDRESS` with JAX's variables
    start the job they describe; a plain process stays single. Explicit values always win.
    On CPU the cross-process collectives use gloo.
    """
    coordinator_address = coordinator_address or os.environ.get("FCOS_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("FCOS_NUM_PROCESSES", "0"))
    if process_id < 0:
        process_id = int(os.environ.get("FCOS_PROCESS_ID", "-1"))
    explicit = coordinator_address or num_processes > 1
    if num_processes == 1 and not coordinator_address:
        return  # asked for one process
    # Only the CPU client reads this (gloo is jax 0.10's default; said here so a change of default
    # cannot leave CPU processes without collectives); GPU/TPU runs keep their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not explicit:
        try:
            jax.distributed.initialize()  # JAX's cluster detection
        except ValueError as error:
            # What jax.distributed raises when no cluster was recognised (and no
            # JAX_COORDINATOR_ADDRESS set): nothing to join, one process.
            if "coordinator_address should be defined" not in str(error):
                raise
            return
        log.info("jax.distributed found the job: process %d", jax.process_index())
        return
    kwargs = {}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes > 0:
        kwargs["num_processes"] = num_processes
    if process_id >= 0:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis `data` over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over `data`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of a batch (leading axis) -> global arrays sharded over `data`."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def abstract(tree, placement: jax.sharding.Sharding):
    """`jax.ShapeDtypeStruct` of every leaf of `tree` (arrays or structs), placed by `placement`:
    what `jit(...).lower` and orbax's restore take for arrays that do not exist yet."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), tree)


def replicate(tree, mesh: Mesh):
    """Places a pytree replicated on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def on_each_shard(f: Callable, mesh: Mesh, replicated_args: int = 0) -> Callable:
    """`f` run by every device on its own rows of the batch, with no communication.

    The first `replicated_args` positional arguments are replicated (the weights); the others are
    pytrees of [B, ...] arrays split over `data` on their leading axis, and so are the outputs:
    device d computes rows [d * B/N, (d + 1) * B/N) from them alone. For per-image work
    (inference, decoding, NMS): each device runs its own loops, none waits for another.
    """

    def mapped(*args):
        specs = tuple(
            PartitionSpec() if i < replicated_args else PartitionSpec(DATA_AXIS)
            for i in range(len(args))
        )
        # Not type-checked for replication: every output is split, and loop carries that start
        # from constants (NMS) would otherwise need casting to per-device values.
        shard = jax.shard_map(
            f, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(DATA_AXIS), check_vma=False
        )
        return shard(*args)

    return mapped


def local_rows(tree):
    """This process's rows of arrays split over `data`, as NumPy, in global row order (the
    process's own slice of the batch, as `to_global` took it): one transfer per shard."""

    def rows(array: jax.Array) -> np.ndarray:
        shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])

    return jax.tree.map(rows, tree)


def gather_from_processes(array: np.ndarray) -> np.ndarray:
    """Every process's `array` [n_p, ...] concatenated in process order, on every process; the
    row counts may differ. Values travel as bytes, so any dtype (float64 too) arrives exact.
    One process: `array` itself."""
    if jax.process_count() == 1:
        return array
    from jax.experimental import multihost_utils

    array = np.ascontiguousarray(array)
    row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    counts = np.asarray(multihost_utils.process_allgather(np.int32(len(array)))).reshape(-1)
    payload = np.zeros((int(counts.max()), max(row_bytes, 1)), np.uint8)
    payload[: len(array), :row_bytes] = array.reshape(len(array), -1).view(np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(payload))  # [P, max rows, bytes]
    parts = [gathered[p, : counts[p], :row_bytes] for p in range(len(counts))]
    flat = np.ascontiguousarray(np.concatenate(parts))
    return flat.view(array.dtype).reshape(-1, *array.shape[1:])


def _client():
    """The `jax.distributed` coordination client (key-value store and barriers)."""
    from jax._src import distributed  # orbax reaches the same client this way

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("several processes but jax.distributed is not initialised")
    return client


def _directory_leader(directory: Path, key: str, timeout_ms: int) -> int:
    """The lowest process index that sees the same `directory` as this process.

    Every process writes a marker file into its `directory`; the markers a process can see tell
    which processes share its disk (one shared file system: process 0 leads everyone; local disks:
    the first process of each host leads that host).
    """
    client, me, count = _client(), jax.process_index(), jax.process_count()
    if me == 0:
        client.key_value_set(f"{key}/token", uuid.uuid4().hex)
    token = client.blocking_key_value_get(f"{key}/token", timeout_ms)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / f".fcos_jax_probe-{token}-{me}"
    marker.touch()
    client.wait_at_barrier(f"{key}/written", timeout_ms)
    sharing = [p for p in range(count) if (directory / f".fcos_jax_probe-{token}-{p}").exists()]
    client.wait_at_barrier(f"{key}/seen", timeout_ms)
    marker.unlink()
    return min(sharing)


def run_once_per_directory(
    work: Callable[[], None], directory: str | Path, what: str, timeout_s: int = WAIT_FOR_LEADER_S
) -> None:
    """Runs `work` (which writes under `directory`) in one process per distinct `directory`.

    With one process it just runs. With several, every process calls this in the same order: the
    lowest process that sees the same directory runs `work` (process 0 when `directory` is on a
    shared file system; the first process of each host with local disks) and the processes sharing
    its directory wait for it. A failure in the leader is raised in its followers too.
    `what` names the work in messages.
    """
    if jax.process_count() == 1:
        work()
        return
    key = f"fcos_jax/once/{next(_COORDINATION_ROUND)}"
    timeout_ms = int(timeout_s * 1000)
    leader = _directory_leader(Path(directory).expanduser().absolute(), key, 600_000)
    client, me = _client(), jax.process_index()
    if me == leader:
        status = "ok"
        try:
            work()
        except BaseException as error:
            status = f"{type(error).__name__}: {error}"
            raise
        finally:
            client.key_value_set(f"{key}/status/{leader}", status)
        return
    log.info("process %d waits for process %d: %s", me, leader, what)
    status = client.blocking_key_value_get(f"{key}/status/{leader}", timeout_ms)
    if status != "ok":
        raise LeaderFailedError(f"process {leader} failed at {what}: {status}")
