"""Embedding images with a trained DeepSSIM: jitted, data-parallel, last batch padded.

Two entry points:
* `embed_array`: an in-memory (N, H, W) stack -> (N, D) embeddings (small sets, tests).
* `embed_to_store`: any image source (NIfTI slices, PNG layouts, a manifest, a bank) ->
  an embedding store (deepssim_jax.store) written shard by shard. Each shard is a fixed
  range of source rows, so the store's layout depends only on `shard_rows`, never on the
  device or process count; a killed job skips the shards already on disk and produces
  the same store. Images are read by grain threads while the devices compute; the job
  reports images/s and the share of its time spent waiting on input.

A store records what it was made from (deepssim_jax.store, "identity"): the source's ids
and their number, shard_rows, dtype, the caller's fingerprint (checkpoint, data, image
size). A writer continues it only when all of that matches; a partial store whose
shard_rows changed is begun again, any other change is refused, naming the fields. The
store is marked complete only when its rows are exactly the source's ids, in order.

Test hook: the environment variable DEEPSSIM_STOP_AFTER_SHARDS=N makes embed_to_store stop
the job as a kill would, after writing N shards (and their partial index) in this run: it
raises StoppedByTestHook, a SystemExit with status STOP_EXIT_CODE (3), so the command exits
non-zero and no later step runs (not even the final index); the reason is logged. Tests
use it to interrupt --mode=embed, match or audit at a known point without timing.
"""

import os
import time
from typing import Any, Callable, Mapping, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from deepssim_jax import fileio, parallel, store


def make_embed_fn(model):
  """A jitted (variables, images (B, H, W)) -> L2-normalised float32 embeddings (B, D),
  whatever the model's compute dtype (compute_dtype)."""
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False).astype(jnp.float32))


def compute_dtype(model) -> str:
  """The name of the dtype a DeepSSIM model computes in ('float32' | 'bfloat16'; its
  backbone's): part of what its embeddings are made with (jobs.embed_job's store identity)."""
  return np.dtype(getattr(getattr(model, "backbone", None), "dtype", np.float32)).name


