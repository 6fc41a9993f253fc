"""The embedded demo data set: real MRI slices and a synthetic set with known answers.

Everything downstream (SSIM targets, training, the memorization audit) needs a training set
and a "generated" set whose memorized images are known. Real generated data is not
shippable, so the demo builds one from the five vendored volumes (data/mri, see its README):

* training: real axial slices of four heads (evenly spaced in a central band per head),
  optionally with coronal / sagittal slices of them too (`extra_planes`);
* synthetic: a shuffled mix of
  (a) copies: training slices, each possibly flipped along either axis, rotated by up to
      `max_angle` rad and gamma-adjusted (these are memorized: label 1 Duplicate);
  (b) neighbours: other slices of the training heads, `neighbour_mm` mm from their nearest
      training slice and never themselves in training (label 2 Similar);
  (c) other head: slices of the fifth head, never in training (label 0 Different);
  when more neighbours or other-head images are asked for than there are distinct slices,
  the extra ones are augmented repeats (same augmentation as copies; same label);
* heldout: further real slices of the training heads, in none of the sets above (they lie
  between training slices, so they resemble them: same heads, a few mm apart; when the
  band has no free slice left, the slices just outside it).

Each set is an image bank (dict keys, images, meta; see images.load_all). Synthetic meta
columns: kind (copy / neighbour / other), source_key (the training key it derives from; for
a neighbour its nearest training slice; '' for other), label (ground truth vs source_key),
augment (what was applied, e.g. 'gamma0.712+flip1+rot+0.093', or 'none'), angle (rad) and
gamma of that augmentation, subject, slice, offset_mm (axial distance to source_key's slice;
NaN for other). `write_demo_layout` writes the same sets in the reference PNG layout so
the PNG reader and the whole pipeline can run end to end on them.

All slices go through volumes.slice_image (RAS+, radiological view, physical aspect kept,
z-scored), exactly like a real data set. Building it takes well under a second or two.
"""

import logging
import os
from typing import Sequence

import numpy as np

from deepssim_jax import fileio
from deepssim_jax.data import images
from deepssim_jax.data import volumes

MRI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mri")

# (head, band lo, band hi): bands chosen by eye so every slice shows brain (robex's field of
# view reaches down to the neck, hence its higher band).
TRAIN_HEADS = (("colin27", 0.4, 0.7), ("icbm152", 0.4, 0.7), ("robex", 0.55, 0.8),
               ("itkkmeans", 0.4, 0.7))
OTHER_HEAD = ("radiomics1", 0.35, 0.8)

KINDS = ("copy", "neighbour", "other")
LABELS = {"copy": 1, "neighbour": 2, "other": 0}  # 1 Duplicate, 2 Similar, 0 Different


def _rotate(image: np.ndarray, angle: float) -> np.ndarray:
  """Bilinear rotation by `angle` rad counter-clockwise (as displayed) about the centre,
  edge values repeated (scikit-image's rotate(order=1, mode='edge') convention)."""
  h, w = image.shape
  cy, cx = (h - 1) / 2, (w - 1) / 2
  r, c = np.mgrid[0:h, 0:w].astype(np.float64)
  cos, sin = np.cos(angle), np.sin(angle)
  # Output pixel (r, c) samples the input at the point rotated back by -angle.
  y = cy + (r - cy) * cos + (c - cx) * sin
  x = cx - (r - cy) * sin + (c - cx) * cos
  y, x = np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)
  y0, x0 = np.minimum(np.floor(y).astype(int), h - 2), np.minimum(np.floor(x).astype(int),
                                                                  w - 2)
  fy, fx = y - y0, x - x0
  img = image.astype(np.float64)
  return ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x0 + 1])
          + fy * ((1 - fx) * img[y0 + 1, x0] + fx * img[y0 + 1, x0 + 1]))


