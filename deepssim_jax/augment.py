"""On-device image augmentations (dm-pix) that teach DeepSSIM alignment invariance.

Each transform fires independently per image with its own probability (the paper: flips
along each axis, a rotation uniform in +-0.17 rad and a gamma contrast change with gamma
uniform in [0.5, 1.5], each with p = 0.33). The SSIM target is never recomputed after
augmentation: the network must learn that a flipped/rotated/contrast-changed copy is
still the same image. All functions are pure, jittable and take an explicit PRNG key;
they act on z-scored 2-D images of shape (H, W) (single) or (B, H, W) (batched).
"""

import dataclasses
import math

import dm_pix as pix
import jax
import jax.numpy as jnp

from deepssim_jax import geometry
from deepssim_jax import ssim as ssim_lib
from deepssim_jax.data import images as images_lib


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities and ranges of the augmentations (all from the config)."""
  p_flip0: float = 0.33   # flip along axis 0 (rows, up-down)
  p_flip1: float = 0.33   # flip along axis 1 (columns, left-right)
  p_rotate: float = 0.33
  max_angle: float = 0.17  # radians; the rotation is uniform in [-max_angle, max_angle]
  p_gamma: float = 0.33
  gamma_min: float = 0.5
  gamma_max: float = 1.5
  renormalize: bool = True  # z-score again after the transforms (the network's input)
  # Contrast randomization (ours): with p_contrast, both images of a pair pass through one
  # random intensity map before anything else, and the target becomes their SSIM after it.
  p_contrast: float = 0.0
  contrast_knots: int = 6
  # The spread of a map's tissue knots is uniform in [contrast_min_range, 1] of the range
  # (1: the maps above, unchanged); below 1, some maps are flat (weak tissue contrast over
  # dark air, as in proton density), where SSIM still sees the faint structure.
  contrast_min_range: float = 1.0
  # Shape randomization (ours): with p_shape, both images of a pair go through one random
  # affine warp (log-scale per axis uniform in +-shape_max_scale, shear in +-shape_max_shear,
  # shift in +-shape_max_shift of the size), and the target becomes their SSIM after it:
  # heads of other sizes and proportions than the training heads.
  p_shape: float = 0.0
  shape_max_scale: float = 0.15
  shape_max_shear: float = 0.1
  shape_max_shift: float = 0.05
  # Resolution randomization (ours): with p_blur, both images of a pair are smoothed by one
  # Gaussian (sigma uniform in [blur_min_sigma, blur_max_sigma] pixels), and the target
  # becomes their SSIM after it: scanners of other resolution and smoothness.
  p_blur: float = 0.0
  blur_min_sigma: float = 0.5
  blur_max_sigma: float = 1.5
  # Anatomy randomization (ours): with p_elastic, both images of a pair go through one
  # smooth random displacement field (control points on an elastic_grid x elastic_grid
  # grid, each displaced uniformly in +-elastic_max_disp pixels per axis, interpolated
  # bilinearly), and the target becomes their SSIM after it: heads of other anatomy.
  p_elastic: float = 0.0
  elastic_grid: int = 5
  elastic_max_disp: float = 6.0
  # Synthetic neighbours (ours): with p_neighbour, a pair becomes an image and that image
  # warped by a smooth random displacement field (control points on a neighbour_grid x
  # neighbour_grid grid, each uniform in +-m pixels per axis, m uniform in
  # [neighbour_min_disp, neighbour_max_disp]), target their SSIM: pairs spread over the
  # decision band, which the few neighbouring slices of a handful of heads leave thin.
  p_neighbour: float = 0.0
  neighbour_grid: int = 5
  neighbour_min_disp: float = 0.5
  neighbour_max_disp: float = 4.0
  # Noise randomization (ours): with p_noise, each image of a pair gets its own Gaussian
  # noise of one sigma uniform in [noise_min_sigma, noise_max_sigma] (of the z-scored
  # image's unit std), and the target becomes their SSIM after it: scans noisier than the
  # training heads, whose SSIM falls with the noise though the anatomy does not.
  p_noise: float = 0.0
  noise_min_sigma: float = 0.0
  noise_max_sigma: float = 0.1
  # Where the noise goes: last (False: an acquisition's noise comes after its anatomy and
  # contrast), or first (True: before the contrast map, which then scales it by its local
  # slope, so the noise differs between tissues, as in an image remapped from a noisy one).
  noise_first: bool = False
  # Noisy copies stay copies (True): a pair of two identical images (a self pair, target 1)
  # keeps its target 1 under the noise, as under flips, rotations and gamma, since a copy
  # with acquisition noise is still a copy; the noise lowers the target of other pairs only.
  noise_keep_copies: bool = False

  @classmethod
  def from_config(cls, cfg) -> "AugmentConfig":
    return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})


def gamma_contrast(x: jax.Array, gamma: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Gamma on an image of any range: min-max to [0, 1], x ** gamma, back to the range.

  z-scored images are partly negative, so gamma acts on the min-max scaled image, as
  MONAI's RandAdjustContrast does.
  """
  lo, hi = jnp.min(x), jnp.max(x)
  scale = hi - lo
  u = (x - lo) / (scale + eps)
  return pix.adjust_gamma(u, gamma) * scale + lo


