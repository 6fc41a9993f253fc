"""Geometry of 2-D images, in JAX: affine warps, rotation, flips, the candidate transforms
and area resizing (adaptive average pooling).

Two users share it: the augmentations (`augment`: a random flip and rotation per image, and
the shape randomization's affine warp of a pair)
and the paper's aligned SSIM (`ssim.aligned_ssim`, phi: the best SSIM over a grid of rigid
transforms of the second image). Both rotate with dm-pix's convention (`dm_pix.rotate`,
order 1, mode 'nearest': bilinear, counter-clockwise about the image centre, edge pixels
extended), here written as batched gathers. A candidate is indexed by one integer t: flip
state t // K (0 none, 1 left-right, 2 up-down, 3 both), then rotation by angles[t % K].
Everything is pure and jittable and acts on the last two axes of (..., H, W) arrays.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def sample(x: jax.Array, src_r: jax.Array, src_c: jax.Array) -> jax.Array:
  """Bilinear samples of (..., H, W) images at (h, w) source coordinates (row, column):
  (..., h, w), edge pixels extended (dm_pix's order 1, mode 'nearest'), as four gathers
  with one index map shared by the batch."""
  h, w = x.shape[-2:]
  src_r, src_c = jnp.broadcast_arrays(src_r, src_c)
  out_shape = x.shape[:-2] + src_r.shape
  r0, c0 = jnp.floor(src_r), jnp.floor(src_c)
  fr, fc = src_r - r0, src_c - c0
  clip_r = lambda i: jnp.clip(i, 0, h - 1).astype(jnp.int32)
  clip_c = lambda i: jnp.clip(i, 0, w - 1).astype(jnp.int32)
  flat = x.reshape(*x.shape[:-2], h * w)
  take = lambda i, j: jnp.take(flat, (i * w + j).reshape(-1), axis=-1).reshape(out_shape)
  ra, rb, ca, cb = clip_r(r0), clip_r(r0 + 1), clip_c(c0), clip_c(c0 + 1)
  return ((1 - fr) * ((1 - fc) * take(ra, ca) + fc * take(ra, cb))
          + fr * ((1 - fc) * take(rb, ca) + fc * take(rb, cb)))


def affine(x: jax.Array, m: jax.Array, shift: jax.Array) -> jax.Array:
  """Bilinear pull-back of (..., H, W) images through one affine map about the centre:
  output pixel p (row, column, centred) samples the input at m @ p + shift + centre, edge
  pixels extended (sample).

  Args:
    x: images (..., H, W).
    m: (2, 2) matrix acting on (row, column) offsets from the centre (may be traced).
    shift: (2,) offset in pixels (rows, columns) of the sampled point.

  Returns:
    The warped images, the shape and dtype of x. m the identity and shift 0: x exactly.
  """
  h, w = x.shape[-2:]
  r = jnp.arange(h, dtype=jnp.float32)[:, None] - (h - 1) / 2.0
  q = jnp.arange(w, dtype=jnp.float32)[None, :] - (w - 1) / 2.0
  src_r = m[0, 0] * r + m[0, 1] * q + (shift[0] + (h - 1) / 2.0)
  src_c = m[1, 0] * r + m[1, 1] * q + (shift[1] + (w - 1) / 2.0)
  return sample(x, src_r, src_c)


def displace(x: jax.Array, dr: jax.Array, dc: jax.Array) -> jax.Array:
  """Bilinear pull-back of (..., H, W) images through a displacement field: output pixel
  (r, c) samples the input at (r + dr[r, c], c + dc[r, c]), edge pixels extended (sample;
  scipy.ndimage.map_coordinates(order=1, mode='nearest')). dr = dc = 0: x exactly."""
  h, w = x.shape[-2:]
  r = jnp.arange(h, dtype=jnp.float32)[:, None]
  c = jnp.arange(w, dtype=jnp.float32)[None, :]
  return sample(x, r + dr, c + dc)


def area_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) averaging weights of torch's adaptive average pooling ('area'
  interpolation) along one axis: output i is the mean of inputs
  [floor(i n_in / n_out), ceil((i + 1) n_in / n_out))."""
  w = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    lo, hi = i * n_in // n_out, -(-(i + 1) * n_in // n_out)
    w[i, lo:hi] = 1.0 / (hi - lo)
  return w


def area_resize(x: jax.Array, size) -> jax.Array:
  """(..., H, W) -> (..., h, w) as torch.nn.functional.interpolate(mode='area') (MONAI's
  Resize default), i.e. adaptive_avg_pool2d: two small matmuls, any up or down scale."""
  wh = jnp.asarray(area_weights(x.shape[-2], size[0]))
  ww = jnp.asarray(area_weights(x.shape[-1], size[1]))
  return jnp.einsum("hH,...HW,wW->...hw", wh, x, ww, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def rotate(x: jax.Array, angle: jax.Array) -> jax.Array:
  """dm_pix.rotate(order=1, mode='nearest') of (..., H, W) images, all by the same angle.

  The same bilinear pull-back (counter-clockwise about the centre, edge pixels extended):
  `affine` with the rotation matrix, ~9x faster on CPU than dm-pix, which interpolates
  trilinearly over an (H, W, 1) volume per image. Angle 0 is the exact identity.

  Args:
    x: images (..., H, W).
    angle: the rotation in radians (a scalar, may be traced).

  Returns:
    The rotated images, the shape and dtype of x.
  """
  c, s = jnp.cos(angle), jnp.sin(angle)
  return affine(x, jnp.stack([jnp.stack([c, s]), jnp.stack([-s, c])]),
                jnp.zeros((2,), jnp.float32))


def transform(x: jax.Array, t: jax.Array, angles: jax.Array) -> jax.Array:
  """Candidate t of (..., H, W) images: flip state t // len(angles) (bit 0: left-right,
  bit 1: up-down), then rotation by angles[t % len(angles)] about the centre. t may be
  traced (a loop index)."""
  f = t // angles.shape[0]
  x = jnp.where(f % 2 == 1, jnp.flip(x, -1), x)
  x = jnp.where(f // 2 == 1, jnp.flip(x, -2), x)
  return rotate(x, angles[t % angles.shape[0]])


def num_candidates(angles: jax.Array, flips: bool = True) -> int:
  """How many rigid candidates there are: len(angles), times 4 with flips."""
  return (4 if flips else 1) * jnp.shape(angles)[0]


@functools.partial(jax.jit, static_argnames=("flips",))
def transform_candidates(x: jax.Array, angles: jax.Array, *, flips: bool = True) -> jax.Array:
  """Every rigid candidate (as tried by `ssim.aligned_ssim`), in its index order.

  Args:
    x: images (..., H, W).
    angles: (K,) rotation angles in radians (counter-clockwise, about the centre).
    flips: also the left-right, up-down and both flips.

  Returns:
    (T, ..., H, W), T = 4K (flips) or K; candidate t is `transform(x, t, angles)`.
  """
  angles = jnp.asarray(angles, jnp.float32)
  ts = jnp.arange(num_candidates(angles, flips))
  return jax.vmap(lambda t: transform(x, t, angles))(ts)
