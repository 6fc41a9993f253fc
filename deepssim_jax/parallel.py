"""Devices, meshes and shardings: one data-parallel layout for every job.

Every heavy step is a plain `jax.jit` over a 1-D `Mesh` named "data": the batch is sharded
along its leading axis (P("data")), parameters and optimiser state are replicated (P()).
The same code runs on 1 CPU, several GPUs or a multi-host TPU slice; per-process host
batches become global arrays with `jax.make_array_from_process_local_data`.
"""

from typing import Any, Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Starts jax.distributed when running as several processes (no-op for one).

  With no arguments JAX auto-detects SLURM, Open MPI and Cloud TPU environments; explicit
  arguments are for the local launcher and custom clusters.
  """
  if jax.distributed.is_initialized():
    return
  if coordinator_address is None and num_processes in (None, 1):
    # Auto-detection only where a cluster environment is visible.
    import os
    if not any(k in os.environ for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                                         "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
      return
    if int(os.environ.get("SLURM_NTASKS", "2")) == 1:
      return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def make_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh over all (global) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree on every device of the mesh (parameters, optimiser state)."""
  return jax.device_put(tree, replicated(mesh))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
  """The share of a global batch that this process feeds; checks divisibility."""
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f"global batch {global_batch} is not divisible by the {n} devices of the "
                     "mesh; choose a multiple of the device count")
  return global_batch // jax.process_count()


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Turns this process's host batch (dict of numpy arrays) into global sharded arrays."""
  sharding = data_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def pad_to(x: np.ndarray, n: int) -> np.ndarray:
  """Pads the leading axis to n rows by repeating the last row (no recompilation)."""
  if len(x) == n:
    return x
  if len(x) > n:
    raise ValueError(f"batch of {len(x)} rows does not fit a padded size of {n}")
  if len(x) == 0:
    raise ValueError("cannot pad an empty batch")
  reps = np.repeat(x[-1:], n - len(x), axis=0)
  return np.concatenate([x, reps], axis=0)


def is_main_process() -> bool:
  return jax.process_index() == 0