def augment_image(key: jax.Array, x: jax.Array, cfg: AugmentConfig) -> jax.Array:
  """Augments one (H, W) image; each transform fires independently with its probability."""
  k = jax.random.split(key, 6)
  u = jax.random.uniform(k[0], (4,))
  x = jnp.where(u[0] < cfg.p_flip0, x[::-1, :], x)
  x = jnp.where(u[1] < cfg.p_flip1, x[:, ::-1], x)
  angle = jax.random.uniform(k[1], (), minval=-cfg.max_angle, maxval=cfg.max_angle)
  angle = jnp.where(u[2] < cfg.p_rotate, angle, 0.0)
  # dm_pix.rotate(order=1, mode="nearest") computed as four gathers (geometry.rotate, tested
  # equal to dm-pix): ~15x faster on CPU. Angle 0 is the exact identity; no branch needed.
  x = geometry.rotate(x, angle)
  gamma = jax.random.uniform(k[2], (), minval=cfg.gamma_min, maxval=cfg.gamma_max)
  x = jnp.where(u[3] < cfg.p_gamma, gamma_contrast(x, gamma), x)
  if cfg.renormalize:
    x = images_lib.zscore(x, xp=jnp)
  return x


def intensity_map(u: jax.Array, ys: jax.Array) -> jax.Array:
  """A piecewise-linear intensity map of [0, 1] through (i / (K - 1), ys[i]), i < K."""
  xs = jnp.linspace(0.0, 1.0, ys.shape[-1])
  return jnp.interp(u, xs, ys)


def random_map_values(key: jax.Array, knots: int, min_range: float = 1.0) -> jax.Array:
  """Knot values of a random, generally non-monotone intensity map: 0 stays 0 (air is dark
  in every MRI sequence), the others are uniform in [0, 1] and scaled so the largest is 1
  (the remapped image keeps the full range).

  With min_range < 1 the other knots are then squeezed into [1 - c, 1], y -> 1 - c (1 - y),
  c uniform in [min_range, 1]: a small c gives a flat map, tissues alike and far above air.
  min_range 1 draws exactly the maps above (same key use).
  """
  k_u, k_c = jax.random.split(key) if min_range < 1.0 else (key, None)
  ys = jax.random.uniform(k_u, (knots,), minval=0.0, maxval=1.0).at[0].set(0.0)
  ys = ys / jnp.maximum(jnp.max(ys), 1e-3)
  if k_c is None:
    return ys
  c = jax.random.uniform(k_c, (), minval=min_range, maxval=1.0)
  return (1.0 - c * (1.0 - ys)).at[0].set(0.0)


