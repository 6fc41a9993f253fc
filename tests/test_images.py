"""Tests for deepssim_jax.data.images: resampling, z-scoring, PNG sources, banks."""

import os
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from deepssim_jax import fileio
from deepssim_jax.data import images

SIZE = (136, 112)


def _smooth(rng, shape=SIZE):
  """A non-constant image with structure (so 8-bit quantisation is mild)."""
  r, c = np.mgrid[0:shape[0], 0:shape[1]]
  return (np.sin(r / 7.0) + np.cos(c / 5.0) + 0.3 * rng.standard_normal(shape)).astype(
      np.float32)


@pytest.mark.parametrize("shape,pixel,background", [
    ((229, 193), (1.0, 1.0), 0.0),     # downsample (anti-aliased)
    ((62, 92), (3.0, 2.0), 0.0),       # anisotropic pixels, upsample
    ((256, 256), (0.78, 0.78), 0.0),   # square field of view into a tall frame
    ((9, 7), (1.0, 1.0), 0.0),         # strong upsample
])
def test_resample_fit_matches_jax_scale_and_translate(shape, pixel, background):
  rng = np.random.default_rng(0)
  x = rng.random(shape).astype(np.float32)
  out = images.resample(x, SIZE, pixel, mode="fit", background=background)
  h, w = shape
  s = min(SIZE[0] / (h * pixel[0]), SIZE[1] / (w * pixel[1]))
  sy, sx = s * pixel[0], s * pixel[1]
  ref = jax.image.scale_and_translate(
      jnp.asarray(x), SIZE, (0, 1), jnp.array([sy, sx]),
      jnp.array([(SIZE[0] - h * sy) / 2, (SIZE[1] - w * sx) / 2]), "linear", antialias=True)
  assert out.shape == SIZE and out.dtype == np.float32
  np.testing.assert_allclose(out, np.asarray(ref), atol=2e-5)


def test_resample_stretch_matches_jax_resize():
  x = np.random.default_rng(1).random((90, 140)).astype(np.float32)
  out = images.resample(x, SIZE, mode="stretch")
  ref = jax.image.resize(jnp.asarray(x), SIZE, "linear", antialias=True)
  np.testing.assert_allclose(out, np.asarray(ref), atol=2e-5)


def test_resample_fixed_spacing_pads_with_background_and_keeps_scale():
  x = np.ones((20, 10), np.float32)
  x[0, 0] = 2.0  # not constant
  # 2 mm pixels at 1 mm per output pixel: 40 x 20 mm -> 40 x 20 output pixels, centred.
  out = images.resample(x, (60, 40), (2.0, 2.0), spacing_mm=1.0, background=-5.0)
  inside = out > -5.0
  rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
  assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (10, 50, 10, 30)


def test_zscore_closed_form_host_and_traced():
  """The one z-score: per image over (H, W), (x - mean) / std with the population std, as
  the numpy closed form; host in float64 then float32, traced under jit the same numbers."""
  rng = np.random.default_rng(2)
  x = _smooth(rng)
  z = images.zscore(x)
  assert z.dtype == np.float32 and z.shape == x.shape
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(z, (x64 - x64.mean()) / x64.std(), atol=1e-6)
  assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-5
  u8 = rng.integers(0, 255, size=(20, 16)).astype(np.uint8)  # integer images too
  np.testing.assert_allclose(images.zscore(u8), (u8 - u8.mean()) / u8.std(), atol=1e-6)
  # A stack: each image on its own (not the stack's mean and std).
  xs = rng.normal(3, 2, size=(3, 10, 12)) * np.array([1.0, 10.0, 0.1])[:, None, None]
  zs = images.zscore(xs, dtype=np.float64)
  assert zs.dtype == np.float64
  np.testing.assert_allclose(zs, [(v - v.mean()) / v.std() for v in xs], atol=1e-12)
  np.testing.assert_allclose(zs.mean((1, 2)), 0, atol=1e-12)
  np.testing.assert_allclose(zs.std((1, 2)), 1, atol=1e-12)
  # Traced: the same formula under jit, over the last two axes of any leading shape.
  traced = jax.jit(lambda v: images.zscore(v, xp=jnp))
  np.testing.assert_allclose(traced(jnp.asarray(xs, jnp.float32)), zs, atol=1e-5)
  np.testing.assert_allclose(traced(jnp.asarray(xs[None], jnp.float32))[0], zs, atol=1e-5)
  # It cannot raise there: a constant image comes out as zeros (std floored at ZSCORE_EPS).
  flat = traced(jnp.full((2, 8, 8), 0.1, jnp.float32))
  assert bool(jnp.all(jnp.isfinite(flat))) and float(jnp.abs(flat).max()) < 0.1


