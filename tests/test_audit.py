"""The audit job on the embedded demo data (tiny untrained model), and run comparison."""

import functools
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from deepssim_jax import audit, compare, config_lib, embed, fileio, models, truth as truth_lib
from test_report import _decode, _parse  # pytest puts tests/ on sys.path

SIZE = (40, 32)


@pytest.fixture(scope="module")
def tiny_model():
  model = models.make_model("convnext_atto", hidden_dim=16, embed_dim=8, depthwise_impl="conv",
                            depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
  v = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), np.zeros((1, *SIZE), np.float32))
  return model, v


@pytest.fixture(scope="module")
def model_fn(tiny_model):
  model, v = tiny_model
  fn = embed.make_embed_fn(model)

  def embeddings(config, workdir, spec, name):
    src = audit.default_images(config, workdir, spec, name)
    return src.keys, embed.embed_array(model, v, src.images, 16, progress=False, embed_fn=fn)
  return embeddings


def _config(tmp_path, **kw):
  c = config_lib.base_config()
  c.data.image_size = SIZE
  c.data.real = config_lib.source_config("demo", part="real")
  c.data.synth = config_lib.source_config("demo", part="synthetic")
  c.data.heldout = config_lib.source_config("demo", part="heldout")
  c.data.demo.update(dict(slices_per_head=4, num_copies=12, num_neighbours=8, num_other=6,
                          heldout_per_head=2))
  c.audit.out_dir = str(tmp_path / "audit")
  c.calibrate.mi.rounds = 3
  c.calibrate.carlini.n = 5
  c.report.gallery_size = 5
  c.update(kw)
  return c


def _ck(config, workdir):
  return "ckpt-fp"


def test_audit_writes_csv_summary_and_report(model_fn, tmp_path):
  c = _config(tmp_path)
  out = audit.audit_job(c, str(tmp_path / "work"), model_fn, checkpoint_fingerprint=_ck)
  folder = out["out_dir"]
  assert sorted(os.listdir(folder)) == sorted(audit.FILES)
  assert sorted(os.listdir(tmp_path)) == ["audit", "work"]  # no staging folder left
  table = fileio.read_csv(os.path.join(folder, "audit.csv"),
                      ["synth_id", "train_id_1", "score_1", "train_id_5", "score_5", "class",
                       "class_name", "dar_memorized", "mi", "oni", "mi_memorized",
                       "carlini_ratio", "carlini_memorized"])
  n = 12 + 8 + 6
  assert len(table["synth_id"]) == n
  s1 = fileio.float_column("audit.csv", table, "score_1")
  s5 = fileio.float_column("audit.csv", table, "score_5")
  assert np.all(s1 >= s5)
  cls = np.asarray([int(v) for v in table["class"]])
  np.testing.assert_array_equal(cls, np.where(s1 <= 0.6, 0, np.where(s1 > 0.85, 1, 2)))
  mi = fileio.float_column("audit.csv", table, "mi")
  np.testing.assert_allclose(fileio.float_column("audit.csv", table, "oni"), -np.tanh(mi),
                             atol=1e-12)
  with open(os.path.join(folder, "summary.json")) as f:
    s = json.load(f)
  assert s["n_synthetic"] == n and s["n_training"] == 16 and s["n_heldout"] == 8
  assert sum(s["counts"].values()) == n
  assert s["counts"]["duplicate"] == int(np.sum(cls == 1))
  assert s["memorization_rate"] == pytest.approx(np.mean(cls == 1))
  copied = {t for t, c_ in zip(table["train_id_1"], cls) if c_ == 1}
  assert s["share_training_copied"] == pytest.approx(len(copied) / 16)
  assert s["n_subjects"] == 4  # the demo's four training heads ('<head>/z080' ids)
  assert s["n_subjects_copied"] == len({t.rsplit("/", 1)[0] for t in copied})
  assert s["share_subjects_copied"] == pytest.approx(s["n_subjects_copied"] / 4)
  assert s["thresholds"]["t_low"] == 0.6 and s["thresholds"]["t_high"] == 0.85
  assert s["thresholds"]["dar"] == s["calibration"]["dar"]["threshold"]
  assert set(s["calibration"]) == {"dar", "mi", "carlini"}
  assert s["fingerprints"]["checkpoint"] == "ckpt-fp"
  assert all(len(s["fingerprints"][k]) == 16
             for k in ("training", "synthetic", "heldout", "settings", "training_embeddings",
                       "synthetic_embeddings", "heldout_embeddings"))
  # The report: 5 pairs, most suspicious first, images at the bank's size.
  with open(os.path.join(folder, "report.html"), encoding="utf-8") as f:
    p = _parse(f.read())
  shown = [float(f_["data-score"]) for f_ in p.figures]
  np.testing.assert_allclose(shown, np.sort(s1)[::-1][:5], rtol=1e-6)
  gallery = [a for a in p.imgs if a.get("class") == "gallery"]
  assert len(gallery) == 15
  assert _decode(gallery[0]["src"]).size == (SIZE[1] * 2, SIZE[0] * 2)


