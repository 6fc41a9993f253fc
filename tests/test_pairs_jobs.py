"""Pair sampling and tables, the pair-table job against scikit-image, and the whole
config-driven run (pairs -> train -> evaluate) on a tiny version of the demo config."""

import importlib.util
import json
import os

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from deepssim_jax import fileio, jobs, pairs, ref_matrix
from deepssim_jax.data import images


def test_sample_pairs_distinct_matched_and_split_by_synthetic_image():
  source = np.array([0, 1, -1, 2, 3, 4, -1, 5] * 5)
  ia, ib, valid = pairs.sample_pairs(10, len(source), 200, seed=3, source_index=source,
                                     matched_fraction=0.25, valid_fraction=0.3)
  assert len(ia) == 200
  assert len(set(zip(ia.tolist(), ib.tolist()))) == 200  # distinct
  matched = np.sum(source[ib] == ia)
  assert matched >= 30  # every synthetic image with a source (25% of 200 > 30 available)
  for j in np.unique(ib):  # every pair of a synthetic image sits in one split
    assert len(set(valid[ib == j].tolist())) == 1
  assert 0 < valid.mean() < 1
  ia2, ib2, _ = pairs.sample_pairs(10, len(source), 200, seed=3, source_index=source)
  np.testing.assert_array_equal(ia, ia2), np.testing.assert_array_equal(ib, ib2)
  # Never more pairs than exist.
  assert len(pairs.sample_pairs(3, 4, 100, seed=0)[0]) == 12


def test_balance_targets_flattens_the_histogram_as_far_as_the_pool_allows():
  rng = np.random.default_rng(0)
  # A uniform table's shape: most targets low, few high, none in [0.5, 0.6).
  t = np.concatenate([rng.uniform(0.0, 0.5, 900), rng.uniform(0.6, 0.9, 30),
                      rng.uniform(0.9, 1.0, 5), [-0.2, 1.0]])
  keep = pairs.balance_targets(t, 200, 10, seed=1)
  assert len(keep) == 200 and len(np.unique(keep)) == 200
  counts = np.histogram(np.clip(t[keep], 0, 1 - 1e-9), 10, (0, 1))[0]
  pool = np.histogram(np.clip(t, 0, 1 - 1e-9), 10, (0, 1))[0]
  short = pool <= counts  # bins the pool cannot fill give every pair they hold
  np.testing.assert_array_equal(counts[short], pool[short])
  assert short[5:].all() and counts[5] == 0
  # The remaining 200 - (short total) pairs are shared evenly among the well-filled bins.
  full = counts[~short]
  assert full.max() - full.min() <= 1 and full.sum() == 200 - counts[short].sum()
  np.testing.assert_array_equal(keep, pairs.balance_targets(t, 200, 10, seed=1))
  assert not np.array_equal(keep, pairs.balance_targets(t, 200, 10, seed=2))
  np.testing.assert_array_equal(pairs.balance_targets(t, 5000, 10, seed=0),
                                np.arange(len(t)))  # asks for more than the pool: all
  with pytest.raises(ValueError, match="balance_bins"):
    pairs.balance_targets(t, 10, 0, seed=0)


def test_balance_targets_with_repeats_is_flat_and_repeats_evenly():
  rng = np.random.default_rng(0)
  t = np.concatenate([rng.uniform(0.0, 0.5, 900), rng.uniform(0.6, 0.9, 30),
                      rng.uniform(0.9, 1.0, 5)])  # bin 5 empty
  keep = pairs.balance_targets(t, 403, 10, seed=1, repeat=True)
  assert len(keep) == 403
  counts = np.histogram(t[keep], 10, (0, 1))[0]
  assert counts[5] == 0
  full = counts[np.arange(10) != 5]
  assert full.max() - full.min() <= 1 and full.sum() == 403  # 9 bins, 44 or 45 each
  # A bin with fewer pairs than its share repeats each of them as evenly as the share allows.
  times = np.bincount(keep, minlength=len(t))[t >= 0.9]
  assert times.max() - times.min() <= 1 and times.sum() == counts[9]
  # A bin with more pairs than its share keeps distinct ones.
  assert np.bincount(keep, minlength=len(t))[t < 0.1].max() == 1
  np.testing.assert_array_equal(keep, pairs.balance_targets(t, 403, 10, seed=1, repeat=True))


def test_pair_table_ssim_equals_scikit_image(tmp_path):
  rng = np.random.default_rng(0)
  def bank(n, prefix):
    x = rng.normal(size=(n, 24, 20)).cumsum(1).astype(np.float32)
    x = (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)
    return {"keys": np.array([f"{prefix}{i}" for i in range(n)]), "images": x, "meta": {}}
  real, synth = bank(5, "r"), bank(7, "s")
  table = pairs.build_pair_table(real, synth, num_pairs=30, seed=0, matched_fraction=0,
                                 valid_fraction=0.2, batch_size=16, align=False,
                                 align_angles=(), align_flips=False)
  for rk, sk, s in zip(table.real_key, table.synth_key, table.ssim):
    a = real["images"][int(rk[1:])].astype(np.float64)
    b = synth["images"][int(sk[1:])].astype(np.float64)
    assert s == pytest.approx(structural_similarity(a, b, data_range=a.max() - a.min()),
                              abs=1e-5)
  path = tmp_path / "pairs.csv"
  pairs.write_pairs(path, table)
  back = pairs.read_pairs(path)
  np.testing.assert_array_equal(back.real_key, table.real_key)
  np.testing.assert_array_equal(back.ssim, table.ssim)
  assert set(back.split) <= {"train", "valid"}


