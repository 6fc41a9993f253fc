"""SSIM targets: scikit-image's SSIM on z-scored images, in JAX, fast for many pairs.

DeepSSIM learns to reproduce one number per (training, synthetic) image pair: the SSIM that
scikit-image's `structural_similarity` returns with its defaults (7x7 uniform window,
K1 = 0.01, K2 = 0.03, sample covariance, mean over the valid, border-cropped region) on
z-scored images, with data_range = max - min of the first z-scored image. This module is
the only place that number is computed.

Two ways to compute it, tested equal to each other and to scikit-image (<= 1e-5):

* `ssim_pairs`: the plain per-pair form, `dm_pix.ssim` with a 7x7 mean filter over the
  VALID region. scikit-image multiplies variances and covariance by N / (N - 1) (N = 49);
  dividing k2 by sqrt(N / (N - 1)) gives the same ratio. Differentiable.
* The moment form (`image_stats`, `ssim_all_pairs`, `ssim_indexed`, `aligned_ssim`, and the
  host functions `ssim`, `ssim_matrix`): the same formula, differentiable too, faster and
  more accurate. Second moments are taken of each image minus its minimum (SSIM's
  covariances do not change under such shifts): in a flat background they are then exact
  zeros, not float32 cancellation noise, which on MRI slices (a constant background after
  z-scoring) keeps the worst error against float64 scikit-image at ~8e-7 instead of ~8e-6
  (plain float32, dm-pix included). Every
  term of SSIM except the local mean of a*b belongs to ONE image (local mean, local
  variance, data range), so they are computed once per image; a pair costs only the 7x7 box
  sum of a*b and the SSIM formula. The box sum is a separable shift-sum over the 7 offsets
  (banded-matrix GEMMs were 2-3x slower on CPU). It runs in its own loop step (`lax.map`)
  so that XLA CPU materialises it instead of fusing it into the formula's reduction (3x
  slower), and the spatial mean is a dot with a ones vector (a plain loop fusion + a GEMV,
  2x faster than XLA CPU's fused reduction). Pairs are processed in blocks/steps of a few
  dozen so that every intermediate stays in cache and memory stays bounded. Unlike
  dm-pix, the covariance is not clipped to sqrt(var_a * var_b): it never exceeds it except
  by rounding (variances are clamped at eps^2 as in dm-pix).

z-scoring is `deepssim_jax.data.images.zscore` (the project's one z-score): the host
wrappers `ssim` and `ssim_matrix` z-score raw images with it, so a constant image (std 0) or
any NaN/inf raises `deepssim_jax.fileio.InputError` (a ValueError) naming the image; it never
returns NaN. The JAX-level functions take images that are already z-scored (float,
(B, H, W)) and check nothing, so they stay jittable.

Alignment (the paper's phi, `aligned_ssim`): the best SSIM over rigid transforms of the second
image. It is an SSIM form, so it lives here; the transforms themselves (4 flip states x a grid
of rotation angles, dm-pix's rotate as batched gathers) are `deepssim_jax.geometry`.
The transform acts on the z-scored b, which is then z-scored again (traced); as interpolation
and edge padding commute with affine intensity maps, that equals z-scoring the transformed raw
image, i.e. SSIM(zscore(a), zscore(phi(b))).

The module is longer than ~400 lines because it keeps one number's computations together:
both forms, the moment form's blocked all-pairs / indexed / aligned drivers, which share its
private helpers, and the host wrappers.
"""

import functools
from typing import Optional, Sequence, Union

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from deepssim_jax import fileio, geometry
from deepssim_jax.data import images as images_lib

Stats = dict  # see image_stats
Bank = Union[jax.Array, np.ndarray, Stats]

_HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------- plain form (dm-pix)


def _box_sum(x: jax.Array, win_size: int, axes: tuple[int, int]) -> jax.Array:
  """Sum over a win_size x win_size window, VALID region, as two shift-sums."""
  for axis in axes:
    n = x.shape[axis] - win_size + 1
    s = jax.lax.slice_in_dim(x, 0, n, axis=axis)
    for k in range(1, win_size):
      s = s + jax.lax.slice_in_dim(x, k, k + n, axis=axis)
    x = s
  return x


def _check_win_size(win_size: int, shape: Sequence[int]) -> None:
  if win_size < 3 or win_size % 2 == 0:
    raise ValueError(f"win_size must be odd and >= 3 (scikit-image's rule), got {win_size}")
  if min(shape[-2:]) < win_size:
    raise ValueError(f"images of size {tuple(shape[-2:])} are smaller than the "
                     f"{win_size}x{win_size} SSIM window")