def test_zscore_errors_name_the_image():
  with pytest.raises(fileio.InputError, match=r"flat\.png: constant image"):
    images.zscore(np.full((4, 4), 3.0), "flat.png")
  with pytest.raises(fileio.InputError, match=r"nan\.png: 1 of 2 pixels are NaN.*non-finite"):
    images.zscore(np.array([[0.0, np.nan]]), "nan.png")
  with pytest.raises(ValueError, match=r"image: 1 of 4 pixels are inf"):  # InputError is one
    images.zscore(np.array([[0.0, np.inf], [1.0, 2.0]]))
  xs = np.random.default_rng(5).normal(size=(3, 10, 12))
  bad = xs.copy()
  bad[1] = 7.0
  bad[2, 0, 0] = np.nan
  with pytest.raises(fileio.InputError, match=r"s1: constant image.*1 more image\(s\) of 3"):
    images.zscore(bad, ["s0", "s1", "s2"])
  with pytest.raises(fileio.InputError, match=r"image 1: constant image"):  # default names
    images.zscore(bad)
  with pytest.raises(fileio.InputError, match="dtype complex"):
    images.zscore(np.ones((4, 4), complex), "c.png")
  with pytest.raises(fileio.InputError, match=r"v\.png: expected an image \(H, W\)"):
    images.zscore(np.arange(5.0), "v.png")
  with pytest.raises(fileio.InputError, match="empty"):
    images.zscore(np.zeros((0, 4)))
  with pytest.raises(ValueError, match="2 names for 3 images"):
    images.zscore(xs, ["a", "b"])
  # Raw pixels are checked before resampling with the same rule.
  with pytest.raises(fileio.InputError, match=r"raw\.png: constant image"):
    images.check_not_constant(np.full((5, 5), 2, np.uint16), "raw.png")


