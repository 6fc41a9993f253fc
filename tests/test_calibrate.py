"""Calibration formulas against hand-computed values and independent numpy closed forms."""

import math

import numpy as np
import pytest

from deepssim_jax import calibrate, fileio


def _unit(deg):
  """Unit 2-D vectors at the given angles (degrees)."""
  t = np.deg2rad(np.asarray(deg, np.float64))
  return np.stack([np.cos(t), np.sin(t)], axis=1).astype(np.float32)


def _cfg(**enabled):
  c = calibrate.default_config()
  for name in calibrate.CALIBRATIONS:
    c[name].enabled = bool(enabled.get(name, False))
  return c


def _brute_nn(q, r):
  """Independent nearest-neighbour cosine: numpy, float64, no JAX."""
  q = np.asarray(q, np.float64)
  r = np.asarray(r, np.float64)
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  r = r / np.linalg.norm(r, axis=1, keepdims=True)
  return (q @ r.T).max(axis=1)


def test_percentile_threshold_by_hand():
  # Linear interpolation: position 0.95 * 4 = 3.8 between 0.4 and 0.5.
  t = calibrate.percentile_threshold([0.5, 0.1, 0.4, 0.2, 0.3], 95)
  assert t == pytest.approx(0.48, abs=1e-12)


def test_dar_by_hand():
  train = _unit([0, 90])
  # Nearest angles to the axes: 10, 20, 30 and 30 (60 is 30 from the y axis).
  held = _unit([10, 20, 30, 60])
  synth = _unit([5, 25, 80])
  ctx = calibrate.context(train, synth, heldout_emb=held)
  out = calibrate.run_all(_cfg(dar=True), ctx)
  sims = np.sort(np.cos(np.deg2rad([30, 30, 20, 10])))
  pos = 0.95 * 3  # index 2.85 in the sorted 4 values
  t = sims[2] + (pos - 2) * (sims[3] - sims[2])
  assert out["summary"]["dar"]["threshold"] == pytest.approx(t, abs=1e-6)
  # cos 5 and cos 10 (80 is 10 from the y axis) exceed t; cos 25 does not.
  np.testing.assert_array_equal(out["columns"]["dar_memorized"], [1, 0, 1])
  assert out["summary"]["dar"]["memorization_rate"] == pytest.approx(2 / 3)


def test_dar_train_to_heldout_direction_by_hand():
  train = _unit([0, 90])
  held = _unit([10, 60])  # training 0 -> held 10 (cos 10); training 90 -> held 60 (cos 30)
  cfg = _cfg(dar=True)
  cfg.dar.direction, cfg.dar.percentile = "train_to_heldout", 50
  out = calibrate.run_all(cfg, calibrate.context(train, _unit([45]), heldout_emb=held))
  want = (math.cos(math.radians(10)) + math.cos(math.radians(30))) / 2
  assert out["summary"]["dar"]["threshold"] == pytest.approx(want, abs=1e-6)
  cfg.dar.direction = "sideways"
  with pytest.raises(ValueError, match="direction"):
    calibrate.run_all(cfg, calibrate.context(train, _unit([45]), heldout_emb=held))


def test_mi_from_null_by_hand():
  mi, oni, mu, sigma = calibrate.mi_from_null([0.9, 0.6, 0.5], [0.5, 0.7], ddof=0)
  assert mu == pytest.approx(0.6) and sigma == pytest.approx(0.1)
  np.testing.assert_allclose(mi, [3.0, 0.0, -1.0], atol=1e-12)
  np.testing.assert_allclose(oni, [-math.tanh(3.0), 0.0, math.tanh(1.0)], atol=1e-12)
  # ddof=1: sigma = sqrt(0.02).
  _, _, _, s1 = calibrate.mi_from_null([0.9], [0.5, 0.7], ddof=1)
  assert s1 == pytest.approx(math.sqrt(0.02))


def test_half_splits_are_halves_and_seeded():
  splits = calibrate.half_splits(11, 4, seed=3)
  assert len(splits) == 4
  for a, b in splits:
    assert len(a) == 5 and len(b) == 6
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(11))
  again = calibrate.half_splits(11, 4, seed=3)
  for (a1, b1), (a2, b2) in zip(splits, again):
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
  other = calibrate.half_splits(11, 4, seed=4)
  assert any(not np.array_equal(a1, a2) for (a1, _), (a2, _) in zip(splits, other))


def test_split_half_null_matches_brute_force_and_is_reproducible():
  x = np.random.default_rng(0).normal(size=(11, 5)).astype(np.float32)
  null = calibrate.split_half_null(x, rounds=3, seed=7)
  want = np.concatenate([_brute_nn(x[a], x[b])
                         for a, b in calibrate.half_splits(11, 3, seed=7)])
  assert null.shape == (15,)
  np.testing.assert_allclose(null, want, atol=1e-5)
  np.testing.assert_array_equal(null, calibrate.split_half_null(x, rounds=3, seed=7))
  assert not np.array_equal(null, calibrate.split_half_null(x, rounds=3, seed=8))