def remap(x: jax.Array, ys: jax.Array) -> jax.Array:
  """An image (any range) through intensity_map on its min-max scaled values, z-scored."""
  lo, hi = jnp.min(x), jnp.max(x)
  return images_lib.zscore(intensity_map((x - lo) / jnp.maximum(hi - lo, 1e-6), ys), xp=jnp)


def _randomize_pairs(key: jax.Array, a: jax.Array, b: jax.Array, target: jax.Array, p: float,
                     make) -> tuple[jax.Array, jax.Array, jax.Array]:
  """With probability p per pair, pair i is replaced by make(key_i, a_i, b_i) (a new pair
  of (H, W) images) and its target by the SSIM of the new pair; other pairs unchanged. The
  key splits as (on, per-pair keys)."""
  n = a.shape[0]
  k_on, k_draw = jax.random.split(key)
  on = jax.random.uniform(k_on, (n,)) < p
  ta, tb = jax.vmap(make)(jax.random.split(k_draw, n), a, b)
  new_target = ssim_lib.ssim_pairs(ta, tb)
  pick = lambda new, old: jnp.where(on.reshape((n,) + (1,) * (old.ndim - 1)), new, old)
  return pick(ta, a), pick(tb, b), pick(new_target, target)


def _both(draw):
  """A pair maker for _randomize_pairs: one transform draw(key) (a function of an (H, W)
  image) applied to both images of the pair."""
  return lambda k, x, y: (lambda f: (f(x), f(y)))(draw(k))


