"""Device mesh, multi-process start-up and host -> global arrays (DESIGN.md, Parallelism).

One mesh axis `data` over every device of every process. Parameters and optimizer state are
replicated; batches are sharded on their leading axis.
"""

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
) -> None:
    """Starts `jax.distributed` when several processes are asked for.

    Arguments left empty come from `FCOS_COORDINATOR`, `FCOS_NUM_PROCESSES`, `FCOS_PROCESS_ID`
    (or JAX's own cluster auto-detection when those are unset too). A single process is a no-op.
    On CPU the cross-process collectives use gloo.
    """
    coordinator_address = coordinator_address or os.environ.get("FCOS_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("FCOS_NUM_PROCESSES", "0"))
    if process_id < 0:
        process_id = int(os.environ.get("FCOS_PROCESS_ID", "-1"))
    if num_processes <= 1 and not coordinator_address:
        return
    # Only the CPU client reads this; GPU/TPU runs keep their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
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


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of a global batch; raises when the devices do not divide it."""
    if global_batch_size % mesh.size:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {mesh.size} devices"
        )
    return global_batch_size // jax.process_count()


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of a batch (leading axis) -> global arrays sharded over `data`."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def replicate(tree, mesh: Mesh):
    """Places a pytree replicated on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
