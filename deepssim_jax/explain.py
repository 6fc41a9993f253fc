"""Explanation maps: which regions of two images make DeepSSIM call them alike (or not).

Two methods (config `method`):

* "occlusion" (the default; ours): each image of the pair in turn has a `window` x `window`
  square set to 0 (the mean of a z-scored image), every `stride` pixels (the last squares
  flush with the border, so every pixel is covered), and the pair's cosine is recomputed
  with the other image as it is. With delta_w = cos(occluded by w) - cos, a pixel's value
  is the mean delta_w over the squares w that cover it: "similarity" maps ReLU(-value)
  (hiding the region lowers the similarity: it is what the pair shares), "dissimilarity"
  ReLU(value) (hiding it raises the similarity: it is where they differ), each divided by
  its maximum (+ eps). It costs one embedding per square and image (208 of them for a
  136 x 112 image at window 16, stride 8), run through the data-parallel embedding path.
* "layercam": the reference's multi-scale LayerCAM (below): one forward and backward pass.

Why occlusion is the default. Measured (tests/test_explain.py, the built-in model: 8
slices, each against a copy with a 40 x 48 box replaced by noise, the box in 3 places): the
altered copy's dissimilarity map, as mean inside / mean outside the box, has a median of
3.49 with occlusion (24 of 24 cases above 1) and 1.85 with LayerCAM (23 of 24). The gradient
of a mean-pooled embedding is spread over the whole image; occlusion measures each region's
effect on the score directly. Neither is a segmentation: a small square hidden inside a
large altered region changes little, so a large alteration can go unmarked.

Multi-scale LayerCAM of a pair, as the reference's DeepSSIM++ computes it
(scripts/explainability.py, src/utils/layercam.py of brAIn-science/DeepSSIM): the score of
the pair is back-propagated through the embedding network to the output A (h, w, C) of
every chosen ConvNeXt stage of each image, and per stage

  cam = ReLU(sum_c ReLU(d score / d A) * A)          (LayerCAM, Jiang et al. 2021)
  cam = (cam - min cam) / (max cam + eps)            (the reference's per-stage scaling)

is upsampled bilinearly to the image size; the stages' maps are averaged and the mean is
min-max scaled to [0, 1]. The reference explains all four stages (stem + stage 1, then
stages 2, 3, 4: its stage_a..stage_d, our `stages_0..3` outputs), with the other image's
embedding held fixed.

Which score: "similarity" back-propagates the cosine of the two embeddings (the
reference's choice): bright where the image's content raises the similarity, i.e. what the
two images share ("why do these match"). "dissimilarity" back-propagates 1 - cosine:
bright where the content lowers the similarity, i.e. where the images differ. Both come
from one backward pass (d(1 - cos) = -d cos), so `layercam_maps` returns both.

What the maps can tell apart depends on the head. With the paper's "wacv" head (mean pool
of the last stage), the outputs of stages 0-2 feed only the next stage's LayerNorm, which
ignores the scale of each position's channel vector, so sum_c (d score / d A_c) A_c = 0
there: ReLU(g) . A and ReLU(-g) . A sum to the same, and those stages' maps are the same for
both scores (they show where the score is sensitive, not which way). Only the last
stage's map tells the scores apart, and a mean-pooled head gives it the same gradient at
every position (Grad-CAM of the last stage). With the "gem" head (DeepSSIM++, what the
reference explains) every stage also feeds its own GeM pooling, so every stage's map
depends on the score.

An exact copy has no map: at cosine 1 the cosine is at its maximum and its gradient
vanishes (what is left is float round-off, ~1e-9, which the scaling would blow up into a
full-contrast pattern of noise). Pairs whose cosine is at least `max_cosine` get maps of 0
(with either method).

Both images of a pair, and several pairs, go through the network as one batch: the model
runs in inference mode (BatchNorm on running averages, no dropout), so no image's
embedding depends on another's, and the gradient of the sum of the pairs' cosines with
respect to one image's activations is exactly that image's own pair's gradient (with the
other embedding fixed, as in the reference).

Stage activations and their gradients are read without touching the model's code or
parameters: `nn.intercept_methods` adds a zero offset to each chosen stage's output, and
the gradient with respect to that offset is d score / d A (through every later use of A,
which for the "gem" head includes its GeM pooling of that stage).
"""

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deepssim_jax import models, parallel

