"""Two FSIMs of paired (n, H, W) grey images, batched and jitted.

fsim_reference: the DeepSSIM reference's simplified FSIM. The reference repository
(brAIn-science/DeepSSIM, src/utils/fsim.py) scores its FSIM baseline with a gradient-based
stand-in for phase congruency, not Zhang et al.'s log-Gabor one:
  * "phase congruency" PC: the gradient magnitude of np.gradient (central differences,
    one-sided at the borders) divided by its image maximum (+ 1e-8);
  * gradient magnitude G: Sobel, [[1, 0, -1], [2, 0, -2], [1, 0, -1]] and its transpose,
    applied as OpenCV's filter2D does (correlation, borders reflected without repeating
    the edge pixel);
  * S = (2 G1 G2 + T2) / (G1^2 + G2^2 + T2) * (2 P1 P2 + T1) / (P1^2 + P2^2 + T1), T1 0.85,
    T2 160; FSIM = sum(S * max(P1, P2)) / (sum(max(P1, P2)) + 1e-8).

fsim_zhang: the FSIM of L. Zhang, L. Zhang, X. Mou and D. Zhang, "FSIM: A Feature
Similarity Index for Image Quality Assessment", IEEE TIP 20(8):2378-2386, 2011, grey-scale
form (FSIM, not FSIMc), as piq 0.8 implements it (piq.fsim(x, y, data_range=255,
chromatic=False), itself a port of the authors' MATLAB FeatureSIM.m) and tested against:
  * images average-pooled by max(1, round(min(H, W) / 256)) (Python's round: 1.5 -> 2,
    2.5 -> 2; kernel = stride, remainder rows / columns dropped);
  * PC: Kovesi's phase congruency from 4 scales x 4 orientations of log-Gabor filters
    (min wavelength 6, mult 2, sigma_f 0.55, delta_theta 1.2, times a Butterworth low-pass
    of cutoff 0.45, order 15), applied by FFT (circular borders); the PC_2 energy
    sum_s(A cos(dphi) - |A sin(dphi)|) per orientation, less a noise threshold from the
    median of the smallest scale's |response|^2 (Rayleigh model, k = 2 standard deviations,
    divided by 1.7), clipped at 0; PC = (sum_o energy + eps) / (sum_{o,s} A + eps);
  * G: Scharr, [[-3, 0, 3], [-10, 0, 10], [-3, 0, 3]] / 16 and its transpose (correlation,
    zero padding);
  * S_PC, S_G as above with T1 0.85, T2 160 (0..255 scale); FSIM = sum(S_G S_PC PC_m) /
    sum(PC_m), PC_m = max(PC1, PC2) (no epsilon).

T2 is on the scale of 8-bit images, so score / score_zhang first min-max scale each image
to 0..255 and round (to_uint8_scale), as the PNG files the reference reads were written
(data.images.write_png): the two scores see identical inputs and differ only by formula.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

T1 = 0.85
T2 = 160.0
EPS = 1e-8
SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
# fsim_zhang: piq.fsim's defaults (piq/fsim.py) and its Scharr kernel (functional/filters.py).
SCALES, ORIENTATIONS, MIN_LENGTH, MULT = 4, 4, 6, 2
SIGMA_F, DELTA_THETA, K_NOISE = 0.55, 1.2, 2.0
SCHARR_X = np.array([[-3, 0, 3], [-10, 0, 10], [-3, 0, 3]], np.float32) / 16
EPS32 = float(np.finfo(np.float32).eps)  # piq's phase-congruency epsilon (input dtype's)


def to_uint8_scale(x: jax.Array, rounded: bool = True) -> jax.Array:
  """(n, H, W) images min-max scaled to 0..255 per image and, with rounded, rounded to
  integers: the 8-bit PNG the reference reads (data.images.write_png). A constant image
  gives zeros, as write_png writes it. The one home of that scaling (both FSIMs, the
  baselines' input in metrics, CLIP's in clip)."""
  lo = x.min(axis=(1, 2), keepdims=True)
  hi = x.max(axis=(1, 2), keepdims=True)
  span = jnp.where(hi > lo, hi - lo, 1.0)
  u = (x - lo) / span * 255.0
  return jnp.where(hi > lo, jnp.round(u) if rounded else u, 0.0)


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


def _correlate3(x: jax.Array, kernel: np.ndarray, mode: str) -> jax.Array:
  """3x3 correlation of (n, H, W) images, borders padded by jnp.pad's mode."""
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1)), mode=mode)
  h, w = x.shape[1:]
  return sum(float(kernel[u, v]) * p[:, u:u + h, v:v + w]
             for u in range(3) for v in range(3) if kernel[u, v])


def gradient_magnitude(x: jax.Array) -> jax.Array:
  """Sobel magnitude as cv2.filter2D computes it (correlation, BORDER_REFLECT_101)."""
  # numpy's "reflect" is OpenCV's REFLECT_101
  return jnp.sqrt(_correlate3(x, SOBEL_X, "reflect") ** 2 +
                  _correlate3(x, SOBEL_X.T, "reflect") ** 2)


