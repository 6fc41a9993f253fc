"""SSIM targets against scikit-image (the reference's ground truth) and against each other."""

import glob
import os

import dm_pix as pix
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from skimage.metrics import structural_similarity
from skimage.transform import resize

from deepssim_jax import fileio, geometry, parallel
from deepssim_jax import ssim as S
from deepssim_jax.data.images import zscore

MRI_DIR = os.path.join(os.path.dirname(S.__file__), "data", "mri")
TOL = 1e-5


def _smooth(rng, n, shape=(48, 40)):
  """Random images with spatial structure (cumulative sums), raw (not z-scored)."""
  x = rng.normal(size=(n, *shape)).cumsum(1).cumsum(2)
  return x + rng.normal(scale=0.5 * x.std(), size=x.shape)


def _z64(x):
  x = np.asarray(x, np.float64)
  return (x - x.mean()) / x.std()


def _skimage(a_raw, b_raw):
  """The reference: scikit-image defaults on float64 z-scored images, range of the first."""
  za, zb = _z64(a_raw), _z64(b_raw)
  return structural_similarity(za, zb, data_range=za.max() - za.min())


@pytest.fixture(scope="module")
def mri():
  """Axial slices (central band) of three vendored volumes, resized to 136 x 112, raw."""
  out = []
  for path in sorted(glob.glob(os.path.join(MRI_DIR, "*.nii.gz")))[:3]:
    img = nib.as_closest_canonical(nib.load(path))
    nz = img.shape[2]
    for k in (int(0.45 * nz), int(0.5 * nz), int(0.55 * nz)):
      sl = np.asarray(img.dataobj[:, :, k], np.float64).T[::-1]  # rows anterior->posterior
      out.append(resize(sl, (136, 112), order=1, anti_aliasing=True, preserve_range=True))
  return np.stack(out)


def test_ssim_matches_skimage_random():
  rng = np.random.default_rng(0)
  a, b = _smooth(rng, 6), _smooth(rng, 6)
  b[:3] = a[:3] + rng.normal(scale=0.3 * a[:3].std(), size=a[:3].shape)  # similar pairs too
  ref = np.array([_skimage(x, y) for x, y in zip(a, b)])
  got = np.array([S.ssim(x, y) for x, y in zip(a, b)])
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
  assert ref[:3].min() > 0.5 and ref[3:].max() < 0.5  # both regimes are exercised
  # The batched dm-pix form on host-z-scored images gives the same numbers.
  np.testing.assert_allclose(S.ssim_pairs(zscore(a), zscore(b)), ref,
                             atol=TOL, rtol=0)


def test_ssim_matches_skimage_mri(mri):
  pairs = [(0, 1), (1, 2), (3, 4), (0, 3), (2, 7), (5, 8), (6, 6), (8, 0)]
  ref = np.array([_skimage(mri[i], mri[j]) for i, j in pairs])
  got = np.array([S.ssim(mri[i], mri[j]) for i, j in pairs])
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
  assert got[6] == pytest.approx(1.0, abs=1e-6) and ref.min() < 0.6


def test_matrix_and_all_pairs_equal_pairwise(mri):
  rng = np.random.default_rng(1)
  a, b = mri[:7], np.concatenate([mri[2:], _smooth(rng, 2, (136, 112))])  # 7 x 9
  ref = np.array([[_skimage(x, y) for y in b] for x in a])
  m = S.ssim_matrix(a, b, block_a=3, block_b=4)  # blocks do not divide 7 x 9
  assert m.shape == (7, 9) and m.dtype == np.float64
  np.testing.assert_allclose(m, ref, atol=TOL, rtol=0)
  loop = np.array([[S.ssim(x, y) for y in b] for x in a])
  np.testing.assert_allclose(m, loop, atol=1e-6, rtol=0)
  # The plain dm-pix form, pair by pair (float32 without the min shift: within 1e-5 too).
  za, zb = zscore(a), zscore(b)
  plain = np.array([[S.ssim_pairs(za[i:i + 1], zb[j:j + 1])[0] for j in range(len(zb))]
                    for i in range(len(za))])
  np.testing.assert_allclose(plain, ref, atol=TOL, rtol=0)
  np.testing.assert_allclose(m, plain, atol=TOL, rtol=0)
  # Precomputed moments, default blocks and blocks larger than the sets: same matrix.
  sa, sb = S.image_stats(za), S.image_stats(zb, batch_size=4)
  np.testing.assert_allclose(S.ssim_all_pairs(sa, sb), m, atol=1e-6, rtol=0)
  np.testing.assert_allclose(S.ssim_all_pairs(za, zb, block_a=64, block_b=64), m,
                             atol=1e-6, rtol=0)


