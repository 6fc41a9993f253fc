"""Pair similarity metrics by name: DeepSSIM and the baselines it is compared with.

Every metric is a function `score(ctx, a, b) -> (n,) float64` of two paired stacks of
z-scored images (a[i] is the training image, b[i] the synthetic one); higher means more
similar. `ctx` carries what a metric needs beyond the pair: the DeepSSIM model and
variables, the training bank (Carlini's criterion looks at a synthetic image's nearest
training images), batch sizes and the mesh. The registry is a plain dict:

  deepssim      cosine of DeepSSIM embeddings (any checkpoint)
  deepssim_aligned  the same after b is rigidly registered onto a (deepssim_jax.align:
                flips x rotations up to 9 degrees, chosen by pixel correlation; ours)
  ssim          plain pixel SSIM (scikit-image's definition, deepssim_jax.ssim)
  pearson       pixel Pearson correlation (Akbar et al. 2025)
  carlini_l2    minus Carlini et al.'s relative L2: -||b - a|| / (alpha * mean distance of
                b to its n nearest training images), alpha 0.5, n 50; a pair is a copy
                under their criterion when the relative distance is < 1 (score > -1)
  convnext_raw  cosine of an untrained ConvNeXt's pooled features (no ImageNet weights:
                the sanity floor a learned metric must beat)
  fsim_reference  FSIM exactly as the DeepSSIM reference computes it (deepssim_jax.fsim:
                a gradient-based stand-in for phase congruency, not Zhang et al.'s FSIM)
  fsim          Zhang et al.'s FSIM (IEEE TIP 2011: log-Gabor phase congruency, Scharr
                gradients), grey-scale, as piq computes it; same 8-bit inputs as above
  sscd, ums_sscd  cosine of SSCD descriptors (deepssim_jax.resnet, head gem_proj) with the
                weights of Chen et al. / UMS-SSCD; input as the reference's factories: the
                8-bit image scaled to [0, 1], resized to 288x288 (MONAI's area mode), repeated
                to RGB, (x - m) / m with m ImageNet's channel means (the reference divides by
                the means, not the stds); tested equal to the MONAI transforms
  dar           Dar et al.'s contrastive ResNet-50 (1 channel, native size, the 8-bit image
                min-max scaled, as MONAI's ScaleIntensity);
                scored as the reference's DarEmbeddingScorer: the Pearson correlation of the
                two embeddings (1 - scipy's correlation distance), not their cosine
  semdedup      SemDeDup's cosine of CLIP image embeddings (deepssim_jax.clip: open_clip's
                ViT image tower and the transform open_clip gives it, from 8-bit images);
                the reference names no CLIP model: eval.clip.model (ViT-B-32 by default)
                and eval.clip.act say which one the weights file holds
The last four need weights files (config.eval.weights.<name>: a path, or "random" for a
smoke run with seeded random weights; unset, --mode=evaluate reports them as missing); the
reference's thresholds for them come with BASELINES (reference_thresholds).

The paper's thresholds (evaluate.PAPER_THRESHOLDS) apply to deepssim and ssim, and to both
FSIMs: the reference's evaluation scripts have no FSIM scorer of their own, so its FSIM
matrix is classified with the DeepSSIM scorer's 0.60 / 0.85, the only one on that scale.
Evaluate pearson, carlini_l2 and convnext_raw with thresholds fitted on a validation split.
"""

import functools
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepssim_jax import (align, calibrate, clip, embed, fileio, fsim, geometry,
                          pairs as pairs_lib, parallel, resnet)

Metric = Callable[[Dict[str, Any], np.ndarray, np.ndarray], np.ndarray]


def unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(first index of each distinct image, inverse): x[first][inverse] equals x bit for bit.
  Pair stacks repeat their images (a training image in many pairs), so embedding each
  distinct image once is cheaper; equality is exact (byte-wise)."""
  flat = np.ascontiguousarray(x).reshape(len(x), -1)
  rows = flat.view(np.dtype((np.void, flat.dtype.itemsize * flat.shape[1]))).ravel()
  _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
  return first, inverse.reshape(-1)


def _embed(ctx, x: np.ndarray) -> np.ndarray:
  """The DeepSSIM checkpoint's unit embeddings of a stack (ctx's model and variables)."""
  return embed.embed_array(ctx["model"], ctx["variables"], x, ctx["batch_size"],
                           ctx.get("mesh"), progress=False, embed_fn=ctx.get("embed_fn"))


def _deepssim(ctx, a, b):
  def emb(x):
    first, inverse = unique_rows(x)
    return _embed(ctx, x[first])[inverse]
  return embed.cosine_pairs(emb(a), emb(b))


def _deepssim_aligned(ctx, a, b):
  # Each distinct image once; b's rigid candidates are embedded for each distinct b.
  fa, ia = unique_rows(a)
  fb, ib = unique_rows(b)
  return align.aligned_scores(functools.partial(_embed, ctx), a[fa], b[fb],
                              pairs=np.stack([ia, ib], 1))[0].astype(np.float64)


def _ssim(ctx, a, b):
  idx = np.arange(len(a))
  return pairs_lib.compute_ssim(a, b, idx, idx, batch_size=ctx["ssim_batch_size"],
                                mesh=ctx.get("mesh"), progress=False).astype(np.float64)


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pixel Pearson correlation of each pair (n, H, W) x (n, H, W) -> (n,)."""
  a = np.asarray(a, np.float64).reshape(len(a), -1)
  b = np.asarray(b, np.float64).reshape(len(b), -1)
  a = a - a.mean(axis=1, keepdims=True)
  b = b - b.mean(axis=1, keepdims=True)
  den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
  if np.any(den == 0):
    raise fileio.InputError(f"pearson: constant image in pair {int(np.argmax(den == 0))}")
  return (a * b).sum(axis=1) / den


def carlini_relative_l2(a: np.ndarray, b: np.ndarray, train: np.ndarray, alpha: float = 0.5,
                        n: int = 50, block: int = 256) -> np.ndarray:
  """Carlini et al.'s relative distance ||b - a|| / (alpha * mean_{n nearest t} ||b - t||).

  The criterion's one implementation is deepssim_jax.calibrate's (relative_distance on
  float64 pixel distances; why float64 is said there); here the judged training image is
  the pair's `a` rather than b's nearest. With a = b's nearest training image it equals the
  audit's carlini_ratio in pixel space.

  Args:
    a, b: paired stacks (m, H, W): training image, synthetic image.
    train: the training set (N, H, W) in which b's n nearest images are found.
    alpha, n: the criterion's constants (0.5, 50 in the paper); n is capped at N.
    block: synthetic images per block of the nearest-image search.

  Returns:
    (m,) relative distances (< 1: a copy under their criterion).
  """
  if len(train) == 0:
    raise fileio.InputError("carlini_l2: the training set is empty")
  if not len(b):
    return np.zeros(0)
  first, inverse = unique_rows(np.asarray(b))  # pairs repeat their synthetic images
  near = calibrate.pixel_knn_l2(np.asarray(b)[first], train, int(n), block)[inverse]
  return calibrate.relative_distance(near, alpha, direct=calibrate.pixel_l2(b, a))


def _carlini(ctx, a, b):
  return -carlini_relative_l2(a, b, ctx["train_images"], ctx["carlini_alpha"], ctx["carlini_n"])


def _convnext_raw(ctx, a, b):
  fa, fb = raw_features(ctx, a), raw_features(ctx, b)
  fa /= np.maximum(np.linalg.norm(fa, axis=1, keepdims=True), 1e-12)
  fb /= np.maximum(np.linalg.norm(fb, axis=1, keepdims=True), 1e-12)
  return np.sum(fa * fb, axis=1)


def raw_features(ctx, images: np.ndarray) -> np.ndarray:
  """Pooled features of the untrained backbone of ctx['model'] (seeded init), float64."""
  backbone = ctx["model"].backbone
  if "raw_variables" not in ctx:
    x = jnp.zeros((1, *images.shape[1:], 3), jnp.float32)
    ctx["raw_variables"] = jax.jit(functools.partial(backbone.init, train=False))(
        jax.random.key(ctx.get("seed", 0)), x)
    ctx["raw_fn"] = jax.jit(lambda v, x: jnp.mean(
        backbone.apply(v, jnp.repeat(x[..., None], 3, axis=-1), train=False), axis=(1, 2)))
  return _batched(ctx["raw_fn"], ctx["raw_variables"], images, ctx)