def test_aligned_audit_job_embeds_the_candidates_with_the_checkpoint_model(
    model_fn, tiny_model, tmp_path):
  """audit.align in the job: the aligned scores are the checkpoint network's (make_embedder),
  equal to align.aligned_scores with that network over each image's 4 k candidates (its
  nearest by plain cosine, the best over its four flip states); without a model the job
  stops before writing anything."""
  from deepssim_jax import align  # pylint: disable=g-import-not-at-top
  model, v = tiny_model
  c = _config(tmp_path)
  c.audit.align, c.audit.k, c.calibrate.dar.enabled = True, 2, False
  out = audit.audit_job(c, str(tmp_path / "work"), model_fn, model=lambda cfg, wd: tiny_model)
  table = fileio.read_csv(os.path.join(out["out_dir"], "audit.csv"),
                          ["synth_id", "score_1", "score_2"])
  embed_images = functools.partial(embed.embed_array, model, v, batch_size=16, progress=False)
  train = audit.default_images(c, "", c.data.real, "training")
  synth = audit.default_images(c, "", c.data.synth, "synthetic")
  xt, xs = np.asarray(train.images), np.asarray(synth.images)
  et = embed_images(xt)
  plain = np.max([embed_images(np.ascontiguousarray(np.flip(xs, axes))) @ et.T
                  for axes in ((), (1,), (2,), (1, 2))], axis=0)
  aligned = align.aligned_scores(embed_images, xs, xt)[0]
  cand = np.argsort(-plain, axis=1, kind="stable")[:, :8]
  want = np.sort(np.take_along_axis(aligned, cand, 1), axis=1)[:, ::-1][:, :2]
  assert list(table["synth_id"]) == list(synth.keys)
  got = np.stack([fileio.float_column("audit.csv", table, f"score_{j}") for j in (1, 2)], 1)
  # Rows whose 8th and 9th plain cosines are within float error may pick either candidate.
  top = -np.sort(-plain, axis=1)
  clear = top[:, 7] - top[:, 8] > 1e-4
  assert clear.sum() >= 20, clear
  np.testing.assert_allclose(got[clear], want[clear], atol=1e-4)
  assert out["summary"]["align"]["rerank"] == 4
  c.audit.out_dir = str(tmp_path / "none")
  with pytest.raises(ValueError, match="audit.align needs"):
    audit.audit_job(c, str(tmp_path / "work"), model_fn)
  assert not os.path.exists(c.audit.out_dir)