def test_image_stats_match_numpy():
  rng = np.random.default_rng(2)
  z = zscore(_smooth(rng, 3))
  st = S.image_stats(z)
  lo = z.min(axis=(1, 2))
  win = np.lib.stride_tricks.sliding_window_view(z.astype(np.float64), (7, 7), axis=(1, 2))
  np.testing.assert_allclose(st["shift"], lo)
  np.testing.assert_allclose(st["shifted"], z - lo[:, None, None], atol=1e-6)
  np.testing.assert_allclose(st["mu"] + lo[:, None, None], win.mean(axis=(-2, -1)), atol=1e-5)
  np.testing.assert_allclose(st["var"], win.var(axis=(-2, -1)), atol=1e-4)
  np.testing.assert_allclose(st["data_range"], z.max(axis=(1, 2)) - lo, rtol=1e-6)


def test_indexed_equals_pairwise():
  rng = np.random.default_rng(3)
  za = zscore(_smooth(rng, 6))
  zb = zscore(_smooth(rng, 5))
  zb[0] = za[2] + 0.1 * rng.normal(size=za[2].shape)
  ia = rng.integers(0, 6, 37)  # prime: no chunk divides it
  ib = rng.integers(0, 5, 37)
  ia[0], ib[0] = 2, 0
  ref = np.asarray(S.ssim_pairs(za[ia], zb[ib]))
  for kw in ({}, {"chunk": 8, "sub": 4}):
    got = S.ssim_indexed(S.image_stats(za), S.image_stats(zb), ia, ib, **kw)
    np.testing.assert_allclose(got, ref, atol=3e-6, rtol=0)
  # Raw banks and index batches sharded over 4 devices (the pair job's layout): same values.
  mesh = parallel.make_mesh(jax.devices()[:4])
  ia64, ib64 = rng.integers(0, 6, 64), rng.integers(0, 5, 64)
  sh = NamedSharding(mesh, P(parallel.DATA_AXIS))
  got = S.ssim_indexed(parallel.replicate(jnp.asarray(za), mesh),
                       parallel.replicate(jnp.asarray(zb), mesh),
                       jax.device_put(ia64, sh), jax.device_put(ib64, sh))
  np.testing.assert_allclose(got, S.ssim_pairs(za[ia64], zb[ib64]), atol=3e-6, rtol=0)
  assert ref[0] > 0.8


def test_gradient_finite_and_matches_finite_difference():
  rng = np.random.default_rng(4)
  z = zscore(_smooth(rng, 4))
  a, b = jnp.asarray(z[:2]), jnp.asarray(z[2:])
  f = lambda x: jnp.sum(S.ssim_pairs(a, x))
  g = jax.grad(f)(b)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
  d = jnp.asarray(rng.normal(size=b.shape), jnp.float32)
  d = d / jnp.linalg.norm(d)
  h = 1e-2
  fd = (f(b + h * d) - f(b - h * d)) / (2 * h)
  np.testing.assert_allclose(float(jnp.vdot(g, d)), float(fd), rtol=2e-2, atol=1e-4)
  # The moment form is differentiable too and has the same gradient.
  g2 = jax.grad(lambda x: jnp.trace(S.ssim_all_pairs(a, x)))(b)
  np.testing.assert_allclose(g2, g, atol=1e-5, rtol=1e-3)


