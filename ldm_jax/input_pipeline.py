"""Training records of the latent diffusion model: images, covariates and duplication.

A record is one unique training image: key (e.g. "IXI002-Guys-0828-T1/z070"), uid (the key
with "/" replaced by "-", its folder name in the generation layout), the image (scaled by
data.intensity: min-max to [0, 1] as the reference, or z-scored) and, for conditioned
models, six covariates (age, sex, sequence, CSF, WM and GM fractions) or a caption
embedding (`read_text_embeddings`). data.valid_fraction holds out whole subjects as the
validation split (`valid_subjects`).

* Images come from deepssim_jax.banks (IXI/any NIfTI volumes, PNG layouts, or the embedded
  demo set), cached in the workdir as an .npz, so every job of a run reads the same records.
* Covariates come from a CSV (`read_covariates`: columns key, age, sex, sequence, csf, wm,
  gm; sex M/F or 0/1, sequence a name of cond.sequences or its index). IXI gives age, sex
  and sequence but no tissue fractions (they need a segmentation, e.g. FSL FAST or
  SynthSeg), so IXI runs need the CSV. For the embedded demo data `synthetic_covariates`
  makes one deterministically (documented as synthetic: age and sex drawn per head from a
  seeded generator, sequence T1, fractions = shares of the head's foreground pixels in the
  low / middle / high third of its intensity range, T1 contrast: CSF dark, WM bright).
* Duplication (the memorization-prone setting of the study): each unique image is repeated
  k times, k ~ U{lo..hi} per image ("low": 1..4, "high": 1..14, "none": 1), seeded;
  `write_duplication_csv` records the counts beside the run.
"""

import os
import zipfile
import zlib
from typing import Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging

from deepssim_jax import banks, fileio, parallel

COVARIATES = ("age", "sex", "sequence", "csf", "wm", "gm")
SEXES = {"m": 0.0, "male": 0.0, "f": 1.0, "female": 1.0}


def uid_of(key: str) -> str:
  """The generation-layout folder name of a record key ("a/z070" -> "a-z070")."""
  return str(key).replace("/", "-")


INTENSITIES = ("zscore", "minmax")
SPLITS = ("train", "valid")


def scale_intensity(images: np.ndarray, mode: str) -> np.ndarray:
  """The images as the networks see them (data.intensity).

  "zscore": as read (deepssim_jax's banks z-score every slice); "minmax": each image scaled
  to [0, 1], as the reference's MONAI ScaleIntensityd(minv=0, maxv=1). A z-score is an
  increasing affine map, so min-max scaling the z-scored slice gives the min-max scaling of
  the raw one.
  """
  if mode not in INTENSITIES:
    raise ValueError(f"data.intensity {mode!r}: expected one of {INTENSITIES}")
  images = np.asarray(images, np.float32)
  if mode == "zscore":
    return images
  lo = images.min(axis=(1, 2), keepdims=True)
  hi = images.max(axis=(1, 2), keepdims=True)
  return (images - lo) / np.maximum(hi - lo, np.finfo(np.float32).tiny)


def subject_of(key: str) -> str:
  """The subject (volume) of a record key: the part before the first "/"."""
  return str(key).split("/", 1)[0]