def round_batch(batch_size: int, mesh) -> int:
  """The global batch: batch_size rounded up to a multiple of the mesh's device count."""
  n_dev = mesh.devices.size
  return max(n_dev, -(-int(batch_size) // n_dev) * n_dev)


def embed_array(model, variables, images: np.ndarray, batch_size: int, mesh=None,
                progress: bool = True, embed_fn=None) -> np.ndarray:
  """Embeds an in-memory (N, H, W) stack in fixed-size batches sharded over the mesh."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  batch_size = round_batch(batch_size, mesh)
  embed_fn = make_embed_fn(model) if embed_fn is None else embed_fn
  variables = parallel.replicate(variables, mesh)
  out = []
  t0 = time.perf_counter()
  for start in tqdm(range(0, len(images), batch_size), desc="embed", unit="batch",
                    disable=not (progress and parallel.is_main_process())):
    x = np.asarray(images[start:start + batch_size], np.float32)
    n = len(x)
    # Every process holds the whole stack: each feeds its devices' rows, all get all rows.
    e = embed_fn(variables, parallel.shard_global_batch(parallel.pad_to(x, batch_size), mesh))
    out.append(parallel.fetch(e)[:n])
  dt = time.perf_counter() - t0
  logging.info("Embedded %d images in %.1f s (%.1f img/s)", len(images), dt,
               len(images) / max(dt, 1e-9))
  return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)


class BankSource:
  """An in-memory bank (keys, images) seen as a random-access image source."""

  def __init__(self, keys, images):
    self.keys = np.asarray(keys, dtype=str)
    self.images = images
    if len(self.keys) != len(images):
      raise ValueError(f"{len(self.keys)} keys for {len(images)} images")

  def __len__(self):
    return len(self.keys)

  def __getitem__(self, i):
    return np.asarray(self.images[i], np.float32)


def _shard_batches(source, start: int, stop: int, global_batch: int) -> grain.MapDataset:
  """This process's contiguous slice of each global batch of rows [start, stop).

  The last batch is padded by repeating row stop - 1 (no recompilation); the padding rows
  are dropped after the forward pass.
  """
  nproc, pid = jax.process_count(), jax.process_index()
  local = global_batch // nproc
  steps = -(-(stop - start) // global_batch)

  def row(q):
    i = start + (q // local) * global_batch + pid * local + q % local
    return source[min(i, stop - 1)]

  return grain.MapDataset.range(steps * local).map(row).batch(local, drop_remainder=True)


def _gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array as one host numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


STOP_ENV = "DEEPSSIM_STOP_AFTER_SHARDS"
STOP_EXIT_CODE = 3


class StoppedByTestHook(SystemExit):
  """Raised after DEEPSSIM_STOP_AFTER_SHARDS shards: a SystemExit with status
  STOP_EXIT_CODE (an integer status, so entrypoints do not report it as a user error);
  str() is the reason."""

  def __init__(self, message: str):
    super().__init__(STOP_EXIT_CODE)
    self.message = message

  def __str__(self):
    return self.message


def _stop_after_env() -> Optional[int]:
  value = os.environ.get(STOP_ENV, "").strip()
  if not value:
    return None
  try:
    n = int(value)
  except ValueError:
    raise ValueError(f"{STOP_ENV}={value!r}: expected a number of shards") from None
  if n < 1:
    raise ValueError(f"{STOP_ENV}={value!r}: expected a number of shards >= 1")
  return n


def _todo_shards(folder: str, num_shards: int,
                 prepare: Optional[Callable[[], list[int]]] = None) -> list[int]:
  """Shards still to write; process 0 decides (it alone sees the store) and tells all.

  prepare: process 0's check of the folder, returning the shards done
  (store.prepare_writer); default: the valid shards on disk (store.completed_shards). If
  it refuses the store, every process raises.
  """
  done = np.zeros(num_shards + 1, np.int32)  # the last entry: 1 if process 0 refused
  error = None
  if parallel.is_main_process():
    try:
      for i in (prepare() if prepare else store.completed_shards(folder)):
        if i < num_shards:
          done[i] = 1
    except fileio.InputError as e:
      error, done[-1] = e, 1
  if jax.process_count() > 1:
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  if error is not None:
    raise error
  if done[-1]:
    raise fileio.InputError(f"{folder}: process 0 refused the store (see its log)")
  return [i for i in range(num_shards) if not done[i]]


def embed_to_store(embed_fn: Callable, variables: Any, source, folder: str, *,
                   batch_size: int, shard_rows: int, fingerprint: str,
                   meta: Optional[Mapping[str, Any]] = None, dtype: str = "float32",
                   mesh=None, num_threads: int = 4, prefetch: int = 4,
                   progress: bool = True, stop_after_shards: Optional[int] = None,
                   identity: Optional[Mapping[str, Any]] = None) -> dict:
  """Embeds every image of a source into an embedding store, resumably.

  The store's identity (meta["identity"]) is {"n_source", "source_ids" (store.
  ids_fingerprint of the keys), "shard_rows", "dtype", "fingerprint"} plus `identity`. An
  existing store is continued only if its identity is the same; a partial one that differs
  only in shard_rows is begun again; otherwise InputError naming what changed, before any
  file is touched (store.prepare_writer). The store is marked complete only when its ids
  are the source's keys, in order. The batch size is not part of the identity: it changes
  the embeddings only in the last bits.

  Args:
    embed_fn: jitted (variables, (B, H, W)) -> (B, D) (make_embed_fn).
    variables: model variables (replicated here).
    source: random-access images with `keys` (unique strings) and `__getitem__(i)` ->
      (H, W) float32 z-scored image (deepssim_jax.data sources, BankSource).
    folder: the store folder.
    batch_size: global batch (rounded up to a multiple of the device count).
    shard_rows: source rows per shard (fixes the store's layout).
    fingerprint: identifies model + checkpoint + data (a hash of inputs and settings, not
      of embeddings); a store begun with another one is refused instead of being silently
      mixed.
    meta: recorded in the store's index (checkpoint, data root, ...).
    dtype: "float32" or "float16" storage.
    mesh: the data-parallel mesh (default: all devices).
    num_threads, prefetch: grain reading threads and batches read ahead.
    progress: tqdm bar (process 0 only).
    stop_after_shards: return after writing this many shards (tests of resumption; the
      environment variable DEEPSSIM_STOP_AFTER_SHARDS instead stops the job as a kill
      would: see the module docstring).
    identity: more of what the store is made from (checkpoint fingerprint, data root,
      image size, ...; JSON values), each checked by name when the store is continued.

  Returns:
    {"n", "folder", "written", "skipped", "seconds", "images_per_s",
     "input_wait_fraction", "complete", "index"} (index only once complete).

  Raises:
    InputError: an empty source, or a store in `folder` made from other inputs.
    StoppedByTestHook: DEEPSSIM_STOP_AFTER_SHARDS shards were written.
  """
  keys = np.asarray(source.keys, dtype=str)
  n = len(keys)
  if n == 0:
    raise fileio.InputError(f"{folder}: the image set to embed is empty")
  if shard_rows <= 0:
    raise ValueError(f"shard_rows must be positive, got {shard_rows}")
  if dtype not in ("float32", "float16"):
    raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
  mesh = parallel.make_mesh() if mesh is None else mesh
  global_batch = round_batch(batch_size, mesh)
  if global_batch % jax.process_count():
    raise ValueError(f"global batch {global_batch} not divisible by {jax.process_count()} "
                     "processes")
  stop_env = _stop_after_env()
  variables = parallel.replicate(variables, mesh)
  num_shards = -(-n // shard_rows)
  ident = {**dict(identity or {}), "fingerprint": fingerprint, "n_source": int(n),
           "source_ids": store.ids_fingerprint(keys), "shard_rows": int(shard_rows),
           "dtype": dtype}
  meta = dict(meta or {}, fingerprint=fingerprint, shard_rows=int(shard_rows),
              n_source=int(n), identity=ident)
  all_todo = _todo_shards(folder, num_shards,
                          lambda: store.prepare_writer(folder, ident, meta))
  todo = all_todo if stop_after_shards is None else all_todo[:stop_after_shards]
  main = parallel.is_main_process()
  rows_todo = sum(min(n, (s + 1) * shard_rows) - s * shard_rows for s in todo)
  logging.info("Embedding %d images into %s: %d of %d shards to write (batch %d on %d "
               "devices)", n, folder, len(todo), num_shards, global_batch, mesh.devices.size)
  bar = tqdm(total=rows_todo, desc="embed", unit="img", disable=not (progress and main))
  wait = 0.0
  t0 = time.perf_counter()
  for s in todo:
    start, stop = s * shard_rows, min(n, (s + 1) * shard_rows)
    ds = _shard_batches(source, start, stop, global_batch).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    it = iter(ds)
    outs = []
    for b in range(-(-(stop - start) // global_batch)):
      tw = time.perf_counter()
      x = next(it)
      wait += time.perf_counter() - tw
      e = embed_fn(variables, parallel.shard_batch(np.asarray(x, np.float32), mesh))
      valid = min(global_batch, stop - start - b * global_batch)
      outs.append(_gather(e)[:valid])
      bar.update(valid)
    if main:
      store.write_shard(folder, s, keys[start:stop], np.concatenate(outs).astype(dtype))
      store.finalize(folder, meta, complete=False)
    written = todo.index(s) + 1
    if stop_env is not None and written >= stop_env:
      bar.close()
      msg = (f"{STOP_ENV}={stop_env}: stopped after writing {written} shard(s) of {folder} "
             "(test hook)")
      logging.warning(msg)
      raise StoppedByTestHook(msg)
  bar.close()
  seconds = time.perf_counter() - t0
  out = {"n": n, "folder": folder, "written": len(todo),
         "skipped": num_shards - len(all_todo),
         "seconds": seconds, "images_per_s": rows_todo / max(seconds, 1e-9),
         "input_wait_fraction": wait / max(seconds, 1e-9), "complete": False}
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("embed_to_store:" + folder)
  complete = len(_todo_shards(folder, num_shards)) == 0
  if complete and main:
    # Checks that the rows are the source's ids in order; an index with the same content
    # (a complete store reused) is not rewritten.
    out["index"] = store.finalize(folder, meta, complete=True, source_ids=keys)
  parallel.sync("embed_to_store finalized:" + folder)  # others may read the store next (match)
  out["complete"] = complete
  logging.info("Embedded %d images in %.1f s: %.1f img/s, %.0f%% of the time waiting on "
               "input%s", rows_todo, seconds, out["images_per_s"],
               100 * out["input_wait_fraction"], "" if complete else " (store incomplete)")
  return out


def cosine_pairs(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
  """Row-wise cosine of already-normalised embeddings."""
  return np.sum(np.asarray(emb_a, np.float64) * np.asarray(emb_b, np.float64), axis=-1)
