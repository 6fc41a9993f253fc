"""The PyTorch reference's file formats, read and written as it does.

The reference names an image `<uid>___<name>` (uid = parent folder, name = PNG file name
without .png) in its pair table, its labelled test_set.csv and the index files of its score
matrices (`<matrices_dir>/<metric>.npz` and `<indices_dir>/{real,synth}.npz`, each an
np.savez with one array `data`); we name it `<uid>/<name>`. Everything here is fabricated
in the reference's exact layout with numpy and PIL, and read the way its scripts read it.
"""

import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from deepssim_jax import (config_lib, evaluate, fileio, jobs, pairs, parallel, pipeline,
                          ref_matrix, truth)

UIDS = ("IXI002-Guys-0828-T1_s070", "IXI012-HH-1211-T1_s064", "colin27_s080")
NUM_GEN = 3
SIZE = (20, 16)  # the PNGs' own size: banks hold them without resampling


def _ref(uid, name):
  return f"{uid}___{name}"


def _ours(uid, name):
  return f"{uid}/{name}"


@pytest.fixture
def layout(tmp_path):
  """<root>/<uid>/training.png and gen-<i>.png, a pair table and a test_set.csv with the
  reference's keys, and its images (uint8) by our key."""
  rng = np.random.default_rng(0)
  root = tmp_path / "images"
  pixels = {}
  for uid in UIDS:
    os.makedirs(root / uid)
    for name in ["training"] + [f"gen-{i}" for i in range(NUM_GEN)]:
      x = rng.integers(0, 256, SIZE, dtype=np.uint8)
      Image.fromarray(x).save(root / uid / f"{name}.png")
      pixels[_ours(uid, name)] = x
  pair_rows, test_rows = [], []  # (real uid, synthetic uid, generated name, ...)
  for k, uid in enumerate(UIDS):
    other = UIDS[(k + 1) % len(UIDS)]
    for i in range(NUM_GEN):
      pair_rows.append((other, uid, f"gen-{i}", round(float(rng.uniform(0, 1)), 4),
                        "valid" if i == 0 else "train"))
      test_rows += [(uid, uid, f"gen-{i}", (1, 2, 0)[i]), (other, uid, f"gen-{i}", 0)]
  tables = {}
  for tag, spell in (("ref", _ref), ("ours", _ours)):
    for name, header, rows in (("pairs", ("real_key", "synth_key", "ssim", "split"), pair_rows),
                               ("test", ("real_key", "synth_key", "label"), test_rows)):
      tables[f"{name}_{tag}"] = path = str(tmp_path / f"{name}_{tag}.csv")
      with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for real_uid, synth_uid, gen, *rest in rows:
          w.writerow([spell(real_uid, "training"), spell(synth_uid, gen), *rest])
  return {"root": str(root), "pixels": pixels, **tables}


def _config(layout, tmp_path, pairs_csv, test_csv, metrics=("pearson",)):
  c = config_lib.base_config()
  c.data.image_size = SIZE
  c.data.real = config_lib.source_config("reference", layout["root"], part="training")
  c.data.synth = config_lib.source_config("reference", layout["root"], part="generated")
  c.data.pairs_csv = pairs_csv
  c.data.test_pairs_csv = test_csv
  c.data.num_threads = 0
  c.eval.metrics = tuple(metrics)
  return c


def _zscore(x):
  x = np.asarray(x, np.float64)
  return ((x - x.mean()) / x.std()).astype(np.float32)


def _write_reference_matrix(tmp_path, real_keys, synth_keys, seed=1):
  """A score matrix saved exactly as the reference's scripts/compute_matrix.py saves it."""
  matrix = np.random.default_rng(seed).uniform(-1, 1, (len(real_keys), len(synth_keys)))
  mdir, idir = tmp_path / "matrices", tmp_path / "indices"
  os.makedirs(mdir, exist_ok=True), os.makedirs(idir, exist_ok=True)
  paths = (str(mdir / "deepssim.npz"), str(idir / "real.npz"), str(idir / "synth.npz"))
  np.savez(paths[0], data=matrix.astype(np.float16))
  np.savez(paths[1], data=np.array(list(real_keys)))
  np.savez(paths[2], data=np.array(list(synth_keys)))
  return paths


