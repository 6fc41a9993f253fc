"""The audit job on the embedded demo data (tiny untrained model), and run comparison."""

import functools
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from deepssim_jax import audit, config_lib, embed, io, models
from test_report import _decode, _parse  # pytest puts tests/ on sys.path

SIZE = (40, 32)


@pytest.fixture(scope="module")
def model_fn():
  model = models.make_model("convnext_atto", hidden_dim=16, embed_dim=8, depthwise_impl="conv",
                            depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
  v = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), np.zeros((1, *SIZE), np.float32))
  fn = embed.make_embed_fn(model)

  def embeddings(config, workdir, spec, name):
    src = audit.default_images(config, workdir, spec, name)
    return src.keys, embed.embed_array(model, v, src.images, 16, progress=False, embed_fn=fn)
  return embeddings


def _config(tmp_path, **kw):
  c = config_lib.base_config()
  c.update(audit.default_config())
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
  table = io.read_csv(os.path.join(folder, "audit.csv"),
                      ["synth_id", "train_id_1", "score_1", "train_id_5", "score_5", "class",
                       "class_name", "dar_memorized", "mi", "oni", "mi_memorized",
                       "carlini_ratio", "carlini_memorized"])
  n = 12 + 8 + 6
  assert len(table["synth_id"]) == n
  s1 = io.float_column("audit.csv", table, "score_1")
  s5 = io.float_column("audit.csv", table, "score_5")
  assert np.all(s1 >= s5)
  cls = np.asarray([int(v) for v in table["class"]])
  np.testing.assert_array_equal(cls, np.where(s1 <= 0.6, 0, np.where(s1 > 0.85, 1, 2)))
  mi = io.float_column("audit.csv", table, "mi")
  np.testing.assert_allclose(io.float_column("audit.csv", table, "oni"), -np.tanh(mi),
                             atol=1e-12)
  with open(os.path.join(folder, "summary.json")) as f:
    s = json.load(f)
  assert s["n_synthetic"] == n and s["n_training"] == 16 and s["n_heldout"] == 8
  assert sum(s["counts"].values()) == n
  assert s["counts"]["duplicate"] == int(np.sum(cls == 1))
  assert s["memorization_rate"] == pytest.approx(np.mean(cls == 1))
  copied = {t for t, c_ in zip(table["train_id_1"], cls) if c_ == 1}
  assert s["share_training_copied"] == pytest.approx(len(copied) / 16)
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
    with pytest.raises(io.InputError, match=msg):
      audit.audit_job(c, work, **kw)
    assert _snapshot(folder) == before  # untouched
  # Dar et al. without a held-out set.
  c.audit.heldout = ""
  with pytest.raises(io.InputError, match="held-out"):
    audit.audit_job(c, work, model_fn)
  assert _snapshot(folder) == before
  # A fresh output folder is not created by a failing audit.
  c.audit.out_dir = str(tmp_path / "fresh")
  with pytest.raises(io.InputError):
    audit.audit_job(c, work, model_fn)
  assert not os.path.exists(tmp_path / "fresh")
  assert sorted(os.listdir(tmp_path)) == ["audit", "work"]
  # With Dar et al. off the same config runs (here with Carlini et al. on pixels).
  c.calibrate.dar.enabled = False
  c.calibrate.carlini.space = "pixels"
  s = audit.audit_job(c, work, model_fn)["summary"]
  assert set(s["calibration"]) == {"mi", "carlini"} and "dar" not in s["thresholds"]
  assert s["calibration"]["carlini"]["space"] == "pixels"
  table = io.read_csv(os.path.join(str(tmp_path / "fresh"), "audit.csv"), ["carlini_ratio"])
  assert "dar_memorized" not in table
  with pytest.raises(ValueError, match="embeddings function"):
    audit.audit_job(c, work)


def test_publish_refuses_foreign_folders(tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "thesis.tex").write_text("x")
  with pytest.raises(io.InputError, match="refusing to replace"):
    audit.publish(str(tmp_path / "mine"), {"summary.json": "{}"})
  assert os.listdir(tmp_path / "mine") == ["thesis.tex"]
  out = audit.publish(str(tmp_path / "new"), {"summary.json": "{}", "a.txt": "a"})
  assert sorted(os.listdir(out)) == ["a.txt", "summary.json"]


def test_compare_tabulates_and_plots(model_fn, tmp_path):
  c = _config(tmp_path)
  c.calibrate.dar.enabled = False
  c.compare.synthetic = ("synth", "real")  # the training set audited against itself
  out = audit.compare_job(c, str(tmp_path / "work"), model_fn)
  table = io.read_csv(out["csv"], audit.COMPARE_COLUMNS)
  assert table["name"] == ["synth", "real"]
  rates = io.float_column(out["csv"], table, "memorization_rate")
  assert rates[1] == 1.0  # every training image is its own Duplicate
  assert table["dar_rate"] == ["", ""]
  assert io.float_column(out["csv"], table, "share_training_copied")[1] == 1.0
  with Image.open(out["png"]) as im:
    assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300
  for name in ("synth", "real"):
    assert os.path.exists(tmp_path / "work" / "compare" / name / "report.html")
  with pytest.raises(io.InputError, match="summary.json: not found"):
    audit.compare_runs({"x": str(tmp_path / "nowhere")}, str(tmp_path / "cmp"))