def test_self_fraction_pairs_images_with_themselves_within_one_set():
  """Within one set, self_fraction of the pairs are (i, i) with target 1 (scikit-image's
  SSIM of an image with itself); between two sets the option is refused."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 24, 20)).astype(np.float32)
  x = (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)
  bank = {"keys": np.array([f"k{i}" for i in range(12)]), "images": x}
  kw = dict(num_pairs=60, seed=0, matched_fraction=0.25, valid_fraction=0.1, batch_size=16,
            align=False, align_angles=(), align_flips=False)
  t = pairs.build_pair_table(bank, bank, self_fraction=0.5, **kw)
  same = t.real_key == t.synth_key
  assert int(same.sum()) >= 30  # 30 rows cycle over the 12 images, plus chance hits
  np.testing.assert_allclose(t.ssim[same], 1.0, atol=1e-5)
  j = int(np.flatnonzero(~same)[0])
  ia, ib = (int(k[1:]) for k in (t.real_key[j], t.synth_key[j]))
  want = structural_similarity(x[ia].astype(np.float64), x[ib].astype(np.float64),
                               data_range=float(np.ptp(x[ia])))
  assert abs(t.ssim[j] - want) < 1e-5
  base = pairs.build_pair_table(bank, bank, **kw)
  assert int((base.real_key == base.synth_key).sum()) < 15  # uniform: 1 in 12
  other = {"keys": bank["keys"], "images": x.copy()}
  with pytest.raises(ValueError, match="within one set"):
    pairs.build_pair_table(bank, other, self_fraction=0.5, **kw)


@pytest.mark.parametrize("text,message", [
    ("real_key,synth_key,split\nA,B,train\n", "missing column.*ssim"),
    ("real_key,synth_key,ssim,split\nA,B,0.5,test\n", "split 'test'"),
    ("real_key,synth_key,ssim,split\nA,B,1.7,train\n", "outside"),
    ("real_key,synth_key,ssim,split\nA,B,nan,train\n", "non-finite"),
    ("real_key,synth_key,ssim,split\n", "no rows"),
])
def test_bad_pair_tables_name_file_and_problem(tmp_path, text, message):
  path = tmp_path / "bad.csv"
  path.write_text(text)
  with pytest.raises(fileio.InputError, match=rf"bad\.csv.*{message}"):
    pairs.read_pairs(path)


def test_missing_key_is_named():
  with pytest.raises(fileio.InputError, match=r"t\.csv: key 'zz' \(row 3\) is not in the "
                     r"synthetic image set \(2 ids"):
    fileio.key_rows(np.array(["a", "b"]), np.array(["a", "zz"]), "the synthetic image set",
                    csv_file="t.csv")


def test_build_refuses_empty_and_mismatched_sets():
  x = np.zeros((2, 8, 8), np.float32)
  empty = {"keys": np.array([], str), "images": x[:0]}
  full = {"keys": np.array(["a", "b"]), "images": x}
  kw = dict(num_pairs=4, seed=0, matched_fraction=0, valid_fraction=0, batch_size=4,
            align=False, align_angles=(), align_flips=False)
  with pytest.raises(fileio.InputError, match="synthetic image set is empty"):
    pairs.build_pair_table(full, empty, **kw)
  other = {"keys": np.array(["c"]), "images": np.zeros((1, 9, 8), np.float32)}
  with pytest.raises(fileio.InputError, match="image sizes differ"):
    pairs.build_pair_table(full, other, **kw)


def _demo_config():
  root = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
  spec = importlib.util.spec_from_file_location("demo_config", root)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _check_aligned_targets(workdir, table):
  """Aligned targets (pairs.align, angles include 0): every target is at least the pair's
  plain SSIM (scikit-image; the identity is a candidate), and a copy that is its source
  flipped (no rotation) scores at least the SSIM of the source against the copy with the
  flips undone, as flip states are candidates; the undone flips gain a lot over plain."""
  real = images.load_bank(os.path.join(workdir, "data", "real.npz"))
  synth = images.load_bank(os.path.join(workdir, "data", "synth.npz"))
  rpos = {str(k): i for i, k in enumerate(real["keys"])}
  spos = {str(k): i for i, k in enumerate(synth["keys"])}
  meta = synth["meta"]
  ssim = lambda a, b: structural_similarity(a, b, data_range=float(np.ptp(a)))  # noqa: E731
  flip_copies, gains = 0, []
  for rk, sk, target in zip(table.real_key, table.synth_key, table.ssim):
    a = real["images"][rpos[rk]].astype(np.float64)
    j = spos[sk]
    b = synth["images"][j].astype(np.float64)
    plain = ssim(a, b)
    assert target >= plain - 1e-4, (rk, sk, float(target), plain)
    steps = str(meta["augment"][j]).split("+")
    if (str(meta["kind"][j]) != "copy" or str(meta["source_key"][j]) != rk
        or not {"flip0", "flip1"} & set(steps) or any(s.startswith("rot") for s in steps)):
      continue
    for axis in (0, 1):  # undo the copy's flips (gamma stays: it is no rigid transform)
      if f"flip{axis}" in steps:
        b = np.flip(b, axis)
    undone = ssim(a, b)
    assert target >= undone - 1e-4, (rk, sk, str(meta["augment"][j]), float(target), undone)
    flip_copies += 1
    gains.append(undone - plain)
  assert flip_copies >= 3, flip_copies  # the tiny demo's table holds 5
  assert max(gains) > 0.2, gains  # flips undone: a large gain on asymmetric slices


def test_demo_config_runs_end_to_end_tiny(tmp_path, capsys):
  c = _demo_config()  # the real demo config, shrunk
  c.data.image_size = (40, 32)
  c.data.demo.update(dict(slices_per_head=4, num_copies=12, num_neighbours=8, num_other=6))
  c.pairs.num_pairs = 120
  c.pairs.align_angles = (-0.1, 0.0, 0.1)
  c.model.overrides.update(dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), hidden_dim=16,
                                embed_dim=8, depthwise_impl="conv"))
  c.train.batch_size = 8
  c.train.num_epochs = 1
  c.train.log_every_steps = 5
  workdir = str(tmp_path)
  out = jobs.train_job(c, workdir)
  printed = capsys.readouterr().out
  assert "validation: MSE" in printed and "macro_f1" in printed
  for f in ("pairs.csv", "test_pairs.csv", "config.json", "metrics.csv", "data/real.npz",
            "eval/results.json", "eval/hist_deepssim.png", "eval/hist_ssim.png",
            "eval/table.txt"):
    assert os.path.exists(os.path.join(workdir, f)), f
  table = pairs.read_pairs(os.path.join(workdir, "pairs.csv"))
  test = fileio.read_csv(os.path.join(workdir, "test_pairs.csv"), ["synth_key", "label"])
  assert not set(test["synth_key"]) & set(table.synth_key)  # held out from training
  assert set(test["label"]) == {"0", "1", "2"}
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    results = json.load(f)
  assert set(results) == {"deepssim", "ssim"}
  assert 0 <= results["ssim"]["fixed"]["macro_f1"] <= 1
  assert "fit" in results["ssim"]["fitted"]  # thresholds fitted on half the images
  _check_aligned_targets(workdir, table)
  assert out["step"] == len(table.select("train")) // 8
  # A rerun finds everything done and does not train again.
  again = jobs.train_job(c, workdir)
  assert again["step"] == out["step"]

  # --mode=embed, then --mode=match over the stores (top-k and the reference's matrix).
  c.embed.shard_rows = 16
  c.match.full_matrix = True
  c.match.k = 3
  emb = jobs.embed_job(c, workdir)
  n_real, n_synth = emb["real"]["n"], emb["synth"]["n"]
  assert emb["real"]["complete"] and emb["synth"]["complete"]
  assert jobs.embed_job(c, workdir)["real"]["written"] == 0  # everything already on disk
  res = jobs.match_job(c, workdir)
  assert res["n_query"] == n_synth and res["n_ref"] == n_real
  top = fileio.read_csv(os.path.join(workdir, "match", "top3.csv"),
                    ["synth_id", "rank", "train_id", "score"])
  assert len(top["synth_id"]) == 3 * n_synth
  real_ids, synth_ids, matrix = ref_matrix.read_reference_npz(os.path.join(workdir, "match"))
  assert matrix.shape == (n_real, n_synth)
  # The top-1 score of the first synthetic image is the max of its (float16) matrix column.
  j = synth_ids.tolist().index(top["synth_id"][0])
  assert float(matrix[:, j].max()) == pytest.approx(float(top["score"][0]), abs=2e-3)
  assert set(real_ids.tolist()) >= set(top["train_id"])

  # --mode=evaluate: checkpoints side by side, every baseline, misaligned variants.
  c.eval.metrics = ("deepssim@best", "deepssim@latest", "ssim", "pearson", "carlini_l2",
                    "convnext_raw")
  c.eval.misaligned.enabled = True
  capsys.readouterr()
  results = jobs.evaluate_job(c, workdir)
  printed = capsys.readouterr().out
  names = [f"{m}{v}" for m in c.eval.metrics for v in ("", " (misaligned)")]
  assert list(results) == names
  for name in names:
    assert name in printed
    assert 0 <= results[name]["fixed"]["macro_f1"] <= 1
  assert results["ssim"]["fixed"]["n"] == results["pearson (misaligned)"]["fixed"]["n"]