def _batched(fn, variables, images: np.ndarray, ctx) -> np.ndarray:
  """fn(variables, batch) over images in fixed-size padded batches sharded over the mesh
  (one compiled shape), as float64 rows."""
  mesh = ctx.get("mesh") or parallel.make_mesh()
  bs = embed.round_batch(ctx["batch_size"], mesh)
  v = parallel.replicate(variables, mesh)
  out = []
  for s in range(0, len(images), bs):
    x = np.asarray(images[s:s + bs], np.float32)
    f = fn(v, parallel.shard_global_batch(parallel.pad_to(x, bs), mesh))
    out.append(parallel.fetch(f).astype(np.float64)[:len(x)])
  return np.concatenate(out) if out else np.zeros((0, 0))


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)


def minmax_input(x: jax.Array, size: Optional[Sequence[int]], rgb: bool) -> jax.Array:
  """The reference factories' input from z-scored images (n, H, W): the 8-bit PNG it reads
  (min-max to 0..255 per image, rounded) scaled to [0, 1], resized to `size` unless None
  as MONAI's Resize does by default (area: adaptive average pooling), and with rgb repeated
  to three channels and standardised as (x - m) / m, m ImageNet's channel means (the
  reference divides by the means, not the stds) -> (n, H', W', 1 or 3)."""
  x = fsim.to_uint8_scale(x) / 255.0
  if size is not None:
    x = geometry.area_resize(x, size)
  x = x[..., None]
  if rgb:
    x = (jnp.repeat(x, 3, axis=-1) - _IMAGENET_MEAN) / _IMAGENET_MEAN
  return x


# The embedding baselines, each a dict of functions: make(ctx) -> the Flax module;
# load(path, model, torchscript) -> variables; prepare(z-scored (n, H, W)) -> the network's
# input; score "cosine" or "pearson" (of the two embeddings); thresholds: the reference's
# scorer's (t_low, t_high) (Dar's is one binary threshold); what: the file to download.
# TorchScript files are read only with config.eval.weights_torchscript=True (loading one
# runs code), and only when their state dict has torchvision's keys (resnet.KEY_TABLE).
BASELINES = {
    "sscd": dict(
        make=lambda ctx: resnet.SSCD(), load=functools.partial(resnet.load, in_channels=3),
        prepare=functools.partial(minmax_input, size=(288, 288), rgb=True), score="cosine",
        thresholds=(0.4, 0.6),
        what="sscd_disc_mixup.torchvision.pt from github.com/facebookresearch/sscd-copy-"
             "detection (the torchvision state dict; the reference loads the "
             ".torchscript.pt of the same model)"),
    "ums_sscd": dict(
        make=lambda ctx: resnet.SSCD(), load=functools.partial(resnet.load, in_channels=3),
        prepare=functools.partial(minmax_input, size=(288, 288), rgb=True), score="cosine",
        thresholds=(0.84, 0.89),
        what="the UMS-SSCD TorchScript model of Chen et al.'s SIDE (AAAI 2026)"),
    "dar": dict(
        make=lambda ctx: resnet.Dar(), load=functools.partial(resnet.load, in_channels=1),
        prepare=functools.partial(minmax_input, size=None, rgb=False), score="pearson",
        thresholds=(0.8030425, 0.8030425),
        what="Dar et al.'s contrastive ResNet-50 state dict (.pth, Nature BME 2025, "
             "s41551-025-01468-8)"),
    "semdedup": dict(
        make=lambda ctx: clip.make(ctx.get("clip_model", clip.DEFAULT_MODEL),
                                   ctx.get("clip_act", "gelu")),
        load=clip.load, prepare=clip.preprocess, score="cosine",
        thresholds=clip.REFERENCE_THRESHOLDS, what=clip.WEIGHTS),
}
# eval.weights.<name> = "random": seeded random weights (a smoke test of the pipeline, never
# a result); "" (unset): the metric is reported as missing, not scored.
RANDOM_WEIGHTS = "random"