Array = jax.Array

SCORES = ("similarity", "dissimilarity")
METHODS = ("occlusion", "layercam")
# What each method's maps are, for the audit report's caption.
METHOD_NOTES = {
    "occlusion": ("occlusion: the change of the DeepSSIM score when each {window} x {window} "
                  "square of one image is set to its mean (every {stride} pixels), averaged "
                  "over the squares covering each pixel"),
    "layercam": ("multi-scale LayerCAM of the DeepSSIM score (as DeepSSIM++ explains it), "
                 "averaged over the ConvNeXt stages {stages}"),
}


def describe(cfg: ml_collections.ConfigDict) -> str:
  """One line saying how the maps of an `explain` config are computed (for captions)."""
  check_method(cfg.method)
  return METHOD_NOTES[cfg.method].format(window=int(cfg.window), stride=int(cfg.stride),
                                         stages=tuple(int(i) for i in cfg.stages))


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"explain.method: unknown {method!r}; choose one of {METHODS}")


def default_config() -> ml_collections.ConfigDict:
  """The `explain` config section (config_lib.audit_sections includes it)."""
  c = ml_collections.ConfigDict()
  c.method = "occlusion"      # occlusion (ours) or layercam (the reference's); see METHODS
  c.window = 16               # occlusion: side of the zeroed square (pixels)
  c.stride = 8                # occlusion: step between squares (pixels)
  c.stages = (0, 1, 2, 3)     # ConvNeXt stages explained and averaged (reference: all four)
  c.eps = 1e-8                # the reference's epsilon of the per-stage and final scaling
  c.max_cosine = 0.99999      # pairs this similar (exact copies) get flat maps of 0
  c.in_report = True          # the audit report shows the maps of every gallery pair
  c.scores = ("similarity",)  # maps the report shows, one row per score (see SCORES)
  c.batch_size = 8            # layercam: pairs per compiled call (the last batch is padded)
  c.occlusion_batch_size = 64  # occlusion: occluded images per embedding batch
  return c


def stage_name(i: int) -> str:
  """Flax name of backbone stage i (models.ConvNeXt)."""
  return f"stages_{int(i)}"


