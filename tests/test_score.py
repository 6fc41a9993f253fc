"""The score command: two images, and two folders (PNG or NIfTI) into an audit folder."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deepssim_jax import api, evaluate, fileio, score
from deepssim_jax.data import demo, images

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("demo_pngs") / "pngs")
  r = demo.write_demo_folders(root, slices_per_head=4, num_copies=6, num_neighbours=4,
                              num_other=3, heldout_per_head=0)
  return r


def _run(*args):
  return subprocess.run([sys.executable, "-m", "deepssim_jax.score", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_two_folders_give_the_audit_of_every_synthetic_image(folders, tmp_path):
  """Scored plainly (align=False), every synthetic PNG gets its k nearest training PNGs
  with scores (descending, equal to the API's cosines) and a class; the report, summary
  and known-answer validation are written."""
  model = api.load("builtin")
  out = str(tmp_path / "out")
  r = score.score_folders(model, f"{folders['root']}/training",
                          f"{folders['root']}/synthetic", out, k=3, truth=folders["truth"],
                          align=False)
  assert sorted(os.listdir(out)) == ["audit.csv", "report.html", "summary.json"]
  with open(os.path.join(out, "audit.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == folders["num_synthetic"]
  train_src = images.folder_source(f"{folders['root']}/training")
  synth_src = images.folder_source(f"{folders['root']}/synthetic")
  e_train = model.embed(np.stack([train_src[i] for i in range(len(train_src))]))
  e_synth = model.embed(np.stack([synth_src[i] for i in range(len(synth_src))]))
  sims = e_synth @ e_train.T
  for row in rows:
    i = synth_src.keys.index(row["synth_id"])
    want = np.sort(sims[i])[::-1][:3]
    got = [float(row[f"score_{j}"]) for j in (1, 2, 3)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert train_src.keys.index(row["train_id_1"]) == int(np.argmax(sims[i]))
    assert row["class_name"] == {0: "different", 1: "duplicate", 2: "similar"}[
        int(evaluate.classify(np.array([want[0]]))[0])]
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["n_synthetic"] == len(rows) and summary["k"] == 3 and summary["align"] is None
  assert summary["validation"]["n_memorized"] == 6
  html = open(os.path.join(out, "report.html")).read()
  assert "Against known answers" in html and 'class="overlay"' in html
  assert "rigidly aligned" not in html
  assert r["summary"]["memorization_rate"] == summary["memorization_rate"]


def test_command_line_two_images_and_bad_arguments(folders, tmp_path, capsys):
  """The command end to end (a flipped copy: Duplicate; a missing file: one error line,
  status 2), and the argument rules in-process."""
  a = os.path.join(folders["root"], "training", sorted(os.listdir(
      os.path.join(folders["root"], "training")))[0])
  flipped = str(tmp_path / "flipped.png")
  images.write_png(flipped, images.read_png(a)[:, ::-1])
  p = _run(a, flipped)
  assert p.returncode == 0, p.stderr
  value, label = p.stdout.strip().split("\t")
  assert float(value) > 0.85 and label == "Duplicate"
  p = _run(a, str(tmp_path / "missing.png"))
  assert p.returncode == 2 and "missing.png: file not found" in p.stderr, p.stderr
  assert len(p.stderr.strip().splitlines()) == 1
  r = score.run([a, flipped])
  assert abs(r["score"] - float(value)) < 1e-3
  assert capsys.readouterr().out.strip().endswith("Duplicate")
  # The built-in model aligns by default (model.align): the flip is one of the
  # candidates, so the copy is brought back exactly; --noalign scores the plain cosine.
  r = score.run([a, flipped], align=True)
  assert r["score"] > 0.999 and abs(r["score"] - float(value)) < 1e-3
  plain = score.run([a, flipped], align=False)
  assert plain["score"] < r["score"] - 0.01
  for args, kw, message in (([a], {}, "expected two images"),
                            ([a, flipped], {"train": "x", "synth": "y"}, "not both"),
                            ([], {"train": "x"}, "go together"),
                            ([], {"train": "x", "synth": "y", "k": 0}, "--k must be"),
                            ([a, flipped], {"model": "no/such/run:best"}, "not 'builtin'")):
    with pytest.raises(fileio.InputError, match=message):
      score.run(args, **kw)


def test_aligned_folder_audit(folders, tmp_path):
  """Two folders scored as the built-in model is meant to be (model.align, the command's
  default; score.run as the command calls it): each synthetic image's scores are the
  aligned scores (Model.similarity(align=True)) of its 4 k nearest by plain cosine over
  its four flip states, best k kept; the planted copies (flipped, rotated up to 10
  degrees, gamma-changed) are all found, with their sources."""
  out = str(tmp_path / "aligned")
  score.run([], train=f"{folders['root']}/training", synth=f"{folders['root']}/synthetic",
            k=2, out=out, truth=folders["truth"])
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["align"]["rerank"] == 4 and summary["k"] == 2
  assert summary["validation"]["rules"]["paper"]["recall"] == 1.0, summary["validation"]
  assert summary["validation"]["source_match"] == 1.0
  with open(os.path.join(out, "audit.csv")) as f:
    rows = list(csv.DictReader(f))
  model = api.load("builtin")
  train_src = images.folder_source(f"{folders['root']}/training")
  synth_src = images.folder_source(f"{folders['root']}/synthetic")
  xt = np.stack([train_src[i] for i in range(len(train_src))])
  xs = np.stack([synth_src[i] for i in range(len(synth_src))])
  et = model.embed(xt)
  plain = np.max([model.embed(np.flip(xs, axes)) @ et.T
                  for axes in ((), (1,), (2,), (1, 2))], axis=0)
  aligned = model.similarity(xs, xt, align=True)
  for row in rows:
    i = synth_src.keys.index(row["synth_id"])
    cand = np.argsort(-plain[i], kind="stable")[:8]
    want = np.sort(aligned[i, cand])[::-1][:2]
    np.testing.assert_allclose([float(row["score_1"]), float(row["score_2"])], want, atol=1e-4)
  assert "rigidly aligned" in open(os.path.join(out, "report.html")).read()


def test_nifti_folders_are_read_as_axial_slices(tmp_path):
  """A folder of NIfTI volumes: each volume's band slices, keyed <volume>/z<k>."""
  model = api.load("builtin")
  src = model.source(demo.MRI_DIR)
  keys = list(src.keys)
  assert any(k.startswith("colin27-T1/z") for k in keys)
  assert len({k.split("/")[0] for k in keys}) == 5
  x = src[0]
  assert x.shape == model.image_size and abs(float(x.mean())) < 1e-4


def test_demo_folders_hold_the_sets_and_their_truth(folders):
  """write_demo_folders: one PNG per image, truth.csv marks exactly the planted copies
  with their source's file name; a non-empty destination is refused."""
  root = folders["root"]
  train = sorted(os.listdir(os.path.join(root, "training")))
  synth = sorted(os.listdir(os.path.join(root, "synthetic")))
  assert len(train) == folders["num_training"] == 16
  assert len(synth) == folders["num_synthetic"] == 6 + 4 + 3
  with open(folders["truth"]) as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["synth_id"] + ".png" for r in rows) == synth
  copies = [r for r in rows if r["memorized"] == "1"]
  assert len(copies) == 6
  assert all(r["source_id"] + ".png" in train for r in copies)
  assert all(r["source_id"] == "" for r in rows if r["memorized"] == "0")
  with pytest.raises(fileio.InputError, match="must be empty or absent"):
    demo.write_demo_folders(root)