def valid_subjects(keys: Sequence[str], fraction: float, seed: int) -> set[str]:
  """The subjects held out for validation: ceil(fraction * subjects) of them, chosen by a
  seeded CRC32 order of their names (stable when records are added or reordered), at
  least one subject left for training. Splitting by subject keeps slices of one head on one
  side (neighbouring slices are near copies)."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"data.valid_fraction {fraction}: expected 0 <= fraction < 1")
  subjects = sorted({subject_of(k) for k in keys})
  n = min(int(np.ceil(fraction * len(subjects))), len(subjects) - 1)
  order = sorted(subjects, key=lambda s: (zlib.crc32(f"{seed}:{s}".encode()), s))
  return set(order[:max(n, 0)])


def load_records(config: ml_collections.ConfigDict, workdir: str, split: str = "train"
                 ) -> dict:
  """The unique images of a run's split: dict(keys, uids, images (N, H, W) float32, meta).

  Read once (through deepssim_jax.banks) and cached as <workdir>/training.npz.
  config.data.max_images > 0 keeps the first that many (tests, quick runs);
  config.data.valid_fraction holds out whole subjects for validation (valid_subjects;
  split "valid"); config.data.intensity scales the images (scale_intensity).

  Raises:
    InputError: the split is empty.
  """
  if split not in SPLITS:
    raise ValueError(f"split {split!r}: expected one of {SPLITS}")
  os.makedirs(workdir, exist_ok=True)
  b = banks.bank(config.data.train, config, workdir, "training",
                 num_threads=config.data.get("num_threads", 0))
  n = config.data.get("max_images", 0) or len(b["keys"])
  keys = [str(k) for k in b["keys"][:n]]
  held = valid_subjects(keys, config.data.get("valid_fraction", 0.0), config.seed)
  rows = [i for i, k in enumerate(keys) if (subject_of(k) in held) == (split == "valid")]
  if not rows:
    raise fileio.InputError(f"{workdir}: no {'training' if split == 'train' else 'validation'} "
                        "images" + ("" if split == "train" else
                                    " (set config.data.valid_fraction > 0)"))
  keys = [keys[i] for i in rows]
  images = scale_intensity(np.asarray(b["images"][:n], np.float32)[rows],
                           config.data.get("intensity", "zscore"))
  return {"keys": keys, "uids": [uid_of(k) for k in keys], "images": images,
          "meta": {k: np.asarray(v)[:n][rows] for k, v in b.get("meta", {}).items()}}


def has_valid(config: ml_collections.ConfigDict) -> bool:
  return config.data.get("valid_fraction", 0.0) > 0


# ----------------------------------------------------------------------------- text


def _read_npz_data(f: str, key: str) -> np.ndarray:
  """The flattened array "data" of the .npz `f` (record `key`, for the messages)."""
  try:
    z = np.load(f, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise fileio.InputError(f"{f}: cannot read the caption embedding of {key!r} ({e})") from None
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise fileio.InputError(f"{f}: not an .npz archive; the caption embedding of {key!r} must be "
                        "an .npz with an array 'data'")
  with z:
    if "data" not in z.files:
      raise fileio.InputError(f"{f}: no array 'data' (has {sorted(z.files)}); the caption "
                          f"embedding of {key!r} must be stored under 'data'")
    return np.asarray(z["data"], np.float32).reshape(-1)


def read_text_embeddings(path: str, keys: Sequence[str]) -> np.ndarray:
  """The caption embedding of each record, as the reference's text conditioning reads it.

  Args:
    path: a CSV with columns key and caption_emb_path (an .npz per record, relative paths
      from the CSV's folder) whose array "data" is the embedding (e.g. PubMedBERT's 512
      values); it is flattened into one context token, as the reference's
      `x.view(1, -1)`.
    keys: the record keys.

  Returns:
    (N, 1, D) float32 contexts.

  Raises:
    InputError: a missing row, file or "data" array, unequal sizes or non-finite values.
  """
  table = fileio.read_csv(path, required=("key", "caption_emb_path"))
  index = {k: i for i, k in enumerate(table["key"])}
  root = os.path.dirname(os.path.abspath(path))
  out = []
  for key in keys:
    if key not in index:
      raise fileio.InputError(f"{path}: no row for training image {key!r} (column key)")
    f = os.path.join(root, table["caption_emb_path"][index[key]])
    emb = _read_npz_data(f, key)
    if out and emb.size != out[0].size:
      raise fileio.InputError(f"{f}: {emb.size} values, the first embedding has {out[0].size}")
    if not np.all(np.isfinite(emb)):
      raise fileio.InputError(f"{f}: non-finite values in the caption embedding of {key!r}")
    out.append(emb)
  return np.stack(out)[:, None, :]


# ----------------------------------------------------------------------------- covariates


def synthetic_covariates(keys: Sequence[str], images: np.ndarray, seed: int,
                         age_range: Sequence[float] = (20.0, 86.0),
                         foreground: float = 0.1) -> dict[str, np.ndarray]:
  """Deterministic stand-in covariates for data without demographics (the demo set).

  Args:
    keys: record keys "<head>/z<k>"; the head (before "/") gets one age and sex.
    images: (N, H, W) images.
    seed: seeds the per-head age/sex draws (with a CRC32 of the head name).
    age_range: ages are uniform in this range, rounded to a year.
    foreground: pixels above min + foreground * (max - min) of an image are foreground.

  Returns:
    dict of the COVARIATES columns, each (N,) float64 (sex 0 = M, 1 = F; sequence 0 = T1).
  """
  out = {c: np.zeros(len(keys)) for c in COVARIATES}
  for i, (key, x) in enumerate(zip(keys, images)):
    head = str(key).split("/")[0]
    rng = np.random.default_rng((seed, zlib.crc32(head.encode())))
    out["age"][i] = np.round(rng.uniform(*age_range))
    out["sex"][i] = float(rng.integers(2))
    lo, hi = float(x.min()), float(x.max())
    fg = x[x > lo + foreground * (hi - lo)]
    if fg.size:
      a, b = float(fg.min()), float(fg.max())
      t1, t2 = a + (b - a) / 3, a + 2 * (b - a) / 3
      out["csf"][i] = np.mean(fg <= t1)
      out["gm"][i] = np.mean((fg > t1) & (fg <= t2))
      out["wm"][i] = np.mean(fg > t2)
  return out


def write_covariates_csv(path: str, keys: Sequence[str], cov: Mapping[str, np.ndarray]) -> None:
  fileio.write_csv(path, ["key", *COVARIATES],
               ([k] + [float(cov[c][i]) for c in COVARIATES] for i, k in enumerate(keys)))


def _parse(path: str, column: str, line: int, value: str, names: Sequence[str]) -> float:
  v = value.strip()
  try:
    return float(v)
  except ValueError:
    pass
  if column == "sex" and v.lower() in SEXES:
    return SEXES[v.lower()]
  if column == "sequence" and v.upper() in [s.upper() for s in names]:
    return float([s.upper() for s in names].index(v.upper()))
  raise fileio.InputError(f"{path}: line {line}: column {column!r}: cannot read {value!r} "
                      f"(numbers{', M/F' if column == 'sex' else ''}"
                      f"{', ' + '/'.join(names) if column == 'sequence' else ''})")


def read_covariates(path: str, keys: Sequence[str],
                    sequences: Sequence[str] = ("T1", "T2", "PD")) -> np.ndarray:
  """The COVARIATES of each record key from a CSV, as an (N, 6) float32 array (raw units).

  Raises:
    InputError: missing file/columns, a bad value, or a key without a row.
  """
  table = fileio.read_csv(path, required=("key", *COVARIATES))
  index = {k: i for i, k in enumerate(table["key"])}
  out = np.zeros((len(keys), len(COVARIATES)), np.float32)
  for n, key in enumerate(keys):
    if key not in index:
      raise fileio.InputError(f"{path}: no row for training image {key!r} (column key)")
    i = index[key]
    for j, c in enumerate(COVARIATES):
      out[n, j] = _parse(path, c, i + 2, table[c][i], sequences)
  if not np.all(np.isfinite(out)):
    raise fileio.InputError(f"{path}: non-finite covariates (e.g. an unknown age)")
  return out


def covariates(config: ml_collections.ConfigDict, records: dict, workdir: str) -> np.ndarray:
  """The records' (N, 6) raw covariates: from config.data.covariates_csv, or synthetic ones
  for the demo data (also written to <workdir>/covariates.csv, for the reader)."""
  path = config.data.get("covariates_csv", "")
  if not path:
    if config.data.train.kind != "demo":
      raise fileio.InputError(
          "conditioning 'covariates' needs config.data.covariates_csv: a CSV with columns "
          f"key,{','.join(COVARIATES)} (one row per training slice key; tissue fractions "
          "from a segmentation such as FSL FAST or SynthSeg)")
    # A pure function of the records: computed for any split, written once for the reader.
    cov = synthetic_covariates(records["keys"], records["images"], config.seed)
    path = os.path.join(workdir, "covariates.csv")
    if parallel.is_main_process() and not os.path.exists(path):
      write_covariates_csv(path, records["keys"], cov)
      logging.info("Wrote synthetic demo covariates to %s", path)
    return np.stack([cov[c] for c in COVARIATES], 1).astype(np.float32)
  return read_covariates(path, records["keys"], tuple(config.cond.sequences))


def normalize_covariates(cov: np.ndarray, offset: Sequence[float],
                         scale: Sequence[float]) -> np.ndarray:
  """(cov - offset) / scale per column: the UNet's (N, 1, 6) cross-attention context."""
  cov = (np.asarray(cov, np.float32) - np.asarray(offset, np.float32)) / np.asarray(scale,
                                                                                   np.float32)
  return cov[:, None, :]


