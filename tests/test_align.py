"""deepssim_jax.align (registration before scoring) and the API's align=True.

With the pixels themselves as the embedding (centred unit rows), the aligned cosine is the
best Pearson correlation over the candidates, which numpy computes independently from
geometry.transform_candidates (tested against scikit-image's rotate in test_geometry).
"""

import os

import numpy as np
import pytest

import deepssim_jax
from deepssim_jax import align, fileio, geometry
from deepssim_jax.data import demo, images as images_lib


def smooth(n, seed, size=(24, 20)):
  rng = np.random.default_rng(seed)
  r, c = np.mgrid[0:size[0], 0:size[1]] / 6.0
  out = [np.sin(r * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(c * rng.uniform(0.5, 2))
         + 0.3 * rng.normal(size=size) for _ in range(n)]
  return images_lib.zscore(np.stack(out).astype(np.float32))


def test_angle_grid_starts_at_the_identity_and_is_symmetric():
  g = align.angle_grid()
  assert g[0] == 0 and len(g) == 7
  np.testing.assert_allclose(np.sort(g), np.deg2rad([-9, -6, -3, 0, 3, 6, 9]), atol=1e-6)
  assert list(align.angle_grid(0.0, 0.1)) == [0.0]
  for bad in ((-0.1, 0.05), (0.1, 0.0)):
    with pytest.raises(ValueError, match="align"):
      align.angle_grid(*bad)


def test_pixel_embedding_gives_the_best_correlation_over_candidates():
  a, b = smooth(3, 0), smooth(4, 1)
  angles = align.angle_grid()
  s, chosen = align.aligned_scores(align.unit_rows, a, b, angles)
  cands = np.asarray(geometry.transform_candidates(b, angles))  # (T, M, H, W)
  r = np.array([[[np.corrcoef(a[i].ravel(), cands[t, j].ravel())[0, 1]
                  for j in range(len(b))] for i in range(len(a))] for t in range(len(cands))])
  np.testing.assert_allclose(s, r.max(axis=0), atol=1e-5)
  np.testing.assert_array_equal(chosen, r.argmax(axis=0))
  # Pairs: the matrix's entries.
  pairs = np.array([[0, 3], [2, 0], [1, 1]])
  sp, cp = align.aligned_scores(align.unit_rows, a, b, angles, pairs=pairs)
  np.testing.assert_allclose(sp, s[pairs[:, 0], pairs[:, 1]], atol=1e-6)
  np.testing.assert_array_equal(cp, chosen[pairs[:, 0], pairs[:, 1]])


def test_a_transformed_copy_is_brought_back_and_the_identity_wins_ties():
  b = smooth(2, 2)
  angles = align.angle_grid()
  t = 3 * len(angles) + 4  # both flips, then a rotation of angles[4]
  a = align.candidates(b, t, angles)
  s, chosen = align.aligned_scores(align.unit_rows, a, b, angles)
  np.testing.assert_array_equal(np.diag(chosen), [t, t])
  np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-5)
  _, same = align.aligned_scores(align.unit_rows, b, b, angles)
  np.testing.assert_array_equal(np.diag(same), [0, 0])
  with pytest.raises(ValueError, match="start with 0"):
    align.aligned_scores(align.unit_rows, a, b, angles[::-1])


@pytest.fixture(scope="module")
def model():
  return deepssim_jax.load("builtin")


def test_api_align_scores_a_rotated_noisy_copy_as_a_copy(model):
  _, x = model.read(os.path.join(demo.MRI_DIR, "colin27-T1.nii.gz"))
  rng = np.random.default_rng(0)
  # Off the grid (7.4 degrees) and flipped, with a gamma change and noise: a copy as the
  # held-out benchmark makes them.
  g = (x[20] - x[20].min()) / np.ptp(x[20])
  copy = demo._rotate(np.flip(g ** 0.8, 0), np.deg2rad(7.4))  # pylint: disable=protected-access
  copy = images_lib.zscore((copy + rng.normal(0, 0.02, copy.shape)).astype(np.float32))
  raw, aligned = model.score(x[20], copy, align=False), model.score(x[20], copy, align=True)
  # The built-in network never saw flips (model.align): plain, the copy is not one.
  assert aligned > 0.85 > raw, (raw, aligned)
  # A slice 12 mm away stays Different: the registration makes no copy of it.
  assert max(model.score(x[20], x[32], align=True), model.score(x[20], x[32], align=False)
             ) <= 0.60
  stack = np.stack([x[5], copy, x[32], x[40]])
  sim = model.similarity(x[20:22], stack, align=True)
  assert sim.shape == (2, 4)
  assert sim[0, 1] == pytest.approx(aligned, abs=1e-5)
  top = model.nearest(x[20:21], stack, k=2, align=True)
  assert top["indices"][0, 0] == 1 and top["scores"][0, 0] == pytest.approx(aligned, abs=1e-5)
  assert top["scores"][0, 0] >= top["scores"][0, 1]
  assert list(top["classes"][0][:1]) == ["Duplicate"]
  with pytest.raises(fileio.InputError, match="rerank"):
    model.nearest(x[20:21], stack, k=2, align=True, rerank=0)