def test_memorization_index_end_to_end_matches_closed_form():
  rng = np.random.default_rng(1)
  train = rng.normal(size=(12, 6)).astype(np.float32)
  synth = np.concatenate([train[:2] + 0.01 * rng.normal(size=(2, 6)),
                          rng.normal(size=(3, 6))]).astype(np.float32)
  cfg = _cfg(mi=True)
  cfg.mi.rounds, cfg.mi.seed = 4, 5
  out = calibrate.run_all(cfg, calibrate.context(train, synth))
  null = np.concatenate([_brute_nn(train[a], train[b])
                         for a, b in calibrate.half_splits(12, 4, seed=5)])
  s = _brute_nn(synth, train)
  mi = (s - null.mean()) / null.std()
  np.testing.assert_allclose(out["columns"]["mi_score"], s, atol=1e-5)
  np.testing.assert_allclose(out["columns"]["mi"], mi, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["columns"]["oni"], -np.tanh(mi), atol=1e-4)
  summ = out["summary"]["mi"]
  assert summ["mu_null"] == pytest.approx(null.mean(), abs=1e-5)
  assert summ["sigma_null"] == pytest.approx(null.std(), rel=1e-4)
  assert summ["n_null"] == 4 * 6
  np.testing.assert_array_equal(out["columns"]["mi_memorized"], (mi > 3.0).astype(int))
  # The two near-copies are the most memorized.
  assert set(np.argsort(-out["columns"]["mi"])[:2]) == {0, 1}


def test_mi_halves_reference_matches_closed_form():
  rng = np.random.default_rng(4)
  train = rng.normal(size=(9, 3)).astype(np.float32)
  synth = rng.normal(size=(4, 3)).astype(np.float32)
  cfg = _cfg(mi=True)
  cfg.mi.rounds, cfg.mi.seed, cfg.mi.synthetic_reference = 3, 1, "halves"
  out = calibrate.run_all(cfg, calibrate.context(train, synth))
  splits = calibrate.half_splits(9, 3, seed=1)
  s = np.mean([_brute_nn(synth, train[b]) for _, b in splits], axis=0)
  null = np.concatenate([_brute_nn(train[a], train[b]) for a, b in splits])
  np.testing.assert_allclose(out["columns"]["mi_score"], s, atol=1e-5)
  np.testing.assert_allclose(out["columns"]["mi"], (s - null.mean()) / null.std(), atol=1e-4)
  cfg.mi.synthetic_reference = "most"
  with pytest.raises(ValueError, match="synthetic_reference"):
    calibrate.run_all(cfg, calibrate.context(train, synth))


def test_zca_is_inverse_square_root_of_covariance():
  x = np.random.default_rng(2).normal(size=(200, 4)) * [3.0, 1.0, 0.5, 0.2] + [1, 0, 0, 0]
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  cov = np.cov(u.T, bias=True)
  for eps in (0.0, 0.01):
    zca = calibrate.zca_fit(x, eps)
    w = zca["w"]
    np.testing.assert_allclose(zca["mean"], u.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(w, w.T, atol=1e-10)
    np.testing.assert_allclose(w @ w, np.linalg.inv(cov + eps * np.eye(4)), rtol=1e-4,
                               atol=1e-4)
  zca = calibrate.zca_fit(x, 0.0)
  y = calibrate.zca_apply(zca, x, renormalize=False).astype(np.float64)
  np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(4), atol=1e-4)
  z = calibrate.zca_apply(zca, x)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)


def test_mi_with_whitening_uses_whitened_space():
  rng = np.random.default_rng(3)
  train = rng.normal(size=(30, 4)).astype(np.float32)
  synth = rng.normal(size=(5, 4)).astype(np.float32)
  cfg = _cfg(mi=True)
  cfg.mi.whiten, cfg.mi.rounds, cfg.mi.zca_eps = True, 2, 0.01
  out = calibrate.run_all(cfg, calibrate.context(train, synth))
  zca = calibrate.zca_fit(train, 0.01)
  tw = calibrate.zca_apply(zca, train)
  sw = calibrate.zca_apply(zca, synth)
  np.testing.assert_allclose(out["columns"]["mi_score"], _brute_nn(sw, tw), atol=1e-5)
  null = np.concatenate([_brute_nn(tw[a], tw[b])
                         for a, b in calibrate.half_splits(30, 2, seed=cfg.mi.seed)])
  assert out["summary"]["mi"]["mu_null"] == pytest.approx(null.mean(), abs=1e-5)