def augment(image: np.ndarray, rng: np.random.Generator, p_flip: float = 0.5,
            p_rotate: float = 0.5, max_angle: float = 0.17, p_gamma: float = 0.5,
            gamma_range: Sequence[float] = (0.5, 1.5)) -> tuple[np.ndarray, dict]:
  """Randomly gamma-adjusts, flips (each axis) and rotates a z-scored image, in that order.

  Gamma acts on the min-max normalised image; rotation is bilinear about the centre with
  edge values repeated, counter-clockwise for a positive angle; the result is z-scored
  again. Each step is drawn independently with its probability.

  Returns:
    (float32 image, dict(augment = description such as 'gamma1.310+flip0+rot-0.123' or
    'none', angle = radians (0 if not rotated), gamma = exponent (1 if not applied))).
  """
  x = np.asarray(image, np.float64)
  done, angle, gamma = [], 0.0, 1.0
  if rng.random() < p_gamma:
    gamma = float(rng.uniform(*gamma_range))
    x = ((x - x.min()) / (x.max() - x.min())) ** gamma
    done.append(f"gamma{gamma:.3f}")
  for axis in (0, 1):
    if rng.random() < p_flip:
      x = np.flip(x, axis)
      done.append(f"flip{axis}")
  if rng.random() < p_rotate:
    angle = float(rng.uniform(-max_angle, max_angle))
    x = _rotate(x, angle)
    done.append(f"rot{angle:+.3f}")
  info = {"augment": "+".join(done) or "none", "angle": angle, "gamma": gamma}
  return images.zscore(x, "augmented image"), info


def _draw(pool: int, n: int, rng: np.random.Generator, what: str,
          shuffle: bool = True) -> list[tuple[int, bool]]:
  """n items of a pool of distinct ones: (index, repeat). Distinct while possible (a random
  subset in pool order when shuffle, else the first n); beyond the pool, random repeats."""
  if n <= pool:
    idx = sorted(rng.choice(pool, n, replace=False)) if shuffle else range(n)
    return [(int(i), False) for i in idx]
  logging.info("demo: %d %s requested, %d distinct: %d augmented repeats", n, what, pool,
               n - pool)
  return [(i, False) for i in range(pool)] + [
      (int(i), True) for i in rng.choice(pool, n - pool, replace=True)]


def _head_path(data_dir: str, head: str) -> str:
  path = os.path.join(data_dir, f"{head}-T1.nii.gz")
  if not os.path.isfile(path):
    raise fileio.InputError(f"{path}: demo volume not found")
  return path


def _bank(keys, imgs, meta, size) -> dict:
  return {"keys": np.asarray(keys, dtype=str),
          "images": (np.stack(imgs).astype(np.float32) if imgs
                     else np.zeros((0, *size), np.float32)),
          "meta": images.meta_columns(meta, len(keys))}


