"""Augmentations: shapes, ranges, per-transform correctness, reproducibility from a seed."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepssim_jax import augment
from deepssim_jax.data import images

OFF = augment.AugmentConfig(p_flip0=0, p_flip1=0, p_rotate=0, p_gamma=0, renormalize=False)


def _images(n=6, h=20, w=16, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, h, w)).astype(np.float32)
  return jnp.asarray((x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True))


def _assert_target_is_ssim(xa, xb, t):
  """A pair's recomputed target is scikit-image's SSIM of the pair as returned."""
  from skimage.metrics import structural_similarity
  za, zb = np.asarray(xa, np.float64), np.asarray(xb, np.float64)
  want = structural_similarity(za, zb, data_range=za.max() - za.min())
  assert abs(float(t) - want) < 1e-4, (float(t), want)


def _assert_p0_untouched(fn, field, key, a, b, target):
  """fn (a *_pairs randomization) at probability 0 returns the pairs and targets as given."""
  ra, rb, t = fn(key, a, b, target, dataclasses.replace(OFF, **{field: 0.0}))
  for got, want in ((ra, a), (rb, b), (t, target)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _assert_still_and_p0(fn, field, still, key, a, b, target):
  """A randomization at zero strength (`still`: no warp, no noise) pairs each image a[i]
  with itself (second image a[i], target recomputed: 1); at probability 0 it is a no-op."""
  _, rb, t = fn(key, a, b, target, still)
  np.testing.assert_allclose(np.asarray(rb), np.asarray(a), atol=1e-5)
  np.testing.assert_allclose(np.asarray(t), 1.0, atol=1e-5)
  _assert_p0_untouched(fn, field, key, a, b, target)


def test_identity_when_all_probabilities_are_zero():
  x = _images()
  y = augment.augment_batch(jax.random.key(0), x, OFF)
  np.testing.assert_allclose(y, x, atol=1e-6)


def test_renormalize_is_the_project_zscore():
  """renormalize z-scores each image with data.images.zscore (traced): per image over (H, W),
  the host z-score's numbers."""
  x = np.asarray(_images()) * np.arange(1, 7, dtype=np.float32)[:, None, None] + 5.0
  on = dataclasses.replace(OFF, renormalize=True)
  y = augment.augment_batch(jax.random.key(0), jnp.asarray(x), on)
  np.testing.assert_allclose(y, images.zscore(x), atol=1e-5)


@pytest.mark.parametrize("field,expected", [("p_flip0", lambda x: x[:, ::-1, :]),
                                            ("p_flip1", lambda x: x[:, :, ::-1])])
def test_flips_fire_with_probability_one(field, expected):
  x = _images()
  cfg = dataclasses.replace(OFF, **{field: 1.0})
  y = augment.augment_batch(jax.random.key(1), x, cfg)
  np.testing.assert_allclose(y, expected(np.asarray(x)), atol=1e-6)


def test_rotation_matches_scipy_convention_and_keeps_range():
  from scipy import ndimage
  x = np.asarray(_images(n=1, h=33, w=33))[0]
  cfg = dataclasses.replace(OFF, p_rotate=1.0, max_angle=0.17)
  key = jax.random.key(3)
  y = np.asarray(augment.augment_image(key, jnp.asarray(x), cfg))
  # Recover the angle the function drew, then compare with scipy's rotation about the centre.
  angle = float(jax.random.uniform(jax.random.split(key, 6)[1], (), minval=-0.17, maxval=0.17))
  assert abs(angle) > 0.01
  c = (np.array(x.shape) - 1) / 2
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  ref = ndimage.affine_transform(x, rot, offset=c - rot @ c, order=1, mode="nearest")
  ref_t = ndimage.affine_transform(x, rot.T, offset=c - rot.T @ c, order=1, mode="nearest")
  err = min(np.abs(y - ref).max(), np.abs(y - ref_t).max())
  assert err < 1e-4
  assert x.min() - 1e-5 <= y.min() and y.max() <= x.max() + 1e-5  # linear interp stays in range