def test_carlini_embedding_by_hand():
  train = _unit([0, 90, 180])
  synth = _unit([5, 45, 0])
  cfg = _cfg(carlini=True)
  cfg.carlini.n = 2
  out = calibrate.run_all(cfg, calibrate.context(train, synth))
  # Chord length between unit vectors theta apart: 2 sin(theta / 2).
  chord = lambda deg: 2 * math.sin(math.radians(deg) / 2)
  # 5 degrees: nearest 0 (5 away), second 90 (85 away); 45: two neighbours 45 away.
  r5 = chord(5) / (0.5 * (chord(5) + chord(85)) / 2)
  np.testing.assert_allclose(out["columns"]["carlini_ratio"], [r5, 2.0, 0.0], atol=1e-3)
  np.testing.assert_array_equal(out["columns"]["carlini_memorized"], [1, 0, 1])
  assert out["summary"]["carlini"]["n_used"] == 2
  cfg.carlini.n = 50  # capped at the 3 training images
  out = calibrate.run_all(cfg, calibrate.context(train, synth))
  r5 = chord(5) / (0.5 * (chord(5) + chord(85) + chord(175)) / 3)
  assert out["columns"]["carlini_ratio"][0] == pytest.approx(r5, abs=1e-3)
  assert out["summary"]["carlini"]["n_used"] == 3


def test_carlini_pixels_by_hand():
  train_imgs = np.stack([np.zeros((2, 2)), np.ones((2, 2)), 3 * np.ones((2, 2))])
  synth_imgs = np.stack([0.5 * np.ones((2, 2)), np.ones((2, 2))])
  cfg = _cfg(carlini=True)
  cfg.carlini.space = "pixels"
  cfg.carlini.n = 3
  ctx = calibrate.context(_unit([0, 40, 80]), _unit([10, 20]), train_images=train_imgs,
                          synth_images=synth_imgs)
  out = calibrate.run_all(cfg, ctx)
  # 0.5: distances 1, 1, 5 -> 1 / (0.5 * 7 / 3) = 6 / 7; the exact copy -> 0.
  np.testing.assert_allclose(out["columns"]["carlini_ratio"], [6 / 7, 0.0], atol=1e-12)
  np.testing.assert_array_equal(out["columns"]["carlini_memorized"], [1, 1])
  d = calibrate.pixel_knn_l2(synth_imgs, train_imgs, 2, block=1)
  np.testing.assert_allclose(d, [[1, 1], [0, 2]], atol=1e-12)


def test_relative_distance_formula():
  d = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(calibrate.relative_distance(d, 0.5), [1 / (0.5 * 2), 0.0])
  # A given direct distance (the metric's paired image) replaces d_1; a zero mean stays finite.
  np.testing.assert_allclose(calibrate.relative_distance(d, 0.5, direct=[3.0, 1.0]),
                             [3 / (0.5 * 2), 1 / (0.5 * 1e-12)])


def _carlini_images():
  """Synthetic image 0 at pixel distances 1, 2, 3, 4 from the four training images (one pixel
  differs each time), synthetic image 1 an exact copy of training image 2."""
  train = np.zeros((4, 2, 3))
  train[0, 0, 0], train[1, 0, 1], train[2, 1, 0], train[3, 1, 2] = 1, 2, 3, 4
  synth = np.stack([np.zeros((2, 3)), train[2]])
  return train, synth


def test_carlini_closed_form_by_hand():
  from deepssim_jax import metrics  # pylint: disable=g-import-not-at-top
  train, synth = _carlini_images()
  # Image 0: n = 3 nearest at 1, 2, 3 (mean 2): r = 1 / (0.5 * 2) = 1, not < delta 1.
  # Image 1: an exact copy: r = 0. Its other distances: sqrt(3^2 + 1^2), sqrt(3^2 + 2^2), 5.
  d = calibrate.pixel_knn_l2(synth, train, 3)
  np.testing.assert_array_equal(d, [[1, 2, 3], [0, math.sqrt(10), math.sqrt(13)]])
  cfg = _cfg(carlini=True)
  cfg.carlini.space, cfg.carlini.n, cfg.carlini.alpha = "pixels", 3, 0.5
  ctx = calibrate.context(_unit([0, 45, 90, 135]), _unit([10, 90]), train_images=train,
                          synth_images=synth)
  out = calibrate.run_all(cfg, ctx)["columns"]
  np.testing.assert_array_equal(out["carlini_ratio"], [1.0, 0.0])
  np.testing.assert_array_equal(out["carlini_memorized"], [0, 1])
  # The metric judges the pair's own training image: image 0 against training image 3
  # (distance 4): r = 4 / (0.5 * 2) = 4, reported as the score -4.
  got = metrics.carlini_relative_l2(train[[3, 2]], synth, train, alpha=0.5, n=3)
  np.testing.assert_array_equal(got, [4.0, 0.0])


