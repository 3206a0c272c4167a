"""Helpers for tests that start several processes: free ports and cluster environments."""

import os
import random
import socket

# JAX's SLURM detection (jax._src.clusters.SlurmCluster) derives the coordinator's port from the
# job id: JOB_ID % 4096 + 61440.
SLURM_PORT_BASE = 65536 - 4096
# What marks a process as part of a cluster job for JAX or for us.
CLUSTER_VARIABLE_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "FCOS_", "TPU_")
CLUSTER_VARIABLES = ("KUBERNETES_SERVICE_HOST", "JAX_LOCAL_DEVICE_IDS")


def free_port(low: int = 0, high: int = 0) -> int:
    """A TCP port on 127.0.0.1 nobody listens on (any, or one in [low, high])."""
    for _ in range(200):
        port = random.randint(low, high) if high else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in [{low}, {high}]")


def without_cluster(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) without any variable that describes a cluster job."""
    env = dict(os.environ if env is None else env)
    return {
        k: v
        for k, v in env.items()
        if not k.startswith(CLUSTER_VARIABLE_PREFIXES) and k not in CLUSTER_VARIABLES
    }


def slurm_step(num_processes: int, port: int) -> list[dict[str, str]]:
    """The variables `srun --ntasks=N` gives each of its N tasks on this host (one node), with a
    job id whose JAX-derived coordinator port is `port` (in [SLURM_PORT_BASE, 65535])."""
    if not SLURM_PORT_BASE <= port < 65536:
        raise ValueError(f"port {port} outside the SLURM-derived range")
    job_id = str(port - SLURM_PORT_BASE + 4096 * 17)
    common = {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOBID": job_id,
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": str(num_processes),
        "SLURM_NPROCS": str(num_processes),
        "SLURM_STEP_NUM_TASKS": str(num_processes),
        "SLURM_NNODES": "1",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_NODEID": "0",
        "SLURM_TASKS_PER_NODE": str(num_processes),
    }
    return [
        {**common, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)} for i in range(num_processes)
    ]


def slurm_port() -> int:
    """A free port that a SLURM job id can name (see `slurm_step`)."""
    return free_port(SLURM_PORT_BASE, 65535)