def test_report_shows_explanation_maps_of_the_checkpoint_model(model_fn, tiny_model, tmp_path):
  """With the model (as jobs passes it), every gallery pair gets its two images with their
  explanation maps laid over, one row per explain.scores; explain.in_report off: none."""
  c = _config(tmp_path)
  c.report.gallery_size = 3
  c.explain.scores = ("similarity", "dissimilarity")
  asked = []

  def model(config, workdir):
    asked.append(workdir)
    return tiny_model

  folder = audit.audit_job(c, str(tmp_path / "work"), model_fn, checkpoint_fingerprint=_ck,
                           model=model)["out_dir"]
  assert asked == [str(tmp_path / "work")]
  assert sorted(os.listdir(folder)) == sorted(audit.FILES)
  with open(os.path.join(folder, "report.html"), encoding="utf-8") as f:
    text = f.read()
  p = _parse(text)
  overlays = [a for a in p.imgs if a.get("class") == "overlay"]
  assert len(overlays) == 3 * 2 * 2  # pairs x scores x (synthetic, training)
  assert len([a for a in p.imgs if a.get("class") == "gallery"]) == 3 * 3
  for a in overlays:
    im = _decode(a["src"])
    assert im.mode == "RGB" and im.size == (SIZE[1] * 2, SIZE[0] * 2)
  assert "occlusion: the change of the DeepSSIM score when each 16 x 16 square" in text
  # The maps are those of explain for the shown pairs (here: the most similar pair's).
  table = fileio.read_csv(os.path.join(folder, "audit.csv"), ["synth_id", "train_id_1", "score_1"])
  top = int(np.argmax(fileio.float_column("audit.csv", table, "score_1")))
  assert overlays[0]["alt"] == f"synthetic {table['synth_id'][top]} similarity map"
  assert overlays[1]["alt"] == f"training {table['train_id_1'][top]} similarity map"

  c.explain.in_report = False
  c.audit.out_dir = str(tmp_path / "audit_off")
  folder = audit.audit_job(c, str(tmp_path / "work"), model_fn, checkpoint_fingerprint=_ck,
                           model=model)["out_dir"]
  assert len(asked) == 1  # the model is not even loaded
  with open(os.path.join(folder, "report.html"), encoding="utf-8") as f:
    p = _parse(f.read())
  assert not [a for a in p.imgs if a.get("class") == "overlay"]
  assert len([a for a in p.imgs if a.get("class") == "gallery"]) == 3 * 3


def test_rerun_reproduces_csv_byte_for_byte(model_fn, tmp_path):
  c = _config(tmp_path)
  work = str(tmp_path / "work")
  first = audit.audit_job(c, work, model_fn)["out_dir"]
  a = {f: open(os.path.join(first, f), "rb").read() for f in audit.FILES}
  c.audit.out_dir = str(tmp_path / "again")
  second = audit.audit_job(c, work, model_fn)["out_dir"]
  for f in ("audit.csv", "summary.json"):
    assert open(os.path.join(second, f), "rb").read() == a[f], f
  # Rerunning into the same folder replaces it in one piece.
  c.audit.out_dir = first
  audit.audit_job(c, work, model_fn)
  assert open(os.path.join(first, "audit.csv"), "rb").read() == a["audit.csv"]
  assert sorted(os.listdir(tmp_path)) == ["again", "audit", "work"]


