"""Pair tables: the (training image, synthetic image, SSIM) rows DeepSSIM learns from.

A pair table is a CSV with columns real_key, synth_key, ssim, split (train / valid); keys
refer to the images of two image banks (the real/training set and the synthetic set). The
build job samples pairs, computes their SSIM targets on device in batches, optionally after
a rigid alignment of the synthetic image to the real one (the paper's phi), and writes the table
atomically. Labelled evaluation pairs use the same key columns plus `label`.
"""

import dataclasses
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from deepssim_jax import fileio, parallel, ssim as ssim_lib

PAIR_COLUMNS = ("real_key", "synth_key", "ssim", "split")
SPLITS = ("train", "valid")


@dataclasses.dataclass(frozen=True)
class PairTable:
  real_key: np.ndarray   # (P,) str
  synth_key: np.ndarray  # (P,) str
  ssim: np.ndarray       # (P,) float32
  split: np.ndarray      # (P,) str

  def __len__(self):
    return len(self.ssim)

  def select(self, split: str) -> "PairTable":
    m = self.split == split
    return PairTable(self.real_key[m], self.synth_key[m], self.ssim[m], self.split[m])


def read_pairs(path: str) -> PairTable:
  """Reads and validates a pair table (columns real_key, synth_key, ssim, split)."""
  t = fileio.read_csv(path, required=PAIR_COLUMNS)
  if not t["ssim"]:
    raise fileio.InputError(f"{path}: the pair table has no rows")
  s = fileio.float_column(path, t, "ssim").astype(np.float32)
  if s.min() < -1 - 1e-5 or s.max() > 1 + 1e-5:
    i = int(np.argmax(np.abs(s) > 1 + 1e-5))
    raise fileio.InputError(f"{path}: line {i + 2}: ssim {s[i]} outside [-1, 1]")
  split = np.asarray(t["split"])
  bad = ~np.isin(split, SPLITS)
  if bad.any():
    i = int(np.argmax(bad))
    raise fileio.InputError(f"{path}: line {i + 2}: split {str(split[i])!r} is not one of {SPLITS}")
  return PairTable(np.asarray(t["real_key"]), np.asarray(t["synth_key"]), s, split)


def write_pairs(path: str, table: PairTable) -> None:
  fileio.write_csv(path, PAIR_COLUMNS,
               zip(table.real_key, table.synth_key, table.ssim.astype(float), table.split))


