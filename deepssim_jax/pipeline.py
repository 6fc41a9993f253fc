"""grain input pipelines: pair batches for training and evaluation, image batches for embedding.

Image banks live in .npy files opened as memory maps, so worker processes share pages
instead of copies and a bank larger than memory still works. Pipelines are grain
MapDatasets (random access, seeded shuffle, per-epoch reshuffle, sharding by process),
so the batch at position i is a pure function of (seed, i): resuming at a step replays
exactly the batches an uninterrupted run would have seen. Batches are dicts of numpy
arrays with fixed keys (image_a, image_b, ssim, weight).
"""

import os
from typing import Iterator

import grain
import jax
import numpy as np

from deepssim_jax import fileio


def save_bank_arrays(folder: str, name: str, bank: dict) -> str:
  """Writes a bank's images as <folder>/<name>.npy (atomically) for memory-mapped reading,
  only when missing or stale: <name>.npy.record.json holds the fingerprint of the bank it
  was written from (the bank's `fingerprint`, banks.bank, else a hash of its images), so a
  rerun (e.g. --mode=evaluate on a finished, possibly read-only, workdir) writes nothing."""
  from deepssim_jax import banks  # local: keep this module light
  path = os.path.join(folder, f"{name}.npy")
  images = bank["images"]
  fp = bank.get("fingerprint") or fileio.fingerprint(np.asarray(images, np.float32))
  record = {"bank": fp, "shape": [int(s) for s in np.shape(images)]}
  if os.path.isfile(path) and banks.read_record(path) == record:
    try:
      on_disk = np.load(path, mmap_mode="r")
      if list(on_disk.shape) == record["shape"] and on_disk.dtype == np.float32:
        return path
    except (OSError, ValueError):
      pass  # unreadable: written again
  banks.drop_record(path)
  fileio.write_npy(path, np.ascontiguousarray(images, np.float32))
  banks.write_record(path, record)
  return path


class PairSource:
  """grain random-access source of (image_a, image_b, ssim) from two memory-mapped banks."""

  def __init__(self, real_path: str, synth_path: str, real_idx: np.ndarray,
               synth_idx: np.ndarray, ssim: np.ndarray):
    self.real_path, self.synth_path = real_path, synth_path
    self.real_idx = np.asarray(real_idx, np.int64)
    self.synth_idx = np.asarray(synth_idx, np.int64)
    self.ssim = np.asarray(ssim, np.float32)
    self._open()

  def _open(self):
    self._real = np.load(self.real_path, mmap_mode="r")
    self._synth = np.load(self.synth_path, mmap_mode="r")

  def __getstate__(self):
    d = dict(self.__dict__)
    d.pop("_real"), d.pop("_synth")
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._open()

  def __len__(self):
    return len(self.ssim)

  def __getitem__(self, i):
    return {"image_a": np.asarray(self._real[self.real_idx[i]]),
            "image_b": np.asarray(self._synth[self.synth_idx[i]]),
            "ssim": self.ssim[i], "weight": np.float32(1.0)}


def train_dataset(source: PairSource, *, global_batch: int, num_epochs: int, seed: int
                  ) -> grain.MapDataset:
  """Shuffled (reshuffled every epoch), repeated, process-sharded, batched pairs.

  Every process reads a disjoint strided share of each global batch, so the global batch
  assembled from all processes is the same whatever the process count.
  """
  if global_batch % jax.process_count():
    raise ValueError(f"global batch {global_batch} is not divisible by "
                     f"{jax.process_count()} processes")
  if len(source) < global_batch:
    raise fileio.InputError(f"only {len(source)} training pairs, fewer than one batch of "
                        f"{global_batch}: lower the batch size or add pairs")
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(num_epochs)
  return _process_share(ds, global_batch)


def _process_share(ds: grain.MapDataset, global_batch: int) -> grain.MapDataset:
  """This process's contiguous slice of every global batch, batched.

  Process p reads rows [p * b, (p + 1) * b) of each global batch (b = global / processes),
  so `make_array_from_process_local_data` reassembles the global batch in its original row
  order: per-row random keys, hence results, do not depend on the process count.
  """
  nproc, pid = jax.process_count(), jax.process_index()
  local = global_batch // nproc
  steps = len(ds) // global_batch
  local_ds = grain.MapDataset.range(steps * local).map(
      lambda q: ds[(q // local) * global_batch + pid * local + q % local])
  return local_ds.batch(local, drop_remainder=True)


def eval_dataset(source: PairSource, *, global_batch: int) -> grain.MapDataset:
  """Every pair once, in order; the last batch padded with weight-0 rows (no recompile)."""
  n = len(source)
  padded = -(-n // global_batch) * global_batch
  base = grain.MapDataset.source(source)

  def fetch(i):
    item = base[min(i, n - 1)]
    if i >= n:
      item = dict(item, weight=np.float32(0.0))
    return item

  return _process_share(grain.MapDataset.range(padded).map(fetch), global_batch)


def iterate(ds: grain.MapDataset, start: int = 0, num_workers: int = 0,
            prefetch: int = 2) -> Iterator[dict]:
  """Iterates batches from position `start`, optionally with worker processes."""
  ds = ds[start:]
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it_ds)


def pair_source(table, real_bank_path: str, synth_bank_path: str, real_keys: np.ndarray,
                synth_keys: np.ndarray, source_name: str = "pair table") -> PairSource:
  """A PairSource for the rows of a PairTable, resolving keys against the banks."""
  ia = fileio.key_rows(real_keys, table.real_key, f"the real image set ({real_bank_path})",
                       csv_file=source_name)
  ib = fileio.key_rows(synth_keys, table.synth_key,
                       f"the synthetic image set ({synth_bank_path})", csv_file=source_name)
  return PairSource(real_bank_path, synth_bank_path, ia, ib, table.ssim)