def test_gamma_contrast_closed_form_and_range():
  x = _images(n=1)[0]
  g = 0.7
  y = np.asarray(augment.gamma_contrast(x, g, eps=0.0))
  xn = np.asarray(x)
  lo, hi = xn.min(), xn.max()
  np.testing.assert_allclose(y, ((xn - lo) / (hi - lo)) ** g * (hi - lo) + lo, rtol=1e-5, atol=1e-5)
  assert np.isclose(y.min(), lo) and np.isclose(y.max(), hi, rtol=1e-5)


@pytest.mark.parametrize("field", ["p_flip0", "p_flip1", "p_rotate", "p_gamma"])
def test_each_transform_fires_at_its_own_probability(field):
  """One transform on at p = 0.3, the others off: over 512 distinct images it changes
  binomial(512, 0.3) of them (mean 154, sd 10.4; accepted within 5 sd), each into the
  transform of the image, and leaves the rest exactly as they were. So a transform
  dropped, always on, or wired to another's probability fails."""
  n, p = 512, 0.3
  x = _images(n, 12, 10, seed=7)
  cfg = dataclasses.replace(OFF, **{field: p}, max_angle=0.17, gamma_min=0.5, gamma_max=0.8)
  y = np.asarray(augment.augment_batch(jax.random.key(11), x, cfg))
  xn = np.asarray(x)
  changed = np.any(y != xn, axis=(1, 2))
  assert abs(int(changed.sum()) - n * p) < 5 * np.sqrt(n * p * (1 - p)), int(changed.sum())
  if field == "p_flip0":
    np.testing.assert_array_equal(y[changed], xn[changed][:, ::-1, :])
  elif field == "p_flip1":
    np.testing.assert_array_equal(y[changed], xn[changed][:, :, ::-1])
  elif field == "p_gamma":  # gamma < 1 on the min-max scaled image: the range is kept
    np.testing.assert_allclose(y[changed].min((1, 2)), xn[changed].min((1, 2)), atol=1e-5)
    np.testing.assert_allclose(y[changed].max((1, 2)), xn[changed].max((1, 2)), atol=1e-5)
    assert np.all(y[changed].mean((1, 2)) > xn[changed].mean((1, 2)))  # brightened
  else:  # rotated (exactness: test_rotation_matches_scipy...); linear interpolation
    assert np.all(np.abs(y[changed] - xn[changed]).max((1, 2)) > 1e-3)
    assert np.all(y[changed].min((1, 2)) >= xn[changed].min((1, 2)) - 1e-5)
  # Another key draws another subset of the same size (not a fixed set of images).
  y2 = np.asarray(augment.augment_batch(jax.random.key(12), x, cfg))
  assert not np.array_equal(changed, np.any(y2 != xn, axis=(1, 2)))


