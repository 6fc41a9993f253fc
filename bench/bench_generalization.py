"""Benchmark: does a DeepSSIM trained on some heads generalize to a head (and contrasts) it
never saw? Leave-one-head-out over the five vendored brain MRI volumes.

For each held-out head H and each lever (a training recipe), the built-in model's config
(configs/builtin.py) is trained on the other four heads only, then scored on labelled pairs
made from H alone, at the paper's fixed thresholds (score <= 0.60 Different, > 0.85
Duplicate, else Similar):

* Duplicate: a slice of H and a copy of it: flipped (each axis p 0.5), rotated by up to
  10 degrees (p 0.5), gamma-changed (gamma in [0.5, 1.5], p 0.5), plus mild Gaussian noise
  (sigma 0.05 of the z-scored image);
* Similar: two slices of H 2 to 4 mm apart (a head whose slice spacing exceeds 4 mm, such
  as radiomics1 at 6.5 mm, uses adjacent slices);
* Different: two slices of H at least 20 mm apart, and a slice of H with a slice of
  another head.

Each pair set is also scored after an intensity remap that mimics other MRI contrasts: a
fixed piecewise-linear map of the min-max scaled T1 intensities applied to every image
(both images of a pair, before the copy is made), "T2-like" (CSF bright, grey above white
matter, background dark) and "PD-like" (flatter, grey slightly above white). Plain SSIM on
the same pairs is printed as a row too, and SSIM's ceiling ("SSIM, copies as 1": each
copy scored 1, the rest by SSIM), what an exact SSIM that ignored the copies' flips,
rotations, gamma and noise would get.

Levers (rows), each a change of its base lever (LEVERS) and compared with it:
* recipe: configs/builtin.py as is. Since 2026-12-04's fourth change it trains without flips
  and with rotations of at most 1.5 degrees, and scores every pair after rigid alignment
  (config.model.align: the second image registered onto the first, deepssim_jax.align, as
  the shipped model scores); rigid_light: the recipe's folds scored plainly (what the
  network leaves to the alignment); measured on it: rigid_neighbours (synthetic
  neighbours, as `neighbours` below, p 0.3);
* flips: the recipe before that fourth change (flips p 0.33 per axis, rotations up to 9.7
  degrees, scored plainly; 18 epochs since 2026-12-03's third change); measured on it:
  shape_strong (shape randomization p 0.8 with larger warps: scale exp(+-0.25), shear
  +-0.15, shift +-8%), long36 (36 epochs),
  blur (resolution randomization: with p 0.5 both images of a pair blurred by one Gaussian
  of sigma 0.5-1.5 pixels, target recomputed), planes (coronal and sagittal slices of the
  training heads as further training images, 20 per plane and head), elastic (anatomy
  randomization: with p 0.5 both images of a pair warped by one smooth random displacement
  field, control points on a 5 x 5 grid moved up to 6 pixels, target recomputed),
  flat_contrast (contrast randomization with flat maps too: a map's tissue knots squeezed
  into [1 - c, 1], c uniform in [0.2, 1]), band3 (the loss weight of pairs whose target
  lies in [0.5, 0.95] tripled), neighbours (synthetic neighbours: with p 0.3 a pair becomes
  an image and its own smooth random warp, up to 0.5-4 pixels, target their SSIM),
  rotate15 (rotation augmentation with p 0.5 instead of 0.33, up to 15 degrees instead of
  9.7: the copies' 10 degrees inside the trained range), band3_neighbours (band3 and
  neighbours together; compared with band3), rotate15_neighbours (rotate15 and neighbours
  in one network; compared with rotate15), neighbours6 (neighbours at p 0.6; compared
  with neighbours), noise (noise randomization: with p 0.3 each
  image of a pair gets its own Gaussian noise of one sigma in [0, 0.1], target their SSIM),
  noise_strong (noise at p 0.5 with sigma up to 0.2; compared with noise), noise_neighbours
  (noise and neighbours in one network; compared with noise), noise_first (noise before
  the contrast map, which then scales it by its slope: tissue-dependent noise, as in the
  T2-/PD-like pairs, remapped from a noisy T1; compared with noise), noise_strong_neighbours
  (noise_strong and neighbours in one network; compared with noise_strong),
  noise_strong_rotate15 (noise_strong and rotate15 in one network; compared with
  noise_strong), noise_copies (noise_strong, but a self pair keeps its target 1 under the
  noise, as under flips and gamma: the held-out Duplicates include noisy copies; compared
  with noise_strong), noise_copies_neighbours (noise_copies with synthetic neighbours, to
  lower the neighbours' scores while the copies are kept at 1; compared with noise_copies),
  noise_copies_band3 (noise_copies with band3's loss weight, to place the neighbours'
  scores more precisely in the band; compared with noise_copies), noise_copies_over3
  (noise_copies with an expectile loss: a pair scored above its target weighs 3x, so
  where the network is unsure it scores low, to pull the neighbours below 0.85 while the
  copies, whose target 1 nothing exceeds, stay; compared with noise_copies),
  noise_copies_over6 (the same at 6x; compared with noise_copies_over3);
* epochs9: flips before 2026-12-03's third change (9 epochs);
* dropout_short: epochs9 before its change of 2026-12-03 (the paper's head dropout 0.33,
  3 epochs at lr 1e-3); measured on it: no_dropout (head dropout 0), long3
  (9 epochs at lr 2e-3), flat (balanced targets with the scarce bins' pairs repeated to an
  even share), no_aug (no augmentation or randomization at all: a diagnostic of the fit);
* no_shape: dropout_short without shape randomization (flips before the first
  change); measured on it: no_contrast (without contrast randomization), less_self (5%
  self pairs instead of 15%, balanced from a pool of 6x the pairs), unbalanced (uniform
  pair targets), gem (the DeepSSIM++ GeM head), wide (1.5x the widths, one more block),
  long (twice the epochs), grid / grid43 (the grid head, 2 x 2 / 4 x 3 regions);
* seed1: flips from another seed (config.seed 1 instead of 42), the size of the
  training noise in a cell; ensemble2 (DERIVED: trains nothing more): the mean cosine of
  flips' and seed1's networks, an ensemble of two; ensemble_rot (DERIVED): the
  mean cosine of flips' and rotate15's networks; ensemble_nb_rot (DERIVED):
  neighbours' and rotate15's networks (its difference taken from flips); ensemble_rigid_nb
  (DERIVED): the recipe's and rigid_neighbours' networks, scored aligned (its difference
  taken from the recipe);
* wide18: flips with 1.5x the widths and one more block (`wide` on flips);
* calibrated (DERIVED: trains nothing): epochs9's folds with the cosine mapped to SSIM
  by an isotonic regression fitted on pairs of the fold's own training heads;
* <base>_aligned (DERIVED: trains nothing): the base lever's folds scoring every pair
  after its second image is rigidly registered onto the first (deepssim_jax.align, the
  API's align=True): flips_aligned, neighbours_aligned, noise_neighbours_aligned,
  noise_copies_aligned, noise_copies_over3_aligned, noise_copies_neighbours_aligned,
  rigid_light_aligned (the recipe's own row by another route).
Each (lever, head) trains once into <workdir>/<lever>/<head> and is resumed or reused on a
rerun; results.json there caches its scores and the environment it was trained in
(benchlib.environment: CPU, backend, package versions; environment.json holds the one a
fold began in, and a fold resumed elsewhere records none). Training is deterministic
in one environment, not across them: the recipe's robex fold, retrained on another
machine, moved by -0.09 / -0.05 / -0.05 (T1 / T2-like / PD-like), as much as most levers
(that fold is flips' now).
So a row is compared with its base only where both were trained in one environment
("other environment" in the difference column otherwise): run the base beside the lever.

Usage:
  python bench/bench_generalization.py                                   # recipe, 5 heads
  python bench/bench_generalization.py --levers=recipe,no_contrast --heads=colin27,radiomics1
  python bench/bench_generalization.py --table_only   # reprint from the cached results
  python bench/bench_generalization.py --table_only --intervals  # and each cell's 95% bootstrap
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(BENCH, "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

import benchlib  # noqa: E402

# Each lever is (its base lever, the settings it changes there): its config is
# configs/builtin.py with the settings of its chain of bases applied root first, and its row
# is compared with its base's on the same heads. The recipe is configs/builtin.py as it is;
# the recipes before it are levers too (flips, epochs9, dropout_short, no_shape), so every
# cached row stays what the committed command computes.
_BEFORE = {"model.overrides": {"dropout": 0.33}, "train.num_epochs": 3,
           "optim.learning_rate": 1e-3}
_ROTATE15 = {"aug.p_rotate": 0.5, "aug.max_angle": 0.26}  # rotate15's, on other bases too
LEVERS = {
    "recipe": (None, {}),
    # the recipe before 2026-12-04 (4th change): flips and rotations up to 9.7 degrees in
    # training, scored plainly (the network learns the rigid invariance)
    "flips": ("recipe", {"aug.p_flip0": 0.33, "aug.p_flip1": 0.33, "aug.max_angle": 0.17,
                         "model.align": False}),
    # the recipe scored plainly: the rigid invariance it leaves to the alignment is missing
    "rigid_light": ("recipe", {"model.align": False}),
    # measured on the recipe (scored aligned as it is)
    "rigid_neighbours": ("recipe", {"aug.p_neighbour": 0.3}),
    # measured on flips
    "shape_strong": ("flips", {"aug.p_shape": 0.8, "aug.shape_max_scale": 0.25,
                               "aug.shape_max_shear": 0.15, "aug.shape_max_shift": 0.08}),
    "long36": ("flips", {"train.num_epochs": 36}),
    "blur": ("flips", {"aug.p_blur": 0.5}),
    "planes": ("flips", {"data.demo.extra_planes": (("coronal", 0.3, 0.65),
                                                    ("sagittal", 0.25, 0.75)),
                         "data.demo.extra_slices_per_head": 20}),
    "elastic": ("flips", {"aug.p_elastic": 0.5}),
    "wide18": ("flips", {"model.overrides": dict(depths=(1, 1, 3, 1), dims=(24, 48, 96, 192),
                                                 hidden_dim=256, embed_dim=128)}),
    "flat_contrast": ("flips", {"aug.contrast_min_range": 0.2}),
    "band3": ("flips", {"train.band_weight": 3.0}),
    "neighbours": ("flips", {"aug.p_neighbour": 0.3}),
    "rotate15": ("flips", _ROTATE15),
    "band3_neighbours": ("band3", {"aug.p_neighbour": 0.3}),  # the two together
    "rotate15_neighbours": ("rotate15", {"aug.p_neighbour": 0.3}),  # the two in one network
    "neighbours6": ("neighbours", {"aug.p_neighbour": 0.6}),  # twice the synthetic neighbours
    "noise": ("flips", {"aug.p_noise": 0.3}),
    "noise_strong": ("noise", {"aug.p_noise": 0.5, "aug.noise_max_sigma": 0.2}),
    "noise_neighbours": ("noise", {"aug.p_neighbour": 0.3}),  # noise and neighbours in one
    "noise_first": ("noise", {"aug.noise_first": True}),  # the noise before the contrast map
    "noise_strong_neighbours": ("noise_strong", {"aug.p_neighbour": 0.3}),
    "noise_strong_rotate15": ("noise_strong", _ROTATE15),
    "noise_copies": ("noise_strong", {"aug.noise_keep_copies": True}),  # noisy copies stay 1
    "noise_copies_neighbours": ("noise_copies", {"aug.p_neighbour": 0.3}),
    "noise_copies_band3": ("noise_copies", {"train.band_weight": 3.0}),
    "noise_copies_over3": ("noise_copies", {"train.over_weight": 3.0}),  # errs low
    "noise_copies_over6": ("noise_copies_over3", {"train.over_weight": 6.0}),  # lower still
    "seed1": ("flips", {"seed": 1}),  # flips again from another seed: the noise
    # flips before 2026-12-03 (3rd change): 9 epochs instead of 18
    "epochs9": ("flips", {"train.num_epochs": 9}),
    # flips before 2026-12-03 (2nd change): the paper's head dropout, 3 epochs at 1e-3
    "dropout_short": ("epochs9", _BEFORE),
    # measured on dropout_short
    "no_dropout": ("dropout_short", {"model.overrides": {"dropout": 0.0}}),
    "long3": ("dropout_short", {"train.num_epochs": 9, "optim.learning_rate": 2e-3}),
    "flat": ("dropout_short", {"pairs.balance_repeat": True}),
    "no_aug": ("dropout_short", {"aug.p_flip0": 0.0, "aug.p_flip1": 0.0, "aug.p_rotate": 0.0,
                                 "aug.p_gamma": 0.0, "aug.p_contrast": 0.0,
                                 "aug.p_shape": 0.0}),
    # flips before 2026-12-03 (1st change): without shape randomization
    "no_shape": ("dropout_short", {"aug.p_shape": 0.0}),
    # measured on no_shape
    "no_contrast": ("no_shape", {"aug.p_contrast": 0.0}),
    "less_self": ("no_shape", {"pairs.self_fraction": 0.05, "pairs.pool_factor": 6.0}),
    "unbalanced": ("no_shape", {"pairs.balance_bins": 0}),
    "gem": ("no_shape", {"model.head": "gem"}),
    "wide": ("no_shape", {"model.overrides": dict(depths=(1, 1, 3, 1), dims=(24, 48, 96, 192),
                                                  hidden_dim=256, embed_dim=128)}),
    "long": ("no_shape", {"train.num_epochs": 6}),
    "grid": ("no_shape", {"model.head": "grid"}),
    "grid43": ("no_shape", {"model.head": "grid", "model.overrides": {"grid": (4, 3)}}),
}


# Levers that train nothing: each scores its base lever's trained folds another way.
# calibrated: the fold's cosine through a monotone map to SSIM (isotonic regression) fitted
# on pairs of the fold's own training heads (calibration_pairs), never the held-out head.
# ensemble2: the mean of the cosines of ENSEMBLES' member levers, flips trained from two
# seeds (flips and seed1): a model of two networks, scored as one.
# ensemble_rot: flips' and rotate15's networks (two augmentations' errors, averaged);
# ensemble_nb_rot: neighbours' and rotate15's (the T1 lever's and the contrasts' lever's).
# ensemble_rigid_nb: the recipe's and rigid_neighbours' networks, both scored aligned: the
# registration is chosen by pixel correlation, so both score the same candidate and the
# mean of their aligned cosines is the aligned score of their ensemble (models.Ensemble).
# <base>_aligned: the base fold's network scoring each pair after b is registered onto a
# (deepssim_jax.align: the rigid candidate, flips x rotations up to 9 degrees, whose
# pixels correlate best), what `model.score(a, b, align=True)` computes.
# rigid_light_aligned is the recipe's row by another route (the same network, scored the
# same way): kept so that the table that chose the recipe stays reproducible.
ALIGNED = {f"{base}_aligned": base for base in (
    "flips", "neighbours", "noise_neighbours", "noise_copies", "noise_copies_over3",
    "noise_copies_neighbours", "rigid_light")}
DERIVED = {"calibrated": "epochs9", "ensemble2": "flips", "ensemble_rot": "flips",
           "ensemble_nb_rot": "flips", "ensemble_rigid_nb": "recipe", **ALIGNED}
ENSEMBLES = {"ensemble2": ("flips", "seed1"), "ensemble_rot": ("flips", "rotate15"),
             "ensemble_nb_rot": ("neighbours", "rotate15"),
             "ensemble_rigid_nb": ("recipe", "rigid_neighbours")}
# Calibration pairs: slices of one training head at most this far apart (and as many
# pairs of two heads), plus this share of augmented copies (target 1, like the self pairs).
# The goal (macro F1 per held-out cell) and the bootstrap of each cell's interval.
GOAL = 0.80
INTERVAL_ROUNDS = 2000
CALIBRATION_MAX_MM = 30.0
CALIBRATION_COPY_SHARE = 0.15


def base_of(lever: str):
  """The lever a row's difference is taken from (None for the recipe and plain SSIM)."""
  if lever in DERIVED:
    return DERIVED[lever]
  return LEVERS[lever][0] if lever in LEVERS else None