def _eval_py_scores(paths, test_csv):
  """Scores of a test_set.csv the way the reference's scripts/eval.py looks them up."""
  real_indices = np.load(paths[1])["data"].tolist()
  synth_indices = np.load(paths[2])["data"].tolist()
  score_matrix = np.load(paths[0])["data"]
  with open(test_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  return np.array([score_matrix[real_indices.index(r["real_key"]),
                                synth_indices.index(r["synth_key"])] for r in rows])


# ---------------------------------------------------------------------------------------


def test_key_spellings():
  want = "IXI002-Guys-0828-T1_s070/gen-3"
  assert fileio.canonical_key("IXI002-Guys-0828-T1_s070___gen-3") == want
  assert fileio.canonical_key("IXI002-Guys-0828-T1_s070/gen-3") == want
  assert fileio.canonical_key("flat_key") == "flat_key"
  assert fileio.canonical_key("a___b___c") == "a/b___c"  # the first ___ only
  assert fileio.canonical_key("a___training.png") == "a/training.png"  # .png is kept
  assert fileio.reference_key("uid/gen-3") == "uid___gen-3"
  assert fileio.reference_key("uid___gen-3") == "uid___gen-3"
  assert fileio.reference_key("site/uid/gen-3") == "site/uid___gen-3"  # uid: the parent folder
  assert fileio.reference_key("flat_key") == "flat_key"
  for k in ("uid/gen-3", "site/uid/gen-3", "flat", "head/z070"):
    assert fileio.canonical_key(fileio.reference_key(k)) == k


def test_reference_keys_find_the_same_images(layout, tmp_path):
  """The pair table and test set with ___ keys resolve to the rows / keys would, and those
  rows hold the PNG the key names."""
  c = _config(layout, tmp_path, layout["pairs_ref"], layout["test_ref"])
  d = jobs.prepare_data(c, str(tmp_path / "work"))
  real_keys, synth_keys = d["real"]["keys"], d["synth"]["keys"]
  assert set(real_keys.tolist()) == {_ours(u, "training") for u in UIDS}
  table, ours = d["table"], pairs.read_pairs(layout["pairs_ours"])
  assert str(table.real_key[0]).endswith("___training")  # read as written
  for which, keys in (("real_key", real_keys), ("synth_key", synth_keys)):
    want = fileio.key_rows(keys, getattr(ours, which), "x", csv_file="ours.csv")
    np.testing.assert_array_equal(
        fileio.key_rows(keys, getattr(table, which), "x", csv_file="ref.csv"), want)
    # Ids in the reference's spelling and keys in ours: the same rows again.
    ref_ids = np.array([fileio.reference_key(k) for k in keys.tolist()])
    np.testing.assert_array_equal(fileio.key_rows(ref_ids, getattr(ours, which), "x"), want)
    np.testing.assert_array_equal(fileio.key_rows(keys, getattr(table, which), "t"), want)
  src = pipeline.pair_source(table, d["real_npy"], d["synth_npy"], real_keys, synth_keys,
                             layout["pairs_ref"])
  for j in range(len(table)):
    item = src[j]
    for image, key in ((item["image_a"], table.real_key[j]),
                       (item["image_b"], table.synth_key[j])):
      uid, name = str(key).split("___")  # the reference's get_image_path
      np.testing.assert_allclose(image, _zscore(layout["pixels"][_ours(uid, name)]),
                                 atol=1e-5)
  # A missing ___ key is named, with the file.
  bad = tmp_path / "bad_test.csv"
  bad.write_text("real_key,synth_key,label\n"
                 f"{_ref(UIDS[0], 'training')},{_ref(UIDS[0], 'gen-9')},1\n")
  with pytest.raises(fileio.InputError, match=rf"bad_test\.csv: key "
                     rf"'{UIDS[0]}___gen-9' \(row 2\) is not in the synthetic"):
    fileio.key_rows(synth_keys, evaluate.read_labelled_pairs(str(bad))["synth_key"],
                    "the synthetic image set", csv_file=str(bad))
  with pytest.raises(fileio.InputError, match=r"store: key 'nobody___training' not found"):
    fileio.key_rows(real_keys, ["nobody___training"], "store")


def test_evaluate_scores_reference_test_set_and_matrix(layout, tmp_path):
  """evaluate_job on the reference's test_set.csv: the same results as with / keys, and a
  matrix saved by the reference (metric 'matrix:...') scored as its eval.py scores it."""
  real = [_ref(u, "training") for u in UIDS]
  synth = [_ref(u, f"gen-{i}") for u in UIDS for i in range(NUM_GEN)]
  rng = np.random.default_rng(5)  # the reference's index order is os.listdir's: any
  paths = _write_reference_matrix(tmp_path, rng.permutation(real), rng.permutation(synth))
  metric = "matrix:" + ",".join(paths)
  results = {}
  for tag in ("ref", "ours"):
    c = _config(layout, tmp_path, layout["pairs_ref"], layout[f"test_{tag}"],
                ("pearson", metric))
    work = str(tmp_path / f"work_{tag}")
    jobs.evaluate_job(c, work)
    with open(os.path.join(work, "eval", "results.json")) as f:
      results[tag] = json.load(f)
  assert results["ref"] == results["ours"]  # fitting split included: keys are one image
  assert set(results["ref"]) == {"pearson", metric}
  scores = _eval_py_scores(paths, layout["test_ref"])
  labels = evaluate.read_labelled_pairs(layout["test_ref"])["label"]
  want = evaluate.write_results(
      str(tmp_path / "want.json"),
      {"fixed": evaluate.evaluate_scores(labels, scores.astype(np.float64))})
  with open(want) as f:
    want = json.load(f)["fixed"]
  assert results["ref"][metric]["fixed"] == want
  # Only matrices: no image set is read (none is configured), the same scores; a matrix
  # beside its index files (the match job's layout) is named by its path alone.
  beside = os.path.join(os.path.dirname(paths[1]), "deepssim.npz")
  shutil.copy(paths[0], beside)
  c = config_lib.base_config()
  c.data.test_pairs_csv = layout["test_ref"]
  c.eval.metrics = (metric, "matrix:" + beside)
  out = jobs.evaluate_job(c, str(tmp_path / "work_matrix"))
  for m in c.eval.metrics:
    assert out[m]["fixed"]["macro_f1"] == pytest.approx(want["macro_f1"])
  for entry in ("matrix:", "matrix:a.npz,b.npz"):
    with pytest.raises(fileio.InputError, match="expected 'matrix:<matrix.npz>'"):
      jobs.matrix_metric_paths(entry)


def test_our_matrix_reads_with_plain_numpy_like_eval_py(tmp_path):
  """write_reference_npz (the match job's writer): the reference's eval.py lookups on its
  test_set.csv keys give the scores our code computed."""
  rng = np.random.default_rng(2)
  real_ids = [_ours(u, "training") for u in UIDS]
  synth_ids = [_ours(u, f"gen-{i}") for u in UIDS for i in range(NUM_GEN)]
  real_emb = rng.normal(size=(len(real_ids), 8)).astype(np.float32)
  synth_emb = rng.normal(size=(len(synth_ids), 8)).astype(np.float32)
  m = ref_matrix.full_matrix(real_emb, synth_emb, block=2,
                        mesh=parallel.make_mesh(jax.devices()[:1]))
  paths = ref_matrix.write_reference_npz(str(tmp_path / "match"), real_ids, synth_ids, m)
  assert np.load(paths["real"])["data"].tolist() == [_ref(u, "training") for u in UIDS]
  assert np.load(paths["synth"])["data"].dtype.kind == "U"
  test_csv = tmp_path / "test_set.csv"
  keys = [(_ref(UIDS[a], "training"), _ref(UIDS[b], f"gen-{i}"))
          for a in range(3) for b in range(3) for i in range(NUM_GEN)]
  test_csv.write_text("real_key,synth_key,label\n" + "".join(f"{r},{s},0\n" for r, s in keys))
  got = _eval_py_scores((paths["matrix"], paths["real"], paths["synth"]), test_csv)
  key = fileio.canonical_key
  want = np.array([m[real_ids.index(key(r)), synth_ids.index(key(s))] for r, s in keys])
  np.testing.assert_array_equal(got, want)
  cosine = ref_matrix.pair_scores(real_ids, real_emb, synth_ids, synth_emb,
                             [r for r, _ in keys], [s for _, s in keys])
  np.testing.assert_allclose(got.astype(np.float32), cosine, atol=1e-3)
  # Read back: our spelling, the same matrix.
  back_real, back_synth, back = ref_matrix.read_reference_npz(str(tmp_path / "match"))
  assert back_real.tolist() == real_ids and back_synth.tolist() == synth_ids
  np.testing.assert_array_equal(back, m)
  # Two ids with one reference spelling would make eval.py's .index() ambiguous.
  with pytest.raises(ValueError, match="'u___a' occurs 2 times"):
    ref_matrix.write_reference_npz(str(tmp_path / "dup"), ["u/a", "u___a"], ["s"],
                              np.zeros((2, 1)))


def test_reference_matrix_round_trips(tmp_path):
  real = [_ref(u, "training") for u in UIDS]
  synth = [_ref(u, f"gen-{i}") for u in UIDS[::-1] for i in range(NUM_GEN)]
  paths = _write_reference_matrix(tmp_path, real, synth)
  real_ids, synth_ids, matrix = ref_matrix.read_reference_matrix(*paths)
  assert real_ids.tolist() == [fileio.canonical_key(k) for k in real]
  assert synth_ids.tolist() == [fileio.canonical_key(k) for k in synth]
  raw = np.load(paths[0])["data"]
  assert matrix.dtype == np.float16
  np.testing.assert_array_equal(matrix, raw)
  # Labelled pairs in either spelling score matrix[real_pos, synth_pos].
  rk, sk = [real[2], real[0]], [synth[4], synth[1]]
  want = [raw[2, 4], raw[0, 1]]
  np.testing.assert_array_equal(ref_matrix.matrix_scores(real_ids, synth_ids, matrix, rk, sk), want)
  np.testing.assert_array_equal(
      ref_matrix.matrix_scores(real_ids, synth_ids, matrix, [fileio.canonical_key(k) for k in rk],
                          [fileio.canonical_key(k) for k in sk]), want)
  with pytest.raises(fileio.InputError, match=r"test\.csv: key 'x___gen-0' not found"):
    ref_matrix.matrix_scores(real_ids, synth_ids, matrix, rk, [synth[0], "x___gen-0"],
                        synth_name="test.csv")
  # Our writer, then the reader: the same again.
  ours = ref_matrix.write_reference_npz(str(tmp_path / "again"), real_ids, synth_ids, matrix)
  again = ref_matrix.read_reference_matrix(ours["matrix"], ours["real"], ours["synth"])
  assert again[0].tolist() == real_ids.tolist() and again[1].tolist() == synth_ids.tolist()
  np.testing.assert_array_equal(again[2], matrix)


def test_bad_reference_matrices_are_named(tmp_path):
  real = [_ref(u, "training") for u in UIDS]
  synth = [_ref(u, f"gen-{i}") for u in UIDS[:2] for i in range(2)]
  m, r, s = _write_reference_matrix(tmp_path, real, synth)

  def fails(message, matrix=m, real_path=r, synth_path=s):
    with pytest.raises(fileio.InputError, match=message):
      ref_matrix.read_reference_matrix(matrix, real_path, synth_path)

  bad = str(tmp_path / "bad.npz")
  np.savez(bad, data=np.zeros((len(synth), len(real)), np.float16))  # transposed
  fails(r"bad\.npz: shape \(4, 3\) != \(real 3 ids in .*real\.npz, synthetic 4 ids in "
        r".*synth\.npz\)", bad)
  np.savez(bad, data=np.zeros((len(real), len(synth) + 1), np.float16))
  fails(r"bad\.npz: shape \(3, 5\) != \(real 3", bad)
  np.savez(bad, data=np.zeros(len(real) * len(synth), np.float16))  # not 2-D
  fails(r"bad\.npz: shape \(12,\) != \(real 3", bad)
  np.savez(bad, np.zeros((3, 4)))  # saved without the name `data`
  fails(r"bad\.npz: no 'data' array \(found \['arr_0'\]\)", bad)
  fails(r"bad\.npz: no 'data' array", m, bad)
  np.savez(bad, data=np.array([real[0], real[1], real[0]]))
  fails(rf"bad\.npz: real id '{real[0]}' occurs 2 times", m, bad)
  np.savez(bad, data=np.array([real[0], real[1], fileio.canonical_key(real[0])]))  # one image
  fails(rf"bad\.npz: real id '{real[0]}' occurs 2 times", m, bad)
  np.savez(bad, data=np.array([[k] for k in synth]))
  fails(r"bad\.npz: synthetic ids must be a 1-D array of strings", m, r, bad)
  np.savez(bad, data=np.arange(4))
  fails(r"bad\.npz: synthetic ids must be a 1-D array of strings", m, r, bad)
  np.savez(bad, data=np.array(synth, dtype=object))  # needs pickle: refused, not run
  fails(r"bad\.npz: cannot read the 'data' array", m, r, bad)
  np.save(str(tmp_path / "plain.npy"), np.zeros((3, 4)))
  fails(r"plain\.npy: a single array, not an \.npz archive", str(tmp_path / "plain.npy"))
  (tmp_path / "junk.npz").write_text("not a zip")
  fails(r"junk\.npz: cannot read the 'data' array", str(tmp_path / "junk.npz"))
  fails(r"absent\.npz: file not found", str(tmp_path / "absent.npz"))


def test_truth_csv_in_reference_spelling(tmp_path):
  """The audit's known answers may name images as the reference does."""
  ids = np.array([_ours(UIDS[0], "gen-0"), _ours(UIDS[1], "gen-0"), _ours(UIDS[2], "gen-1")])
  path = tmp_path / "truth.csv"
  path.write_text("synth_id,memorized,source_id\n"
                  f"{_ref(UIDS[2], 'gen-1')},0,\n{_ref(UIDS[0], 'gen-0')},1,"
                  f"{_ref(UIDS[0], 'training')}\n{_ours(UIDS[1], 'gen-0')},0,\n")
  t = truth.read_truth(str(path), ids)
  np.testing.assert_array_equal(t["memorized"], [True, False, False])
  v = truth.validate(t, {"paper": np.array([True, False, False])}, np.array([0.9, 0.1, 0.2]),
                     np.array([_ours(UIDS[0], "training"), "x", "y"]))
  assert v["source_match"] == 1.0
  path.write_text("synth_id,memorized\n" + "".join(
      f"{k},0\n" for k in [_ref(UIDS[0], "gen-0"), _ours(UIDS[0], "gen-0"),
                           _ref(UIDS[1], "gen-0"), _ref(UIDS[2], "gen-1")]))
  with pytest.raises(fileio.InputError, match=rf"truth\.csv: synth_id '{UIDS[0]}___gen-0' appears"):
    truth.read_truth(str(path), ids)
  path.write_text("synth_id,memorized\n" + "".join(
      f"{k},0\n" for k in [_ref(UIDS[0], "gen-0"), _ref(UIDS[1], "gen-0"), "ghost___gen-1"]))
  with pytest.raises(fileio.InputError, match=r"truth\.csv: ids do not match.*'ghost___gen-1'"):
    truth.read_truth(str(path), ids)