def _similarity(p: jax.Array, q: jax.Array, t: float) -> jax.Array:
  return (2 * p * q + t) / (p ** 2 + q ** 2 + t)


@jax.jit
def fsim_reference(a: jax.Array, b: jax.Array) -> jax.Array:
  """The reference's FSIM of each pair of (n, H, W) images (any intensity scale) -> (n,)."""
  a = to_uint8_scale(jnp.asarray(a, jnp.float32))
  b = to_uint8_scale(jnp.asarray(b, jnp.float32))
  pa, pb = phase_congruency(a), phase_congruency(b)
  s = _similarity(gradient_magnitude(a), gradient_magnitude(b), T2) * _similarity(pa, pb, T1)
  pcm = jnp.maximum(pa, pb)
  return (s * pcm).sum(axis=(1, 2)) / (pcm.sum(axis=(1, 2)) + EPS)


def _grid_axis(n: int) -> np.ndarray:
  """piq.functional.get_meshgrid along one axis (odd sizes divide by n - 1, not n)."""
  if n % 2:
    return np.arange(-(n - 1) / 2, n / 2) / (n - 1)
  return np.arange(-n / 2, n / 2) / n


@functools.lru_cache(maxsize=16)
def log_gabor_bank(h: int, w: int) -> tuple[np.ndarray, ...]:
  """piq.fsim._construct_filters for (h, w) images plus the filter sums its noise model
  uses (computed in float64, returned as float32).

  Returns:
    filters (O, S, h, w), 0 frequency at [0, 0]; em_n (O,): sum of the smallest scale's
    squared filter; sum_an2 (O,): sum over scales and pixels of the squared spatial
    filters (ifft2(filter).real * sqrt(h w)); sum_ai_aj (O,): the same of the products of
    the spatial filters of each pair of scales s < s'.
  """
  gx, gy = np.meshgrid(_grid_axis(h), _grid_axis(w), indexing="ij")
  radius = np.sqrt(gx ** 2 + gy ** 2)
  theta = np.arctan2(-gy, gx)
  lowpass = np.fft.ifftshift(1.0 / (1.0 + (radius / 0.45) ** (2 * 15)))
  radius = np.fft.ifftshift(radius)
  theta = np.fft.ifftshift(theta)
  radius[0, 0] = 1.0
  radial = []
  for s in range(SCALES):
    g = np.exp(-np.log(radius * (MIN_LENGTH * MULT ** s)) ** 2 / (2 * math.log(SIGMA_F) ** 2))
    g = g * lowpass
    g[0, 0] = 0.0
    radial.append(g)
  theta_sigma = math.pi / (ORIENTATIONS * DELTA_THETA)
  angular = []
  for o in range(ORIENTATIONS):
    angle = o * math.pi / ORIENTATIONS
    ds = np.sin(theta) * math.cos(angle) - np.cos(theta) * math.sin(angle)
    dc = np.cos(theta) * math.cos(angle) + np.sin(theta) * math.sin(angle)
    angular.append(np.exp(-np.abs(np.arctan2(ds, dc)) ** 2 / (2 * theta_sigma ** 2)))
  filters = np.stack(angular)[:, None] * np.stack(radial)[None]  # (O, S, h, w)
  spatial = np.fft.ifft2(filters).real * math.sqrt(h * w)
  em_n = (filters[:, 0] ** 2).sum(axis=(-2, -1))
  sum_an2 = (spatial ** 2).sum(axis=(1, 2, 3))
  sum_ai_aj = sum((spatial[:, s] * spatial[:, t]).sum(axis=(-2, -1))
                  for s in range(SCALES) for t in range(s + 1, SCALES))
  return tuple(np.asarray(v, np.float32) for v in (filters, em_n, sum_an2, sum_ai_aj))