def _cov_norm(win_size: int) -> float:
  n = win_size * win_size
  return n / (n - 1.0)


@functools.partial(jax.jit, static_argnames=("win_size", "k1", "k2"))
def ssim_pairs(a: jax.Array, b: jax.Array, *, win_size: int = 7, k1: float = 0.01,
               k2: float = 0.03) -> jax.Array:
  """scikit-image's default SSIM of image pairs, via dm_pix.ssim.

  Args:
    a: first images, z-scored, (B, H, W) float; data_range = max - min of each a.
    b: second images, (B, H, W).
    win_size, k1, k2: scikit-image's parameters (uniform window, sample covariance).

  Returns:
    (B,) SSIM values, float32. Differentiable in a and b.
  """
  _check_win_size(win_size, a.shape)
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  k2_eff = k2 / np.sqrt(_cov_norm(win_size))
  # dm-pix passes (H, W, 1): filter the squeezed channel (a trailing 1-axis is slow on CPU).
  box = lambda z: _box_sum(z[..., 0], win_size, (-2, -1))[..., None] / (win_size * win_size)

  def one(x, y):
    return pix.ssim(x[..., None], y[..., None], max_val=jnp.max(x) - jnp.min(x), k1=k1,
                    k2=k2_eff, filter_fn=box)

  return jax.vmap(one)(a, b)


# ------------------------------------------------------------------------- moment form


def _stats_one(x: jax.Array, win_size: int) -> Stats:
  x = x.astype(jnp.float32)
  n = win_size * win_size
  lo = jnp.min(x, axis=(-2, -1), keepdims=True)
  xs = x - lo
  mu = _box_sum(xs, win_size, (-2, -1)) / n
  var = _box_sum(xs * xs, win_size, (-2, -1)) / n - mu * mu
  var = jnp.maximum(var, jnp.finfo(jnp.float32).eps ** 2)  # as dm-pix
  return {"shifted": xs, "shift": lo[..., 0, 0], "mu": mu, "var": var,
          "data_range": jnp.max(x, axis=(-2, -1)) - lo[..., 0, 0]}


@functools.partial(jax.jit, static_argnames=("win_size", "batch_size"))
def image_stats(images: jax.Array, *, win_size: int = 7, batch_size: int = 64) -> Stats:
  """Per-image SSIM moments, computed once and reused by every pair of the image.

  Args:
    images: z-scored images, (N, H, W).
    win_size: the SSIM window.
    batch_size: images per step (bounds the temporary memory).

  Returns:
    {"shifted": the images minus their minimum (N, H, W) float32, "shift": the minimum
    (N,), "mu": local means of the shifted images (N, h, w), "var": local (biased)
    variances (N, h, w), "data_range": max - min (N,)}, h = H - win_size + 1 (same for w).
    Second moments come from the min-shifted images: flat background then gives exact
    zeros instead of float32 cancellation noise (worst error against float64
    scikit-image over 400 MRI slice pairs: 8e-7, against 8e-6 unshifted and for dm-pix).
  """
  _check_win_size(win_size, images.shape)
  images = jnp.asarray(images, jnp.float32)
  return jax.lax.map(lambda x: _stats_one(x, win_size), images,
                     batch_size=min(batch_size, images.shape[0]))


def _as_stats(bank: Bank, win_size: int) -> Stats:
  if isinstance(bank, dict):
    return bank
  return image_stats(jnp.asarray(bank, jnp.float32), win_size=win_size)


def _stats_win_size(stats: Stats) -> int:
  return stats["shifted"].shape[-2] - stats["mu"].shape[-2] + 1


def _ssim_from_moments(s, a: Stats, b: Stats, win_size, k1, k2):
  """Mean SSIM from the raw window sum `s` of shifted a * shifted b and per-image stats.

  Shapes broadcast (scalars per image already expanded); the last two axes are the valid
  region. Returns the leading shape.
  """
  range_a = a["data_range"]
  c1 = (k1 * range_a) ** 2
  c2 = (k2 * range_a) ** 2 / _cov_norm(win_size)
  mu_a = a["mu"] + a["shift"]
  mu_b = b["mu"] + b["shift"]
  p2 = 2.0 * mu_a * mu_b
  cov2 = s * (2.0 / (win_size * win_size)) - 2.0 * a["mu"] * b["mu"]  # 2 cov (shift-free)
  num = (p2 + c1) * (cov2 + c2)
  den = (mu_a * mu_a + mu_b * mu_b + c1) * (a["var"] + b["var"] + c2)
  r = num / den
  lead = r.shape[:-2]
  r = r.reshape(*lead, -1)
  # A GEMV with ones, not jnp.mean: on XLA CPU the elementwise part then stays one plain
  # loop fusion (2x faster); HIGHEST keeps it exact float32 on GPUs (no TF32).
  return jnp.dot(r, jnp.ones((r.shape[-1],), r.dtype), precision=_HIGHEST) / r.shape[-1]


