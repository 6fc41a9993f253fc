"""Embedding store: round trip, streaming blocks, resume semantics, bad stores."""

import json
import os

import numpy as np
import pytest

from deepssim_jax import fileio, store


def _make(folder, sizes, d=8, dtype=np.float32, seed=0, meta=None):
  rng = np.random.default_rng(seed)
  ids, embs, start = [], [], 0
  for i, n in enumerate(sizes):
    shard_ids = [f"img-{start + j}" for j in range(n)]
    emb = rng.normal(size=(n, d)).astype(dtype)
    store.write_shard(str(folder), i, shard_ids, emb)
    ids += shard_ids
    embs.append(emb)
    start += n
  store.finalize(str(folder), meta or {"fingerprint": "abc"})
  return np.array(ids), np.concatenate(embs)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_and_blocks(tmp_path, dtype):
  ids, emb = _make(tmp_path / "s", [5, 7, 1, 4], dtype=dtype)
  got_ids, got_emb = store.load_store(str(tmp_path / "s"))
  np.testing.assert_array_equal(got_ids, ids)
  np.testing.assert_array_equal(got_emb, emb)
  assert got_emb.dtype == dtype
  index = json.load(open(tmp_path / "s" / "index.json"))
  assert index["status"] == "complete" and index["n_rows"] == 17 and index["dim"] == 8
  assert [s["rows"] for s in index["shards"]] == [5, 7, 1, 4]
  assert index["meta"]["fingerprint"] == "abc"
  for rows in (1, 3, 6, 17, 40):
    blocks = list(store.iter_store_blocks(str(tmp_path / "s"), rows))
    assert all(len(b[0]) == rows for b in blocks[:-1]) and 0 < len(blocks[-1][0]) <= rows
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), ids)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), emb)


def test_resume_semantics(tmp_path):
  folder = str(tmp_path / "s")
  assert store.completed_shards(folder) == []
  os.makedirs(folder)
  store.finalize(folder, {"fingerprint": "model-a"}, complete=False)
  store.write_shard(folder, 0, ["a", "b"], np.ones((2, 4)))
  store.write_shard(folder, 2, ["e"], np.ones((1, 4)))
  # A killed writer leaves only a temporary file, and a corrupt shard is not "done".
  open(os.path.join(folder, ".shard-00001.npz.x.tmp"), "wb").write(b"partial")
  open(os.path.join(folder, "shard-00003.npz"), "wb").write(b"garbage")
  assert store.completed_shards(folder, fingerprint="model-a") == [0, 2]
  with pytest.raises(fileio.InputError, match="model-a"):
    store.completed_shards(folder, fingerprint="model-b")
  # Partial stores are refused by readers, and finalize refuses a gap in the shards.
  with pytest.raises(fileio.InputError, match="partial"):
    store.load_store(folder)
  os.remove(os.path.join(folder, "shard-00003.npz"))
  with pytest.raises(fileio.InputError, match="shard-00001"):
    store.finalize(folder, {"fingerprint": "model-a"})
  store.write_shard(folder, 1, ["c", "d"], np.zeros((2, 4)) + 2)
  store.finalize(folder, {"fingerprint": "model-a"})
  ids, emb = store.load_store(folder)
  assert ids.tolist() == ["a", "b", "c", "d", "e"]
  np.testing.assert_array_equal(emb[:, 0], [1, 1, 2, 2, 1])


def test_bad_stores(tmp_path):
  with pytest.raises(fileio.InputError, match="not found"):
    store.load_store(str(tmp_path / "missing"))
  # No index: finalize never ran.
  noidx = str(tmp_path / "noidx")
  store.write_shard(noidx, 0, ["a"], np.ones((1, 4)))
  with pytest.raises(fileio.InputError, match="index.json"):
    store.load_store(noidx)
  # Mismatched dimensions across shards.
  dims = str(tmp_path / "dims")
  store.write_shard(dims, 0, ["a"], np.ones((1, 4)))
  store.write_shard(dims, 1, ["b"], np.ones((1, 5)))
  with pytest.raises(fileio.InputError, match="shard-00001.npz.*dimension 5"):
    store.finalize(dims, {})
  # Duplicate ids within a shard and across shards.
  with pytest.raises(fileio.InputError, match="duplicate id 'a'"):
    store.write_shard(str(tmp_path / "dup1"), 0, ["a", "a"], np.ones((2, 4)))
  dup = str(tmp_path / "dup2")
  store.write_shard(dup, 0, ["a", "b"], np.ones((2, 4)))
  store.write_shard(dup, 1, ["c", "b"], np.ones((2, 4)))
  with pytest.raises(fileio.InputError, match="duplicate id 'b'.*shard-00000.*shard-00001"):
    store.finalize(dup, {})
  # A shard replaced after finalize no longer matches the index.
  ok = str(tmp_path / "ok")
  _make(ok, [3, 3])
  store.write_shard(ok, 1, ["x", "y"], np.ones((2, 8)))
  with pytest.raises(fileio.InputError, match="shard-00001.npz: 2 rows"):
    list(store.iter_store_blocks(ok, 2))
  with pytest.raises(ValueError, match="NaN"):
    store.write_shard(str(tmp_path / "nan"), 0, ["a"], np.full((1, 4), np.nan))