def _snapshot(folder):
  return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def test_bad_inputs_fail_cleanly_and_keep_the_previous_report(model_fn, tmp_path):
  c = _config(tmp_path)
  work = str(tmp_path / "work")
  folder = audit.audit_job(c, work, model_fn)["out_dir"]
  before = _snapshot(folder)

  def only(name, fn):
    def wrapped(config, workdir, spec, n):
      return fn(config, workdir, spec, n) if n == name else model_fn(config, workdir, spec, n)
    return wrapped

  def empty(config, workdir, spec, name):
    ids, emb = model_fn(config, workdir, spec, name)
    return ids[:0], emb[:0]

  def other_size(config, workdir, spec, name):  # a checkpoint of another model size
    ids, emb = model_fn(config, workdir, spec, name)
    return ids, np.concatenate([emb, emb], axis=1)

  def cropped_images(config, workdir, spec, name):
    src = audit.default_images(config, workdir, spec, name)
    return audit.ArraySource(src.keys, src.images[:, :, :-2]) if name == "synth" else src

  cases = [
      (dict(embeddings=only("synth", empty)), "synthetic set .* is empty"),
      (dict(embeddings=only("synth", other_size)), "embedding dimension 16 differs"),
      (dict(embeddings=model_fn, images=cropped_images), "mismatched image sizes"),
  ]
  for kw, msg in cases:
    with pytest.raises(fileio.InputError, match=msg):
      audit.audit_job(c, work, **kw)
    assert _snapshot(folder) == before  # untouched
  # Dar et al. without a held-out set.
  c.audit.heldout = ""
  with pytest.raises(fileio.InputError, match="held-out"):
    audit.audit_job(c, work, model_fn)
  assert _snapshot(folder) == before
  # A fresh output folder is not created by a failing audit.
  c.audit.out_dir = str(tmp_path / "fresh")
  with pytest.raises(fileio.InputError):
    audit.audit_job(c, work, model_fn)
  assert not os.path.exists(tmp_path / "fresh")
  assert sorted(os.listdir(tmp_path)) == ["audit", "work"]
  # With Dar et al. off the same config runs (here with Carlini et al. on pixels).
  c.calibrate.dar.enabled = False
  c.calibrate.carlini.space = "pixels"
  s = audit.audit_job(c, work, model_fn)["summary"]
  assert set(s["calibration"]) == {"mi", "carlini"} and "dar" not in s["thresholds"]
  assert s["calibration"]["carlini"]["space"] == "pixels"
  table = fileio.read_csv(os.path.join(str(tmp_path / "fresh"), "audit.csv"), ["carlini_ratio"])
  assert "dar_memorized" not in table
  with pytest.raises(ValueError, match="embeddings function"):
    audit.audit_job(c, work)


def test_publish_refuses_foreign_folders(tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "thesis.tex").write_text("x")
  with pytest.raises(fileio.InputError, match="refusing to replace"):
    audit.publish(str(tmp_path / "mine"), {"summary.json": "{}"})
  assert os.listdir(tmp_path / "mine") == ["thesis.tex"]
  out = audit.publish(str(tmp_path / "new"), {"summary.json": "{}", "a.txt": "a"})
  assert sorted(os.listdir(out)) == ["a.txt", "summary.json"]


def test_replace_folder_swaps_the_whole_folder(tmp_path):
  folder = tmp_path / "out"
  fileio.replace_folder(str(folder), {"m": "1", "old.txt": "x"}, marker="m")
  # Text, bytes and a writer; files of the previous folder do not survive.
  out = fileio.replace_folder(str(folder), {"m": "2", "b.bin": b"\x00\x01",
                                            "w.txt": lambda p: fileio.write_text(p, "w")},
                              marker="m")
  assert out == str(folder)
  assert sorted(os.listdir(folder)) == ["b.bin", "m", "w.txt"]
  assert (folder / "m").read_text() == "2" and (folder / "b.bin").read_bytes() == b"\x00\x01"
  assert [p for p in os.listdir(tmp_path) if p != "out"] == []  # no temporary left behind
  with pytest.raises(fileio.InputError, match="not a folder"):
    fileio.replace_folder(str(folder / "m"), {"m": "3"}, marker="m")
  (tmp_path / "empty").mkdir()  # an empty folder may be replaced without the marker
  fileio.replace_folder(str(tmp_path / "empty"), {"m": "e"}, marker="m")
  assert os.listdir(tmp_path / "empty") == ["m"]