def contrast_pairs(key: jax.Array, a: jax.Array, b: jax.Array, target: jax.Array,
                   cfg: AugmentConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Contrast randomization of a batch of pairs (B, H, W): with probability p_contrast a
  pair is drawn one random intensity map (random_map_values), applied to both images, and
  its target is replaced by the SSIM of the remapped pair (ssim.ssim_pairs), so the target
  stays the true SSIM of what the network sees. Other pairs are returned unchanged.

  Pairs share a map because a training pair is two images of one contrast; the network
  learns SSIM on contrasts it never saw. The stored target must be the plain SSIM of the
  pair (pairs.align False): an aligned target is not recomputed.
  """
  def draw(k):
    ys = random_map_values(k, cfg.contrast_knots, cfg.contrast_min_range)
    return lambda x: remap(x, ys)
  return _randomize_pairs(key, a, b, target, cfg.p_contrast, _both(draw))


def random_affine(key: jax.Array, cfg: AugmentConfig, size) -> tuple[jax.Array, jax.Array]:
  """(m (2, 2), shift (2,)) of a random warp for geometry.affine: per-axis scale
  exp(uniform +-shape_max_scale), a shear of rows by columns in +-shape_max_shear, a shift
  in +-shape_max_shift of each side."""
  k_s, k_h, k_t = jax.random.split(key, 3)
  log_s = jax.random.uniform(k_s, (2,), minval=-cfg.shape_max_scale, maxval=cfg.shape_max_scale)
  shear = jax.random.uniform(k_h, (), minval=-cfg.shape_max_shear, maxval=cfg.shape_max_shear)
  m = jnp.diag(jnp.exp(log_s)) @ jnp.array([[1.0, 0.0], [0.0, 1.0]]).at[0, 1].set(shear)
  shift = jax.random.uniform(k_t, (2,), minval=-cfg.shape_max_shift,
                             maxval=cfg.shape_max_shift) * jnp.asarray(size, jnp.float32)
  return m, shift


def shape_pairs(key: jax.Array, a: jax.Array, b: jax.Array, target: jax.Array,
                cfg: AugmentConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Shape randomization of a batch of pairs (B, H, W): with probability p_shape a pair is
  drawn one random affine warp (random_affine), applied to both images (z-scored again),
  and its target is replaced by the SSIM of the warped pair, so the target stays the true
  SSIM of what the network sees. Other pairs are returned unchanged. As for contrast_pairs,
  the stored target must be the plain SSIM of the pair (pairs.align False)."""
  def draw(k):
    m, shift = random_affine(k, cfg, a.shape[-2:])
    return lambda x: images_lib.zscore(geometry.affine(x, m, shift), xp=jnp)
  return _randomize_pairs(key, a, b, target, cfg.p_shape, _both(draw))


def blur(x: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """An (H, W) image smoothed by a Gaussian of `sigma` pixels (dm-pix's separable kernel of
  2 radius + 1 taps), the border read as the image's minimum (the background: no bright or
  dark rim appears)."""
  lo = jnp.min(x)
  y = pix.gaussian_blur((x - lo)[..., None], sigma, 2 * radius + 1)[..., 0]
  return y + lo


def blur_radius(cfg: AugmentConfig) -> int:
  """Kernel radius of blur_pairs: 3 of the largest sigma (at least 1 pixel)."""
  return max(1, int(math.ceil(3.0 * cfg.blur_max_sigma)))


def blur_pairs(key: jax.Array, a: jax.Array, b: jax.Array, target: jax.Array,
               cfg: AugmentConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Resolution randomization of a batch of pairs (B, H, W): with probability p_blur a pair
  is drawn one sigma uniform in [blur_min_sigma, blur_max_sigma], both images are blurred
  by it (blur; z-scored again) and its target is replaced by the SSIM of the blurred pair.
  Other pairs are returned unchanged. As for contrast_pairs, the stored target must be
  the plain SSIM of the pair (pairs.align False)."""
  radius = blur_radius(cfg)

  def draw(k):
    sigma = jax.random.uniform(k, (), minval=cfg.blur_min_sigma, maxval=cfg.blur_max_sigma)
    return lambda x: images_lib.zscore(blur(x, sigma, radius), xp=jnp)
  return _randomize_pairs(key, a, b, target, cfg.p_blur, _both(draw))


def smooth_field(key: jax.Array, grid: int, max_disp, size) -> jax.Array:
  """(2, H, W) row and column displacements (pixels) of a random smooth field: a
  grid x grid grid of control points spanning the image, each uniform in +-max_disp per
  axis, interpolated bilinearly between them (so no displacement exceeds max_disp)."""
  h, w = size
  d = jax.random.uniform(key, (2, grid, grid), minval=-1.0, maxval=1.0) * max_disp
  # Control point (i, j) sits at row i (h - 1) / (g - 1), column j (w - 1) / (g - 1).
  r = jnp.linspace(0.0, grid - 1.0, h)[:, None]
  c = jnp.linspace(0.0, grid - 1.0, w)[None, :]
  return jax.vmap(lambda f: geometry.sample(f, r, c))(d)


def random_displacement(key: jax.Array, cfg: AugmentConfig, size) -> jax.Array:
  """smooth_field on cfg.elastic_grid control points within +-cfg.elastic_max_disp."""
  return smooth_field(key, cfg.elastic_grid, cfg.elastic_max_disp, size)


def elastic_pairs(key: jax.Array, a: jax.Array, b: jax.Array, target: jax.Array,
                  cfg: AugmentConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Anatomy randomization of a batch of pairs (B, H, W): with probability p_elastic a pair
  is drawn one smooth random displacement field (random_displacement), both images are
  warped by it (geometry.displace; z-scored again) and its target is replaced by the SSIM
  of the warped pair: the same two slices of a head of somewhat different anatomy. Other
  pairs are returned unchanged. As for contrast_pairs, the stored target must be the plain
  SSIM of the pair (pairs.align False)."""
  def draw(k):
    dr, dc = random_displacement(k, cfg, a.shape[-2:])
    return lambda x: images_lib.zscore(geometry.displace(x, dr, dc), xp=jnp)
  return _randomize_pairs(key, a, b, target, cfg.p_elastic, _both(draw))


def neighbour_pairs(key: jax.Array, a: jax.Array, b: jax.Array, target: jax.Array,
                    cfg: AugmentConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Synthetic neighbours in a batch of pairs (B, H, W): with probability p_neighbour,
  pair i becomes (a_i, a_i warped) by its own smooth random field (smooth_field on
  neighbour_grid control points, the bound m uniform in [neighbour_min_disp,
  neighbour_max_disp]; z-scored again), target the SSIM of the two: an image beside a
  slightly different anatomy of itself, as a neighbouring slice is. Other pairs unchanged.
  The key splits as (on, per-pair (bound, field) keys)."""
  def warp(k, x, _):
    k_m, k_f = jax.random.split(k)
    m = jax.random.uniform(k_m, (), minval=cfg.neighbour_min_disp,
                           maxval=cfg.neighbour_max_disp)
    dr, dc = smooth_field(k_f, cfg.neighbour_grid, m, x.shape[-2:])
    return x, images_lib.zscore(geometry.displace(x, dr, dc), xp=jnp)
  return _randomize_pairs(key, a, b, target, cfg.p_neighbour, warp)


def noise_pairs(key: jax.Array, a: jax.Array, b: jax.Array, target: jax.Array,
                cfg: AugmentConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Noise randomization of a batch of pairs (B, H, W): with probability p_noise a pair is
  drawn one sigma uniform in [noise_min_sigma, noise_max_sigma], each image gets its own
  Gaussian noise of that sigma (two acquisitions' noise is independent; z-scored again),
  and the target is replaced by the SSIM of the noisy pair. Other pairs unchanged. With
  cfg.noise_keep_copies, a pair of two identical images keeps its target (a noisy copy is
  still a copy). The key splits as (on, per-pair (sigma, noise of a, noise of b) keys). As
  for contrast_pairs, the stored target must be the plain SSIM of the pair (pairs.align
  False)."""
  def add_noise(k, x, y):
    k_s, k_x, k_y = jax.random.split(k, 3)
    sigma = jax.random.uniform(k_s, (), minval=cfg.noise_min_sigma, maxval=cfg.noise_max_sigma)
    noisy = lambda kk, z: images_lib.zscore(z + sigma * jax.random.normal(kk, z.shape), xp=jnp)
    return noisy(k_x, x), noisy(k_y, y)
  na, nb, new_target = _randomize_pairs(key, a, b, target, cfg.p_noise, add_noise)
  if cfg.noise_keep_copies:
    new_target = jnp.where(jnp.all(a == b, axis=(1, 2)), target, new_target)
  return na, nb, new_target


# The pair randomizations in the order they run (noise last, or second with noise_first),
# each with its own key: fold_in of the step's key by the number here, so that a run
# without one draws what it always drew.
PAIR_RANDOMIZATIONS = {"p_neighbour": (neighbour_pairs, 11), "p_contrast": (contrast_pairs, 7),
                       "p_shape": (shape_pairs, 8), "p_blur": (blur_pairs, 9),
                       "p_elastic": (elastic_pairs, 10), "p_noise": (noise_pairs, 12)}


def randomize_pairs(key: jax.Array, a: jax.Array, b: jax.Array, target: jax.Array,
                    cfg: AugmentConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Every pair randomization whose probability is above 0, in PAIR_RANDOMIZATIONS' order:
  synthetic neighbours first (the others act on the new pairs too), then contrast, shape,
  resolution, anatomy and noise; with cfg.noise_first the noise comes right after the
  neighbours, before the contrast map. Each recomputes the targets of the pairs it changes."""
  order = [f for f in PAIR_RANDOMIZATIONS if f != "p_noise"]
  order.insert(1 if cfg.noise_first else len(order), "p_noise")
  for field in order:
    fn, salt = PAIR_RANDOMIZATIONS[field]
    if getattr(cfg, field) > 0:
      a, b, target = fn(jax.random.fold_in(key, salt), a, b, target, cfg)
  return a, b, target


def augment_batch(key: jax.Array, images: jax.Array, cfg: AugmentConfig) -> jax.Array:
  """Augments a (B, H, W) batch with an independent draw for every image."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(augment_image, in_axes=(0, 0, None))(keys, images, cfg)