def sample_pairs(num_real: int, num_synth: int, num_pairs: int, seed: int,
                 source_index: Optional[np.ndarray] = None, matched_fraction: float = 0.25,
                 valid_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Samples distinct (real, synth) index pairs and a train/valid split.

  Uniform pairs are mostly unrelated images with low SSIM; where the synthetic set knows the
  training image each synthetic image derives from (`source_index`, -1 for none), a share
  `matched_fraction` of the pairs is (source, synthetic), so high-SSIM targets are present.
  The split is by synthetic image: every pair of a synthetic image is in the same split.

  Returns:
    (real_idx, synth_idx, is_valid) arrays of the same length <= num_pairs.
  """
  rng = np.random.default_rng(seed)
  total = num_real * num_synth
  num_pairs = min(num_pairs, total)
  chosen = set()
  if source_index is not None:
    has = np.flatnonzero(np.asarray(source_index) >= 0)
    n_matched = min(int(round(matched_fraction * num_pairs)), len(has))
    for j in rng.choice(has, n_matched, replace=False):
      chosen.add(int(source_index[j]) * num_synth + int(j))
  while len(chosen) < num_pairs:
    need = num_pairs - len(chosen)
    for flat in rng.integers(0, total, size=2 * need + 16):
      chosen.add(int(flat))
      if len(chosen) == num_pairs:
        break
  flat = np.sort(np.fromiter(chosen, np.int64))
  flat = flat[rng.permutation(len(flat))]
  real_idx, synth_idx = flat // num_synth, flat % num_synth
  valid_synth = rng.random(num_synth) < valid_fraction
  if valid_fraction > 0 and num_synth > 1 and not valid_synth[synth_idx].any():
    valid_synth[synth_idx[0]] = True  # at least one validation image, however small the set
  return real_idx, synth_idx, valid_synth[synth_idx]


def balance_targets(targets: np.ndarray, num: int, bins: int, seed: int,
                    repeat: bool = False) -> np.ndarray:
  """Indices of `num` of the pairs whose target histogram over `bins` equal bins of [0, 1]
  is as flat as the pool allows (targets below 0 count in the first bin, above 1 in the last).

  Water-filling: every bin gets an equal share of what is left; a bin holding fewer pairs
  than its share gives all of them and the rest is shared among the other bins. Which pairs
  of a bin are kept is random (seeded). Returns sorted indices.

  repeat=True: every non-empty bin gets an equal share (num // its count, the remainder to
  the first bins), a bin with fewer pairs repeating them (each pair as evenly often as the
  share allows), so the histogram is flat and the scarce high-target pairs weigh as much as
  the common low ones; `num` is not capped at the pool's size.
  """
  if bins < 1:
    raise ValueError(f"pairs.balance_bins must be >= 1 (got {bins})")
  which = np.clip((np.asarray(targets) * bins).astype(np.int64), 0, bins - 1)
  members = [np.flatnonzero(which == b) for b in range(bins)]
  if repeat:
    rng = np.random.default_rng(seed)
    full = [m for m in members if len(m)]
    if not full:
      return np.zeros(0, np.int64)
    quota = np.full(len(full), num // len(full)) + (np.arange(len(full)) < num % len(full))
    chosen = [np.concatenate([rng.permutation(m) for _ in range(-(-q // len(m)))])[:q]
              for m, q in zip(full, quota)]
    return np.sort(np.concatenate(chosen))
  num = min(num, len(targets))
  quota = np.zeros(bins, np.int64)
  left, open_bins = num, [b for b in range(bins) if len(members[b])]
  while left and open_bins:
    share = max(left // len(open_bins), 1)
    for b in sorted(open_bins, key=lambda b: len(members[b]) - quota[b]):
      take = min(share, len(members[b]) - quota[b], left)
      quota[b] += take
      left -= take
    open_bins = [b for b in open_bins if quota[b] < len(members[b])]
  rng = np.random.default_rng(seed)
  chosen = [rng.choice(m, q, replace=False) for m, q in zip(members, quota) if q]
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def compute_ssim(real_images: np.ndarray, synth_images: np.ndarray, real_idx: np.ndarray,
                 synth_idx: np.ndarray, batch_size: int = 1024, align: bool = False,
                 align_angles: tuple = (), align_flips: bool = True,
                 mesh=None, progress: bool = True) -> np.ndarray:
  """SSIM (optionally after aligning the synthetic image to the real one) of indexed pairs.

  Both banks (z-scored, (N, H, W)) live on every device; each batch of index pairs is
  sharded over the mesh and padded to a fixed size, so one program serves every batch.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  n_dev = mesh.devices.size
  batch_size = max(n_dev, batch_size // n_dev * n_dev)
  real_dev = parallel.replicate(jnp.asarray(real_images, jnp.float32), mesh)
  synth_dev = parallel.replicate(jnp.asarray(synth_images, jnp.float32), mesh)
  if align:
    banks = (real_dev, synth_dev)
  else:  # per-image moments once; only the cross term per pair
    banks = (ssim_lib.image_stats(real_dev), ssim_lib.image_stats(synth_dev))
  angles = jnp.asarray(align_angles if align_angles else (0.0,), jnp.float32)

  @jax.jit
  def batch_fn(banks, ia, ib):  # banks are arguments, never constants folded into the HLO
    if align:
      return ssim_lib.aligned_ssim(banks[0][ia], banks[1][ib], angles, flips=align_flips)[0]
    return ssim_lib.ssim_indexed(banks[0], banks[1], ia, ib)

  out = np.empty(len(real_idx), np.float32)
  t0 = time.perf_counter()
  bar = tqdm(total=len(out), desc="SSIM targets", unit="pair",
             disable=not (progress and parallel.is_main_process()),
             smoothing=0.1)
  for start in range(0, len(out), batch_size):
    stop = min(start + batch_size, len(out))
    ia = parallel.pad_to(real_idx[start:stop], batch_size)
    ib = parallel.pad_to(synth_idx[start:stop], batch_size)
    ia, ib = parallel.shard_global_batch((ia, ib), mesh)  # every process holds all pairs
    out[start:stop] = parallel.fetch(batch_fn(banks, ia, ib))[:stop - start]
    bar.update(stop - start)
  bar.close()
  logging.info("SSIM targets: %d pairs in %.1f s (%.0f pairs/s)", len(out),
               time.perf_counter() - t0, len(out) / max(time.perf_counter() - t0, 1e-9))
  return out


def _add_self_pairs(ia, ib, is_valid, s, n: int, n_self: int, valid_fraction: float,
                    seed: int):
  """Appends n_self (i, i) rows with target 1, images in a seeded cyclic order; an image
  keeps the split its other pairs have (the split is by image), else a seeded draw."""
  rng = np.random.default_rng(seed + 7)
  valid = rng.random(n) < valid_fraction
  valid[ib] = False
  valid[ib[is_valid]] = True
  idx = np.resize(rng.permutation(n), n_self)
  order = rng.permutation(len(ia) + n_self)
  cat = lambda a, b: np.concatenate([a, b])[order]  # noqa: E731
  return (cat(ia, idx), cat(ib, idx), cat(is_valid, valid[idx]),
          cat(s, np.ones(n_self, np.float32)))


def build_pair_table(real_bank: dict, synth_bank: dict, *, num_pairs: int, seed: int,
                     matched_fraction: float, valid_fraction: float, batch_size: int,
                     align: bool, align_angles: tuple, align_flips: bool,
                     balance_bins: int = 0, pool_factor: float = 4.0,
                     balance_repeat: bool = False, self_fraction: float = 0.0,
                     mesh=None) -> PairTable:
  """Samples pairs between two image banks and computes their SSIM targets.

  Banks are dicts with `keys` (N,) and z-scored `images` (N, H, W); the synthetic bank may
  carry meta `source_key` (the training image it derives from) to oversample matched pairs.

  balance_bins > 0 (ours, not the reference's uniform sampling): targets are computed for a
  pool of pool_factor x num_pairs sampled pairs, and num_pairs of them are kept so that the
  targets spread as evenly as the pool allows over balance_bins bins of [0, 1]
  (`balance_targets`); balance_repeat: exactly evenly, the scarce bins' pairs repeated.

  self_fraction > 0 (pairs within one set, real_bank is synth_bank): that share of the rows
  pairs an image with itself (target 1), every image in turn (rows repeat when there are
  more such rows than images; added after sampling and balancing). Training augments each
  branch independently, so these become the flipped / rotated / contrast-changed copies a
  Duplicate stands for.

  Uniform pairs of a real data set are almost all unrelated images
  (SSIM 0.1-0.4); the memorization decision lives at 0.6-1, where a uniform table has few
  pairs to learn from.
  """
  for name, bank in (("real", real_bank), ("synthetic", synth_bank)):
    if len(bank["keys"]) == 0:
      raise fileio.InputError(f"the {name} image set is empty")
  if real_bank["images"].shape[1:] != synth_bank["images"].shape[1:]:
    raise fileio.InputError(f"image sizes differ: real {real_bank['images'].shape[1:]} vs "
                        f"synthetic {synth_bank['images'].shape[1:]}")
  if self_fraction > 0 and synth_bank is not real_bank:
    raise ValueError("self_fraction applies to pairs within one set (no synthetic set)")
  n_self = int(round(self_fraction * num_pairs))
  num_pairs -= n_self
  source_index = None
  src = synth_bank.get("meta", {}).get("source_key")
  if src is not None:
    source_index = fileio.key_rows(real_bank["keys"], src, "the real image set", missing=-1)
  pool = int(round(num_pairs * pool_factor)) if balance_bins else num_pairs
  ia, ib, is_valid = sample_pairs(len(real_bank["keys"]), len(synth_bank["keys"]), pool,
                                  seed, source_index, matched_fraction, valid_fraction)
  s = compute_ssim(real_bank["images"], synth_bank["images"], ia, ib, batch_size=batch_size,
                   align=align, align_angles=align_angles, align_flips=align_flips, mesh=mesh)
  if balance_bins:
    keep = balance_targets(s, num_pairs, balance_bins, seed, repeat=balance_repeat)
    keep = keep[np.random.default_rng(seed).permutation(len(keep))]
    ia, ib, is_valid, s = ia[keep], ib[keep], is_valid[keep], s[keep]
    logging.info("Balanced pairs: %d of a pool of %d; targets per bin %s", len(keep), pool,
                 np.histogram(np.clip(s, 0, 1), balance_bins, (0, 1))[0].tolist())
  if n_self:
    ia, ib, is_valid, s = _add_self_pairs(ia, ib, is_valid, s, len(real_bank["keys"]),
                                          n_self, valid_fraction, seed)
  split = np.where(is_valid, "valid", "train")
  return PairTable(np.asarray(real_bank["keys"])[ia], np.asarray(synth_bank["keys"])[ib], s,
                   split)