def test_api_align_refuses_stacks_for_a_single_score(model):
  _, x = model.read(os.path.join(demo.MRI_DIR, "colin27-T1.nii.gz"))
  with pytest.raises(fileio.InputError, match="expected one"):
    model.score(x[:2], x[3], align=True)


def test_rerank_keeps_the_best_aligned_candidates_chunk_by_chunk():
  """rerank = the aligned matrix's entries at each row's plain candidates, sorted, best k;
  the same from arrays or row-indexed sources and for any chunk size."""
  angles = align.angle_grid()
  ref = smooth(9, 3)
  query = np.concatenate([align.candidates(ref[[2, 5]], 2 * len(angles) + 2, angles),
                          smooth(3, 4)])
  cand = np.argsort(-(align.unit_rows(query) @ align.unit_rows(ref).T), axis=1,
                    kind="stable")[:, :6]
  full = align.aligned_scores(align.unit_rows, query, ref, angles)[0]
  s, i = align.rerank(align.unit_rows, query, ref, cand, 2, chunk=100)
  want = np.take_along_axis(full, cand, 1)
  order = np.argsort(-want, axis=1, kind="stable")[:, :2]
  np.testing.assert_allclose(s, np.take_along_axis(want, order, 1), atol=1e-6)
  np.testing.assert_array_equal(i, np.take_along_axis(cand, order, 1))
  # The up-down-flipped, rotated copies are brought back to their sources when all are
  # candidates (the first copy's source is not among its 6 best plain cosines).
  assert 2 not in cand[0]
  s9, i9 = align.rerank(align.unit_rows, query, ref, np.tile(np.arange(9), (5, 1)), 1)
  assert list(i9[:2, 0]) == [2, 5] and np.all(s9[:2, 0] > 0.999)

  class Rows:  # a random-access source, as audits pass them
    def __init__(self, x):
      self.x = x

    def __len__(self):
      return len(self.x)

    def __getitem__(self, r):
      return self.x[r]

  s1, i1 = align.rerank(align.unit_rows, Rows(query), Rows(ref), cand, 2, chunk=2)
  np.testing.assert_allclose(s1, s, atol=1e-6)
  np.testing.assert_array_equal(i1, i)
  for bad in ({"k": 7}, {"k": 0}, {"k": 2, "chunk": 0}):
    with pytest.raises(ValueError, match="rerank"):
      align.rerank(align.unit_rows, query, ref, cand, **bad)


def test_flip_candidates_are_the_best_over_the_query_flip_states():
  """flip_candidates = each query row's m reference rows of highest Pearson correlation
  (the pixel embedding) over the query's four flip states (numpy's corrcoef), whatever the
  chunk; so a flipped copy's source is a candidate where plain cosines miss it."""
  from deepssim_jax import match  # pylint: disable=g-import-not-at-top
  angles = align.angle_grid()
  ref = smooth(9, 3)
  query = np.concatenate([align.candidates(ref[[2, 5]], 2 * len(angles) + 1, angles),
                          smooth(3, 4)])
  m = 3
  cand = align.flip_candidates(align.unit_rows, query, align.unit_rows(query),
                               align.unit_rows(ref), m, match.topk_match, chunk=2)
  r = np.max([[[np.corrcoef(np.flip(q, axes).ravel(), t.ravel())[0, 1] for t in ref]
               for q in query] for axes in ((), (0,), (1,), (0, 1))], axis=0)
  want = np.argsort(-r, axis=1, kind="stable")[:, :m]
  np.testing.assert_array_equal(cand, want)
  plain = np.argsort(-(align.unit_rows(query) @ align.unit_rows(ref).T), axis=1)[:, :m]
  assert 2 not in plain[0]  # the first copy's source is missed by plain cosines
  assert cand[0, 0] == 2 and cand[1, 0] == 5
  # best_unique: a reference row found under several flip states counts once.
  got = align.best_unique(np.array([[0.9, 0.8, 0.95, 0.1]]), np.array([[4, 1, 4, 2]]), 3)
  np.testing.assert_array_equal(got, [[4, 1, 2]])


def test_aligned_score_of_an_ensemble_is_its_members_mean():
  """The candidate is chosen by pixel correlation, whatever the network: so the aligned
  score of an ensemble (unit embeddings concatenated and divided by sqrt(K), as
  models.Ensemble) is the mean of its members' aligned scores (the bench's
  ensemble_rigid_nb)."""
  a, b = smooth(3, 8), smooth(4, 9)
  first = align.unit_rows
  second = lambda x: align.unit_rows(np.abs(x) ** 1.5)  # noqa: E731  another embedding
  both = lambda x: np.concatenate([first(x), second(x)], 1) / np.sqrt(2.0)  # noqa: E731
  s1, c1 = align.aligned_scores(first, a, b)
  s2, c2 = align.aligned_scores(second, a, b)
  s, c = align.aligned_scores(both, a, b)
  np.testing.assert_array_equal(c, c1)
  np.testing.assert_array_equal(c, c2)
  np.testing.assert_allclose(s, (s1 + s2) / 2, atol=1e-6)