def _expand(stats: Stats, axis: int) -> Stats:
  """Inserts a broadcast axis at `axis` of every entry; per-image scalars also get (h, w)."""
  out = {}
  for k, v in stats.items():
    v = jnp.expand_dims(v, axis)
    out[k] = v[..., None, None] if k in ("shift", "data_range") else v
  return out


def _cross_block(a: Stats, b: Stats, win_size: int, k1: float, k2: float) -> jax.Array:
  """SSIM of every pair of a block: a (n, ...) x b (m, ...) -> (n, m)."""
  bx = b["shifted"]
  # One loop step per image of a: XLA materialises the box sums before the formula.
  s = jax.lax.map(lambda x: _box_sum(x[None] * bx, win_size, (-2, -1)), a["shifted"])
  return _ssim_from_moments(s, _expand(a, 1), _expand(b, 0), win_size, k1, k2)


def _pad_rows(tree, n: int):
  def pad(x):
    extra = n - x.shape[0]
    if extra == 0:
      return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)], axis=0)
  return jax.tree.map(pad, tree)


@functools.partial(jax.jit, static_argnames=("block_a", "block_b", "win_size", "k1", "k2"))
def ssim_all_pairs(bank_a: Bank, bank_b: Bank, *, block_a: int = 4, block_b: int = 16,
                   win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """SSIM of every (a, b) pair of two image sets, blocked so memory stays bounded.

  Each image's moments are computed once (pass `image_stats` dicts to reuse them across
  calls); a block of block_a x block_b pairs holds block_a * block_b box-summed maps.

  Args:
    bank_a: first images, z-scored (N, H, W), or their `image_stats`; data_range from a.
    bank_b: second images (M, H, W), or their `image_stats`.
    block_a, block_b: pairs per block along each set (N, M need not divide them; the
      defaults suit CPUs, where a block's maps should stay in cache; use larger blocks on
      accelerators).
    win_size: the SSIM window (used when images, not stats, are passed).
    k1, k2: SSIM constants.

  Returns:
    (N, M) float32 SSIM matrix, equal to `ssim_pairs` of each pair to float tolerance.
  """
  a = _as_stats(bank_a, win_size)
  b = _as_stats(bank_b, win_size)
  win = _stats_win_size(a)
  if _stats_win_size(b) != win or a["shifted"].shape[1:] != b["shifted"].shape[1:]:
    raise ValueError(f"image sets differ: {a['shifted'].shape[1:]} vs "
                     f"{b['shifted'].shape[1:]} (or their window sizes)")
  n, m = a["shifted"].shape[0], b["shifted"].shape[0]
  block_a, block_b = min(block_a, n), min(block_b, m)
  na, nb = -(-n // block_a), -(-m // block_b)
  blocks = lambda t, k, size: jax.tree.map(lambda x: x.reshape(k, size, *x.shape[1:]),
                                           _pad_rows(t, k * size))
  ab, bb = blocks(a, na, block_a), blocks(b, nb, block_b)

  def row(a_blk):
    return jax.lax.map(lambda b_blk: _cross_block(a_blk, b_blk, win, k1, k2), bb)

  out = jax.lax.map(row, ab)  # (na, nb, block_a, block_b)
  return out.transpose(0, 2, 1, 3).reshape(na * block_a, nb * block_b)[:n, :m]


def _divisor_at_most(n: int, k: int) -> int:
  k = max(1, min(n, k))
  while n % k:
    k -= 1
  return k


def _pair_steps(p: int, chunk: int, sub: int) -> tuple[int, int, int]:
  """(steps, q, c): p pairs = steps outer steps x q inner steps x c pairs per inner step."""
  c = _divisor_at_most(p, sub)
  q = _divisor_at_most(p // c, max(1, chunk // c))
  return p // (c * q), q, c


def _to_steps(x: jax.Array, steps: int, q: int, c: int) -> jax.Array:
  """(P, ...) -> (steps, q, c, ...). Pair r * steps * q + s * q + t lands at [s, t, r]: the
  c axis stays the outermost of P, so a pair axis sharded over devices stays sharded."""
  return jnp.moveaxis(x.reshape(c, steps, q, *x.shape[1:]), 0, 2)


def _from_steps(x: jax.Array) -> jax.Array:
  steps, q, c = x.shape[:3]
  return jnp.moveaxis(x, 2, 0).reshape(steps * q * c, *x.shape[3:])


def _paired_step(a: Stats, b: Stats, win_size: int, k1: float, k2: float) -> jax.Array:
  """SSIM of aligned pairs laid out (q, c, ...) -> (q, c). The box sums run as q loop steps
  of c pairs, so XLA materialises them before the formula (see the module docstring)."""
  s = jax.lax.map(lambda xy: _box_sum(xy[0] * xy[1], win_size, (-2, -1)),
                  (a["shifted"], b["shifted"]))
  e = lambda t: {k: (v[..., None, None] if k in ("shift", "data_range") else v)
                 for k, v in t.items()}
  return _ssim_from_moments(s, e(a), e(b), win_size, k1, k2)


@functools.partial(jax.jit, static_argnames=("chunk", "sub", "win_size", "k1", "k2"))
def ssim_indexed(bank_a: Bank, bank_b: Bank, idx_a: jax.Array, idx_b: jax.Array, *,
                 chunk: int = 32, sub: int = 8, win_size: int = 7, k1: float = 0.01,
                 k2: float = 0.03) -> jax.Array:
  """SSIM of pairs (bank_a[idx_a[i]], bank_b[idx_b[i]]) from per-image moments.

  For the pair-table job: a few thousand images, ~1e5 sampled pairs. Pass `image_stats`
  of each bank (computed once) and batches of indices; the same bank may be both sides.
  The pairs run in steps of about `chunk` pairs (gathered from the banks inside the step,
  so memory stays bounded by the chunk, not the batch).

  Args:
    bank_a: first images, z-scored (N, H, W), or their `image_stats`; data_range from a.
    bank_b: second images (M, H, W), or their `image_stats`.
    idx_a, idx_b: (P,) integer indices into the banks (may be sharded over devices). Not
      range-checked here (JAX clamps out-of-range indices): validate keys on the host.
    chunk: pairs per step (bounds the temporary memory: ~chunk * 4 maps of (h, w)).
    sub: pairs per inner box-sum step (a CPU-fusion knob; keep it a multiple of the
      device count when idx is sharded).
    win_size: the SSIM window (used when images, not stats, are passed).
    k1, k2: SSIM constants.

  Returns:
    (P,) float32 SSIM values.
  """
  a = _as_stats(bank_a, win_size)
  b = _as_stats(bank_b, win_size)
  win = _stats_win_size(a)
  if _stats_win_size(b) != win or a["shifted"].shape[1:] != b["shifted"].shape[1:]:
    raise ValueError(f"image sets differ: {a['shifted'].shape[1:]} vs "
                     f"{b['shifted'].shape[1:]} (or their window sizes)")
  idx_a = jnp.asarray(idx_a)
  idx_b = jnp.asarray(idx_b)
  if idx_a.shape != idx_b.shape or idx_a.ndim != 1:
    raise ValueError(f"idx_a {idx_a.shape} and idx_b {idx_b.shape} must be equal 1-D shapes")
  steps, q, c = _pair_steps(idx_a.shape[0], chunk, sub)

  def step(ij):
    ga = jax.tree.map(lambda x: x[ij[0]], a)
    gb = jax.tree.map(lambda x: x[ij[1]], b)
    return _paired_step(ga, gb, win, k1, k2)

  out = jax.lax.map(step, (_to_steps(idx_a, steps, q, c), _to_steps(idx_b, steps, q, c)))
  return _from_steps(out)


# ---------------------------------------------------------------------------- alignment


@functools.partial(jax.jit, static_argnames=("flips", "sub", "win_size", "k1", "k2"))
def aligned_ssim(a: jax.Array, b: jax.Array, angles: jax.Array, *, flips: bool = True,
                 sub: int = 8, win_size: int = 7, k1: float = 0.01,
                 k2: float = 0.03) -> tuple[jax.Array, jax.Array]:
  """SSIM(a, phi(b)) maximised over rigid transforms phi of b (the paper's aligned SSIM).

  phi runs over `geometry.transform_candidates` (flip states x rotation angles); the
  transformed b is z-scored again (see the module docstring), a is left as is (its
  data_range is used).
  Include angle 0 in `angles` so that the identity is a candidate (then the result is
  >= plain SSIM up to float rounding). Candidates are visited one at a time over the
  whole batch, so a batch sharded over devices stays sharded.

  Args:
    a: first images, z-scored, (B, H, W).
    b: second images, z-scored, (B, H, W).
    angles: (K,) rotation angles in radians, e.g. jnp.linspace(-0.1745, 0.1745, 9).
    flips: also try left-right, up-down and both flips.
    sub, win_size, k1, k2: as in `ssim_indexed` (memory grows with the batch B: a few
      (B, H, W) maps per candidate; split large batches).

  Returns:
    (best SSIM (B,) float32, index of the best candidate (B,) int32).
  """
  _check_win_size(win_size, a.shape)
  angles = jnp.asarray(angles, jnp.float32)
  sa = _stats_one(jnp.asarray(a, jnp.float32), win_size)
  b = jnp.asarray(b, jnp.float32)

  steps, q, c = _pair_steps(a.shape[0], a.shape[0], sub)
  sa = jax.tree.map(lambda x: _to_steps(x, steps, q, c)[0], sa)  # (q, c, ...)
  b = _to_steps(b, steps, q, c)[0]

  def body(t, carry):
    best, idx = carry
    sb = _stats_one(images_lib.zscore(geometry.transform(b, t, angles), xp=jnp), win_size)
    s = _paired_step(sa, sb, win_size, k1, k2)
    better = s > best
    return jnp.where(better, s, best), jnp.where(better, t, idx)

  init = (jnp.full((q, c), -jnp.inf, jnp.float32), jnp.zeros((q, c), jnp.int32))
  best, idx = jax.lax.fori_loop(0, geometry.num_candidates(angles, flips), body, init)
  return _from_steps(best[None]), _from_steps(idx[None])


# ------------------------------------------------------------------------- host wrappers


def _check_pair_shapes(a: np.ndarray, b: np.ndarray, names: Sequence[str], ndim: int,
                       what: str) -> None:
  for x, name in zip((a, b), names):
    if x.ndim != ndim:
      raise fileio.InputError(f"{name}: expected {what}, got shape {x.shape}")
  if a.shape[-2:] != b.shape[-2:]:
    raise fileio.InputError(f"{names[0]} and {names[1]}: image sizes differ: {a.shape[-2:]} vs "
                        f"{b.shape[-2:]}")


def ssim(a: np.ndarray, b: np.ndarray, *, names: Sequence[str] = ("a", "b"),
         win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> float:
  """The reference SSIM target of two raw 2-D images.

  Equals skimage.metrics.structural_similarity(za, zb, data_range=za.max() - za.min())
  with za, zb the z-scored images.

  Args:
    a, b: raw images (H, W), any real dtype.
    names: what to call a and b in errors (file names or keys).
    win_size, k1, k2: scikit-image's parameters.

  Raises:
    InputError: not 2-D, sizes differ, smaller than the window, NaN/inf or constant.
  """
  a, b = np.asarray(a), np.asarray(b)
  _check_pair_shapes(a, b, names, 2, "a 2-D image (H, W)")
  if min(a.shape) < win_size:
    raise fileio.InputError(f"{names[0]}: image {a.shape} is smaller than the {win_size}x"
                        f"{win_size} SSIM window")
  za = images_lib.zscore(a, names[0])
  zb = images_lib.zscore(b, names[1])
  out = ssim_all_pairs(za[None], zb[None], win_size=win_size, k1=k1, k2=k2)
  return float(out[0, 0])


def ssim_matrix(a: np.ndarray, b: np.ndarray, *, names_a: Optional[Sequence[str]] = None,
                names_b: Optional[Sequence[str]] = None, block_a: int = 4,
                block_b: int = 16, win_size: int = 7, k1: float = 0.01,
                k2: float = 0.03) -> np.ndarray:
  """SSIM of every pair of two stacks of raw images.

  Args:
    a: raw images (N, H, W); b: raw images (M, H, W).
    names_a, names_b: per-image names for errors.
    block_a, block_b, win_size, k1, k2: as in `ssim_all_pairs`.

  Returns:
    (N, M) float64 matrix; entry (i, j) equals `ssim(a[i], b[j])` to float tolerance.

  Raises:
    InputError: not 3-D, sizes differ, smaller than the window, NaN/inf or constant image.
  """
  a, b = np.asarray(a), np.asarray(b)
  _check_pair_shapes(a, b, ("first image set", "second image set"), 3,
                     "a stack of images (N, H, W)")
  if min(a.shape[1:]) < win_size:
    raise fileio.InputError(f"images {a.shape[1:]} are smaller than the {win_size}x{win_size} "
                        "SSIM window")
  za = images_lib.zscore(a, "image" if names_a is None else names_a)
  zb = images_lib.zscore(b, "image" if names_b is None else names_b)
  out = ssim_all_pairs(za, zb, block_a=block_a, block_b=block_b, win_size=win_size, k1=k1,
                       k2=k2)
  return np.asarray(out, np.float64)
