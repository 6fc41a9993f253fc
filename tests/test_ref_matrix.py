"""The reference's matrix files (what its eval.py loads) and labelled pair scores."""

import numpy as np
import pytest

from deepssim_jax import fileio, parallel, ref_matrix


def test_full_matrix_reference_format(tmp_path):
  rng = np.random.default_rng(4)
  real = rng.normal(size=(11, 16)).astype(np.float32)
  synth = rng.normal(size=(7, 16)).astype(np.float32)
  m = ref_matrix.full_matrix(real, synth, block=2, mesh=parallel.make_mesh())
  rn = real / np.linalg.norm(real, axis=1, keepdims=True)
  sn = synth / np.linalg.norm(synth, axis=1, keepdims=True)
  assert m.shape == (11, 7) and m.dtype == np.float16
  np.testing.assert_allclose(m.astype(np.float32), rn @ sn.T, atol=1e-3)
  real_ids = [f"r{i}" for i in range(11)]
  synth_ids = [f"s{i}" for i in range(7)]
  paths = ref_matrix.write_reference_npz(str(tmp_path / "ref"), real_ids, synth_ids, m)
  # Loaded the way the reference's eval scripts load them.
  matrix = np.load(paths["matrix"])["data"]
  real_idx = np.load(str(tmp_path / "ref" / "real.npz"))["data"].tolist()
  synth_idx = np.load(str(tmp_path / "ref" / "synth.npz"))["data"].tolist()
  assert matrix.dtype == np.float16 and matrix.shape == (len(real_idx), len(synth_idx))
  assert real_idx == real_ids and synth_idx == synth_ids
  assert matrix[real_idx.index("r3"), synth_idx.index("s5")] == m[3, 5]
  back = ref_matrix.read_reference_npz(str(tmp_path / "ref"))
  np.testing.assert_array_equal(back[2], m)
  with pytest.raises(ValueError, match="shape"):
    ref_matrix.write_reference_npz(str(tmp_path / "bad"), real_ids, synth_ids, m.T)


def test_lookup_and_pair_scores():
  rng = np.random.default_rng(6)
  ids = np.array(["a", "b", "c"])
  emb = rng.normal(size=(3, 5)).astype(np.float32)
  np.testing.assert_array_equal(ref_matrix.lookup(ids, emb, ["c", "a"], "train-store"),
                                emb[[2, 0]])
  with pytest.raises(fileio.InputError, match="train-store.*'zz'"):
    ref_matrix.lookup(ids, emb, ["a", "zz"], "train-store")
  s = ref_matrix.pair_scores(ids, emb, ids, emb[::-1], ["a", "b"], ["a", "c"])
  u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  np.testing.assert_allclose(s, [u[0] @ u[2], u[1] @ u[0]], atol=1e-6)