def demo_sets(size: Sequence[int] = (136, 112), seed: int = 0,
              train_heads: Sequence[tuple[str, float, float]] = TRAIN_HEADS,
              other_head: tuple[str, float, float] | None = OTHER_HEAD,
              slices_per_head: int = 12, num_copies: int = 24, num_neighbours: int = 24,
              num_other: int = 8, neighbour_mm: Sequence[float] = (2.0, 4.0),
              heldout_per_head: int = 4, p_flip: float = 0.5, p_rotate: float = 0.5,
              max_angle: float = 0.17, p_gamma: float = 0.5,
              gamma_range: Sequence[float] = (0.5, 1.5), spacing_mm: float | None = None,
              extra_planes: Sequence[tuple[str, float, float]] = (),
              extra_slices_per_head: int = 0,
              data_dir: str = MRI_DIR) -> dict[str, dict]:
  """Builds the demo training, synthetic and held-out image banks (module docstring).

  Args:
    size: (H, W) of every image.
    seed: seeds which slices are copied / used as neighbours, the augmentations and the
      order of the synthetic set.
    train_heads: (head, band lo, band hi) of each training head; the volume is
      <data_dir>/<head>-T1.nii.gz.
    other_head: (head, band lo, band hi) of the head never seen in training (None or
      num_other 0: no other-head images).
    slices_per_head: training slices per head, evenly spaced in its band; 0: every slice of
      the band.
    num_copies: augmented copies of training slices (distinct sources while possible).
    num_neighbours: neighbouring slices: distinct slices while the volumes have enough,
      then augmented repeats of them (augment, same settings as copies).
    num_other: slices of the other head, evenly spaced in its band; beyond the band's
      slices, augmented repeats of them.
    neighbour_mm: (min, max) axial distance in mm from a neighbour to its nearest training
      slice.
    heldout_per_head: real held-out slices per training head (0 for none).
    p_flip, p_rotate, max_angle, p_gamma, gamma_range: copy augmentation (see augment).
    spacing_mm: None fits each slice into size; a number fixes mm per pixel.
    extra_planes: (plane, band lo, band hi) of further training images of every training
      head: its 'coronal' or 'sagittal' slices in that band (volumes.PLANES), keys
      '<head>/y<k>' / '<head>/x<k>'. More anatomy for a metric trained on few heads; copies,
      neighbours and held-out slices stay axial. Default none.
    extra_slices_per_head: slices per extra plane and head, evenly spaced in its band; 0:
      every slice of the band.
    data_dir: folder of the vendored volumes.

  Returns:
    dict(training=bank, synthetic=bank, heldout=bank or None).

  Raises:
    ValueError: a band holding fewer than slices_per_head (or heldout_per_head free) slices,
      or no slice at neighbour_mm from the training slices.
  """
  rng = np.random.default_rng(seed)
  lo_mm, hi_mm = neighbour_mm
  heads = {}  # head -> (volume, zooms, training slices, path)
  train_keys, train_imgs, train_meta = [], [], {"subject": [], "slice": [], "plane": []}
  for head, lo, hi in train_heads:
    path = _head_path(data_dir, head)
    vol, zooms = volumes.load_canonical(path)
    ks = volumes.band_slices(vol.shape[2], (lo, hi), slices_per_head or None)
    if len(ks) < slices_per_head:
      raise ValueError(f"{path}: band ({lo}, {hi}) holds {len(ks)} slices, fewer than "
                       f"slices_per_head={slices_per_head}")
    heads[head] = (vol, zooms, ks, path)
    for k in ks:
      train_keys.append(volumes.slice_key(head, k))
      train_imgs.append(volumes.slice_image(vol, zooms, k, size, spacing_mm, path))
      train_meta["subject"].append(head)
      train_meta["slice"].append(k)
      train_meta["plane"].append("axial")
  n_axial = len(train_keys)  # copies derive from axial training slices only
  if any(plane == "axial" for plane, _, _ in extra_planes):
    raise ValueError("extra_planes: the axial slices are the training heads' own; "
                     "list 'coronal' or 'sagittal'")
  for head, (vol, zooms, _, path) in heads.items():
    for plane, lo, hi in extra_planes:
      depth = volumes.plane_depth(vol.shape, plane)
      for k in volumes.band_slices(depth, (lo, hi), extra_slices_per_head or None):
        train_keys.append(volumes.slice_key(head, k, plane))
        train_imgs.append(volumes.slice_image(vol, zooms, k, size, spacing_mm, path, plane))
        train_meta["subject"].append(head)
        train_meta["slice"].append(k)
        train_meta["plane"].append(plane)
  training = _bank(train_keys, train_imgs, train_meta, size)

  # Neighbour candidates: every non-training slice whose distance to the nearest training
  # slice of its head is within neighbour_mm; the source is that nearest slice.
  cands = []
  for head, (vol, zooms, ks, _) in heads.items():
    ks_arr = np.asarray(ks)
    for k in range(vol.shape[2]):
      if k in ks:
        continue
      dist = np.abs(ks_arr - k) * zooms[2]
      j = int(np.argmin(dist))
      if lo_mm <= dist[j] <= hi_mm:
        cands.append((head, k, int(ks_arr[j]), float(dist[j])))
  if not cands and num_neighbours:
    raise ValueError(f"no slice lies {lo_mm}-{hi_mm} mm from its nearest training slice "
                     "(training slices too dense for neighbour_mm)")
  picks = _draw(len(cands), num_neighbours, rng, "neighbour slices")
  neighbours = [cands[i] for i, _ in picks]

  # (image, kind, source_key, augment info, subject, slice, offset_mm)
  synth = []
  src = rng.choice(n_axial, num_copies, replace=num_copies > n_axial)
  no_aug = {"augment": "none", "angle": 0.0, "gamma": 1.0}
  aug = (p_flip, p_rotate, max_angle, p_gamma, gamma_range)
  for i in src:
    x, info = augment(training["images"][i], rng, *aug)
    synth.append((x, "copy", train_keys[i], info, train_meta["subject"][i],
                  train_meta["slice"][i], 0.0))
  for (head, k, k_src, dist), (_, repeat) in zip(neighbours, picks):
    vol, zooms, _, path = heads[head]
    x, info = volumes.slice_image(vol, zooms, k, size, spacing_mm, path), no_aug
    if repeat:
      x, info = augment(x, rng, *aug)
    synth.append((x, "neighbour", volumes.slice_key(head, k_src), info, head, k, dist))
  if other_head is not None and num_other > 0:
    head, lo, hi = other_head
    path = _head_path(data_dir, head)
    vol, zooms = volumes.load_canonical(path)
    ks = volumes.band_slices(vol.shape[2], (lo, hi), num_other)
    for i, repeat in _draw(len(ks), num_other, rng, f"{head} slices", shuffle=False):
      x, info = volumes.slice_image(vol, zooms, ks[i], size, spacing_mm, path), no_aug
      if repeat:
        x, info = augment(x, rng, *aug)
      synth.append((x, "other", "", info, head, ks[i], float("nan")))
  order = rng.permutation(len(synth))
  synth = [synth[i] for i in order]
  synthetic = _bank(
      [f"synth-{i:04d}" for i in range(len(synth))], [s[0] for s in synth],
      {"kind": [s[1] for s in synth], "source_key": [s[2] for s in synth],
       "label": [LABELS[s[1]] for s in synth],
       "augment": [s[3]["augment"] for s in synth],
       "angle": [s[3]["angle"] for s in synth], "gamma": [s[3]["gamma"] for s in synth],
       "subject": [s[4] for s in synth], "slice": [s[5] for s in synth],
       "offset_mm": [s[6] for s in synth]}, size)

  heldout = None
  if heldout_per_head > 0:
    used = {(h, k) for h, k, _, _ in neighbours}
    keys, imgs, meta = [], [], {"subject": [], "slice": [], "nearest_key": [],
                                "offset_mm": []}
    for head, (vol, zooms, ks, path) in heads.items():
      free = [k for k in range(ks[0], ks[-1] + 1) if k not in ks and (head, k) not in used]
      if len(free) >= heldout_per_head:
        picked = [free[i] for i in
                  np.round(np.linspace(0, len(free) - 1, heldout_per_head)).astype(int)]
      else:  # the band is taken: the free slices just outside it, nearest first
        outside = sorted((k for k in range(vol.shape[2]) if k < ks[0] or k > ks[-1]),
                         key=lambda k: (min(abs(k - ks[0]), abs(k - ks[-1])), k))
        picked = sorted(free + outside[:heldout_per_head - len(free)])
        if len(picked) < heldout_per_head:
          raise ValueError(f"{path}: only {len(picked)} free slices for heldout_per_head="
                           f"{heldout_per_head}")
      for k in picked:
        j = int(np.argmin(np.abs(np.asarray(ks) - k)))
        keys.append(volumes.slice_key(head, k))
        imgs.append(volumes.slice_image(vol, zooms, k, size, spacing_mm, path))
        meta["subject"].append(head)
        meta["slice"].append(k)
        meta["nearest_key"].append(volumes.slice_key(head, ks[j]))
        meta["offset_mm"].append(float(abs(ks[j] - k) * zooms[2]))
    heldout = _bank(keys, imgs, meta, size)
  return {"training": training, "synthetic": synthetic, "heldout": heldout}


