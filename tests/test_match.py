"""Streaming exact top-k equals brute force (ties included); bad inputs are refused."""

import csv

import jax
import numpy as np
import pytest

from deepssim_jax import fileio, match, parallel, store


def _dyadic(rng, n, d=16, nnz=4):
  """Unit rows with nnz entries of +-1/2: every dot product is exact, with many ties."""
  x = np.zeros((n, d), np.float32)
  for i in range(n):
    cols = rng.choice(d, nnz, replace=False)
    x[i, cols] = rng.choice([-0.5, 0.5], nnz)
  return x


def _brute(q, r, k):
  """Independent reference: float64 cosine matrix, stable argsort (lower index on ties)."""
  qn = q / np.linalg.norm(q.astype(np.float64), axis=1, keepdims=True)
  rn = r / np.linalg.norm(r.astype(np.float64), axis=1, keepdims=True)
  s = qn @ rn.T
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, axis=1), order


@pytest.fixture(scope="module")
def meshes():
  assert len(jax.devices()) == 4  # conftest's fake devices
  return {"4dev": parallel.make_mesh(), "1dev": parallel.make_mesh(jax.devices()[:1])}


# (n_query, n_ref, k, q_block, r_block, chunk): sizes that do not divide the blocks, k larger
# than a reference block, the chunk-max prefilter on and off.
CASES = [
    (37, 301, 5, 4, 64, 4),    # chunked prefilter, 5 blocks, last one partial
    (37, 301, 5, 4, 64, 0),    # plain lax.top_k
    (10, 75, 40, 8, 16, 2),    # k > r_block (and the prefilter cannot apply)
    (3, 9, 9, 2, 4, 0),        # k == n_ref, fewer queries than devices
]


@pytest.mark.parametrize("case", CASES)
def test_streaming_topk_equals_brute_force_with_ties(meshes, case):
  nq, nr, k, qb, rb, chunk = case
  rng = np.random.default_rng(nr + k)
  q, r = _dyadic(rng, nq), _dyadic(rng, nr)
  r[nr // 2:nr // 2 + 5] = r[:5]  # exact duplicate reference rows in other blocks
  want_s, want_i = _brute(q, r, k)
  assert (np.diff(want_s, axis=1) == 0).any()  # the case does have ties inside the top-k
  results = {name: match.topk_match(q, r, k, q_block=qb, r_block=rb, mesh=mesh, chunk=chunk)
             for name, mesh in meshes.items()}
  for s, i in results.values():
    assert s.shape == (nq, k) and s.dtype == np.float32 and i.dtype == np.int64
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(s, want_s.astype(np.float32))


def test_random_floats_unnormalised(meshes):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(21, 24)).astype(np.float32) * 3
  r = rng.normal(size=(250, 24)).astype(np.float16)
  s, i = match.topk_match(q, r, 6, q_block=4, r_block=32, mesh=meshes["4dev"], chunk=4)
  want_s, want_i = _brute(q, r.astype(np.float32), 6)
  np.testing.assert_allclose(s, want_s, atol=2e-6)
  # Indices agree wherever the brute-force ranking is not within rounding of a tie.
  gaps = -np.diff(_brute(q, r.astype(np.float32), 7)[0], axis=1)  # rank j to j + 1
  before = np.concatenate([np.ones((len(q), 1)), gaps[:, :5]], axis=1)
  clear = np.minimum(before, gaps)
  assert (clear > 1e-5).mean() > 0.9
  np.testing.assert_array_equal(i[clear > 1e-5], want_i[clear > 1e-5])
  assert np.all(np.diff(s, axis=1) <= 0)


def test_block_topk_and_merge():
  rng = np.random.default_rng(5)
  q, r = _dyadic(rng, 6), _dyadic(rng, 32)
  s, c = match.block_topk(q, r, 24, k=3, chunk=4)  # columns >= 24 are padding
  want_s, want_c = _brute(q, r[:24], 3)
  np.testing.assert_array_equal(c, want_c)
  np.testing.assert_array_equal(s, want_s)
  # Columns past n_valid (mid-chunk here) must never win, even with the highest scores.
  r_bad = np.concatenate([r[:21], np.repeat(q[:1], 11, axis=0)])
  for chunk in (4, 0):
    s1, c1 = match.block_topk(q, r_bad, 21, k=3, chunk=chunk)
    want_s1, want_c1 = _brute(q, r[:21], 3)
    np.testing.assert_array_equal(c1, want_c1)
    np.testing.assert_array_equal(s1, want_s1)
  s2, c2 = match.block_topk(q, r[24:], 8, k=3, chunk=0)
  ms, mi = match.merge_topk(s, c, s2, c2 + 24)
  all_s, all_i = _brute(q, r, 3)
  np.testing.assert_array_equal(mi, all_i)
  np.testing.assert_array_equal(ms, all_s)


