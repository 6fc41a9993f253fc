"""The Python API (deepssim_jax.load and the Model's methods) on the built-in model, offline.

The README's API example runs here as written; every method is checked against an
independent computation (cosines by numpy, top-k by a full sort, the 3-class rule by hand),
and bad input gets the jobs' errors.
"""

import os
import re

import numpy as np
import pytest
from PIL import Image

import deepssim_jax
from deepssim_jax import api, convert, fileio, models, pretrained
from deepssim_jax.data import demo

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
COLIN = os.path.join(demo.MRI_DIR, "colin27-T1.nii.gz")


@pytest.fixture(scope="module")
def model():
  return deepssim_jax.load("builtin")


@pytest.fixture(scope="module")
def slices(model):
  return model.read(COLIN)


def test_readme_api_example_runs_and_says_what_it_claims(capsys):
  """The README's Python block, executed verbatim: a flipped copy is a Duplicate, a slice
  30 mm away is Different, and the nearest neighbour of every odd slice is an adjacent
  even one."""
  text = open(os.path.join(ROOT, "README.md")).read()
  block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
  ns = {}
  os.chdir(ROOT)
  exec(compile(block, "README.md", "exec"), ns)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "Duplicate" in out and "Different" in out
  assert ns["copy"] > 0.85 and ns["far"] <= 0.60
  keys = ns["keys"]
  z = np.array([int(k.rsplit("z", 1)[1]) for k in keys])
  even, odd = z[::2], z[1::2]
  got = even[ns["top"]["indices"][:, 0]]
  assert np.all(np.abs(got - odd[:len(got)]) <= 3), (got, odd)


def test_embed_score_similarity_nearest_agree_with_numpy(model, slices):
  keys, x = slices
  assert x.shape[1:] == model.image_size and len(keys) == len(x) > 20
  e = model.embed(x[:10])
  dim = sum(net.embed_dim for net, _ in models.members(model.model, model.variables))
  assert e.shape == (10, dim) and e.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
  # One image alone, or a stack: the same embedding (padding never leaks into rows).
  np.testing.assert_allclose(model.embed(x[3]), e[3:4], atol=1e-5)
  s = model.similarity(x[:4], x[4:10])
  np.testing.assert_allclose(s, e[:4] @ e[4:10].T, atol=1e-5)
  assert abs(model.score(x[2], x[7]) - float(e[2] @ e[7])) < 1e-5
  assert abs(model.score(x[5], x[5]) - 1.0) < 1e-5
  top = model.nearest(x[:3], x[3:10], k=4)
  full = e[:3] @ e[3:10].T
  want = np.argsort(-full, axis=1)[:, :4]
  np.testing.assert_array_equal(top["indices"], want)
  np.testing.assert_allclose(top["scores"], np.take_along_axis(full, want, 1), atol=1e-5)
  assert top["classes"].shape == (3, 4)
  # Intensity scale and dtype of an array do not matter: it is z-scored like training did.
  np.testing.assert_allclose(model.embed((x[:2] * 37.0 + 900).astype(np.float64)), e[:2],
                             atol=1e-4)


def test_files_folders_and_arrays_read_the_same_images(model, slices, tmp_path):
  """A NIfTI volume gives its band's slices; a PNG written from a slice and the slice as an
  array embed alike (8-bit rounding aside); a folder is read recursively."""
  keys, x = slices
  assert keys[0].startswith("colin27-T1/z")
  png_dir = tmp_path / "pngs" / "sub"
  png_dir.mkdir(parents=True)
  for i in (0, 9):
    u8 = np.round((x[i] - x[i].min()) / np.ptp(x[i]) * 255).astype(np.uint8)
    Image.fromarray(u8).save(png_dir / f"s{i}.png")
  e_png = model.embed(str(tmp_path / "pngs"))
  e_arr = model.embed(x[[0, 9]])
  assert e_png.shape == (2, e_arr.shape[1])
  assert np.all(np.sum(e_png * e_arr, axis=1) > 0.99)
  e_file = model.embed([str(png_dir / "s0.png"), str(png_dir / "s9.png")])
  np.testing.assert_allclose(e_file, e_png, atol=1e-5)
  # A different size is resampled (aspect kept) to the model's.
  big = np.kron(x[0], np.ones((2, 2), np.float32))
  assert model.score(big, x[0]) > 0.95


def test_classify_is_the_papers_rule():
  s = np.array([0.2, 0.6, 0.600001, 0.85, 0.850001, 1.0])
  np.testing.assert_array_equal(
      deepssim_jax.classify(s),
      ["Different", "Different", "Similar", "Similar", "Duplicate", "Duplicate"])
  assert deepssim_jax.classify(0.9) == "Duplicate"
  assert deepssim_jax.classify(0.9, thresholds=(0.5, 0.95)) == "Similar"
  assert deepssim_jax.classify(np.zeros((2, 3))).shape == (2, 3)