def layout_uid(train_key: str) -> str:
  """The reference-layout folder name of a demo training key ('colin27/z090' ->
  'colin27-z090')."""
  return train_key.replace("/", "-")


def _sets_for(root, what: str, kwargs) -> tuple[str, dict]:
  """(root, demo_sets(**kwargs)) once root is known to be absent or empty."""
  root = os.fspath(root)
  if os.path.isdir(root) and os.listdir(root):
    raise fileio.InputError(f"{root}: {what} destination must be empty or absent")
  return root, demo_sets(**kwargs)


def write_demo_layout(root: str, **kwargs) -> dict:
  """Writes the demo sets in the reference PNG layout, plus the ground-truth labels.

  <root>/<uid>/training.png is a training slice (uid = layout_uid(key)); its gen-<i>.png
  are the synthetic images derived from it (copies and neighbours), and the other-head
  images are dealt round-robin to the training uids (as an unconditional generator's
  samples would be). <root>/labels.csv has one row per generated image: real_key (the
  layout key of its folder's training image), synth_key, label, kind, demo_key (its key in
  demo_sets' synthetic bank). Images are 8-bit PNGs (write_png), so reading them back gives
  the demo images up to 8-bit quantisation.

  Args:
    root: destination folder; must be absent or empty.
    **kwargs: passed to demo_sets.

  Returns:
    dict(root, labels (path of labels.csv), num_training, num_generated, sets (the banks
    demo_sets returned)).

  Raises:
    InputError: root exists and is not empty.
  """
  root, sets = _sets_for(root, "demo layout", kwargs)
  training, synthetic = sets["training"], sets["synthetic"]
  tkeys = [str(k) for k in training["keys"]]
  for key, x in zip(tkeys, training["images"]):
    images.write_png(os.path.join(root, layout_uid(key), "training.png"), x)
  count = {k: 0 for k in tkeys}
  rows, deal = [], 0
  for key, x, kind, src in zip(synthetic["keys"], synthetic["images"],
                               synthetic["meta"]["kind"], synthetic["meta"]["source_key"]):
    src = str(src)
    if not src:
      src, deal = tkeys[deal % len(tkeys)], deal + 1
    uid, i = layout_uid(src), count[src]
    count[src] += 1
    images.write_png(os.path.join(root, uid, f"gen-{i}.png"), x)
    rows.append((f"{uid}/training", f"{uid}/gen-{i}", LABELS[str(kind)], str(kind),
                 str(key)))
  labels = os.path.join(root, "labels.csv")
  fileio.write_csv(labels, ("real_key", "synth_key", "label", "kind", "demo_key"), rows)
  return {"root": root, "labels": labels, "num_training": len(tkeys),
          "num_generated": len(rows), "sets": sets}