def test_prefilter_edge_chunk_ignores_padding():
  # Chunks of 2 columns, 5 valid: chunk 2 holds column 4 (valid, -0.6) and column 5
  # (padding, 1.0). Taking chunk 2's unmasked maximum would evict chunk 1 (0.6).
  q = np.array([[1.0, 0.0]], np.float32)
  r = np.array([[0.8, 0.6], [0, 1], [0.6, 0.8], [0, 1], [-0.6, 0.8], [1, 0], [1, 0], [1, 0]],
               np.float32)
  s, c = match.block_topk(q, r, 5, k=2, chunk=2)
  np.testing.assert_array_equal(c, [[0, 2]])
  np.testing.assert_allclose(s, [[0.8, 0.6]], rtol=1e-6)


def _write_store(folder, ids, emb, shard_rows):
  for n, start in enumerate(range(0, len(ids), shard_rows)):
    store.write_shard(folder, n, ids[start:start + shard_rows], emb[start:start + shard_rows])
  store.finalize(folder, {"fingerprint": "test"})


def test_match_stores_csv_and_npz(tmp_path, meshes):
  rng = np.random.default_rng(2)
  q, r = _dyadic(rng, 13), _dyadic(rng, 90)
  q_ids = np.array([f"gen-{i}" for i in range(13)])
  r_ids = np.array([f"train-{i}" for i in range(90)])
  _write_store(str(tmp_path / "q"), q_ids, q, 5)
  _write_store(str(tmp_path / "r"), r_ids, r.astype(np.float16), 17)
  want_s, want_i = _brute(q, r, 3)
  info = match.match_stores(str(tmp_path / "q"), str(tmp_path / "r"), str(tmp_path / "m.csv"),
                            3, q_block=2, r_block=20, mesh=meshes["4dev"], chunk=2,
                            progress=False)
  assert info == {"path": str(tmp_path / "m.csv"), "n_query": 13, "n_ref": 90, "k": 3}
  with open(tmp_path / "m.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 13 * 3
  for row in rows:
    a, b = int(row["synth_id"].split("-")[1]), int(row["rank"]) - 1
    assert row["train_id"] == r_ids[want_i[a, b]]
    assert float(row["score"]) == want_s[a, b]
  match.match_stores(str(tmp_path / "q"), str(tmp_path / "r"), str(tmp_path / "m.npz"), 3,
                     q_block=2, r_block=20, mesh=meshes["1dev"], chunk=0, progress=False)
  with np.load(tmp_path / "m.npz") as z:
    np.testing.assert_array_equal(z["synth_ids"], q_ids)
    np.testing.assert_array_equal(z["indices"], want_i)
    np.testing.assert_array_equal(z["train_ids"], r_ids[want_i])
    np.testing.assert_array_equal(z["scores"], want_s.astype(np.float32))
  # Queries and references of different dimensions are refused, naming the store.
  _write_store(str(tmp_path / "r8"), r_ids, r[:, :8], 30)
  with pytest.raises(fileio.InputError, match="r8"):
    match.match_stores(str(tmp_path / "q"), str(tmp_path / "r8"), str(tmp_path / "x.csv"), 3,
                       progress=False)


def test_topk_match_refuses_bad_inputs(meshes):
  emb = np.random.default_rng(6).normal(size=(3, 5)).astype(np.float32)
  with pytest.raises(ValueError, match="k=4"):
    match.topk_match(emb, emb, 4, mesh=meshes["1dev"])
  with pytest.raises(ValueError, match="row 1 is zero"):
    match.topk_match(emb, np.stack([emb[0], 0 * emb[0]]), 1, mesh=meshes["1dev"])
  with pytest.raises(ValueError, match="norm"):
    match.topk_match(emb, emb, 1, mesh=meshes["1dev"], normalize_rows=False)