def test_carlini_metric_and_calibration_are_one_criterion():
  """Both entry points (the audit's calibration, the evaluation metric) give identical
  ratios on the same images when the metric's pair is each synthetic image's nearest."""
  from deepssim_jax import metrics  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  train = rng.normal(size=(30, 9, 7)).astype(np.float32)
  synth = rng.normal(size=(8, 9, 7)).astype(np.float32)
  synth[2] = train[5] + 0.01 * rng.normal(size=(9, 7)).astype(np.float32)  # a near copy
  synth[4] = train[11]  # an exact copy
  synth[6] = synth[1]  # a repeated synthetic image (the metric embeds each once)
  cfg = _cfg(carlini=True)
  cfg.carlini.space, cfg.carlini.n, cfg.carlini.pixel_block = "pixels", 6, 3
  ctx = calibrate.context(rng.normal(size=(30, 4)), rng.normal(size=(8, 4)),
                          train_images=train, synth_images=synth)
  ratio = calibrate.run_all(cfg, ctx)["columns"]["carlini_ratio"]
  flat = lambda x: x.reshape(len(x), -1).astype(np.float64)  # noqa: E731
  nearest = np.argmin(((flat(synth)[:, None] - flat(train)[None]) ** 2).sum(-1), axis=1)
  got = metrics.carlini_relative_l2(train[nearest], synth, train, alpha=0.5, n=6, block=5)
  np.testing.assert_array_equal(got, ratio)
  assert ratio[4] == 0.0 and ratio[2] < 0.1 and np.all(np.delete(ratio, [2, 4]) > 0.5)
  # Blocked search (small reference blocks) finds the same neighbours.
  np.testing.assert_array_equal(calibrate.pixel_knn_l2(synth, train, 6, block=2, ref_block=7),
                                calibrate.pixel_knn_l2(synth, train, 6))


def test_bad_inputs_give_clear_errors():
  train = _unit([0, 90, 180])
  with pytest.raises(fileio.InputError, match="synthetic embeddings: empty"):
    calibrate.context(train, np.zeros((0, 2), np.float32))
  with pytest.raises(fileio.InputError, match="training embeddings: empty"):
    calibrate.context(np.zeros((0, 2), np.float32), train)
  with pytest.raises(fileio.InputError, match="dimension 3 differs"):
    calibrate.context(train, np.ones((2, 3), np.float32))
  with pytest.raises(fileio.InputError, match="dimension 3 differs"):
    calibrate.context(train, train, heldout_emb=np.ones((2, 3), np.float32))
  with pytest.raises(fileio.InputError, match="NaN"):
    calibrate.context(train, np.full((1, 2), np.nan, np.float32))
  ctx = calibrate.context(train, _unit([10]))
  with pytest.raises(fileio.InputError, match="held-out"):
    calibrate.run_all(_cfg(dar=True), ctx)
  with pytest.raises(fileio.InputError, match=">= 2 training images"):
    calibrate.run_all(_cfg(mi=True), calibrate.context(train[:1], _unit([10])))
  with pytest.raises(ValueError, match="zero spread"):
    calibrate.run_all(_cfg(mi=True), calibrate.context(_unit([0, 0, 0, 0]), _unit([10])))
  cfg = _cfg(carlini=True)
  cfg.carlini.space = "pixels"
  with pytest.raises(fileio.InputError, match="needs the training and synthetic images"):
    calibrate.run_all(cfg, ctx)
  ctx = calibrate.context(train, _unit([10]), train_images=np.zeros((3, 4, 4)),
                          synth_images=np.zeros((1, 4, 5)))
  with pytest.raises(fileio.InputError, match="mismatched image sizes"):
    calibrate.run_all(cfg, ctx)
  cfg.carlini.space = "voxels"
  with pytest.raises(ValueError, match="'embedding' or 'pixels'"):
    calibrate.run_all(cfg, ctx)
  bad = _cfg()
  bad.nope = {"enabled": True}
  with pytest.raises(ValueError, match="unknown calibration"):
    calibrate.enabled(bad)
  with pytest.raises(fileio.InputError, match="empty held-out"):
    calibrate.percentile_threshold([], 95)


def test_enabled_follows_config():
  assert calibrate.enabled(calibrate.default_config()) == ["dar", "mi", "carlini"]
  assert calibrate.enabled(_cfg(carlini=True)) == ["carlini"]
  out = calibrate.run_all(_cfg(), calibrate.context(_unit([0, 90]), _unit([10])))
  assert out == {"columns": {}, "summary": {}}