def test_write_png_round_trip(tmp_path):
  x = _smooth(np.random.default_rng(3))
  path = tmp_path / "a" / "img.png"
  images.write_png(str(path), x)
  assert os.listdir(tmp_path / "a") == ["img.png"]  # atomic: no temporary left behind
  with Image.open(path) as im:
    assert im.mode == "L" and im.size == (SIZE[1], SIZE[0])
    u8 = np.asarray(im)
  expect = np.round((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
  np.testing.assert_array_equal(u8, expect)
  # Read back through a source: the z-scored image up to 8-bit quantisation.
  src = images.PngSource(["k"], [str(path)], SIZE)
  got = src[0]
  step = (x.max() - x.min()) / 255 / x.std()
  assert np.abs(got - images.zscore(x)).max() <= 0.6 * step + 1e-4


def test_write_png_rejects_bad_images(tmp_path):
  with pytest.raises(ValueError, match="non-finite"):
    images.write_png(str(tmp_path / "n.png"), np.array([[0.0, np.nan]]))
  with pytest.raises(ValueError, match="shape"):
    images.write_png(str(tmp_path / "n.png"), np.zeros((2, 3, 4)))
  images.write_png(str(tmp_path / "c.png"), np.full((5, 5), 7.0))
  assert np.asarray(Image.open(tmp_path / "c.png")).max() == 0


def _write_layout(root, uids, num_gen, rng):
  truth = {}
  for uid in uids:
    x = _smooth(rng)
    images.write_png(os.path.join(root, uid, "training.png"), x)
    truth[f"{uid}/training"] = x
    for i in range(num_gen):
      y = _smooth(rng)
      images.write_png(os.path.join(root, uid, f"gen-{i}.png"), y)
      truth[f"{uid}/gen-{i}"] = y
  return truth


def test_reference_layout(tmp_path):
  rng = np.random.default_rng(4)
  truth = _write_layout(str(tmp_path), ["10", "2", "1"], 11, rng)
  os.makedirs(tmp_path / ".hidden")
  (tmp_path / "notes.txt").write_text("ignored")
  training, generated = images.find_reference_layout(str(tmp_path), SIZE)
  assert training.keys == ["1/training", "2/training", "10/training"]  # natural order
  assert generated.keys[:3] == ["1/gen-0", "1/gen-1", "1/gen-2"]
  assert generated.keys[10] == "1/gen-10" and len(generated) == 33
  assert list(generated.meta["source_key"][:11]) == ["1/training"] * 11
  assert list(generated.meta["gen_index"][:11]) == list(range(11))
  assert list(training.meta["uid"]) == ["1", "2", "10"]
  for src in (training, generated):
    for i in (0, len(src) - 1):
      x = src[i]
      assert x.shape == SIZE and x.dtype == np.float32
      assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-4
      ref = images.zscore(truth[src.keys[i]])
      assert np.corrcoef(x.ravel(), ref.ravel())[0, 1] > 0.999
  # Stable: a second scan gives the same keys.
  again, _ = images.find_reference_layout(str(tmp_path), SIZE)
  assert again.keys == training.keys


def test_reference_layout_errors(tmp_path):
  with pytest.raises(fileio.InputError, match="folder not found"):
    images.find_reference_layout(str(tmp_path / "missing"))
  with pytest.raises(fileio.InputError, match=re.escape(str(tmp_path))):
    images.find_reference_layout(str(tmp_path))  # empty
  rng = np.random.default_rng(5)
  _write_layout(str(tmp_path), ["a"], 2, rng)
  images.write_png(str(tmp_path / "b" / "gen-0.png"), _smooth(rng))
  folder = re.escape(os.path.join(str(tmp_path), "b"))
  with pytest.raises(fileio.InputError, match=folder + ".*no training"):
    images.find_reference_layout(str(tmp_path))


def test_png_errors_name_the_file(tmp_path):
  bad = tmp_path / "u" / "gen-0.png"
  bad.parent.mkdir()
  bad.write_bytes(b"definitely not a png")
  flat = tmp_path / "u" / "training.png"
  Image.fromarray(np.full((8, 8), 9, np.uint8)).save(flat)
  training, generated = images.find_reference_layout(str(tmp_path), SIZE)
  with pytest.raises(fileio.InputError, match=re.escape(str(bad)) + ".*not a readable image"):
    generated[0]
  with pytest.raises(fileio.InputError, match=re.escape(str(flat)) + ".*constant"):
    training[0]


def test_size_mismatch_resize_modes(tmp_path):
  x = _smooth(np.random.default_rng(6), (64, 64))
  path = str(tmp_path / "sq.png")
  images.write_png(path, x)
  fit = images.PngSource(["k"], [path], SIZE, resize="fit")[0]
  assert fit.shape == SIZE
  # A square image fitted into 136 x 112 keeps its aspect: 112 x 112 content, 12-row pads.
  assert np.all(fit[:11] == fit[0, 0]) and np.all(fit[-11:] == fit[0, 0])
  assert np.ptp(fit[30]) > 0
  stretch = images.PngSource(["k"], [path], SIZE, resize="stretch")[0]
  assert stretch.shape == SIZE and np.ptp(stretch[0]) > 0
  native = images.PngSource(["k"], [path], None)[0]
  assert native.shape == (64, 64)
  with pytest.raises(fileio.InputError, match=re.escape(path) + ".*64x64, expected 136x112"):
    images.PngSource(["k"], [path], SIZE, resize="error")[0]


def test_manifest_source(tmp_path):
  rng = np.random.default_rng(7)
  (tmp_path / "imgs").mkdir()
  for name in ("a", "b"):
    images.write_png(str(tmp_path / "imgs" / f"{name}.png"), _smooth(rng))
  csv = tmp_path / "m.csv"
  csv.write_text(f"key,path,site\nx,imgs/a.png,A\ny,{tmp_path / 'imgs' / 'b.png'},B\n")
  src = images.manifest_source(str(csv), SIZE)
  assert src.keys == ["x", "y"] and list(src.meta["site"]) == ["A", "B"]
  assert src.paths[0] == os.path.join(str(tmp_path), "imgs", "a.png")
  assert src[1].shape == SIZE
  dup = tmp_path / "dup.csv"
  dup.write_text("key,path\nx,imgs/a.png\nx,imgs/b.png\n")
  with pytest.raises(fileio.InputError, match=re.escape(str(dup)) + ".*duplicated key 'x'"):
    images.manifest_source(str(dup))
  missing = tmp_path / "missing.csv"
  missing.write_text("key,path\nx,imgs/zz.png\n")
  with pytest.raises(fileio.InputError, match=re.escape(str(missing)) + ".*line 2.*zz.png"):
    images.manifest_source(str(missing))
  empty = tmp_path / "empty.csv"
  empty.write_text("key,path\n")
  with pytest.raises(fileio.InputError, match=re.escape(str(empty)) + ".*no rows"):
    images.manifest_source(str(empty))


def test_folder_source(tmp_path):
  rng = np.random.default_rng(8)
  for name in ("img10", "img2", "img1"):
    images.write_png(str(tmp_path / f"{name}.png"), _smooth(rng))
  (tmp_path / "x.txt").write_text("not an image")
  src = images.folder_source(str(tmp_path), SIZE)
  assert src.keys == ["img1", "img2", "img10"]
  images.write_png(str(tmp_path / "img1.PNG"), _smooth(rng))
  with pytest.raises(fileio.InputError, match=re.escape(str(tmp_path)) + ".*duplicated key 'img1'"):
    images.folder_source(str(tmp_path), SIZE)
  (tmp_path / "empty").mkdir()
  with pytest.raises(fileio.InputError, match=re.escape(str(tmp_path / "empty")) + ".*no .png"):
    images.folder_source(str(tmp_path / "empty"))


def test_pickle_threads_and_bank_round_trip(tmp_path):
  rng = np.random.default_rng(9)
  _write_layout(str(tmp_path / "lay"), ["a", "b", "c"], 3, rng)
  _, generated = images.find_reference_layout(str(tmp_path / "lay"), SIZE)
  clone = pickle.loads(pickle.dumps(generated))
  np.testing.assert_array_equal(clone[4], generated[4])
  bank = images.load_all(generated, progress=False)
  threaded = images.load_all(generated, progress=False, num_threads=2)
  np.testing.assert_array_equal(bank["images"], threaded["images"])
  assert bank["images"].shape == (9,) + SIZE and bank["images"].dtype == np.float32
  assert list(bank["keys"]) == generated.keys
  bank["meta"]["score"] = np.linspace(0, 1, 9)
  path = str(tmp_path / "bank.npz")
  images.save_bank(path, bank)
  back = images.load_bank(path)
  np.testing.assert_array_equal(back["images"], bank["images"])
  np.testing.assert_array_equal(back["keys"], bank["keys"])
  assert sorted(back["meta"]) == sorted(bank["meta"])
  for k, v in bank["meta"].items():
    np.testing.assert_array_equal(back["meta"][k], v)
  garbage = tmp_path / "g.npz"
  garbage.write_bytes(b"nope")
  with pytest.raises(fileio.InputError, match=re.escape(str(garbage))):
    images.load_bank(str(garbage))


def test_meta_columns_types():
  cols = images.meta_columns({"i": [1, 2], "f": [1, None], "s": ["a", None]}, 2)
  assert cols["i"].dtype == np.int64
  assert cols["f"].dtype == np.float64 and np.isnan(cols["f"][1])
  assert list(cols["s"]) == ["a", ""] and cols["s"].dtype.kind == "U"