def test_replace_folder_keeps_the_old_content_when_writing_fails(tmp_path):
  folder = tmp_path / "out"
  fileio.replace_folder(str(folder), {"m": "old", "a.txt": "a"}, marker="m")

  def broken(path):
    fileio.write_text(path, "half")
    raise RuntimeError("writer failed")

  with pytest.raises(RuntimeError, match="writer failed"):
    fileio.replace_folder(str(folder), {"m": "new", "b.txt": broken}, marker="m")
  assert sorted(os.listdir(folder)) == ["a.txt", "m"] and (folder / "m").read_text() == "old"
  assert sorted(os.listdir(tmp_path)) == ["out"]  # the temporary folder is gone
  # A failing first write creates nothing.
  with pytest.raises(RuntimeError):
    fileio.replace_folder(str(tmp_path / "fresh"), {"b.txt": broken}, marker="m")
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_compare_tabulates_and_plots(model_fn, tmp_path):
  c = _config(tmp_path)
  c.calibrate.dar.enabled = False
  c.compare.synthetic = ("synth", "real")  # the training set audited against itself
  out = compare.compare_job(c, str(tmp_path / "work"), model_fn)
  table = fileio.read_csv(out["csv"], compare.COMPARE_COLUMNS)
  assert table["name"] == ["synth", "real"]
  rates = fileio.float_column(out["csv"], table, "memorization_rate")
  assert rates[1] == 1.0  # every training image is its own Duplicate
  assert table["dar_rate"] == ["", ""]
  assert fileio.float_column(out["csv"], table, "share_training_copied")[1] == 1.0
  with Image.open(out["png"]) as im:
    assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300
  for name in ("synth", "real"):
    assert os.path.exists(tmp_path / "work" / "compare" / name / "report.html")
  with pytest.raises(fileio.InputError, match="summary.json: not found"):
    compare.compare_runs({"x": str(tmp_path / "nowhere")}, str(tmp_path / "cmp"))


def test_validate_equals_scikit_learn():
  from sklearn import metrics as skm
  rng = np.random.default_rng(0)
  y = rng.random(60) < 0.4
  score = np.where(y, 0.8, 0.5) + rng.normal(0, 0.15, 60)
  decisions = {"paper": score > 0.85, "none": np.zeros(60, bool)}
  src = np.array([f"t{i % 7}" for i in range(60)])
  nearest = src.copy()
  nearest[:5] = "elsewhere"
  v = truth_lib.validate({"memorized": y, "source": src}, decisions, score, nearest)
  assert v["n_memorized"] == int(y.sum()) and v["n_not_memorized"] == int((~y).sum())
  assert v["auc"] == pytest.approx(skm.roc_auc_score(y, score))
  r = v["rules"]["paper"]
  f = decisions["paper"]
  assert r["precision"] == pytest.approx(skm.precision_score(y, f))
  assert r["recall"] == pytest.approx(skm.recall_score(y, f))
  assert r["false_positive_rate"] == pytest.approx(np.sum(f & ~y) / np.sum(~y))
  assert r["tp"] + r["fp"] + r["fn"] + r["tn"] == 60
  assert v["rules"]["none"]["precision"] is None  # nothing flagged: undefined, not 0
  assert v["rules"]["none"]["recall"] == 0.0
  hit = f & y
  assert v["source_match"] == pytest.approx(np.mean(nearest[hit] == src[hit]))
  assert truth_lib.validate({"memorized": np.zeros(4, bool)}, {}, np.ones(4),
                            src[:4])["auc"] is None


def test_rule_decisions_reads_the_class_and_the_calibrated_columns():
  d = truth_lib.rule_decisions(np.array([1, 2, 0, 1]),
                               {"dar_memorized": np.array([0, 1, 0, 1]),
                                "mi": np.array([9.0, 0, 0, 0])})  # not a decision column
  assert set(d) == {"paper", "dar"}
  np.testing.assert_array_equal(d["paper"], [True, False, False, True])
  np.testing.assert_array_equal(d["dar"], [False, True, False, True])


def test_truth_csv_is_read_in_synthetic_order_and_bad_files_are_named(tmp_path):
  ids = np.array(["s0", "s1", "s2"])
  path = tmp_path / "truth.csv"
  path.write_text("synth_id,memorized,source_id\ns2,0,\ns0,1,t9\ns1,0,\n")
  t = truth_lib.read_truth(str(path), ids)
  np.testing.assert_array_equal(t["memorized"], [True, False, False])
  assert t["source"][0] == "t9"
  for text, message in [
      ("synth_id\ns0\n", "missing column"),
      ("synth_id,memorized\ns0,1\ns1,yes\ns2,0\n", "line 3: memorized must be 0 or 1"),
      ("synth_id,memorized\ns0,1\ns0,0\ns1,0\ns2,0\n", "'s0' appears more than once"),
      ("synth_id,memorized\ns0,1\ns1,0\n", "1 synthetic images have no row"),
      ("synth_id,memorized\ns0,1\ns1,0\ns2,0\nzz,1\n", "1 rows name no synthetic image")]:
    path.write_text(text)
    with pytest.raises(fileio.InputError, match=message) as e:
      truth_lib.read_truth(str(path), ids)
    assert str(path) in str(e.value)