def reference_thresholds(name: str) -> Optional[tuple[float, float]]:
  """The reference's own (t_low, t_high) for a metric, None where it uses the paper's
  (DeepSSIM, SSIM and FSIM share its DeepSSIM scorer's 0.60 / 0.85)."""
  base = name.split("@")[0]
  return tuple(BASELINES[base]["thresholds"]) if base in BASELINES else None


def weights_source(name: str, weights: Optional[Mapping[str, str]]) -> Optional[str]:
  """What a metric's weights come from: None (it needs none), "missing" (unset), "random"
  or the file's path. A path that names no file is an error naming it."""
  base = name.split("@")[0]
  if base not in BASELINES:
    return None
  path = (weights or {}).get(base, "") or ""
  if not path:
    return "missing"
  if path != RANDOM_WEIGHTS and not os.path.isfile(path):
    raise fileio.InputError(f"{path}: no such weights file (--config.eval.weights.{base}; "
                            f"expected {BASELINES[base]['what']})")
  return path


def missing_message(name: str) -> str:
  base = name.split("@")[0]
  return (f"{base}: no weights; set --config.eval.weights.{base}=<{BASELINES[base]['what']}> "
          f"(or ={RANDOM_WEIGHTS} for a smoke run with random weights)")


def baseline_embeddings(name: str, ctx, images: np.ndarray) -> np.ndarray:
  """(n, d) float64 embeddings of z-scored images (n, H, W) by a BASELINES network."""
  spec = BASELINES[name]
  if f"baseline:{name}" not in ctx:
    source = weights_source(name, ctx.get("weights"))
    if source == "missing":
      raise fileio.InputError(missing_message(name))
    model = spec["make"](ctx)
    if source == RANDOM_WEIGHTS:
      variables = model.init(jax.random.key(ctx.get("seed", 0)),
                             spec["prepare"](jnp.zeros((1, 64, 64), jnp.float32)))
    else:
      variables = spec["load"](source, model, torchscript=ctx.get("weights_torchscript", False))
    fn = jax.jit(lambda v, x: model.apply(v, spec["prepare"](x)))
    ctx[f"baseline:{name}"] = (variables, fn)
  variables, fn = ctx[f"baseline:{name}"]
  first, inverse = unique_rows(images)  # pairs repeat their images: embed each once
  return _batched(fn, variables, np.asarray(images)[first], ctx)[inverse]


def _baseline(name, ctx, a, b):
  ea, eb = baseline_embeddings(name, ctx, a), baseline_embeddings(name, ctx, b)
  if BASELINES[name]["score"] == "pearson":
    return pearson(ea, eb)
  return np.sum(ea * eb, axis=1)  # unit vectors: the cosine


METRICS: Dict[str, Metric] = {
    "deepssim": _deepssim,
    "deepssim_aligned": _deepssim_aligned,
    "ssim": _ssim,
    "pearson": lambda ctx, a, b: pearson(a, b),
    "carlini_l2": _carlini,
    "convnext_raw": _convnext_raw,
    "fsim_reference": lambda ctx, a, b: fsim.score(a, b, ctx.get("batch_size", 256)),
    "fsim": lambda ctx, a, b: fsim.score_zhang(a, b, ctx.get("batch_size", 256)),
    **{name: functools.partial(_baseline, name) for name in BASELINES},
}

# Metrics whose scores are on SSIM's scale, where the paper's fixed thresholds apply.
SSIM_SCALED = ("deepssim", "deepssim_aligned", "ssim", "fsim_reference", "fsim")


def get(name: str) -> Metric:
  base = name.split("@")[0]
  if base not in METRICS:
    raise ValueError(f"unknown metric {name!r}; choose from {sorted(METRICS)} (deepssim and "
                     "deepssim_aligned may name a checkpoint: deepssim@best, "
                     "deepssim@latest:1200, deepssim@path/to/workdir:best)")
  return METRICS[base]
