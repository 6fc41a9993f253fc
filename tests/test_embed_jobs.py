"""Embedding job (resumable stores, 4 vs 1 devices) and the pair metrics of evaluation."""

import functools

import jax
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from deepssim_jax import config_lib, embed, fileio, jobs, metrics, models, parallel, store

SIZE = (32, 32)


def images(n, seed):
  rng = np.random.default_rng(seed)
  x = np.kron(rng.normal(size=(n, SIZE[0] // 4, SIZE[1] // 4)), np.ones((4, 4)))
  x += 0.3 * rng.normal(size=x.shape)
  return ((x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def model_vars():
  model = models.make_model("convnext_atto", hidden_dim=16, embed_dim=8, depthwise_impl="conv",
                            depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
  v = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images(1, 0))
  return model, v


class CountingSource(embed.BankSource):
  """A bank source that records which rows were read."""

  def __init__(self, keys, imgs):
    super().__init__(keys, imgs)
    self.read = set()

  def __getitem__(self, i):
    self.read.add(int(i))
    return super().__getitem__(i)


def run_store(model_vars, folder, src, mesh, **kw):
  model, v = model_vars
  kw.setdefault("batch_size", 8)
  kw.setdefault("shard_rows", 12)
  return embed.embed_to_store(embed.make_embed_fn(model), v, src, folder, fingerprint="fp",
                              mesh=mesh, progress=False, **kw)


def test_store_equals_embed_array_and_resume_equals_uninterrupted(model_vars, tmp_path):
  model, v = model_vars
  x = images(31, 1)  # 3 shards of 12, 12, 7 rows; batches of 8 padded within each shard
  keys = [f"img{i:03d}" for i in range(31)]
  mesh = parallel.make_mesh()
  whole = str(tmp_path / "whole")
  r = run_store(model_vars, whole, embed.BankSource(keys, x), mesh)
  assert r["complete"] and r["written"] == 3 and r["skipped"] == 0
  ids, emb = store.load_store(whole)
  assert ids.tolist() == keys
  np.testing.assert_allclose(emb, embed.embed_array(model, v, x, 8, mesh, progress=False),
                             atol=1e-6)
  # Killed after one shard: the store is partial and refused by readers...
  part = str(tmp_path / "part")
  r1 = run_store(model_vars, part, embed.BankSource(keys, x), mesh, stop_after_shards=1)
  assert not r1["complete"] and r1["written"] == 1
  with pytest.raises(fileio.InputError, match="partial"):
    store.load_store(part)
  # ...and the resumed run reads only the missing rows and ends equal to the whole run.
  src = CountingSource(keys, x)
  r2 = run_store(model_vars, part, src, mesh)
  assert r2["complete"] and r2["written"] == 2 and r2["skipped"] == 1
  assert min(src.read) == 12
  ids2, emb2 = store.load_store(part)
  assert ids2.tolist() == keys
  np.testing.assert_array_equal(emb2, emb)
  # A different model (fingerprint) may not continue this store.
  with pytest.raises(fileio.InputError, match="fingerprint"):
    embed.embed_to_store(embed.make_embed_fn(model), v, src, part, batch_size=8,
                         shard_rows=12, fingerprint="other", mesh=mesh, progress=False)


def test_four_devices_give_the_same_store_as_one(model_vars, tmp_path):
  assert jax.device_count() == 4
  x = images(19, 2)
  keys = [f"k{i}" for i in range(19)]
  one = str(tmp_path / "one")
  four = str(tmp_path / "four")
  run_store(model_vars, one, embed.BankSource(keys, x), parallel.make_mesh(jax.devices()[:1]),
            batch_size=6, dtype="float16")
  run_store(model_vars, four, embed.BankSource(keys, x), parallel.make_mesh(), batch_size=6,
            dtype="float16")  # rounded up to 8, so a different padding too
  (i1, e1), (i4, e4) = store.load_store(one), store.load_store(four)
  assert i1.tolist() == i4.tolist() == keys
  assert e1.dtype == e4.dtype == np.float16
  np.testing.assert_allclose(e1.astype(np.float32), e4.astype(np.float32), atol=2e-3)


def test_embed_rejects_empty_set_and_bad_settings(model_vars, tmp_path):
  empty = embed.BankSource([], np.zeros((0, *SIZE), np.float32))
  with pytest.raises(fileio.InputError, match="empty"):
    run_store(model_vars, str(tmp_path / "e"), empty, parallel.make_mesh())
  src = embed.BankSource(["a"], images(1, 3))
  with pytest.raises(ValueError, match="shard_rows"):
    run_store(model_vars, str(tmp_path / "s"), src, parallel.make_mesh(), shard_rows=0)
  with pytest.raises(ValueError, match="dtype"):
    run_store(model_vars, str(tmp_path / "d"), src, parallel.make_mesh(), dtype="int8")


# ----------------------------------------------------------------------------- metrics

def test_pearson_equals_numpy_corrcoef():
  a, b = images(5, 4), images(5, 5)
  b[0] = 2 * a[0] + 1  # a perfect linear copy
  got = metrics.pearson(a, b)
  want = [np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(5)]
  np.testing.assert_allclose(got, want, atol=1e-12)
  assert got[0] == pytest.approx(1.0)
  with pytest.raises(fileio.InputError, match="constant image"):
    metrics.pearson(a[:1], np.ones_like(a[:1]))


def test_carlini_relative_l2_equals_brute_force():
  train = images(20, 6)
  b = images(4, 7)
  b[1] = train[3] + 0.01  # nearly a copy of training image 3
  a = train[[0, 3, 5, 9]]
  got = metrics.carlini_relative_l2(a, b, train, alpha=0.5, n=5, block=3)
  for i in range(4):
    d = np.sort([np.linalg.norm(b[i].astype(np.float64) - t) for t in train])
    want = np.linalg.norm(b[i].astype(np.float64) - a[i]) / (0.5 * d[:5].mean())
    assert got[i] == pytest.approx(want, rel=1e-4)
  assert got[1] < 1 < got[0]  # the copy passes Carlini's test, an unrelated pair does not
  # n larger than the training set is capped at its size.
  full = metrics.carlini_relative_l2(a, b, train[:3], n=50)
  assert np.all(np.isfinite(full))


def test_metric_registry_scores_pairs(model_vars):
  model, v = model_vars
  a, b = images(6, 8), images(6, 9)
  b[2] = a[2]
  ctx = {"model": model, "variables": v, "batch_size": 4, "ssim_batch_size": 8,
         "train_images": images(10, 10), "carlini_alpha": 0.5, "carlini_n": 3, "seed": 0}
  out = {name: metrics.get(name)(ctx, a, b) for name in metrics.METRICS
         if name not in metrics.BASELINES}  # those need weights files: tests/test_resnet.py
  for name, s in out.items():
    assert s.shape == (6,), name
  for name in ("deepssim", "deepssim_aligned", "ssim", "pearson", "convnext_raw",
               "fsim_reference", "fsim"):
    assert out[name][2] == pytest.approx(1.0, abs=1e-5), name  # identical images
  want = [structural_similarity(a[i], b[i], data_range=a[i].max() - a[i].min())
          for i in range(6)]
  np.testing.assert_allclose(out["ssim"], want, atol=1e-5)
  assert out["carlini_l2"][2] == 0.0
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.get("lpips")


def test_deepssim_metric_embeds_each_distinct_image_once_with_the_same_scores(model_vars):
  model, v = model_vars
  base = images(4, 11)
  a = base[[0, 1, 0, 2, 0, 1]]  # a training image in several pairs
  b = images(6, 12)
  b[5] = b[1]
  first, inverse = metrics.unique_rows(a)
  np.testing.assert_array_equal(np.sort(first), [0, 1, 3])
  np.testing.assert_array_equal(a[first][inverse], a)
  c = a.copy()
  c[2] = np.nextafter(c[2], np.inf)  # one ulp off is another image
  assert len(metrics.unique_rows(c)[0]) == 4
  calls = []
  def counting_fn(variables, x):
    calls.append(x.shape[0])
    return embed.make_embed_fn(model)(variables, x)
  mesh = parallel.make_mesh(jax.devices()[:1])
  ctx = {"model": model, "variables": v, "batch_size": 1, "embed_fn": counting_fn,
         "mesh": mesh}
  got = metrics.get("deepssim")(ctx, a, b)
  ea = embed.embed_array(model, v, a, 1, mesh, progress=False)
  eb = embed.embed_array(model, v, b, 1, mesh, progress=False)
  np.testing.assert_allclose(got, embed.cosine_pairs(ea, eb), atol=1e-6)
  assert len(calls) == 3 + 5  # batches of one: each distinct image embedded once


def test_deepssim_aligned_metric_is_the_aligned_score_of_each_pair(model_vars):
  """deepssim_aligned = align.aligned_scores of each pair with the checkpoint's network (a
  flipped copy scores 1 where its plain cosine does not); repeated images are embedded once
  and score the same."""
  from deepssim_jax import align  # pylint: disable=g-import-not-at-top
  model, v = model_vars
  base = images(3, 13)
  a = base[[0, 1, 0, 2]]
  b = np.stack([base[0][:, ::-1], images(1, 14)[0], base[0][:, ::-1], base[2][::-1]])
  ctx = {"model": model, "variables": v, "batch_size": 4}
  got = metrics.get("deepssim_aligned")(ctx, a, b)
  emb = lambda x: embed.embed_array(model, v, x, 4, progress=False)  # noqa: E731
  want = align.aligned_scores(emb, a, b, pairs=np.stack([np.arange(4)] * 2, 1))[0]
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert got[0] == pytest.approx(1.0, abs=1e-5) and got[3] == pytest.approx(1.0, abs=1e-5)
  assert got[2] == got[0]
  plain = metrics.get("deepssim")(ctx, a, b)
  assert plain[0] < 1 - 1e-4


def test_checkpoint_specs():
  assert jobs.parse_checkpoint("best", "w") == ("w", "best", None)
  assert jobs.parse_checkpoint("latest:1200", "w") == ("w", "latest", 1200)
  assert jobs.parse_checkpoint("runs/b:best", "w") == ("runs/b", "best", None)
  assert jobs.parse_checkpoint("C:/runs/b:latest:7", "w") == ("C:/runs/b", "latest", 7)
  with pytest.raises(ValueError, match="best|latest"):
    jobs.parse_checkpoint("final", "w")


def _misalignment_draws(seed, n, cfg):
  """The draws jobs.misalign makes for n <= 256 images (one chunk, keyed
  fold_in(key(seed), 0), split per image), mirroring augment.augment_image: each image's
  key split in 6; k[0] gives 4 uniforms (flip0, flip1, rotate, gamma fire when below p),
  k[1] the angle uniform in [-max_angle, max_angle], k[2] gamma uniform in
  [gamma_min, gamma_max]. Returns (fired (n, 4) bool, angle (n,), gamma (n,))."""
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0), n)
  k = jax.vmap(lambda key: jax.random.split(key, 6))(keys)
  u = jax.vmap(lambda key: jax.random.uniform(key, (4,)))(k[:, 0])
  draw = lambda lo, hi: jax.vmap(  # noqa: E731
      lambda key: jax.random.uniform(key, (), minval=lo, maxval=hi))
  return (np.asarray(u) < cfg.p, np.asarray(draw(-cfg.max_angle, cfg.max_angle)(k[:, 1])),
          np.asarray(draw(cfg.gamma_min, cfg.gamma_max)(k[:, 2])))


def _expected_misalignment(x, fired, angle, gamma):
  """One image transformed as drawn, computed independently: numpy flips, scipy's bilinear
  rotation about the centre (edges extended), gamma on the min-max scaled image, z-scored."""
  from scipy import ndimage
  y = np.asarray(x, np.float64)
  if fired[0]:
    y = y[::-1, :]
  if fired[1]:
    y = y[:, ::-1]
  if fired[2]:  # output (r, c) samples the input at the point rotated back by the angle
    m = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    ctr = (np.array(y.shape) - 1) / 2
    y = ndimage.affine_transform(y, m, offset=ctr - m @ ctr, order=1, mode="nearest")
  if fired[3]:
    lo, hi = y.min(), y.max()
    y = ((y - lo) / (hi - lo)) ** gamma * (hi - lo) + lo
  return (y - y.mean()) / y.std()


def test_misaligned_evaluation_is_seeded_and_transforms_at_rate_p():
  """jobs.misalign applies flips, a rotation within max_angle and a gamma within the
  configured range, each with probability p, seeded: every output equals the independently
  computed transform of the seed's draws (images with none drawn come back as they were),
  each transform fires at rate p and the share of changed images is 1 - (1 - p)^4."""
  c = config_lib.base_config().eval.misaligned
  # Non-default settings, so that a setting left unused shows.
  c.p, c.max_angle, c.gamma_min, c.gamma_max = 0.5, 0.3, 0.6, 0.9
  n = 256  # one chunk of misalign
  x = images(n, 12)
  out = jobs.misalign(x, 5, c)
  np.testing.assert_array_equal(jobs.misalign(x, 5, c), out)  # same seed, same transforms
  assert out.shape == x.shape and out.dtype == np.float32
  fired, angle, gamma = _misalignment_draws(5, n, c)
  for i in range(n):
    want = _expected_misalignment(x[i], fired[i], angle[i], gamma[i])
    err = np.abs(out[i] - want).max()
    assert err < 2e-4, (i, fired[i].tolist(), float(angle[i]), float(gamma[i]), err)
  # Each transform fires at rate p (binomial(256, 0.5): sd 8; a 5-sigma band) over the
  # configured ranges.
  counts = fired.sum(0)
  assert np.all(np.abs(counts - n * c.p) < 40), counts
  assert 0.25 < np.abs(angle[fired[:, 2]]).max() <= 0.3
  assert 0.6 <= gamma[fired[:, 3]].min() and gamma[fired[:, 3]].max() <= 0.9
  changed = np.abs(out - x).reshape(n, -1).max(axis=1) > 1e-3
  np.testing.assert_array_equal(changed, fired.any(1))
  # Untouched only when none of the 4 transforms fires: 256 / 16 = 16 images, sd 3.9.
  assert abs(int((~changed).sum()) - n / 16) < 20, int((~changed).sum())