def test_audit_validates_against_demo_labels_and_a_truth_csv(model_fn, tmp_path):
  c = _config(tmp_path)
  work = str(tmp_path / "work")
  s = audit.audit_job(c, work, model_fn)["summary"]
  table = fileio.read_csv(os.path.join(c.audit.out_dir, "audit.csv"),
                      ["synth_id", "class", "carlini_memorized"])
  from deepssim_jax import banks
  b = banks.bank(c.data.synth, c, os.path.join(work, "data"), "synth")
  label = dict(zip(b["keys"].tolist(), np.asarray(b["meta"]["label"]).tolist()))
  y = np.array([label[i] == 1 for i in table["synth_id"]])
  flagged = np.array([v == "1" for v in table["class"]])
  v = s["validation"]
  assert v["n_memorized"] == 12 == int(y.sum())
  assert v["rules"]["paper"]["tp"] == int(np.sum(flagged & y))
  assert v["rules"]["paper"]["fp"] == int(np.sum(flagged & ~y))
  carlini = np.array([x == "1" for x in table["carlini_memorized"]])
  assert v["rules"]["carlini"]["tp"] == int(np.sum(carlini & y))
  assert set(v["rules"]) == {"paper", "dar", "mi", "carlini"}
  html_text = open(os.path.join(c.audit.out_dir, "report.html"), encoding="utf-8").read()
  assert 'id="validation"' in html_text and "Against known answers" in html_text
  # A truth CSV instead: the first two synthetic images are the only copies.
  truth = tmp_path / "truth.csv"
  truth.write_text("synth_id,memorized\n" + "".join(
      f"{i},{int(j < 2)}\n" for j, i in enumerate(table["synth_id"])))
  c.audit.truth = str(truth)
  v = audit.audit_job(c, work, model_fn)["summary"]["validation"]
  assert v["n_memorized"] == 2 and "source_match" not in v
  # Mismatched ids: a clear error, and the audit already written stays as it was.
  before = _snapshot(c.audit.out_dir)
  truth.write_text("synth_id,memorized\nnot-an-id,1\n")
  with pytest.raises(fileio.InputError, match="ids do not match"):
    audit.audit_job(c, work, model_fn)
  assert _snapshot(c.audit.out_dir) == before
  # No known answers: no validation.
  c.audit.truth = ""
  assert "validation" not in audit.audit_job(c, work, model_fn)["summary"]


def test_subjects_of_training_ids():
  ids = ["colin27/z080", "a/b/z001", "IXI002-Guys-0828-T1/z070", "IXI002-Guys-0828-T2/z070",
         "uid17"]
  np.testing.assert_array_equal(
      audit.subjects(ids, config_lib.base_config().audit.subject_regex),
      ["colin27", "a/b", "IXI002-Guys-0828-T1", "IXI002-Guys-0828-T2", "uid17"])
  np.testing.assert_array_equal(audit.subjects(ids[2:4], r"^(IXI\d+)"), ["IXI002", "IXI002"])
  # Copied subjects: only subjects whose images are the nearest match of a Duplicate.
  s = audit.summarize(np.array([1, 1, 2, 0]), np.array([0, 1, 2, 3]), 4,
                      np.array(["p1", "p1", "p2", "p3"]))
  assert (s["n_subjects"], s["n_subjects_copied"]) == (3, 1)
  assert s["share_subjects_copied"] == pytest.approx(1 / 3)
