"""From a config's image-set spec to an image bank (keys, z-scored images, meta), cached.

Every job reads images the same way: `open_source` turns a spec (kind volumes / reference /
manifest / pngs) into a random-access image source; `bank` materialises it once into the
workdir (an atomic .npz, plus the images as .npy for memory-mapped pipelines), so a rerun
or a resumed run reads nothing twice. The embedded demo sets come from data.demo.

Every cached bank <name>.npz has a record beside it, <name>.npz.record.json: what it was
made from (`source_record`: the spec fields that matter for its kind, the image size, the
demo settings and seed, and a cheap fingerprint of the source files: relative names, sizes
and modification times). A cache is reused only when its record equals the current one;
otherwise (another root, other settings, files changed, or a cache from before records) it
is rebuilt, with a log line naming what changed. Rebuilding rather than refusing: a bank is
a pure function of its record, so the stale one holds nothing the new one would not, and
refusing would only make the user delete the folder by hand. (The pair table, the training
data of a run's checkpoints, is refused instead when checkpoints exist: jobs.prepare_data.)
"""

import json
import os
from typing import Optional

import ml_collections
import numpy as np
from absl import logging

from deepssim_jax import config_lib, data, fileio
from deepssim_jax.data import demo as demo_lib

KINDS = ("volumes", "reference", "manifest", "pngs", "demo")
DEMO_PARTS = {"real": "training", "training": "training", "synthetic": "synthetic",
              "heldout": "heldout"}
RECORD_VERSION = 1
# The spec fields each kind reads (others do not change its images).
KIND_FIELDS = {"volumes": ("root", "layout", "band", "num_slices", "sequences",
                           "max_volumes"),
               "reference": ("root", "part"), "manifest": ("root",), "pngs": ("root",),
               "demo": ("part",)}


def open_source(spec: ml_collections.ConfigDict, size, hint: str = ""):
  """An image source for a spec (see config_lib.source_config)."""
  if spec.kind not in KINDS:
    raise fileio.InputError(f"unknown image-set kind {spec.kind!r}; expected one of {KINDS}")
  if spec.kind == "demo":
    raise ValueError("demo sets are banks, not sources: use bank()")
  root = fileio.require_path(spec.root, f"data root ({spec.kind})", hint)
  if spec.kind == "volumes":
    _, records = data.find_volumes(root, spec.layout)
    seqs = tuple(spec.sequences)
    records = [r for r in records if not r.get("sequence") or r["sequence"] in seqs]
    if not records:
      raise fileio.InputError(f"{root}: no volumes of sequences {seqs}")
    if spec.max_volumes:
      records = records[:spec.max_volumes]
    return data.VolumeSliceSource(records, size=tuple(size), band=tuple(spec.band),
                                  num_slices=spec.num_slices or None)
  if spec.kind == "reference":
    training, generated = data.find_reference_layout(root, size=tuple(size))
    if spec.part not in ("training", "generated"):
      raise fileio.InputError(f"{root}: reference-layout part must be 'training' or 'generated', "
                          f"got {spec.part!r}")
    return training if spec.part == "training" else generated
  if spec.kind == "manifest":
    return data.manifest_source(root, size=tuple(size))
  return data.folder_source(root, size=tuple(size))


def demo_banks(config: ml_collections.ConfigDict) -> dict:
  kw = dict(config.data.get("demo", {}))
  return demo_lib.demo_sets(size=tuple(config.data.image_size), seed=config.seed, **kw)


# ----------------------------------------------------------------------------- records


def _stat_rows(paths, base: str) -> list:
  rows = []
  for p in paths:
    st = os.stat(p)
    rows.append((os.path.relpath(p, base), st.st_size, st.st_mtime_ns))
  return rows