def test_reproducible_from_seed_and_independent_per_image():
  x = jnp.repeat(_images(n=1), 64, axis=0)  # the same image 64 times
  cfg = augment.AugmentConfig()
  a = augment.augment_batch(jax.random.key(42), x, cfg)
  b = augment.augment_batch(jax.random.key(42), x, cfg)
  c = augment.augment_batch(jax.random.key(43), x, cfg)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert a.shape == x.shape and a.dtype == x.dtype and bool(jnp.isfinite(a).all())
  # Independent draws: identical inputs come out in many different versions, some untouched
  # (probability 0.67 ** 4 ~ 0.2 of no transform at all).
  distinct = {np.asarray(a[i]).round(4).tobytes() for i in range(64)}
  assert len(distinct) > 20
  untouched = sum(np.allclose(a[i], x[0], atol=1e-5) for i in range(64))
  assert 3 <= untouched <= 30
  # Renormalised: still z-scored.
  np.testing.assert_allclose(a.mean((1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(a.std((1, 2)), 1, atol=1e-3)


def test_contrast_pairs_recompute_the_target_on_the_remapped_pair():
  """p_contrast 1: both images go through one map (0 stays 0, max knot 1), come out
  z-scored, and the target is scikit-image's SSIM of the remapped pair; p 0: untouched."""
  a, b = _images(4, 24, 20, seed=1), _images(4, 24, 20, seed=2)
  target = jnp.full((4,), 0.123)
  on = dataclasses.replace(OFF, p_contrast=1.0, contrast_knots=5)
  key = jax.random.key(3)
  ra, rb, t = augment.contrast_pairs(key, a, b, target, on)
  ys = jax.vmap(lambda k: augment.random_map_values(k, 5))(
      jax.random.split(jax.random.split(key)[1], 4))
  for i in range(4):
    y = np.asarray(ys[i])
    assert y[0] == 0 and abs(y.max() - 1) < 1e-6 and len(np.unique(y)) == 5
    for x, r in ((a[i], ra[i]), (b[i], rb[i])):
      x = np.asarray(x, np.float64)
      u = (x - x.min()) / np.ptp(x)
      m = np.interp(u, np.linspace(0, 1, 5), y)  # independent: numpy's interp
      np.testing.assert_allclose(np.asarray(r), (m - m.mean()) / m.std(), atol=2e-4)
    _assert_target_is_ssim(ra[i], rb[i], t[i])
  _assert_p0_untouched(augment.contrast_pairs, "p_contrast", key, a, b, target)
  # Half the pairs remapped at p 0.5 (64 pairs: 20-44 of them, a 4-sigma band).
  big_a, big_b = _images(64, 12, 12, seed=4), _images(64, 12, 12, seed=5)
  half = dataclasses.replace(OFF, p_contrast=0.5)
  _, _, t = augment.contrast_pairs(key, big_a, big_b, jnp.full((64,), 5.0), half)
  assert 20 <= int(np.sum(np.asarray(t) != 5.0)) <= 44


def test_flat_maps_squeeze_the_tissue_knots():
  """contrast_min_range 1 draws the original maps; below it, each map's tissue knots are
  squeezed into [1 - c, 1], c uniform in [min_range, 1], so flat maps appear. How often a
  map's tissue spread is below 0.3: under 1% for min_range 1 (five uniform knots scaled to
  max 1), and at least P(c < 0.3) = 1/8 for min_range 0.2 (closed form)."""
  keys = jax.random.split(jax.random.key(7), 4000)
  old = jax.vmap(lambda k: augment.random_map_values(k, 6))(keys)
  same = jax.vmap(lambda k: augment.random_map_values(k, 6, 1.0))(keys)
  np.testing.assert_array_equal(np.asarray(old), np.asarray(same))
  flat = np.asarray(jax.vmap(lambda k: augment.random_map_values(k, 6, 0.2))(keys))
  for ys in (np.asarray(old), flat):
    assert np.all(ys[:, 0] == 0) and np.allclose(ys.max(axis=1), 1.0)
    assert np.all((ys >= 0) & (ys <= 1 + 1e-6))
  spread = lambda ys: ys[:, 1:].max(axis=1) - ys[:, 1:].min(axis=1)
  assert np.mean(spread(np.asarray(old)) < 0.3) < 0.03
  assert np.mean(spread(flat) < 0.3) > 0.125
  # Closed form: flat = 1 - c (1 - base), base the unsqueezed map of the first half of the
  # key, one c in [0.2, 1] per map.
  base = np.asarray(jax.vmap(lambda k: augment.random_map_values(jax.random.split(k)[0], 6))(
      keys), np.float64)[:, 1:]
  c = (1 - flat[:, 1:]) / np.maximum(1 - base, 1e-6)
  keep = base < 0.99  # away from the knot at the top, where c is 0 / 0
  c_row = np.where(keep, c, np.nan)
  np.testing.assert_allclose(np.nanmax(c_row, axis=1), np.nanmin(c_row, axis=1), atol=1e-4)
  assert 0.2 - 1e-4 <= np.nanmin(c_row) and np.nanmax(c_row) <= 1 + 1e-4


def test_shape_pairs_warp_both_images_alike_and_recompute_the_target():
  """p_shape 1: both images of a pair go through the same affine warp (random_affine's),
  come out z-scored, and the target is scikit-image's SSIM of the warped pair; p 0:
  untouched."""
  from deepssim_jax import geometry
  a, b = _images(4, 24, 20, seed=1), _images(4, 24, 20, seed=2)
  target = jnp.full((4,), 0.123)
  on = dataclasses.replace(OFF, p_shape=1.0)
  key = jax.random.key(5)
  wa, wb, t = augment.shape_pairs(key, a, b, target, on)
  keys = jax.random.split(jax.random.split(key)[1], 4)
  for i in range(4):
    m, shift = augment.random_affine(keys[i], on, (24, 20))
    s = np.linalg.svd(np.asarray(m), compute_uv=False)
    assert not np.allclose(np.asarray(m), np.eye(2))
    bound = np.exp(on.shape_max_scale)
    assert 0.85 / bound < s.min() <= s.max() < bound * 1.15
    assert np.all(np.abs(np.asarray(shift)) <= on.shape_max_shift * np.array([24, 20]))
    for x, w in ((a[i], wa[i]), (b[i], wb[i])):
      u = np.asarray(geometry.affine(x, m, shift), np.float64)
      np.testing.assert_allclose(np.asarray(w), (u - u.mean()) / u.std(), atol=2e-4)
    _assert_target_is_ssim(wa[i], wb[i], t[i])
  _assert_p0_untouched(augment.shape_pairs, "p_shape", key, a, b, target)


def test_blur_pairs_smooth_both_images_alike_and_recompute_the_target():
  """p_blur 1: both images of a pair are smoothed by one Gaussian of sigma in the range
  (scipy.ndimage.gaussian_filter with the border read as the image's minimum, the
  independent reference), come out z-scored, and the target is scikit-image's SSIM of the
  blurred pair; p 0: untouched."""
  from scipy import ndimage
  a, b = _images(4, 24, 20, seed=1), _images(4, 24, 20, seed=2)
  target = jnp.full((4,), 0.123)
  on = dataclasses.replace(OFF, p_blur=1.0, blur_min_sigma=0.5, blur_max_sigma=1.5)
  key = jax.random.key(6)
  ba, bb, t = augment.blur_pairs(key, a, b, target, on)
  radius = augment.blur_radius(on)
  assert radius == 5
  keys = jax.random.split(jax.random.split(key)[1], 4)
  sigmas = [float(jax.random.uniform(k, (), minval=0.5, maxval=1.5)) for k in keys]
  assert len(set(sigmas)) == 4 and all(0.5 <= s <= 1.5 for s in sigmas)
  for i, sigma in enumerate(sigmas):
    for x, y in ((a[i], ba[i]), (b[i], bb[i])):
      x = np.asarray(x, np.float64)
      u = ndimage.gaussian_filter(x, sigma, mode="constant", cval=x.min(),
                                  truncate=radius / sigma)
      np.testing.assert_allclose(np.asarray(y), (u - u.mean()) / u.std(), atol=2e-4)
      assert np.std(np.diff(np.asarray(y), axis=1)) < np.std(np.diff(x / x.std(), axis=1))
    _assert_target_is_ssim(ba[i], bb[i], t[i])
  _assert_p0_untouched(augment.blur_pairs, "p_blur", key, a, b, target)


def test_elastic_pairs_warp_both_images_alike_and_recompute_the_target():
  """p_elastic 1: both images of a pair go through one smooth displacement field
  (random_displacement's: bilinear between control points, within +-elastic_max_disp,
  scipy.ndimage.map_coordinates as the independent warp), come out z-scored, and the
  target is scikit-image's SSIM of the warped pair; p 0: untouched."""
  from scipy import ndimage
  a, b = _images(4, 24, 20, seed=1), _images(4, 24, 20, seed=2)
  target = jnp.full((4,), 0.123)
  on = dataclasses.replace(OFF, p_elastic=1.0, elastic_grid=3, elastic_max_disp=2.0)
  key = jax.random.key(7)
  wa, wb, t = augment.elastic_pairs(key, a, b, target, on)
  keys = jax.random.split(jax.random.split(key)[1], 4)
  r, c = np.mgrid[0:24, 0:20]
  for i in range(4):
    dr, dc = np.asarray(augment.random_displacement(keys[i], on, (24, 20)), np.float64)
    # A 3 x 3 grid of control points uniform in +-2: the image's corners are its corners,
    # and between them the field is bilinear, so no step exceeds 4 px per 11.5 rows.
    d = np.asarray(jax.random.uniform(keys[i], (2, 3, 3), minval=-2.0, maxval=2.0))
    np.testing.assert_allclose(dr[[0, 0, 23, 23], [0, 19, 0, 19]],
                               d[0][[0, 0, 2, 2], [0, 2, 0, 2]], atol=1e-5)
    assert 0 < np.abs(dr).max() <= 2.0 and 0 < np.abs(dc).max() <= 2.0
    assert np.max(np.abs(np.diff(dr, axis=0))) <= 4.0 / 11.5 + 1e-5
    for x, w in ((a[i], wa[i]), (b[i], wb[i])):
      u = ndimage.map_coordinates(np.asarray(x, np.float64), [r + dr, c + dc], order=1,
                                  mode="nearest")
      np.testing.assert_allclose(np.asarray(w), (u - u.mean()) / u.std(), atol=2e-4)
    _assert_target_is_ssim(wa[i], wb[i], t[i])
  _assert_p0_untouched(augment.elastic_pairs, "p_elastic", key, a, b, target)


def test_neighbour_pairs_pair_an_image_with_its_own_warp_and_recompute_the_target():
  """p_neighbour 1: pair i becomes (a_i, a_i warped by its own smooth field): the field's
  corners are its control points scaled by a bound m in [min, max] (closed form), the warp
  is scipy.ndimage.map_coordinates', z-scored, and the target scikit-image's SSIM of the
  pair; a bound of 0 gives the image itself (target 1); p 0: untouched."""
  from scipy import ndimage
  a, b = _images(4, 24, 20, seed=1), _images(4, 24, 20, seed=2)
  target = jnp.full((4,), 0.123)
  on = dataclasses.replace(OFF, p_neighbour=1.0, neighbour_grid=3, neighbour_min_disp=1.0,
                           neighbour_max_disp=2.0)
  key = jax.random.key(9)
  na, nb, t = augment.neighbour_pairs(key, a, b, target, on)
  np.testing.assert_array_equal(np.asarray(na), np.asarray(a))
  keys = jax.random.split(jax.random.split(key)[1], 4)
  r, c = np.mgrid[0:24, 0:20]
  for i in range(4):
    k_m, k_f = jax.random.split(keys[i])
    m = float(jax.random.uniform(k_m, (), minval=1.0, maxval=2.0))
    d = np.asarray(jax.random.uniform(k_f, (2, 3, 3), minval=-1.0, maxval=1.0)) * m
    dr, dc = np.asarray(augment.smooth_field(k_f, 3, m, (24, 20)), np.float64)
    np.testing.assert_allclose(dc[[0, 0, 23, 23], [0, 19, 0, 19]],
                               d[1][[0, 0, 2, 2], [0, 2, 0, 2]], atol=1e-5)
    assert 1.0 <= m <= 2.0 and np.abs(dr).max() <= m + 1e-6
    u = ndimage.map_coordinates(np.asarray(a[i], np.float64), [r + dr, c + dc], order=1,
                                mode="nearest")
    np.testing.assert_allclose(np.asarray(nb[i]), (u - u.mean()) / u.std(), atol=2e-4)
    _assert_target_is_ssim(a[i], nb[i], t[i])
    assert float(t[i]) < 0.99
  still = dataclasses.replace(on, neighbour_min_disp=0.0, neighbour_max_disp=0.0)
  _assert_still_and_p0(augment.neighbour_pairs, "p_neighbour", still, key, a, b, target)


def test_noise_pairs_add_independent_noise_of_one_sigma_and_recompute_the_target():
  """p_noise 1: each image of pair i gets its own Gaussian noise of one sigma in the range
  (the draws replayed from the documented key split), comes out z-scored, and the target is
  scikit-image's SSIM of the noisy pair; an image paired with itself falls below 1 (the
  two noises differ); sigma 0 leaves the pair as it was (target recomputed: 1); p 0:
  untouched."""
  a = _images(4, 24, 20, seed=1)
  target = jnp.full((4,), 0.123)
  on = dataclasses.replace(OFF, p_noise=1.0, noise_min_sigma=0.1, noise_max_sigma=0.3)
  key = jax.random.key(10)
  na, nb, t = augment.noise_pairs(key, a, a, target, on)
  keys = jax.random.split(jax.random.split(key)[1], 4)
  for i in range(4):
    k_s, k_x, k_y = jax.random.split(keys[i], 3)
    sigma = float(jax.random.uniform(k_s, (), minval=0.1, maxval=0.3))
    assert 0.1 <= sigma <= 0.3
    for k, got in ((k_x, na[i]), (k_y, nb[i])):
      u = np.asarray(a[i], np.float64) + sigma * np.asarray(jax.random.normal(k, (24, 20)))
      np.testing.assert_allclose(np.asarray(got), (u - u.mean()) / u.std(), atol=2e-4)
    _assert_target_is_ssim(na[i], nb[i], t[i])
    assert float(t[i]) < 0.99
  still = dataclasses.replace(on, noise_min_sigma=0.0, noise_max_sigma=0.0)
  _assert_still_and_p0(augment.noise_pairs, "p_noise", still, key, a, a, target)


def test_noise_keep_copies_keeps_the_target_of_identical_pairs_only():
  """noise_keep_copies: the images get the same noise as without it, a pair of two
  identical images keeps its target 1 (a noisy copy is a copy), the other pairs' targets
  are the SSIM of the noisy pair as before."""
  a, b = _images(4, 24, 20, seed=4), _images(4, 24, 20, seed=5)
  b = b.at[1].set(a[1]).at[3].set(a[3])  # pairs 1 and 3: an image and itself
  target = jnp.array([0.4, 1.0, 0.3, 1.0])
  on = dataclasses.replace(OFF, p_noise=1.0, noise_min_sigma=0.1, noise_max_sigma=0.3)
  key = jax.random.key(11)
  plain = augment.noise_pairs(key, a, b, target, on)
  kept = augment.noise_pairs(key, a, b, target, dataclasses.replace(on, noise_keep_copies=True))
  for g, w in zip(kept[:2], plain[:2]):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  assert not np.array_equal(np.asarray(kept[0][1]), np.asarray(kept[1][1]))  # noisy copy
  np.testing.assert_array_equal(np.asarray(kept[2])[[1, 3]], [1.0, 1.0])
  assert np.all(np.asarray(plain[2])[[1, 3]] < 0.99)
  np.testing.assert_array_equal(np.asarray(kept[2])[[0, 2]], np.asarray(plain[2])[[0, 2]])
  for i in (0, 2):
    _assert_target_is_ssim(kept[0][i], kept[1][i], kept[2][i])


@pytest.mark.parametrize("noise_first", [False, True])
def test_randomize_pairs_runs_the_randomizations_in_order_each_on_its_own_key(noise_first):
  """randomize_pairs is the chain neighbours -> contrast -> shape -> blur -> elastic ->
  noise (noise second with noise_first), each on fold_in(key, its number), replayed here
  call by call; the two orders give different pairs; the final targets are scikit-image's
  SSIM of the final pairs."""
  a, b = _images(4, 24, 20, seed=2), _images(4, 24, 20, seed=3)
  target = jnp.full((4,), 0.5)
  cfg = dataclasses.replace(OFF, p_neighbour=0.5, p_contrast=1.0, p_shape=0.5, p_blur=0.5,
                            p_elastic=0.5, p_noise=1.0, noise_min_sigma=0.1,
                            noise_max_sigma=0.3, noise_first=noise_first)
  key = jax.random.key(5)
  got = augment.randomize_pairs(key, a, b, target, cfg)
  steps = [(augment.neighbour_pairs, 11), (augment.contrast_pairs, 7), (augment.shape_pairs, 8),
           (augment.blur_pairs, 9), (augment.elastic_pairs, 10)]
  steps.insert(1 if noise_first else len(steps), (augment.noise_pairs, 12))
  want = (a, b, target)
  for fn, salt in steps:
    want = fn(jax.random.fold_in(key, salt), *want, cfg)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  other = augment.randomize_pairs(key, a, b, target,
                                  dataclasses.replace(cfg, noise_first=not noise_first))
  assert np.abs(np.asarray(other[0]) - np.asarray(got[0])).max() > 0.1
  for i in range(4):
    _assert_target_is_ssim(got[0][i], got[1][i], got[2][i])
