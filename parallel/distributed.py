"""Multi-host start-up: one process per host, `jax.distributed` initialised from the environment, each host
loading only its own rows of a global batch.

Explicit configuration (any launcher): JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID
(optionally JAX_LOCAL_DEVICE_IDS=0,1,...). Without it, clusters JAX recognises (SLURM, Open MPI, Cloud TPU
pods, GKE TPU slices) are auto-detected by `jax.distributed.initialize()` itself; anything else is a single
process and nothing is initialised.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import numpy as np

CLUSTER_MARKERS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                   "CLOUD_TPU_TASK_ID")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None  # None: let JAX detect the cluster
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None = None


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def config_from_env(env: Mapping[str, str] | None = None) -> DistributedConfig | None:
    """What `initialize` would do: an explicit config, an auto-detected cluster (all fields None), or None for
    a single process. Inconsistent settings raise one-line errors before anything connects."""
    env = os.environ if env is None else env
    address = env.get("JAX_COORDINATOR_ADDRESS")
    num, pid = _int(env, "JAX_NUM_PROCESSES"), _int(env, "JAX_PROCESS_ID")
    local = env.get("JAX_LOCAL_DEVICE_IDS")
    local_ids = tuple(int(i) for i in local.split(",")) if local else None
    if address:
        if ":" not in address:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port")
        if num is None or pid is None:
            raise ValueError("JAX_COORDINATOR_ADDRESS is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID are needed too")
        if not 0 <= pid < num:
            raise ValueError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={num})")
        return DistributedConfig(address, num, pid, local_ids)
    if num is not None or pid is not None:
        raise ValueError("JAX_NUM_PROCESSES / JAX_PROCESS_ID are set without JAX_COORDINATOR_ADDRESS")
    if any(env.get(m) for m in CLUSTER_MARKERS) and int(env.get("SLURM_NTASKS", env.get("OMPI_COMM_WORLD_SIZE", 2))) > 1:
        return DistributedConfig(None, None, None, local_ids)
    return None


def initialize(env: Mapping[str, str] | None = None) -> bool:
    """Start `jax.distributed` as the environment says (before anything else touches devices); True if this is
    now one process of several."""
    cfg = config_from_env(env)
    if cfg is None:
        return False
    if cfg.coordinator_address is None:
        jax.distributed.initialize(local_device_ids=cfg.local_device_ids)
    else:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id, local_device_ids=cfg.local_device_ids)
    return jax.process_count() > 1


def host_rows(global_batch: int, process_id: int | None = None, process_count: int | None = None) -> slice:
    """The rows of a global batch this host loads (contiguous, equal shares): per-host data loading."""
    pid = jax.process_index() if process_id is None else process_id
    count = jax.process_count() if process_count is None else process_count
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} does not split evenly over {count} hosts")
    share = global_batch // count
    return slice(pid * share, (pid + 1) * share)


def global_batch(local_rows: np.ndarray, sharding: jax.sharding.NamedSharding, global_rows: int) -> jax.Array:
    """One global array from every host's own rows (`host_rows`), sharded as asked; no host sees the others'
    data. With one process this is just a `device_put`."""
    shape = (global_rows,) + tuple(local_rows.shape[1:])
    return jax.make_array_from_process_local_data(sharding, np.asarray(local_rows), shape)