# ----------------------------------------------------------------------------- duplication


def duplication_counts(num_images: int, mode: str, ranges: Mapping[str, Sequence[int]],
                       seed: int) -> np.ndarray:
  """How many times each unique image appears in training: k ~ U{lo..hi}, seeded.

  Args:
    num_images: unique images.
    mode: a key of ranges ("none", "low", "high").
    ranges: mode -> (lo, hi), inclusive (the study: none (1, 1), low (1, 4), high (1, 14)).
    seed: numpy default_rng seed.
  """
  if mode not in ranges:
    raise ValueError(f"duplication {mode!r}: expected one of {sorted(ranges)}")
  lo, hi = (int(v) for v in ranges[mode])
  if not 1 <= lo <= hi:
    raise ValueError(f"duplication {mode!r}: range ({lo}, {hi}) must satisfy 1 <= lo <= hi")
  return np.random.default_rng(seed).integers(lo, hi + 1, size=num_images)


def write_duplication_csv(path: str, keys: Sequence[str], counts: np.ndarray) -> None:
  fileio.write_csv(path, ["key", "uid", "count"],
               ([k, uid_of(k), int(c)] for k, c in zip(keys, counts)))


def expand(counts: np.ndarray) -> np.ndarray:
  """The training list: record index i repeated counts[i] times."""
  return np.repeat(np.arange(len(counts)), counts)
