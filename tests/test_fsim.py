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


# fsim_zhang / score_zhang: Zhang et al.'s FSIM, against piq's implementation.

def _scaled(x):
  """The 0..255-scaled, rounded float32 images score_zhang scores (to_uint8_scale)."""
  return np.array(fsim.to_uint8_scale(np.asarray(x, np.float32)))  # writable, for torch


def _piq_fsim(a, b):
  """piq.fsim (grey, data_range 255) of the same 0..255-scaled images, (N, 1, H, W)."""
  piq = pytest.importorskip("piq")  # needs torch: CI installs .[test,parity]
  torch = pytest.importorskip("torch")
  x, y = (torch.from_numpy(_scaled(v))[:, None] for v in (a, b))
  return piq.fsim(x, y, data_range=255, reduction="none", chromatic=False).double().numpy()


def _zhang_pairs(size, n):
  """Real slices paired with: other real slices and the demo's synthetic images (augmented
  copies, neighbouring slices, another head), themselves, flips and 180-degree rotations."""
  sets = demo.demo_sets(size=size, slices_per_head=2, num_copies=4, num_neighbours=4,
                        num_other=2, heldout_per_head=0)
  real, synth = sets["training"]["images"], sets["synthetic"]["images"]
  a = real[np.arange(n) % len(real)]
  b = np.concatenate([np.roll(real, 1, 0), synth])[:n]
  same = a[:4]
  return (np.concatenate([a, same, same, same, same]),
          np.concatenate([b, same, np.flip(same, 1), np.flip(same, 2),
                          np.rot90(same, 2, axes=(1, 2))]), n)


# 136 x 112 (piq pools by 1) and 417 x 390 (min 390 / 256 rounds to 2: piq average-pools by
# 2, dropping the odd row, and builds its filters for the odd 195-pixel width).
@pytest.mark.parametrize("size,n", [((136, 112), 16), ((417, 390), 8)])
def test_zhang_equals_piq_on_real_slices(size, n):
  a, b, n_diff = _zhang_pairs(size, n)
  ours = fsim.score_zhang(a, b, batch=len(a))
  ref = _piq_fsim(a, b)
  # Measured: max |ours - piq| 1.2e-7 at both sizes (float32 rounding; piq itself in float32
  # vs float64 differs by up to 1.7e-7).
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(ours[n_diff:n_diff + 4], 1.0, atol=1e-6)  # identity
  assert ours[:n_diff].std() > 0.03 and ours[:n_diff].max() < 0.95  # a spread, not ones
  # A different formula from the reference's stand-in on the same inputs (measured: mean
  # |difference| 0.14).
  assert np.abs(ours[:n_diff] - fsim.score(a[:n_diff], b[:n_diff])).mean() > 0.05


def test_zhang_symmetric_scale_invariant_and_batched(pairs):
  a, b = pairs
  whole = fsim.score_zhang(a, b)
  assert whole.dtype == np.float64 and whole.shape == (len(a),)
  np.testing.assert_allclose(fsim.score_zhang(b, a), whole, atol=1e-6)
  # Any intensity scale (up to a pixel rounding to the other side of .5: measured 1.2e-6).
  np.testing.assert_allclose(fsim.score_zhang(3.0 * a + 7.0, b), whole, atol=1e-5)
  # Fixed-size batches, the last one padded, give the same scores.
  assert len(a) % 5
  np.testing.assert_allclose(fsim.score_zhang(a, b, batch=5), whole, atol=1e-6)
  # fsim_zhang takes images already on 0..255.
  np.testing.assert_allclose(np.asarray(fsim.fsim_zhang(_scaled(a), _scaled(b))), whole,
                             atol=1e-6)
  assert fsim.score_zhang(a[:0], b[:0]).shape == (0,)


def test_lower_median_is_torch_median():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  for m in (1, 2, 7, 8, 15232):
    v = (rng.normal(size=(4, m)) ** 2).astype(np.float32)
    v[0], v[1, ::2] = 0.0, 0.0  # all zeros; ties
    np.testing.assert_array_equal(np.asarray(fsim._lower_median(v)),
                                  torch.median(torch.from_numpy(v), -1).values.numpy())