def _pixel_set(name, x):
  """An audit set whose embedding is its pixels (centred unit rows: cosine = Pearson r)."""
  return {"name": name, "ids": np.array([f"{name}/{i:02d}" for i in range(len(x))]),
          "emb": align.unit_rows(x), "source": x, "rows": np.arange(len(x)),
          "shape": x.shape[1:], "fingerprint": name, "emb_fingerprint": name}


def test_aligned_audit_scores_registered_copies_and_aligns_dar_not_mi(tmp_path):
  """audit.align: each synthetic image's best training image after alignment (all of them
  are candidates here: align_rerank * k = 12 >= 10), so flipped and rotated copies become
  Duplicates of their sources; Dar's held-out neighbours are aligned too, MI keeps the
  plain cosines."""
  from deepssim_jax import audit, score  # pylint: disable=g-import-not-at-top
  angles = align.angle_grid()
  train = smooth(10, 5)
  synth = np.concatenate([align.candidates(train[[1, 4, 7]], len(angles) + 5, angles),
                          smooth(4, 6)])
  held = np.concatenate([align.candidates(train[[0]], 2 * len(angles) + 3, angles),
                         smooth(5, 7)])
  sets = {"training": _pixel_set("training", train), "synthetic": _pixel_set("synthetic", synth),
          "heldout": _pixel_set("heldout", held)}
  config = score.audit_config(3, str(tmp_path), heldout=True, align=True)
  config.calibrate.mi.rounds, config.calibrate.carlini.n = 3, 4
  config.calibrate.dar.percentile = 50.0
  out = audit.compute_audit(config, sets, embed_images=align.unit_rows)
  full = align.aligned_scores(align.unit_rows, synth, train, angles)[0]
  np.testing.assert_allclose(out["scores"][:, 0], full.max(axis=1), atol=1e-6)
  np.testing.assert_array_equal(out["indices"][:3, 0], [1, 4, 7])
  assert list(out["classes"][:3]) == [1, 1, 1]  # Duplicate
  plain = config.copy_and_resolve_references()
  plain.audit.align = False
  before = audit.compute_audit(plain, sets)
  assert np.all(before["scores"][:3, 0] < 0.85), before["scores"][:3, 0]
  held_nn = align.aligned_scores(align.unit_rows, held, train, angles)[0].max(axis=1)
  dar = out["summary"]["calibration"]["dar"]
  assert dar["threshold"] == pytest.approx(np.percentile(held_nn, 50.0), abs=1e-6)
  assert dar["threshold"] != pytest.approx(before["summary"]["calibration"]["dar"]["threshold"])
  np.testing.assert_allclose(out["columns"]["mi_score"], before["scores"][:, 0], atol=1e-6)
  assert out["summary"]["align"]["rerank"] == 4 and before["summary"]["align"] is None
  with pytest.raises(ValueError, match="embed_images"):
    audit.compute_audit(config, sets)


def test_a_model_meant_to_be_aligned_aligns_by_default(model):
  """config.model.align (set for the built-in model): the API's, the score command's and
  the audit's default follows it; align=False still scores plain cosines, and the same
  network marked plain scores plainly by default."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from deepssim_jax import audit, score  # pylint: disable=g-import-not-at-top
  _, x = model.read(os.path.join(demo.MRI_DIR, "colin27-T1.nii.gz"))
  flipped = x[20][::-1]
  assert model.align and audit.aligns(model.config)
  plain, aligned = model.score(x[20], flipped, align=False), model.score(x[20], flipped,
                                                                          align=True)
  assert model.score(x[20], flipped) == pytest.approx(aligned, abs=1e-6) and aligned > plain
  assert score.score_pair(model, x[20], flipped)["score"] == pytest.approx(aligned, abs=1e-6)
  np.testing.assert_allclose(model.similarity(x[20:21], x[[20, 21]][:, ::-1]),
                             model.similarity(x[20:21], x[[20, 21]][:, ::-1], align=True),
                             atol=1e-6)
  config = model.config.copy_and_resolve_references()
  config.model.align = False
  m = dataclasses.replace(model, config=config)
  assert not m.align and m.score(x[20], flipped) == pytest.approx(plain, abs=1e-6)
  assert score.score_pair(m, x[20], flipped)["score"] == pytest.approx(plain, abs=1e-6)
  assert not audit.aligns(config)


def test_model_align_is_how_a_network_is_scored_not_another_network(tmp_path):
  """A workdir's checkpoints resume with model.align changed (train.check_model_unchanged),
  but not with another network."""
  from deepssim_jax import config_lib, train  # pylint: disable=g-import-not-at-top
  (tmp_path / "checkpoints" / "latest" / "10").mkdir(parents=True)
  saved = config_lib.base_config()
  (tmp_path / "config.json").write_text(saved.to_json_best_effort())
  now = saved.copy_and_resolve_references()
  now.model.align = not saved.model.align
  train.check_model_unchanged(str(tmp_path), now)
  now.model.name = "convnext_small"
  with pytest.raises(fileio.InputError, match="model.name"):
    train.check_model_unchanged(str(tmp_path), now)