# Fixed intensity maps of min-max scaled T1 intensities (knots x -> y), our approximation of
# how tissues rank in other sequences: background ~0, CSF ~0.2-0.3, grey ~0.5, white ~0.7.
CONTRASTS = {
    "T1": None,
    "T2-like": ((0.0, 0.1, 0.3, 0.5, 0.7, 1.0), (0.0, 0.1, 1.0, 0.6, 0.35, 0.3)),
    "PD-like": ((0.0, 0.1, 0.3, 0.5, 0.7, 1.0), (0.0, 0.1, 0.75, 0.9, 0.7, 0.6)),
}
PAIRS_PER_CLASS = 40
DUPLICATE, SIMILAR = 1, 2  # pair labels (evaluate's classes; 0 is Different)
SIMILAR_MM = (2.0, 4.0)
DIFFERENT_MM = 20.0
NOISE_SIGMA = 0.05
MAX_ANGLE = 0.1745  # 10 degrees


def builtin_config():
  spec = importlib.util.spec_from_file_location("builtin_cfg",
                                                os.path.join(ROOT, "configs", "builtin.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod, mod.get_config()


def lever_config(lever: str, held_out: str):
  """configs/builtin.py trained without `held_out`, with the lever's chain of settings."""
  mod, c = builtin_config()
  c.data.demo.train_heads = tuple(h for h in mod.ALL_HEADS if h[0] != held_out)
  chain = []
  while lever is not None:
    lever, settings = LEVERS[lever]
    chain.insert(0, settings)
  for settings in chain:
    for key, value in settings.items():
      *path, field = key.split(".")
      node = c
      for name in path:
        node = node[name]
      if isinstance(value, dict):  # overrides: merged into the recipe's
        node[field].update(value)
      else:
        node[field] = value
  return c


def remap(image: np.ndarray, contrast: str) -> np.ndarray:
  if CONTRASTS[contrast] is None:
    return image
  xs, ys = CONTRASTS[contrast]
  u = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
  from deepssim_jax.data import images
  return images.zscore(np.interp(u, xs, ys), f"{contrast} remap")


def head_slices(head: str, band, size=(136, 112)):
  """(slice indices, z-scored images, slice spacing mm) of a head's band."""
  from deepssim_jax.data import demo, volumes
  path = os.path.join(demo.MRI_DIR, f"{head}-T1.nii.gz")
  vol, zooms = volumes.load_canonical(path)
  ks = volumes.band_slices(vol.shape[2], band)
  imgs = np.stack([volumes.slice_image(vol, zooms, k, size, None, path) for k in ks])
  return np.asarray(ks), imgs, float(zooms[2])


def labelled_pairs(held_out: str, contrast: str, seed: int = 0):
  """(images (N, H, W), pairs (P, 2) rows of images, labels (P,)) for a held-out head under a
  contrast (module docstring)."""
  from deepssim_jax.data import demo, images as images_lib
  mod, _ = builtin_config()
  bands = {h: (lo, hi) for h, lo, hi in mod.ALL_HEADS}
  rng = np.random.default_rng(seed)
  ks, imgs, mm = head_slices(held_out, bands[held_out])
  imgs = np.stack([remap(x, contrast) for x in imgs])
  n = len(ks)
  images = list(imgs)
  pairs, labels = [], []
  # Duplicates: PAIRS_PER_CLASS copies (distinct slices while the head has enough).
  for i in rng.choice(n, PAIRS_PER_CLASS, replace=n < PAIRS_PER_CLASS):
    x, _ = demo.augment(imgs[i], rng, p_flip=0.5, p_rotate=0.5, max_angle=MAX_ANGLE,
                        p_gamma=0.5)
    x = x + rng.normal(0.0, NOISE_SIGMA, x.shape).astype(np.float32)
    images.append(images_lib.zscore(x, "noisy copy"))
    pairs.append((int(i), len(images) - 1))
    labels.append(DUPLICATE)
  dist = np.abs(ks[:, None] - ks[None, :]) * mm
  lo, hi = SIMILAR_MM if mm <= SIMILAR_MM[1] else (mm, mm)
  near = np.argwhere(np.triu((dist >= lo - 1e-6) & (dist <= hi + 1e-6), 1))
  far = np.argwhere(np.triu(dist >= DIFFERENT_MM, 1))
  for rows, label, count in ((near, SIMILAR, PAIRS_PER_CLASS), (far, 0, PAIRS_PER_CLASS // 2)):
    for r in rng.choice(len(rows), min(len(rows), count), replace=False):
      pairs.append((int(rows[r][0]), int(rows[r][1])))
      labels.append(label)
  others = {h: np.stack([remap(x, contrast) for x in head_slices(h, bands[h])[1]])
            for h in bands if h != held_out}
  names = sorted(others)
  for j in range(PAIRS_PER_CLASS // 2):
    o = others[names[j % len(names)]]
    images.append(o[rng.integers(len(o))])
    pairs.append((int(rng.integers(n)), len(images) - 1))
    labels.append(0)
  return np.stack(images), np.asarray(pairs), np.asarray(labels)


def calibration_pairs(held_out: str, config, seed: int = 1):
  """(images, pairs, SSIM targets, weights) from the heads a fold trained on: every pair of
  slices of one head at most CALIBRATION_MAX_MM apart, as many random pairs of two heads,
  and an augmented copy of every slice (target 1, the fold's training augmentation,
  `config.aug`) weighted to CALIBRATION_COPY_SHARE of the total."""
  from deepssim_jax import ssim as ssim_lib
  from deepssim_jax.data import demo, images as images_lib
  mod, _ = builtin_config()
  rng = np.random.default_rng(seed)
  images, pairs, starts = [], [], []
  for head, lo, hi in mod.ALL_HEADS:
    if head == held_out:
      continue
    ks, imgs, mm = head_slices(head, (lo, hi))
    start = len(images)
    starts.append((start, len(ks)))
    images.extend(imgs)
    dist = np.abs(ks[:, None] - ks[None, :]) * mm
    pairs.extend((start + int(i), start + int(j))
                 for i, j in np.argwhere(np.triu(dist <= CALIBRATION_MAX_MM, 1)))
  n_within = len(pairs)
  for _ in range(n_within):
    (sa, na), (sb, nb) = (starts[i] for i in rng.choice(len(starts), 2, replace=False))
    pairs.append((sa + int(rng.integers(na)), sb + int(rng.integers(nb))))
  n_real = len(images)
  a = config.aug
  for i in range(n_real):
    x, _ = demo.augment(images[i], rng, p_flip=a.p_flip0, p_rotate=a.p_rotate,
                        max_angle=a.max_angle, p_gamma=a.p_gamma)
    images.append(images_lib.zscore(x, "copy"))
    pairs.append((i, len(images) - 1))
  images, pairs = np.stack(images), np.asarray(pairs)
  target = np.asarray(ssim_lib.ssim_indexed(images, images, pairs[:, 0], pairs[:, 1]))
  is_copy = np.arange(len(pairs)) >= 2 * n_within
  target = np.where(is_copy, 1.0, target)
  share = CALIBRATION_COPY_SHARE
  weights = np.where(is_copy, share * (~is_copy).sum() / ((1 - share) * is_copy.sum()), 1.0)
  return images, pairs, target, weights


def ensemble_scores(lever: str, held_out: str, members: list) -> dict:
  """An ensemble's scores: per contrast, the mean of its members' cosines (fold_scores
  results of one held-out head, scored on the same pairs) at the paper's thresholds."""
  from deepssim_jax import evaluate
  envs = [m.get("environment") for m in members]
  res = {"lever": lever, "held_out": held_out, "step": members[0]["step"],
         "train_s": sum(m["train_s"] for m in members), "contrasts": {},
         # members trained in different environments: None, never compared (table)
         "environment": envs[0] if same_environment(envs) else None}
  for contrast, c in members[0]["contrasts"].items():
    if any(m["contrasts"][contrast]["labels"] != c["labels"] for m in members):
      raise ValueError(f"{lever}/{held_out}/{contrast}: members scored different pairs")
    s = np.mean([m["contrasts"][contrast]["scores"] for m in members], axis=0)
    res["contrasts"][contrast] = {**c, "deepssim": evaluate.evaluate_scores(
        np.asarray(c["labels"]), s), "scores": s.tolist()}
  return res


def derived_scores(lever: str, held_out: str, workdir: str) -> dict:
  """A DERIVED lever's scores: its base fold's model and cached pairs, another scoring (an
  ensemble's: its members' folds, trained if missing)."""
  from deepssim_jax import fileio
  if lever in ENSEMBLES:
    res = ensemble_scores(lever, held_out, [fold_scores(m, held_out, workdir)
                                            for m in ENSEMBLES[lever]])
    fileio.write_json(os.path.join(workdir, lever, held_out, "results.json"), res)
    return res
  from deepssim_jax import api, evaluate
  base = fold_scores(DERIVED[lever], held_out, workdir)
  model = api.load(os.path.join(workdir, DERIVED[lever], held_out) + ":best")
  if lever in ALIGNED:  # every pair scored again, b aligned onto a
    def rescore(contrast, c):
      imgs, pairs, labels = labelled_pairs(held_out, contrast)
      if labels.tolist() != c["labels"]:
        raise ValueError(f"{lever}/{held_out}/{contrast}: the pairs differ from the base's")
      return pair_scores(model, imgs, pairs, aligned=True)
    extra = {}
  else:  # calibrated: the cached cosines through an isotonic map fitted on training heads
    from sklearn.isotonic import IsotonicRegression
    imgs, pairs, target, weights = calibration_pairs(
        held_out, lever_config(DERIVED[lever], held_out))
    cos, _ = pair_scores(model, imgs, pairs, aligned=False)
    iso = IsotonicRegression(y_min=-1.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(cos, target, sample_weight=weights)
    rescore = lambda contrast, c: (iso.predict(np.asarray(c["scores"])), {})  # noqa: E731
    extra = {"calibration_pairs": int(len(pairs))}
  res = {"lever": lever, "held_out": held_out, "step": base["step"],
         "train_s": base["train_s"], **extra, "contrasts": {},
         "environment": base.get("environment")}
  for contrast, c in base["contrasts"].items():
    s, more = rescore(contrast, c)
    res["contrasts"][contrast] = {**c, **more, "deepssim": evaluate.evaluate_scores(
        np.asarray(c["labels"]), s), "scores": np.asarray(s).tolist()}
  fileio.write_json(os.path.join(workdir, lever, held_out, "results.json"), res)
  return res


def pair_scores(model, imgs: np.ndarray, pairs: np.ndarray, aligned: bool):
  """(scores, extra) of index pairs of `imgs`: the cosine of their embeddings, or, aligned,
  the score after the second image is rigidly registered onto the first
  (align.aligned_scores, what `model.score(a, b, align=True)` computes), with the share of
  pairs the registration moved."""
  if aligned:
    from deepssim_jax import align
    s, chosen = align.aligned_scores(model.embed, imgs, imgs, pairs=pairs)
    return np.asarray(s), {"moved": float(np.mean(chosen != 0))}
  emb = model.embed(imgs)
  return np.sum(emb[pairs[:, 0]] * emb[pairs[:, 1]], axis=1), {}


def fold_scores(lever: str, held_out: str, workdir: str) -> dict:
  """Trains (or reuses) the fold and scores every contrast's pairs (aligned where the
  lever's config.model.align says so, as the shipped model is): cached in results.json."""
  import jax
  from deepssim_jax import api, jobs, validate
  from deepssim_jax import ssim as ssim_lib
  from deepssim_jax import evaluate
  out = os.path.join(workdir, lever, held_out)
  cache = os.path.join(out, "results.json")
  if os.path.isfile(cache):
    with open(cache) as f:
      return json.load(f)
  if lever in DERIVED:
    return derived_scores(lever, held_out, workdir)
  from deepssim_jax import fileio
  config = lever_config(lever, held_out)
  validate.check_deepssim(config, "train", jax.device_count())
  here = benchlib.environment()
  started = started_in(out, here)
  t0 = time.perf_counter()
  jobs.train_job(config, out)
  train_s = time.perf_counter() - t0
  model = api.load(f"{out}:best")
  res = {"lever": lever, "held_out": held_out, "train_s": train_s, "step": model.step,
         "contrasts": {}, "environment": here if started == here else None}
  for contrast in CONTRASTS:
    imgs, pairs, labels = labelled_pairs(held_out, contrast)
    s, more = pair_scores(model, imgs, pairs, aligned=config.model.align)
    ssim = np.asarray(ssim_lib.ssim_indexed(imgs, imgs, pairs[:, 0], pairs[:, 1]))
    res["contrasts"][contrast] = {
        "deepssim": evaluate.evaluate_scores(labels, s),
        "ssim": evaluate.evaluate_scores(labels, ssim), **more,
        "scores": s.tolist(), "ssim_scores": ssim.tolist(), "labels": labels.tolist()}
  fileio.write_json(cache, res)
  return res


def started_in(out: str, here: dict):
  """The environment a fold's training began in (<out>/environment.json, written when it
  begins here); None for a fold begun before environments were recorded. A fold resumed
  in another environment than it began in is a mix of two: its result records None."""
  from deepssim_jax import fileio
  path = os.path.join(out, "environment.json")
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  if os.path.isdir(os.path.join(out, "checkpoints")):
    return None
  fileio.write_json(path, here)
  return here


CEILING = "SSIM, copies as 1"


def same_environment(envs: list) -> bool:
  """Whether results were all trained in one known environment (benchlib.environment):
  the recipe trained on another CPU or jax version moved a cell by up to 0.09, as much as
  a lever, so a lever is compared with its base only where both ran in one environment."""
  return all(e is not None and e == envs[0] for e in envs)


def table(results: list) -> str:
  """Markdown: per lever and contrast, macro F1 per held-out head, the mean, the difference
  from its base (base_of) on the heads both have (their number where fewer than the row's),
  and the per-class recalls averaged over heads;
  plain SSIM (the same pairs) once per contrast, and SSIM's ceiling: the same SSIM with
  every copy scored as its source (1), what a metric that reproduced SSIM exactly and
  ignored the copy's flip / rotation / gamma / noise would get. AUC Dup/Sim: how well the
  scores rank copies above neighbouring slices (copies_over_neighbours), averaged over
  heads: what no placement of the thresholds can improve."""
  from deepssim_jax import evaluate
  heads = sorted({r["held_out"] for r in results})
  lines = ["| lever | contrast | " + " | ".join(heads) + " | mean macro F1 | vs its base "
           "(base_of), same heads | R Duplicate | R Similar | R Different | AUC Dup/Sim |",
           "|---|---|" + "---|" * (len(heads) + 6)]
  rows, env, auc = {}, {}, {}
  for r in results:
    env[(r["lever"], r["held_out"])] = r.get("environment")
    for contrast, c in r["contrasts"].items():
      labels = np.asarray(c["labels"])
      ceiling = np.where(labels == DUPLICATE, 1.0, np.asarray(c["ssim_scores"]))
      for row, metrics, scores in ((r["lever"], c["deepssim"], c["scores"]),
                                   ("plain SSIM", c["ssim"], c["ssim_scores"]),
                                   (CEILING, evaluate.evaluate_scores(labels, ceiling), ceiling)):
        rows.setdefault((row, contrast), {})[r["held_out"]] = metrics
        auc.setdefault((row, contrast), {})[r["held_out"]] = copies_over_neighbours(
            labels, np.asarray(scores))
  order = list(LEVERS) + list(DERIVED) + ["plain SSIM", CEILING]
  for (lever, contrast), by_head in sorted(
      rows.items(), key=lambda kv: (order.index(kv[0][0]), list(CONTRASTS).index(kv[0][1]))):
    f1 = {h: by_head[h]["macro_f1"] for h in by_head}
    mean = np.mean(list(f1.values()))
    base = rows.get((base_of(lever), contrast), {})
    delta = "-"
    common = [h for h in f1 if h in base]
    if base_of(lever) and common:
      if same_environment([env[(k, h)] for k in (lever, base_of(lever)) for h in common]):
        delta = f"{np.mean([f1[h] - base[h]['macro_f1'] for h in common]):+.3f}"
        delta += "" if len(common) == len(f1) else f" (n={len(common)})"
      else:
        delta = "other environment"
    rec = {name: np.mean([by_head[h]["per_class"][name]["recall"] for h in by_head])
           for name in ("duplicate", "similar", "different")}
    lines.append(f"| {lever} | {contrast} | " + " | ".join(
        f"{f1[h]:.3f}" if h in f1 else "-" for h in heads) +
        f" | {mean:.3f} (n={len(f1)}) | {delta} | {rec['duplicate']:.2f} | "
        f"{rec['similar']:.2f} | {rec['different']:.2f} | "
        f"{np.mean(list(auc[(lever, contrast)].values())):.3f} |")
  return "\n".join(lines)


def macro_f1_rows(y: np.ndarray, pred: np.ndarray, classes=(0, 1, 2)) -> np.ndarray:
  """Macro F1 of each row of (R, n) true and predicted labels (scikit-learn's f1_score,
  average="macro", zero_division=0, when every class occurs in a row's truth)."""
  f1 = []
  for c in classes:
    tp = np.sum((y == c) & (pred == c), axis=1)
    wrong = np.sum((y == c) != (pred == c), axis=1)  # false positives and negatives
    f1.append(np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0))
  return np.mean(f1, axis=0)


def macro_f1_interval(labels, scores, rounds: int = INTERVAL_ROUNDS, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of a cell's macro F1: its pairs resampled with replacement
  within each class (each class keeps its number of pairs), scored at the paper's
  thresholds. It measures how much the cell owes to which pairs were drawn (radiomics1 has
  10 Similar pairs), not the training noise (seed1's row measures that)."""
  from deepssim_jax import evaluate
  labels = np.asarray(labels)
  pred = evaluate.classify(np.asarray(scores, np.float64))
  rng = np.random.default_rng(seed)
  idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), (rounds, int(np.sum(labels == c))))
                        for c in np.unique(labels)], axis=1)
  f1 = macro_f1_rows(labels[idx], pred[idx])
  lo, hi = np.quantile(f1, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def interval_table(results: list) -> str:
  """Markdown: each lever cell's macro F1 with its 95% bootstrap interval
  (macro_f1_interval), and how many of a row's cells reach 0.80 / have 0.80 inside."""
  heads = sorted({r["held_out"] for r in results})
  lines = ["| lever | contrast | " + " | ".join(heads) + " | cells >= 0.80 | 0.80 within |",
           "|---|---|" + "---|" * (len(heads) + 2)]
  cells = {}
  for r in results:
    for contrast, c in r["contrasts"].items():
      lo, hi = macro_f1_interval(c["labels"], c["scores"])
      cells.setdefault((r["lever"], contrast), {})[r["held_out"]] = (
          c["deepssim"]["macro_f1"], lo, hi)
  order = list(LEVERS) + list(DERIVED)
  for (lever, contrast), by_head in sorted(
      cells.items(), key=lambda kv: (order.index(kv[0][0]), list(CONTRASTS).index(kv[0][1]))):
    v = list(by_head.values())
    lines.append(f"| {lever} | {contrast} | " + " | ".join(
        "{:.3f} [{:.2f}, {:.2f}]".format(*by_head[h]) if h in by_head else "-" for h in heads)
        + f" | {sum(f >= GOAL for f, _, _ in v)} / {len(v)} | "
        f"{sum(lo <= GOAL <= hi for _, lo, hi in v)} / {len(v)} |")
  return "\n".join(lines)


def copies_over_neighbours(labels: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC of the Duplicate pairs' scores over the Similar pairs' (scikit-learn): the
  chance that a copy scores above a neighbouring slice, whatever the thresholds."""
  from sklearn.metrics import roc_auc_score
  keep = (labels == DUPLICATE) | (labels == SIMILAR)
  return float(roc_auc_score(labels[keep] == DUPLICATE, scores[keep]))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--levers", default="recipe")
  p.add_argument("--heads", default="all")
  p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "generalization"))
  p.add_argument("--out", default="", help="also write the markdown table here")
  p.add_argument("--table_only", action="store_true")
  p.add_argument("--intervals", action="store_true",
                 help="also print each cell's 95%% bootstrap interval (macro_f1_interval)")
  args = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from absl import flags, logging
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  mod, _ = builtin_config()
  heads = ([h for h, _, _ in mod.ALL_HEADS] if args.heads == "all"
           else args.heads.split(","))
  levers = args.levers.split(",")
  for lever in levers:
    if lever not in LEVERS and lever not in DERIVED:
      raise SystemExit(f"unknown lever {lever!r}; choose from {sorted(LEVERS) + sorted(DERIVED)}")
  results = []
  for lever in levers:
    for head in heads:
      cache = os.path.join(args.workdir, lever, head, "results.json")
      if args.table_only:
        if os.path.isfile(cache):
          with open(cache) as f:
            results.append(json.load(f))
        continue
      t0 = time.perf_counter()
      r = fold_scores(lever, head, args.workdir)
      results.append(r)
      c = r["contrasts"]
      print(f"{lever:12s} held out {head:11s}: macro F1 " + ", ".join(
          f"{k} {c[k]['deepssim']['macro_f1']:.3f} (SSIM {c[k]['ssim']['macro_f1']:.3f})"
          for k in CONTRASTS if k in c) + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
  md = table(results)
  if args.intervals:
    md += "\n\n" + interval_table(results)
  print(md)
  if args.out:
    with open(args.out, "w") as f:
      f.write(md + "\n")


if __name__ == "__main__":
  main()
