"""Pair similarity metrics by name: DeepSSIM and the baselines it is compared with.

Every metric is a function `score(ctx, a, b) -> (n,) float64` of two paired stacks of
z-scored images (a[i] is the training image, b[i] the synthetic one); higher means more
similar. `ctx` carries what a metric needs beyond the pair: the DeepSSIM model and
variables, the training bank (Carlini's criterion looks at a synthetic image's nearest
training images), batch sizes and the mesh. The registry is a plain dict:

  deepssim      cosine of DeepSSIM embeddings (any checkpoint)
  ssim          plain pixel SSIM (scikit-image's definition, deepssim_jax.ssim)
  pearson       pixel Pearson correlation (Akbar et al. 2025)
  carlini_l2    minus Carlini et al.'s relative L2: -||b - a|| / (alpha * mean distance of
                b to its n nearest training images), alpha 0.5, n 50; a pair is a copy
                under their criterion when the relative distance is < 1 (score > -1)
  convnext_raw  cosine of an untrained ConvNeXt's pooled features (no ImageNet weights:
                the sanity floor a learned metric must beat)
  fsim_reference  FSIM exactly as the DeepSSIM reference computes it (deepssim_jax.fsim:
                a gradient-based stand-in for phase congruency, not Zhang et al.'s FSIM)

Only deepssim and ssim live on [0, 1] where the paper's thresholds
(evaluate.PAPER_THRESHOLDS) mean something; evaluate the others with thresholds fitted on a
validation split.
"""

import functools
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from deepssim_jax import calibrate, embed, fileio, fsim, pairs as pairs_lib, parallel

Metric = Callable[[Dict[str, Any], np.ndarray, np.ndarray], np.ndarray]


def unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(first index of each distinct image, inverse): x[first][inverse] equals x bit for bit.
  Pair stacks repeat their images (a training image in many pairs), so embedding each
  distinct image once is cheaper; equality is exact (byte-wise)."""
  flat = np.ascontiguousarray(x).reshape(len(x), -1)
  rows = flat.view(np.dtype((np.void, flat.dtype.itemsize * flat.shape[1]))).ravel()
  _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
  return first, inverse.reshape(-1)


def _deepssim(ctx, a, b):
  def emb(x):
    first, inverse = unique_rows(x)
    e = embed.embed_array(ctx["model"], ctx["variables"], x[first], ctx["batch_size"],
                          ctx.get("mesh"), progress=False, embed_fn=ctx.get("embed_fn"))
    return e[inverse]
  return embed.cosine_pairs(emb(a), emb(b))


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
  mesh = ctx.get("mesh") or parallel.make_mesh()
  bs = embed.round_batch(ctx["batch_size"], mesh)
  v = parallel.replicate(ctx["raw_variables"], mesh)
  out = []
  for s in range(0, len(images), bs):
    x = np.asarray(images[s:s + bs], np.float32)
    f = ctx["raw_fn"](v, parallel.shard_global_batch(parallel.pad_to(x, bs), mesh))
    out.append(parallel.fetch(f).astype(np.float64)[:len(x)])
  return np.concatenate(out) if out else np.zeros((0, 0))


METRICS: Dict[str, Metric] = {
    "deepssim": _deepssim,
    "ssim": _ssim,
    "pearson": lambda ctx, a, b: pearson(a, b),
    "carlini_l2": _carlini,
    "convnext_raw": _convnext_raw,
    "fsim_reference": lambda ctx, a, b: fsim.score(a, b, ctx.get("batch_size", 256)),
}

# Metrics whose scores are on SSIM's scale, where the paper's fixed thresholds apply.
SSIM_SCALED = ("deepssim", "ssim")


def get(name: str) -> Metric:
  base = name.split("@")[0]
  if base not in METRICS:
    raise ValueError(f"unknown metric {name!r}; choose from {sorted(METRICS)} (deepssim may "
                     "name a checkpoint: deepssim@best, deepssim@latest:1200, "
                     "deepssim@path/to/workdir:best)")
  return METRICS[base]