def write_demo_folders(root: str, **kwargs) -> dict:
  """Writes the demo's training and synthetic sets as two flat PNG folders, the input of
  `python -m deepssim_jax.score --train=<root>/training --synth=<root>/synthetic`, and the
  known answers <root>/truth.csv (synth_id, memorized 0/1, source_id: the audit's truth
  format, deepssim_jax.truth.read_truth). File names are the keys ('colin27/z090' ->
  colin27-z090.png, synth-0007.png); images are 8-bit PNGs (write_png).

  Raises:
    InputError: root exists and is not empty.
  """
  root, sets = _sets_for(root, "demo folders", kwargs)
  training, synthetic = sets["training"], sets["synthetic"]
  for key, x in zip(training["keys"], training["images"]):
    images.write_png(os.path.join(root, "training", layout_uid(str(key)) + ".png"), x)
  for key, x in zip(synthetic["keys"], synthetic["images"]):
    images.write_png(os.path.join(root, "synthetic", f"{key}.png"), x)
  meta = synthetic["meta"]
  truth = os.path.join(root, "truth.csv")
  fileio.write_csv(truth, ("synth_id", "memorized", "source_id"),
               [(str(k), int(int(lab) == LABELS["copy"]),
                 layout_uid(str(s)) if int(lab) == LABELS["copy"] else "")
                for k, lab, s in zip(synthetic["keys"], meta["label"], meta["source_key"])])
  return {"root": root, "truth": truth, "num_training": len(training["keys"]),
          "num_synthetic": len(synthetic["keys"])}

