"""From a config's image-set spec to an image bank (keys, z-scored images, meta), cached.

Every job reads images the same way: `open_source` turns a spec (kind volumes / reference /
manifest / pngs) into a random-access image source; `bank` materialises it once into the
workdir (an atomic .npz, plus the images as .npy for memory-mapped pipelines), so a rerun
or a resumed run reads nothing twice. The embedded demo sets come from data.demo.
"""

import os

import ml_collections
import numpy as np
from absl import logging

from deepssim_jax import config_lib, data, io
from deepssim_jax.data import demo as demo_lib

KINDS = ("volumes", "reference", "manifest", "pngs", "demo")
DEMO_PARTS = {"real": "training", "training": "training", "synthetic": "synthetic",
              "heldout": "heldout"}


def open_source(spec: ml_collections.ConfigDict, size, hint: str = ""):
  """An image source for a spec (see config_lib.source_config)."""
  if spec.kind not in KINDS:
    raise io.InputError(f"unknown image-set kind {spec.kind!r}; expected one of {KINDS}")
  if spec.kind == "demo":
    raise ValueError("demo sets are banks, not sources: use bank()")
  root = config_lib.require_path(spec.root, f"data root ({spec.kind})", hint)
  if spec.kind == "volumes":
    _, records = data.find_volumes(root, spec.layout)
    seqs = tuple(spec.sequences)
    records = [r for r in records if not r.get("sequence") or r["sequence"] in seqs]
    if not records:
      raise io.InputError(f"{root}: no volumes of sequences {seqs}")
    if spec.max_volumes:
      records = records[:spec.max_volumes]
    return data.VolumeSliceSource(records, size=tuple(size), band=tuple(spec.band),
                                  num_slices=spec.num_slices or None)
  if spec.kind == "reference":
    training, generated = data.find_reference_layout(root, size=tuple(size))
    if spec.part not in ("training", "generated"):
      raise io.InputError(f"{root}: reference-layout part must be 'training' or 'generated', "
                          f"got {spec.part!r}")
    return training if spec.part == "training" else generated
  if spec.kind == "manifest":
    return data.manifest_source(root, size=tuple(size))
  return data.folder_source(root, size=tuple(size))


def demo_banks(config: ml_collections.ConfigDict) -> dict:
  kw = dict(config.data.get("demo", {}))
  return demo_lib.demo_sets(size=tuple(config.data.image_size), seed=config.seed, **kw)


def bank(spec: ml_collections.ConfigDict, config: ml_collections.ConfigDict, cache_dir: str,
         name: str, num_threads: int = 0) -> dict:
  """The bank of one image set, read once and cached as <cache_dir>/<name>.npz."""
  path = os.path.join(cache_dir, f"{name}.npz")
  if os.path.exists(path):
    b = data.load_bank(path)
    if tuple(b["images"].shape[1:]) != tuple(config.data.image_size):
      raise io.InputError(f"{path}: cached images are {b['images'].shape[1:]}, the config "
                          f"asks for {tuple(config.data.image_size)}; use another workdir")
    return b
  if spec.kind == "demo":
    if spec.part not in DEMO_PARTS:
      raise io.InputError(f"demo part {spec.part!r}: expected one of {sorted(DEMO_PARTS)}")
    b = demo_banks(config)[DEMO_PARTS[spec.part]]
  else:
    src = open_source(spec, config.data.image_size, config.data.get("download_hint", ""))
    logging.info("Reading %d images of %s", len(src), spec.root)
    b = data.load_all(src, progress=True, num_threads=num_threads)
  data.save_bank(path, b)
  return b


def subset(b: dict, mask: np.ndarray) -> dict:
  """The rows of a bank where mask is true (meta columns included)."""
  return {"keys": b["keys"][mask], "images": b["images"][mask],
          "meta": {k: np.asarray(v)[mask] for k, v in b.get("meta", {}).items()}}
