"""Devices, meshes and shardings: one data-parallel layout for every job.

Every heavy step is a plain `jax.jit` over a 1-D `Mesh` named "data": the batch is sharded
along its leading axis (P("data")), parameters and optimiser state are replicated (P()).
The same code runs on 1 CPU, several GPUs or a multi-host TPU slice; per-process host
batches become global arrays with `jax.make_array_from_process_local_data`.
"""

import glob
import importlib.util
import os
from typing import Any, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def _env_int(name: str) -> Optional[int]:
  v = os.environ.get(name)
  return int(v) if v not in (None, "") else None


def _cluster_detected() -> bool:
  """Whether a multi-process cluster environment that jax.distributed detects is visible."""
  if "SLURM_PROCID" in os.environ and "SLURM_STEP_NODELIST" in os.environ:
    # Only inside an srun step of several tasks: srun sets SLURM_STEP_NUM_TASKS. A command
    # run directly in the batch script is one process, whatever the job's SLURM_NTASKS.
    return (_env_int("SLURM_STEP_NUM_TASKS") or 1) > 1
  if "OMPI_COMM_WORLD_SIZE" in os.environ:
    return int(os.environ["OMPI_COMM_WORLD_SIZE"]) > 1
  if any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                                   "MEGASCALE_COORDINATOR_ADDRESS")):
    return True
  # A Cloud TPU VM (libtpu installed, TPU chips attached): JAX asks the metadata server
  # for the worker count; a single-host slice then simply runs as one process.
  return (importlib.util.find_spec("libtpu") is not None and
          bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Starts jax.distributed when running as several processes (no-op for one).

  Must run before any other JAX call. Where the settings come from, first match wins:
    1. the arguments (main.py's --coordinator_address/--num_processes/--process_id);
    2. JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (launch/local.py sets
       them, so any entrypoint that calls this function runs under the local launcher);
    3. a cluster JAX detects by itself (`jax.distributed.initialize()` with no arguments):
       SLURM under srun with more than one task, Open MPI, Cloud TPU VMs / GKE TPU slices;
    4. otherwise a single process, nothing to start.
  Several processes on CPU (the local launcher, CPU clusters) need cross-process
  collectives: gloo is selected unless JAX_CPU_COLLECTIVES_IMPLEMENTATION says otherwise
  (the setting only concerns JAX's CPU client, so it is harmless on GPU/TPU hosts).
  """
  if jax.distributed.is_initialized():
    return
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  cluster = _cluster_detected()
  if not explicit and not cluster:
    return
  if not cluster and None in (coordinator_address, num_processes, process_id):
    raise ValueError("multi-process run: give the coordinator address, the number of "
                     f"processes and this process's id (got {coordinator_address!r}, "
                     f"{num_processes!r}, {process_id!r})")
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO chatter of orbax (dozens of lines per checkpoint); warnings still pass."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def setup_logging() -> None:
  """Entrypoint logging: no orbax INFO lines; processes other than 0 log warnings only
  (process 0 logs and shows progress bars)."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if not is_main_process():
    logging.set_verbosity(logging.WARNING)


def make_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh over all (global) devices.

  Devices are ordered by process, so process p owns the p-th contiguous block of every
  batch-sharded array: the block its input pipeline reads (pipeline._process_share).
  """
  devices = jax.devices() if devices is None else devices
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
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


def shard_global_batch(batch: Any, mesh: Mesh) -> Any:
  """Like shard_batch, for host arrays every process holds whole (the same global batch).

  Each process copies in only the rows its devices own; with one process this equals
  shard_batch.
  """
  sharding = data_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                             lambda idx, x=np.asarray(x): x[idx]), batch)


def fetch(tree: Any) -> Any:
  """Host numpy copies of (possibly multi-process) global arrays, on every process.

  Arrays sharded over other processes' devices are all-gathered (a collective: every
  process must call it); addressable or replicated ones are simply copied.
  """
  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)


def sync(name: str) -> None:
  """A barrier across processes (no-op for one), e.g. after process 0 wrote a file that
  every process reads next."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


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