def _lower_median(v: jax.Array) -> jax.Array:
  """torch.median(v, dim=-1) of non-negative float32 values: the lower middle value for an
  even count (not the mean of the two middle ones). Found exactly by bisection on the bit
  patterns (for non-negative floats, int32 order is float order): 31 counting passes, ~5x
  faster than XLA's CPU sort on (n, 15232) rows."""
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)
  rank = (v.shape[-1] - 1) // 2 + 1  # the median: smallest t with rank values <= t

  def step(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = (bits <= mid[..., None]).sum(-1) >= rank
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo = jnp.zeros(v.shape[:-1], jnp.int32)
  hi = jnp.full(v.shape[:-1], 0x7F800000, jnp.int32)  # +inf
  lo, _ = jax.lax.fori_loop(0, 31, step, (lo, hi))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def phase_congruency_kovesi(x: jax.Array) -> jax.Array:
  """piq.fsim._phase_congruency of (n, H, W) images (0..255 scale) -> (n, H, W)."""
  n, h, w = x.shape
  filters, em_n, sum_an2, sum_ai_aj = log_gabor_bank(h, w)
  spectrum = jnp.fft.fft2(x.astype(jnp.complex64))

  def orientation(args):  # one orientation at a time: a quarter of the peak memory
    filt, em, an2, aiaj = args
    eo = jnp.fft.ifft2(spectrum[:, None] * filt)  # (n, S, h, w)
    even, odd = eo.real, eo.imag
    amplitude = jnp.sqrt(even ** 2 + odd ** 2)
    sum_e, sum_o = even.sum(1, keepdims=True), odd.sum(1, keepdims=True)
    norm = jnp.sqrt(sum_e ** 2 + sum_o ** 2) + EPS32
    mean_e, mean_o = sum_e / norm, sum_o / norm
    energy = (even * mean_e + odd * mean_o - jnp.abs(even * mean_o - odd * mean_e)).sum(1)
    # Noise: the (lower, as torch.median) median of the smallest scale's squared amplitude.
    median = _lower_median((amplitude[:, 0] ** 2).reshape(n, h * w))
    noise_power = (-median / math.log(0.5)) / em
    tau = jnp.sqrt((2 * noise_power * an2 + 4 * noise_power * aiaj) / 2)
    threshold = (tau * math.sqrt(math.pi / 2) +
                 K_NOISE * jnp.sqrt((2 - math.pi / 2) * tau ** 2)) / 1.7
    return (jnp.maximum(energy - threshold[:, None, None], 0.0), amplitude.sum(1))

  energy, amplitude = jax.lax.map(orientation, (filters, em_n, sum_an2, sum_ai_aj))
  return (energy.sum(0) + EPS32) / (amplitude.sum(0) + EPS32)


def _avg_pool(x: jax.Array, k: int) -> jax.Array:
  """torch.nn.functional.avg_pool2d(x, k) of (n, H, W) images (remainders dropped)."""
  if k == 1:
    return x
  n, h, w = x.shape
  x = x[:, :h // k * k, :w // k * k].reshape(n, h // k, k, w // k, k)
  return x.mean(axis=(2, 4))


@jax.jit
def fsim_zhang(a: jax.Array, b: jax.Array) -> jax.Array:
  """Zhang et al.'s grey-scale FSIM (piq.fsim, data_range=255, chromatic=False) of each
  pair of (n, H, W) images already on the 0..255 scale (T2 assumes it) -> (n,) float32."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  k = max(1, round(min(a.shape[1:]) / 256))  # Python's round, as piq
  both = _avg_pool(jnp.concatenate([a, b]), k)
  pc = phase_congruency_kovesi(both)
  grad = jnp.sqrt(_correlate3(both, SCHARR_X, "constant") ** 2 +
                  _correlate3(both, SCHARR_X.T, "constant") ** 2)
  n = a.shape[0]
  pa, pb, ga, gb = pc[:n], pc[n:], grad[:n], grad[n:]
  pcm = jnp.where(pa > pb, pa, pb)
  s = _similarity(ga, gb, T2) * _similarity(pa, pb, T1) * pcm
  return s.sum(axis=(1, 2)) / pcm.sum(axis=(1, 2))


@jax.jit
def _fsim_zhang_any_scale(a: jax.Array, b: jax.Array) -> jax.Array:
  return fsim_zhang(to_uint8_scale(jnp.asarray(a, jnp.float32)),
                    to_uint8_scale(jnp.asarray(b, jnp.float32)))


def _batched(fn, a: np.ndarray, b: np.ndarray, batch: int) -> np.ndarray:
  """fn over paired stacks in fixed-size batches (the last one padded: one compilation)."""
  out = []
  for s in range(0, len(a), batch):
    x, y = np.asarray(a[s:s + batch], np.float32), np.asarray(b[s:s + batch], np.float32)
    n = len(x)
    if n < batch and len(a) > batch:  # pad the last batch to the compiled shape
      x = np.concatenate([x, np.repeat(x[-1:], batch - n, 0)])
      y = np.concatenate([y, np.repeat(y[-1:], batch - n, 0)])
    out.append(np.asarray(fn(x, y), np.float64)[:n])
  return np.concatenate(out) if out else np.zeros((0,))


def score(a: np.ndarray, b: np.ndarray, batch: int = 256) -> np.ndarray:
  """fsim_reference over paired stacks of images (any intensity scale) -> (n,) float64."""
  return _batched(fsim_reference, a, b, batch)


def score_zhang(a: np.ndarray, b: np.ndarray, batch: int = 256) -> np.ndarray:
  """fsim_zhang over paired stacks of images (any intensity scale, e.g. z-scored) -> (n,)
  float64. Each image is first min-max scaled to 0..255 and rounded (to_uint8_scale),
  the same preprocessing as fsim_reference's."""
  return _batched(_fsim_zhang_any_scale, a, b, batch)
