"""Multi-host start-up: `jax.distributed.initialize`, automatic where the cluster says how.

TPU pod slices, SLURM jobs (srun) and Open MPI (mpirun) are detected by JAX from their
environment; anywhere else pass the coordinator, process count and index explicitly. On CPU the
processes exchange data with gloo collectives, so the same code runs as local processes.
"""

from __future__ import annotations

import os

import jax

from transformer.errors import ConfigError


def _cluster_detected() -> bool:
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    # A multi-host TPU slice lists its workers' hostnames.
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins the processes of a multi-host run; returns True when it did."""
    explicit = [coordinator_address, num_processes, process_id]
    if any(x is not None for x in explicit) and not all(x is not None for x in explicit):
        raise ConfigError(
            "multi-host needs all of --coordinator_address, --num_processes and --process_id "
            "(or none, on TPU pods and SLURM where they are detected)"
        )
    if not all(x is not None for x in explicit) and not _cluster_detected():
        return False
    # Only affects the CPU backend: lets local CPU processes run collectives together.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(x is not None for x in explicit):
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    return True