def test_host_wrappers_name_the_bad_image():
  """ssim / ssim_matrix z-score with data.images.zscore (tested in test_images), so a
  constant or NaN image is an error naming it; shapes are checked first."""
  rng = np.random.default_rng(5)
  x = rng.integers(0, 255, size=(20, 16)).astype(np.uint8)
  xs = rng.normal(3, 2, size=(3, 10, 12))
  bad = xs.copy()
  bad[2, 0, 0] = np.nan
  with pytest.raises(fileio.InputError, match=r"b\.png: constant image"):
    S.ssim(x, np.zeros_like(x), names=("a.png", "b.png"))
  with pytest.raises(fileio.InputError, match=r"synth-9: 1 of 120 pixels are NaN"):
    S.ssim_matrix(xs, bad[2:], names_b=["synth-9"])
  with pytest.raises(fileio.InputError, match=r"image 1: constant image"):
    S.ssim_matrix(xs, np.stack([xs[0], np.full((10, 12), 7.0)]))
  with pytest.raises(fileio.InputError, match="sizes differ"):
    S.ssim(x, x[:, :10])
  with pytest.raises(fileio.InputError, match="2-D"):
    S.ssim(xs, xs)


@jax.jit
def _dm_pix_rotate(x, angle):
  return jax.vmap(lambda im: pix.rotate(im[..., None], angle, order=1, mode="nearest")[..., 0])(x)


def _rotate(x, angle):
  return np.asarray(_dm_pix_rotate(jnp.asarray(x, jnp.float32), angle))


def test_aligned_ssim(mri):
  angles = jnp.linspace(-0.15, 0.15, 7)  # step 0.05; index 3 is the identity
  z = zscore(mri[[0, 4, 8]])
  # b = flip-ud(rotate(a, 0.1)); phi = rotate(-0.1) o flip-ud undoes it: candidate 2 * 7 + 1.
  b = zscore(_rotate(z, 0.1)[:, ::-1, :])
  plain = np.asarray(S.ssim_pairs(z, b))
  best, idx = S.aligned_ssim(z, b, angles)
  best, idx = np.asarray(best), np.asarray(idx)
  assert np.all(best > plain + 0.3) and np.all(best > 0.8), (plain, best)
  # Independent path: every candidate through dm-pix SSIM, then the max. (Brains are
  # nearly left-right symmetric: flip-ud and flip-both + rotate(+0.1) may tie.)
  cands = geometry.transform_candidates(jnp.asarray(b), angles)
  assert cands.shape == (28, 3, 136, 112)
  brute = S.ssim_pairs(jnp.tile(z, (28, 1, 1)), zscore(cands.reshape(84, 136, 112), xp=jnp))
  brute = np.asarray(brute).reshape(28, 3).T
  np.testing.assert_allclose(best, brute.max(1), atol=TOL)
  np.testing.assert_allclose(brute[np.arange(3), idx], brute.max(1), atol=TOL)
  assert set(idx.tolist()) <= {2 * 7 + 1, 3 * 7 + 5}, idx

  # Asymmetric random images: the exact transform is found; never below plain SSIM (the
  # identity is a candidate), with or without flips.
  rng = np.random.default_rng(6)
  za = zscore(_smooth(rng, 4))
  zb = zscore(_smooth(rng, 4))
  moved = zscore(_rotate(za, 0.1)[:, ::-1, :])
  a2, b2 = np.concatenate([za, za]), np.concatenate([moved, zb])
  plain = np.asarray(S.ssim_pairs(a2, b2))
  best, idx = map(np.asarray, S.aligned_ssim(a2, b2, angles))
  np.testing.assert_array_equal(idx[:4], 2 * 7 + 1)
  assert np.all(best[:4] > plain[:4] + 0.2)
  assert np.all(best >= plain - 1e-6)
  best, idx = map(np.asarray, S.aligned_ssim(a2, b2, angles, flips=False))
  assert np.all(best >= plain - 1e-6) and idx.max() < 7