def forward_with_offsets(model: models.DeepSSIM, variables: Any, x: Array,
                         offsets: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
  """Embeds x (inference mode) with offsets[name] added to that backbone stage's output.

  Args:
    model: a DeepSSIM module.
    variables: its variables.
    x: (B, H, W) z-scored images.
    offsets: {stage name: array broadcastable to that stage's (B, h, w, C) output}.

  Returns:
    (embeddings (B, D), {stage name: that stage's output, offset added}).
  """
  acts = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if (context.method_name == "__call__" and isinstance(mod, models.ConvNeXtStage)
        and mod.name in offsets):
      out = out + offsets[mod.name].astype(out.dtype)
      acts[mod.name] = out
    return out

  with nn.intercept_methods(interceptor):
    emb = model.apply(variables, x, train=False)
  missing = sorted(set(offsets) - set(acts))
  if missing:
    raise ValueError(f"the model has no backbone stage(s) {missing} (stages are "
                     f"{[stage_name(i) for i in range(len(model.backbone.depths))]})")
  return emb, acts


def stage_gradients(model: models.DeepSSIM, variables: Any, a: Array, b: Array,
                    stages: Sequence[int]) -> tuple[dict, dict, Array]:
  """Stage activations of a and b and the gradient of their cosine with respect to them.

  Args:
    model, variables: the embedding network.
    a, b: (P, H, W) the pairs' images.
    stages: backbone stage indices.

  Returns:
    (acts, grads, cos): acts and grads {stage name: (2P, h, w, C) float32}, rows [0, P)
    for a and [P, 2P) for b, grads of cos(a_p, b_p) with the other embedding fixed;
    cos (P,) the pairs' cosines.
  """
  p = a.shape[0]
  x = jnp.concatenate([a, b], axis=0)
  names = [stage_name(i) for i in stages]
  shapes = jax.eval_shape(
      lambda: forward_with_offsets(model, variables, x, {n: jnp.zeros(()) for n in names})[1])

  def total_cosine(offsets):
    emb, acts = forward_with_offsets(model, variables, x, offsets)
    cos = models.cosine(emb[:p], emb[p:])
    return jnp.sum(cos), (acts, cos)

  zeros = {n: jnp.zeros(s.shape, jnp.float32) for n, s in shapes.items()}
  grads, (acts, cos) = jax.grad(total_cosine, has_aux=True)(zeros)
  acts = {n: v.astype(jnp.float32) for n, v in acts.items()}
  return acts, grads, cos


def layercam(act: Array, weight: Array, eps: float = 1e-8) -> Array:
  """One stage's LayerCAM, scaled as the reference does.

  Args:
    act: (N, h, w, C) stage output.
    weight: (N, h, w, C) gradient of the score with respect to it.
    eps: added to the maximum.

  Returns:
    (N, h, w): ReLU(sum_c ReLU(weight) * act), then (cam - min) / (max + eps) per image.
  """
  cam = jax.nn.relu(jnp.sum(jax.nn.relu(weight) * act, axis=-1))
  lo = jnp.min(cam, axis=(1, 2), keepdims=True)
  hi = jnp.max(cam, axis=(1, 2), keepdims=True)
  return (cam - lo) / (hi + eps)


def fuse(cams: Sequence[Array], size: tuple[int, int], eps: float = 1e-8) -> Array:
  """Stage maps upsampled (bilinear) to `size`, averaged and min-max scaled to [0, 1].

  Args:
    cams: per stage (N, h_i, w_i) maps.
    size: (H, W) of the images.
    eps: added to the range.

  Returns:
    (N, H, W) in [0, 1].
  """
  up = [jax.image.resize(c, (c.shape[0], *size), "bilinear") for c in cams]
  m = jnp.mean(jnp.stack(up), axis=0)
  lo = jnp.min(m, axis=(1, 2), keepdims=True)
  hi = jnp.max(m, axis=(1, 2), keepdims=True)
  return (m - lo) / (hi - lo + eps)


@functools.partial(jax.jit, static_argnames=("model", "stages", "eps", "max_cosine"))
def layercam_maps(model: models.DeepSSIM, variables: Any, a: Array, b: Array, *,
                  stages: Sequence[int] = (0, 1, 2, 3), eps: float = 1e-8,
                  max_cosine: float = 0.99999) -> dict[str, Any]:
  """Both scores' multi-scale LayerCAM maps of a batch of pairs (one backward pass).

  Args:
    model: a DeepSSIM module (static: one compilation per model, stages and shape).
    variables: its variables.
    a, b: (P, H, W) z-scored images, pair p = (a[p], b[p]).
    stages: backbone stages explained (a tuple).
    eps: scaling epsilon.
    max_cosine: pairs whose cosine is at least this get maps of 0 (no gradient to read).

  Returns:
    {"similarity": (maps_a, maps_b), "dissimilarity": (maps_a, maps_b), "cosine": (P,)},
    maps (P, H, W) float32 in [0, 1] (see the module docstring for their meaning).
  """
  if isinstance(model, models.Ensemble):
    raise ValueError("layercam explains the stages of one network; an ensemble of "
                     f"{len(model.members)} is explained by method 'occlusion'")
  p, h, w = a.shape
  acts, grads, cos = stage_gradients(model, variables, a, b, tuple(stages))
  out = {"cosine": cos}
  for score, sign in (("similarity", 1.0), ("dissimilarity", -1.0)):
    cams = [layercam(acts[n], sign * grads[n], eps) for n in (stage_name(i) for i in stages)]
    maps = fuse(cams, (h, w), eps)
    flat = jnp.tile(cos >= max_cosine, 2)[:, None, None]
    maps = jnp.where(flat, 0.0, maps)
    out[score] = (maps[:p], maps[p:])
  return out


def occlusion_windows(size: tuple[int, int], window: int, stride: int) -> np.ndarray:
  """(K, H, W) bool masks of the occluding squares: window x window (clipped to the image)
  every `stride` pixels from the top left, plus a last row / column of squares flush with
  the bottom / right border, so every pixel is covered."""
  if window < 1 or stride < 1:
    raise ValueError(f"explain: window and stride must be >= 1 (got {window}, {stride})")

  def starts(n):
    last = max(n - window, 0)
    return sorted(set(range(0, last + 1, stride)) | {last})

  h, w = size
  masks = []
  for r in starts(h):
    for c in starts(w):
      m = np.zeros((h, w), bool)
      m[r:r + window, c:c + window] = True
      masks.append(m)
  return np.stack(masks)


def occlusion_maps(model: models.DeepSSIM, variables: Any, a: np.ndarray, b: np.ndarray, *,
                   window: int = 16, stride: int = 8, batch_size: int = 64,
                   eps: float = 1e-8, max_cosine: float = 0.99999, mesh=None,
                   embed_fn=None) -> dict[str, Any]:
  """Both scores' occlusion maps of a batch of pairs (module docstring).

  Args:
    model, variables: the embedding network.
    a, b: (P, H, W) z-scored images, pair p = (a[p], b[p]).
    window, stride: the occluding squares (occlusion_windows).
    batch_size: occluded images per embedding batch (sharded over the mesh).
    eps: added to each map's maximum.
    max_cosine: pairs whose cosine is at least this get maps of 0.
    mesh, embed_fn: as embed.embed_array (defaults: all devices, a new jitted function).

  Returns:
    {"similarity": (maps_a, maps_b), "dissimilarity": (maps_a, maps_b), "cosine": (P,)},
    maps (P, H, W) float32 numpy in [0, 1].
  """
  from deepssim_jax import embed as embed_lib  # pylint: disable=g-import-not-at-top
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  p, h, w = a.shape
  masks = occlusion_windows((h, w), int(window), int(stride))
  weights = masks.astype(np.float32) / masks.sum(0)  # each square's share of its pixels' mean
  mesh = parallel.make_mesh() if mesh is None else mesh
  variables = parallel.replicate(variables, mesh)
  embed_fn = embed_lib.make_embed_fn(model) if embed_fn is None else embed_fn

  def embed(x):
    return embed_lib.embed_array(model, variables, x, batch_size, mesh=mesh, progress=False,
                                 embed_fn=embed_fn)

  e = embed(np.concatenate([a, b]))
  cos = np.sum(e[:p] * e[p:], axis=1)
  out = {score: (np.zeros((p, h, w), np.float32), np.zeros((p, h, w), np.float32))
         for score in SCORES}
  for i in range(p):
    if cos[i] >= max_cosine:
      continue
    for side, (x, other) in enumerate(((a[i], e[p + i]), (b[i], e[i]))):
      delta = embed(np.where(masks, 0.0, x[None]).astype(np.float32)) @ other - cos[i]
      value = np.tensordot(delta, weights, axes=1)
      for score, m in (("similarity", np.maximum(-value, 0)),
                       ("dissimilarity", np.maximum(value, 0))):
        out[score][side][i] = m / (m.max() + eps)
  return {**out, "cosine": cos}


def pair_maps(model: models.DeepSSIM, variables: Any, a: Array, b: Array, *,
              method: str = "occlusion", score: str = "similarity",
              stages: Sequence[int] = (0, 1, 2, 3), window: int = 16, stride: int = 8,
              eps: float = 1e-8, max_cosine: float = 0.99999) -> tuple[Array, Array]:
  """Explanation maps of one pair or a batch of pairs.

  Args:
    model: a DeepSSIM module (models.make_model / train.model_from_config).
    variables: its variables.
    a, b: (H, W) or (P, H, W) z-scored images (the model's input).
    method: "occlusion" or "layercam" (module docstring).
    score: "similarity" (bright where the two images' content makes them match) or
      "dissimilarity" (bright where they differ).
    stages: layercam: backbone stages explained and averaged.
    window, stride: occlusion: the occluding squares.
    eps: scaling epsilon (the reference's 1e-8).
    max_cosine: pairs at least this similar (exact copies) get maps of 0.

  Returns:
    (map_a, map_b), each of a's shape, float32 in [0, 1]: map_a explains a's side (b's
    embedding fixed), map_b b's side.
  """
  if score not in SCORES:
    raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")
  check_method(method)
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape or a.ndim not in (2, 3):
    raise ValueError(f"need two (H, W) or (P, H, W) images of one shape, got {a.shape} and "
                     f"{b.shape}")
  single = a.ndim == 2
  if single:
    a, b = a[None], b[None]
  if method == "occlusion":
    ma, mb = occlusion_maps(model, variables, np.asarray(a), np.asarray(b), window=window,
                            stride=stride, eps=float(eps),
                            max_cosine=float(max_cosine))[score]
  else:
    ma, mb = layercam_maps(model, variables, a, b, stages=tuple(int(s) for s in stages),
                           eps=float(eps), max_cosine=float(max_cosine))[score]
  return (ma[0], mb[0]) if single else (ma, mb)


def explain_pairs(model: models.DeepSSIM, variables: Any, a: np.ndarray, b: np.ndarray,
                  cfg: ml_collections.ConfigDict, mesh=None) -> dict[str, tuple]:
  """Maps of many pairs, in fixed-size batches sharded over the mesh (host arrays out).

  Args:
    model, variables: the embedding network.
    a, b: (P, H, W) images, pair p = (a[p], b[p]).
    cfg: the `explain` config section (method, its settings, eps, max_cosine, scores).
    mesh: device mesh (default parallel.make_mesh()).

  Returns:
    {score: (maps_a, maps_b)} for each of cfg.scores, numpy (P, H, W) float32 in [0, 1].
  """
  scores = tuple(cfg.scores)
  bad = [s for s in scores if s not in SCORES]
  if bad:
    raise ValueError(f"explain.scores: unknown {bad}; choose from {SCORES}")
  check_method(cfg.method)
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  if a.shape != b.shape or a.ndim != 3:
    raise ValueError(f"need (P, H, W) image stacks of one shape, got {a.shape} and {b.shape}")
  mesh = parallel.make_mesh() if mesh is None else mesh
  if cfg.method == "occlusion":
    res = occlusion_maps(model, variables, a, b, window=int(cfg.window),
                         stride=int(cfg.stride), batch_size=int(cfg.occlusion_batch_size),
                         eps=float(cfg.eps), max_cosine=float(cfg.max_cosine), mesh=mesh)
    return {s: res[s] for s in scores}
  n_dev = mesh.devices.size
  bs = max(n_dev, -(-int(cfg.batch_size) // n_dev) * n_dev)
  variables = parallel.replicate(variables, mesh)
  kw = dict(stages=tuple(int(s) for s in cfg.stages), eps=float(cfg.eps),
            max_cosine=float(cfg.max_cosine))
  out = {s: ([], []) for s in scores}
  for start in range(0, len(a), bs):
    n = len(a[start:start + bs])
    xa, xb = (parallel.shard_global_batch(parallel.pad_to(x[start:start + bs], bs), mesh)
              for x in (a, b))
    res = parallel.fetch(layercam_maps(model, variables, xa, xb, **kw))
    for s in scores:
      out[s][0].append(np.asarray(res[s][0])[:n])
      out[s][1].append(np.asarray(res[s][1])[:n])
  empty = np.zeros((0, *a.shape[1:]), np.float32)
  return {s: tuple(np.concatenate(m) if m else empty for m in out[s]) for s in scores}