@pytest.mark.parametrize("bad,message", [
    (np.zeros((2, 3, 4, 5)), "expected an \\(H, W\\) image or an \\(N, H, W\\) stack"),
    (np.full((20, 20), np.nan), "non-finite"),
    (np.ones((20, 20)), "constant image"),
    (np.zeros((0, 20, 20)), "no images"),
])
def test_bad_arrays_are_refused_by_name(model, bad, message):
  with pytest.raises(fileio.InputError, match=message):
    model.embed(bad)


def test_bad_files_and_specs_are_refused_by_name(model, tmp_path):
  junk = tmp_path / "junk.png"
  junk.write_bytes(b"not a png")
  with pytest.raises(fileio.InputError, match="junk.png: not a readable image"):
    model.embed(str(junk))
  broken = tmp_path / "broken.nii.gz"
  broken.write_bytes(b"\x1f\x8b garbage")
  with pytest.raises(fileio.InputError, match="broken.nii.gz"):
    model.embed(str(broken))
  with pytest.raises(fileio.InputError, match="file not found"):
    model.embed(str(tmp_path / "missing.png"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(fileio.InputError, match="no .png, .nii or .nii.gz"):
    model.embed(str(tmp_path / "empty"))
  with pytest.raises(fileio.InputError, match="not 'builtin'"):
    deepssim_jax.load(str(tmp_path / "no_such_run:best"))
  with pytest.raises(fileio.InputError, match="no config.json"):
    deepssim_jax.load(str(tmp_path / "empty"))
  with pytest.raises(fileio.InputError, match="one image for a"):
    model.explain(np.stack([np.eye(20)] * 2), np.eye(20))
  with pytest.raises(fileio.InputError, match="holds 2 images"):
    model.score(np.stack([np.eye(20) + 1, np.eye(20)]), np.eye(20))


def test_checkpoint_folders_and_exported_files_load_the_same_model(model, slices, tmp_path):
  """The built-in model's (first) network written as a checkpoint folder
  (convert.write_checkpoint, read as a run's best), exported again to .npz, and reloaded:
  identical embeddings (for an ensemble of K, sqrt(K) x its first embedding columns); a
  damaged file is refused."""
  x = slices[1][:4]
  kw = {"name": model.config.model.name, "head": model.config.model.head,
        **dict(model.config.model.overrides)}
  nets = models.members(model.model, model.variables)
  net, variables = nets[0]
  folder = str(tmp_path / "run")
  convert.write_checkpoint(folder, kw, variables, model.image_size, {"test": 1})
  want = model.embed(x)[:, :net.embed_dim] * np.sqrt(len(nets))
  for spec in (folder, folder + ":best", folder + ":best:0"):
    np.testing.assert_allclose(deepssim_jax.load(spec).embed(x), want, atol=1e-6)
  out = str(tmp_path / "again.npz")
  meta = pretrained.export(folder, "best", out)
  assert meta["step"] == 0
  np.testing.assert_allclose(deepssim_jax.load(out).embed(x), want, atol=1e-6)
  with np.load(out) as z:
    arrays = dict(z)
  first = next(k for k in arrays if k.startswith(pretrained.PREFIX))
  arrays[first] = arrays[first] + 1
  damaged = str(tmp_path / "damaged.npz")
  np.savez(damaged, **arrays)
  with pytest.raises(fileio.InputError, match="damaged file"):
    deepssim_jax.load(damaged)
  np.savez(str(tmp_path / "other.npz"), data=np.zeros(3))
  with pytest.raises(fileio.InputError, match="not an exported DeepSSIM model"):
    deepssim_jax.load(str(tmp_path / "other.npz"))


def test_builtin_model_ships_with_its_card():
  card = os.path.join(os.path.dirname(pretrained.BUILTIN), "MODEL_CARD.md")
  text = open(card).read()
  assert "leave-one-head-out" in text.lower()
  m = api.load("builtin")
  assert os.path.getsize(pretrained.BUILTIN) < 8 * 2**20
  assert m.step > 0 and m.image_size == (136, 112)


def test_explain_maps_of_a_pair(model, slices):
  """model.explain: two (H, W) maps in [0, 1], equal to explain.pair_maps on the same
  z-scored images; with the default method (occlusion) a pixel is bright in the similarity
  map or the dissimilarity map, never both; an exact copy has maps of 0. (How well the
  maps localise is tested in tests/test_explain.py.)"""
  from deepssim_jax import explain
  x = slices[1][25]
  y = x.copy()
  y[20:60, 10:58] = np.random.default_rng(0).normal(size=(40, 48))
  ma, mb = model.explain(x, y, score="dissimilarity")
  assert ma.shape == mb.shape == model.image_size
  assert 0 <= mb.min() and mb.max() <= 1 and mb.max() > 0
  ref = explain.pair_maps(model.model, model.variables, x, model.read(y)[1][0],
                          score="dissimilarity")
  np.testing.assert_allclose(mb, np.asarray(ref[1]), atol=1e-5)
  sa, sb = model.explain(x, y, score="similarity")
  assert sb.max() > 0 and np.all(sb * mb == 0) and np.all(sa * ma == 0)
  for m in model.explain(x, x, score="dissimilarity"):
    np.testing.assert_array_equal(m, 0.0)
