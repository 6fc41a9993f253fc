"""Explanation maps: which regions of two images make DeepSSIM call them alike (or not).

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
depends on the score. Measured (tests/test_explain.py, 4 middle slices): with a 40 x 48
box of a copy replaced by noise, the copy's dissimilarity map is 1.2-1.9 times higher
inside the box than outside for the built-in model (median 1.5), 1.6-2.5 times for a
demo-trained one (median 1.9): a coarse localisation, not a segmentation.

An exact copy has no map: at cosine 1 the cosine is at its maximum and its gradient
vanishes (what is left is float round-off, ~1e-9, which the scaling would blow up into a
full-contrast pattern of noise). Pairs whose cosine is at least `max_cosine` get maps of 0.

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


def default_config() -> ml_collections.ConfigDict:
  """The `explain` config section (config_lib.audit_sections includes it)."""
  c = ml_collections.ConfigDict()
  c.stages = (0, 1, 2, 3)     # ConvNeXt stages explained and averaged (reference: all four)
  c.eps = 1e-8                # the reference's epsilon of the per-stage and final scaling
  c.max_cosine = 0.99999      # pairs this similar (exact copies) get flat maps of 0
  c.in_report = True          # the audit report shows the maps of every gallery pair
  c.scores = ("similarity",)  # maps the report shows, one row per score (see SCORES)
  c.batch_size = 8            # pairs per compiled call (the last batch is padded)
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


def pair_maps(model: models.DeepSSIM, variables: Any, a: Array, b: Array, *,
              stages: Sequence[int] = (0, 1, 2, 3), score: str = "similarity",
              eps: float = 1e-8, max_cosine: float = 0.99999) -> tuple[Array, Array]:
  """Multi-scale LayerCAM maps of one pair or a batch of pairs (jit-compiled).

  Args:
    model: a DeepSSIM module (models.make_model / train.model_from_config).
    variables: its variables.
    a, b: (H, W) or (P, H, W) z-scored images (the model's input).
    stages: backbone stages explained and averaged.
    score: "similarity" (cosine: bright where the two images' content makes them match)
      or "dissimilarity" (1 - cosine: bright where they differ).
    eps: scaling epsilon (the reference's 1e-8).
    max_cosine: pairs at least this similar (exact copies) get maps of 0.

  Returns:
    (map_a, map_b), each of a's shape, float32 in [0, 1]: map_a explains a's side (b's
    embedding fixed), map_b b's side.
  """
  if score not in SCORES:
    raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape or a.ndim not in (2, 3):
    raise ValueError(f"need two (H, W) or (P, H, W) images of one shape, got {a.shape} and "
                     f"{b.shape}")
  single = a.ndim == 2
  if single:
    a, b = a[None], b[None]
  ma, mb = layercam_maps(model, variables, a, b, stages=tuple(int(s) for s in stages),
                         eps=float(eps), max_cosine=float(max_cosine))[score]
  return (ma[0], mb[0]) if single else (ma, mb)


def explain_pairs(model: models.DeepSSIM, variables: Any, a: np.ndarray, b: np.ndarray,
                  cfg: ml_collections.ConfigDict, mesh=None) -> dict[str, tuple]:
  """Maps of many pairs, in fixed-size batches sharded over the mesh (host arrays out).

  Args:
    model, variables: the embedding network.
    a, b: (P, H, W) images, pair p = (a[p], b[p]).
    cfg: the `explain` config section (stages, eps, max_cosine, scores, batch_size).
    mesh: device mesh (default parallel.make_mesh()).

  Returns:
    {score: (maps_a, maps_b)} for each of cfg.scores, numpy (P, H, W) float32 in [0, 1].
  """
  scores = tuple(cfg.scores)
  bad = [s for s in scores if s not in SCORES]
  if bad:
    raise ValueError(f"explain.scores: unknown {bad}; choose from {SCORES}")
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  if a.shape != b.shape or a.ndim != 3:
    raise ValueError(f"need (P, H, W) image stacks of one shape, got {a.shape} and {b.shape}")
  mesh = parallel.make_mesh() if mesh is None else mesh
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
