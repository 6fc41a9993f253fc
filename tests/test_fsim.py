"""fsim_reference equals the reference's formula computed with OpenCV and numpy (its own
tools: cv2.filter2D, np.gradient) on real vendored MRI slices and their demo copies."""

import numpy as np
import pytest

from deepssim_jax import fsim, metrics
from deepssim_jax.data import demo

cv2 = pytest.importorskip("cv2")  # opencv-python-headless: a test extra


def _u8(x):
  x = np.asarray(x, np.float64)
  lo, hi = x.min(), x.max()
  return np.round((x - lo) / (hi - lo) * 255.0).astype(np.uint8)


def _reference_fsim(img1, img2, t1=0.85, t2=160.0):
  """The formula of the reference's src/utils/fsim.py, on uint8 images, with OpenCV."""
  def features(img):
    f = img.astype(np.float32)
    dx, dy = np.gradient(f)
    mag = np.sqrt(dx ** 2 + dy ** 2)
    pc = mag / (np.max(mag) + 1e-8)
    gx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
    g = np.sqrt(cv2.filter2D(f, -1, gx) ** 2 + cv2.filter2D(f, -1, gx.T) ** 2)
    return pc, g
  p1, g1 = features(img1)
  p2, g2 = features(img2)
  s = (2 * g1 * g2 + t2) / (g1 ** 2 + g2 ** 2 + t2) * (2 * p1 * p2 + t1) / (p1 ** 2 + p2 ** 2 + t1)
  pcm = np.maximum(p1, p2)
  return float(np.sum(s * pcm) / (np.sum(pcm) + 1e-8))


@pytest.fixture(scope="module")
def pairs():
  sets = demo.demo_sets(size=(136, 112), slices_per_head=3, num_copies=6, num_neighbours=6,
                        num_other=3)
  real, synth = sets["training"]["images"], sets["synthetic"]["images"]
  n = min(len(real), len(synth))
  rng = np.random.default_rng(0)
  return real[rng.integers(0, len(real), n)], synth[:n]


def test_equals_opencv_numpy_reference_on_real_slices(pairs):
  a, b = pairs
  ours = fsim.score(a, b, batch=8)
  ref = np.array([_reference_fsim(_u8(x), _u8(y)) for x, y in zip(a, b)])
  assert len(ours) == len(a) >= 8
  np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
  assert ref.std() > 0.01  # the pairs span a range of scores, not one value


def test_self_is_one_scale_invariant_and_symmetric(pairs):
  a, b = pairs
  np.testing.assert_allclose(fsim.score(a, a), 1.0, atol=1e-6)
  # Any intensity scale gives the same score (images are min-max scaled to 0..255 first).
  np.testing.assert_allclose(fsim.score(3.0 * a + 7.0, b), fsim.score(a, b), atol=1e-6)
  np.testing.assert_allclose(fsim.score(b, a), fsim.score(a, b), atol=1e-6)


def test_registered_as_a_metric(pairs):
  a, b = pairs
  ctx = {"batch_size": 16}
  np.testing.assert_allclose(metrics.get("fsim_reference")(ctx, a, b),
                             fsim.score(a, b), atol=1e-7)
