"""FSIM as the DeepSSIM reference computes it (`fsim_reference`), batched and jitted.

The reference repository (brAIn-science/DeepSSIM, src/utils/fsim.py) scores its FSIM
baseline with a simplified formula on 8-bit grey images, not Zhang et al.'s (2011)
log-Gabor phase congruency:
  * "phase congruency" PC: the gradient magnitude of np.gradient (central differences,
    one-sided at the borders) divided by its image maximum (+ 1e-8);
  * gradient magnitude G: Sobel, [[1, 0, -1], [2, 0, -2], [1, 0, -1]] and its transpose,
    applied as OpenCV's filter2D does (correlation, borders reflected without repeating
    the edge pixel);
  * S = (2 G1 G2 + T2) / (G1^2 + G2^2 + T2) * (2 P1 P2 + T1) / (P1^2 + P2^2 + T1), T1 0.85,
    T2 160; FSIM = sum(S * max(P1, P2)) / (sum(max(P1, P2)) + 1e-8).
T2 is on the scale of 8-bit images, so each image is first min-max scaled to 0..255 and
rounded, as the PNG files the reference reads were written (data.images.write_png).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

T1 = 0.85
T2 = 160.0
EPS = 1e-8
SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)


def to_uint8_scale(x: jax.Array) -> jax.Array:
  """(n, H, W) images min-max scaled to 0..255 per image and rounded (a constant image
  gives zeros, as write_png writes it)."""
  lo = x.min(axis=(1, 2), keepdims=True)
  hi = x.max(axis=(1, 2), keepdims=True)
  span = jnp.where(hi > lo, hi - lo, 1.0)
  return jnp.where(hi > lo, jnp.round((x - lo) / span * 255.0), 0.0)


def _np_gradient(x: jax.Array, axis: int) -> jax.Array:
  """np.gradient along one axis: central differences inside, one-sided at the ends."""
  n = x.shape[axis]
  take = functools.partial(jax.lax.slice_in_dim, x, axis=axis)
  inner = (take(2, n) - take(0, n - 2)) / 2.0
  first = take(1, 2) - take(0, 1)
  last = take(n - 1, n) - take(n - 2, n - 1)
  return jnp.concatenate([first, inner, last], axis=axis)


def phase_congruency(x: jax.Array) -> jax.Array:
  """The reference's PC stand-in: normalised gradient magnitude, per image."""
  mag = jnp.sqrt(_np_gradient(x, 1) ** 2 + _np_gradient(x, 2) ** 2)
  return mag / (mag.max(axis=(1, 2), keepdims=True) + EPS)


def gradient_magnitude(x: jax.Array) -> jax.Array:
  """Sobel magnitude as cv2.filter2D computes it (correlation, BORDER_REFLECT_101)."""
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1)), mode="reflect")  # numpy's reflect = REFLECT_101
  h, w = x.shape[1:]
  gx = sum(float(SOBEL_X[u, v]) * p[:, u:u + h, v:v + w]
           for u in range(3) for v in range(3) if SOBEL_X[u, v])
  gy = sum(float(SOBEL_X[v, u]) * p[:, u:u + h, v:v + w]
           for u in range(3) for v in range(3) if SOBEL_X[v, u])
  return jnp.sqrt(gx ** 2 + gy ** 2)


@jax.jit
def fsim_reference(a: jax.Array, b: jax.Array) -> jax.Array:
  """The reference's FSIM of each pair of (n, H, W) images (any intensity scale) -> (n,)."""
  a = to_uint8_scale(jnp.asarray(a, jnp.float32))
  b = to_uint8_scale(jnp.asarray(b, jnp.float32))
  pa, pb = phase_congruency(a), phase_congruency(b)
  ga, gb = gradient_magnitude(a), gradient_magnitude(b)
  s = ((2 * ga * gb + T2) / (ga ** 2 + gb ** 2 + T2)) * ((2 * pa * pb + T1) /
                                                         (pa ** 2 + pb ** 2 + T1))
  pcm = jnp.maximum(pa, pb)
  return (s * pcm).sum(axis=(1, 2)) / (pcm.sum(axis=(1, 2)) + EPS)


def score(a: np.ndarray, b: np.ndarray, batch: int = 256) -> np.ndarray:
  """fsim_reference over paired stacks in fixed-size batches (one compilation) -> float64."""
  out = []
  for s in range(0, len(a), batch):
    x, y = np.asarray(a[s:s + batch], np.float32), np.asarray(b[s:s + batch], np.float32)
    n = len(x)
    if n < batch and len(a) > batch:  # pad the last batch to the compiled shape
      x = np.concatenate([x, np.repeat(x[-1:], batch - n, 0)])
      y = np.concatenate([y, np.repeat(y[-1:], batch - n, 0)])
    out.append(np.asarray(fsim_reference(x, y), np.float64)[:n])
  return np.concatenate(out) if out else np.zeros((0,))