def _walk(root: str, recursive: bool = True) -> list[str]:
  """Every non-hidden file under root (hidden folders skipped), sorted."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    out += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    if not recursive:
      break
  return sorted(out)


def files_fingerprint(kind: str, root: str) -> Optional[str]:
  """A cheap fingerprint of the files a source of `kind` reads under `root`: their names,
  sizes and modification times (no file is read, except a manifest's CSV). None when the
  root does not exist (nothing to compare)."""
  if not root or not os.path.exists(root):
    return None
  root = os.path.abspath(root)
  if kind == "manifest" and os.path.isfile(root):
    table = fileio.read_csv(root, required=("key", "path"))
    base = os.path.dirname(root)
    paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in table["path"]]
    with open(root, "rb") as f:
      csv_bytes = f.read()
    return fileio.fingerprint(csv_bytes, *_stat_rows([p for p in paths if os.path.exists(p)],
                                                 base),
                          [p for p in paths if not os.path.exists(p)])
  if os.path.isfile(root):
    return fileio.fingerprint(*_stat_rows([root], os.path.dirname(root)))
  files = _walk(root, recursive=kind != "pngs")
  if kind in ("reference", "pngs"):  # what they read: PNGs (not a workdir kept beside them)
    files = [f for f in files if f.lower().endswith(".png")]
  return fileio.fingerprint(*_stat_rows(files, root))


def source_record(spec: ml_collections.ConfigDict, config: ml_collections.ConfigDict
                  ) -> dict:
  """What a bank of `spec` is made from (the module docstring), JSON-ready."""
  if spec.kind not in KINDS:
    raise fileio.InputError(f"unknown image-set kind {spec.kind!r}; expected one of {KINDS}")
  rec = {"version": RECORD_VERSION, "kind": spec.kind,
         "image_size": [int(s) for s in config.data.image_size]}
  for field in KIND_FIELDS[spec.kind]:
    v = spec.get(field)
    rec[field] = list(v) if isinstance(v, (list, tuple)) else v
  if spec.kind == "demo":
    kw = dict(config.data.get("demo", {}))
    rec["demo"] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in kw.items()}
    rec["seed"] = int(config.seed)
    rec["files"] = files_fingerprint("demo", kw.get("data_dir", demo_lib.MRI_DIR))
  else:
    rec["root"] = os.path.abspath(spec.root) if spec.root else ""
    rec["files"] = files_fingerprint(spec.kind, spec.root)
  return json.loads(json.dumps(rec, sort_keys=True, default=str))  # as read back


def record_fingerprint(record: dict) -> str:
  return fileio.fingerprint(json.dumps(record, sort_keys=True, default=str))


def record_path(path: str) -> str:
  """The record of a cached file: <path>.record.json beside it."""
  return path + ".record.json"


def read_record(path: str) -> Optional[dict]:
  """The record of a cached file, or None (no record, or unreadable)."""
  try:
    with open(record_path(path), encoding="utf-8") as f:
      rec = json.load(f)
  except (OSError, ValueError):
    return None
  return rec if isinstance(rec, dict) else None


def write_record(path: str, record: dict) -> None:
  fileio.write_json(record_path(path), record)


def drop_record(path: str) -> None:
  """Removes a cached file's record (before the file is replaced: a run killed in between
  leaves a cache without a record, which is rebuilt, never one with a wrong record)."""
  try:
    os.remove(record_path(path))
  except FileNotFoundError:
    pass


def changes(old: Optional[dict], new: dict) -> list[str]:
  """What differs between a stored record and the current one, one phrase per field
  ('files' as 'source files changed'); ['no record ...'] without a stored record."""
  if old is None:
    return ["no record of what it was made from"]
  out = config_lib.config_changes({k: v for k, v in old.items() if k != "files"},
                                  {k: v for k, v in new.items() if k != "files"}, "")
  if old.get("files", "<unset>") != new.get("files", "<unset>"):
    out.append("source files changed (names, sizes or modification times)")
  return out


def cache_state(spec: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                cache_dir: str, name: str) -> tuple[dict, list[str]]:
  """(record, changes) of the bank <cache_dir>/<name>.npz: the record the bank has or will
  have, and why the cache cannot be reused (empty: reuse it).

  When the source cannot be seen (its root is gone: a finished workdir moved to another
  machine) and the cache's record matches in everything else, the cache is reused with a
  warning: the stored record is returned.
  """
  path = os.path.join(cache_dir, f"{name}.npz")
  new = source_record(spec, config)
  if not os.path.isfile(path):
    return new, ["not built yet"]
  old = read_record(path)
  if old is not None and new.get("files") is None and old.get("files") is not None:
    diff = changes({k: v for k, v in old.items() if k != "files"},
                   {k: v for k, v in new.items() if k != "files"})
    if not diff:
      logging.warning("%s: the source %s is not there; its files cannot be checked, reusing "
                      "the bank built from it", path, new.get("root"))
      return old, []
  return new, changes(old, new)


def bank(spec: ml_collections.ConfigDict, config: ml_collections.ConfigDict, cache_dir: str,
         name: str, num_threads: int = 0) -> dict:
  """The bank of one image set, read once and cached as <cache_dir>/<name>.npz.

  Reused only when its record (source_record) matches; otherwise rebuilt. The returned
  dict carries `fingerprint`, a hash of that record (what the bank was made from).
  """
  path = os.path.join(cache_dir, f"{name}.npz")
  record, why = cache_state(spec, config, cache_dir, name)
  if not why:
    b = data.load_bank(path)
    if tuple(b["images"].shape[1:]) != tuple(config.data.image_size):
      raise fileio.InputError(f"{path}: cached images are {b['images'].shape[1:]}, the config "
                          f"asks for {tuple(config.data.image_size)}; use another workdir")
    b["fingerprint"] = record_fingerprint(record)
    return b
  if os.path.exists(path):
    logging.warning("%s: rebuilding the cached bank: %s", path, "; ".join(why))
  if spec.kind == "demo":
    if spec.part not in DEMO_PARTS:
      raise fileio.InputError(f"demo part {spec.part!r}: expected one of {sorted(DEMO_PARTS)}")
    b = demo_banks(config)[DEMO_PARTS[spec.part]]
  else:
    src = open_source(spec, config.data.image_size, config.data.get("download_hint", ""))
    logging.info("Reading %d images of %s", len(src), spec.root)
    b = data.load_all(src, progress=True, num_threads=num_threads)
  drop_record(path)
  data.save_bank(path, b)
  write_record(path, record)
  b["fingerprint"] = record_fingerprint(record)
  return b


def subset(b: dict, mask: np.ndarray) -> dict:
  """The rows of a bank where mask is true (meta columns included)."""
  return {"keys": b["keys"][mask], "images": b["images"][mask],
          "meta": {k: np.asarray(v)[mask] for k, v in b.get("meta", {}).items()}}
