"""Rigid geometry: rotation against dm-pix, and the flip x rotation candidates' order."""

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from deepssim_jax import geometry


@jax.jit
def _dm_pix_rotate(x, angle):
  return jax.vmap(lambda im: pix.rotate(im[..., None], angle, order=1, mode="nearest")[..., 0])(x)


def test_rotate_matches_dm_pix():
  z = np.random.default_rng(7).normal(size=(3, 41, 36)).cumsum(1).cumsum(2).astype(np.float32)
  for angle in (0.0, 0.1, -0.17, 2.5):
    # dm-pix rounds its uncentred coordinates (~1e-5 here); ours uses centred ones.
    np.testing.assert_allclose(geometry.rotate(jnp.asarray(z), angle),
                               _dm_pix_rotate(jnp.asarray(z), angle), atol=1e-4, rtol=1e-6)
  np.testing.assert_array_equal(geometry.rotate(jnp.asarray(z), 0.0), z)


def test_candidates_are_flips_then_rotations_in_index_order():
  x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 9, 7)), jnp.float32)
  angles = jnp.array([0.0, 0.3, -0.2])
  cands = np.asarray(geometry.transform_candidates(x, angles))
  assert geometry.num_candidates(angles) == 12 and cands.shape == (12, 2, 9, 7)
  flips = [lambda v: v, lambda v: v[..., ::-1], lambda v: v[..., ::-1, :],
           lambda v: v[..., ::-1, ::-1]]
  for t in range(12):
    want = geometry.rotate(jnp.asarray(flips[t // 3](np.asarray(x))), angles[t % 3])
    np.testing.assert_allclose(cands[t], want, atol=1e-6)
    np.testing.assert_allclose(geometry.transform(x, t, angles), want, atol=1e-6)
  np.testing.assert_array_equal(cands[0], x)  # candidate 0 is the identity
  no_flips = geometry.transform_candidates(x, angles, flips=False)
  assert geometry.num_candidates(angles, flips=False) == 3
  np.testing.assert_array_equal(no_flips, cands[:3])


def test_affine_matches_scipy_and_the_identity_is_exact():
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  z = np.random.default_rng(3).normal(size=(2, 33, 28)).cumsum(1).cumsum(2).astype(np.float32)
  m = np.array([[1.12, 0.08], [0.0, 0.9]], np.float32)
  shift = np.array([1.7, -2.2], np.float32)
  got = np.asarray(geometry.affine(jnp.asarray(z), jnp.asarray(m), jnp.asarray(shift)))
  centre = (np.array(z.shape[1:]) - 1) / 2.0
  for i in range(2):  # scipy: output[o] = input[m @ o + offset], edge pixels extended
    want = ndimage.affine_transform(z[i].astype(np.float64), m, centre - m @ centre + shift,
                                    order=1, mode="nearest")
    np.testing.assert_allclose(got[i], want, atol=1e-3 * np.abs(z).max())
  np.testing.assert_array_equal(
      geometry.affine(jnp.asarray(z), jnp.eye(2), jnp.zeros(2)), z)


def test_displace_matches_scipy_and_zero_is_exact():
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  z = rng.normal(size=(2, 33, 28)).cumsum(1).cumsum(2).astype(np.float32)
  dr, dc = rng.uniform(-3.0, 3.0, (2, 33, 28)).astype(np.float32)  # past the edges too
  got = np.asarray(geometry.displace(jnp.asarray(z), jnp.asarray(dr), jnp.asarray(dc)))
  r, c = np.mgrid[0:33, 0:28]
  for i in range(2):  # scipy: output[r, c] = input at (r + dr, c + dc), edge pixels extended
    want = ndimage.map_coordinates(z[i].astype(np.float64), [r + dr, c + dc], order=1,
                                   mode="nearest")
    np.testing.assert_allclose(got[i], want, atol=1e-4 * np.abs(z).max())
  zero = jnp.zeros((33, 28))
  np.testing.assert_array_equal(geometry.displace(jnp.asarray(z), zero, zero), z)
  # sample() on another grid: (..., h, w) out of (..., H, W), as scipy's map_coordinates.
  rows, cols = rng.uniform(-1, 34, (5, 7)), rng.uniform(-1, 29, (5, 7))
  got = np.asarray(geometry.sample(jnp.asarray(z), jnp.asarray(rows), jnp.asarray(cols)))
  assert got.shape == (2, 5, 7)
  np.testing.assert_allclose(got[1], ndimage.map_coordinates(
      z[1].astype(np.float64), [rows, cols], order=1, mode="nearest"), atol=1e-4 * np.abs(z).max())
