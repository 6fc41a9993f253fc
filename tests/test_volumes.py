"""Tests for deepssim_jax.data.volumes: discovery, RAS slices, physical aspect, errors."""

import gzip
import os
import pickle
import re
import sys
import types
from unittest import mock

import nibabel as nib
import numpy as np
import pytest

from deepssim_jax import fileio
from deepssim_jax.data import images
from deepssim_jax.data import volumes

SIZE = (136, 112)
MRI_DIR = os.path.join(os.path.dirname(volumes.__file__), "mri")


def _save(path, data, affine=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
  return path


def _noise_volume(shape=(12, 14, 10), seed=0):
  return np.random.default_rng(seed).random(shape).astype(np.float32)


@pytest.fixture(scope="module")
def real():
  """The vendored volumes read once: source with 3 slices per head and its bank."""
  layout, records = volumes.find_volumes(MRI_DIR)
  src = volumes.VolumeSliceSource(records, SIZE, band=(0.4, 0.6), num_slices=3)
  return layout, records, src, images.load_all(src, progress=False)


def test_real_volumes_shapes_keys_zscore(real):
  layout, records, src, bank = real
  assert layout == "folder" and len(records) == 5
  assert bank["images"].shape == (15,) + SIZE and bank["images"].dtype == np.float32
  assert len(set(src.keys)) == len(src.keys) == 15
  assert all(re.fullmatch(r"[a-z0-9]+-T1/z\d{3}", k) for k in src.keys)
  assert src.keys[0].startswith("colin27-T1/z")
  mean, std = bank["images"].mean(axis=(1, 2)), bank["images"].std(axis=(1, 2))
  np.testing.assert_allclose(mean, 0, atol=1e-5)
  np.testing.assert_allclose(std, 1, atol=1e-5)
  # Stable: rebuilding gives the same keys; meta has one row per image.
  again = volumes.VolumeSliceSource(volumes.find_volumes(MRI_DIR)[1], SIZE, (0.4, 0.6), 3)
  assert again.keys == src.keys
  assert list(src.meta["slice"]) == [int(k[-3:]) for k in src.keys]
  assert len(src.meta["path"]) == 15


def test_real_volume_matches_direct_reading(real):
  _, records, src, bank = real
  # Slice 1 of colin27, computed independently from nibabel's canonical volume.
  canon = nib.as_closest_canonical(nib.load(records[0]["path"]))
  vol = np.asarray(canon.dataobj, np.float64)
  k = src.meta["slice"][1]
  view = np.fliplr(np.rot90(vol[:, :, k]))  # anterior up, patient right on the left
  ref = images.zscore(images.resample(view, SIZE, canon.header.get_zooms()[1::-1]))
  np.testing.assert_allclose(bank["images"][1], ref, atol=1e-4)


def test_pickle_and_threads(real):
  _, _, src, bank = real
  clone = pickle.loads(pickle.dumps(src))
  assert clone.keys == src.keys
  np.testing.assert_array_equal(clone[7], bank["images"][7])
  threaded = images.load_all(clone, progress=False, num_threads=2)
  np.testing.assert_array_equal(threaded["images"], bank["images"])


def test_band_slices():
  assert volumes.band_slices(101, (0.4, 0.6)) == list(range(40, 61))
  assert volumes.band_slices(101, (0.4, 0.6), num_slices=5) == [40, 45, 50, 55, 60]
  assert volumes.band_slices(101, (0.4, 0.6), stride=10) == [40, 50, 60]
  assert volumes.band_slices(11, (0.4, 0.6), num_slices=50) == [4, 5, 6]
  assert volumes.band_slices(10, (0.5, 0.5)) == [5]
  with pytest.raises(ValueError):
    volumes.band_slices(10, (0.7, 0.2))


def test_ras_reorientation(tmp_path):
  # A RAS volume with an anterior-right marker, and the same head stored flipped in x and
  # with the axes permuted: new voxel (i, j, k) is old voxel (X-1-j, k, i).
  vol = _noise_volume((12, 14, 10))
  vol[9:12, 11:14, :] = 5.0  # high x (patient right), high y (anterior)
  zooms = np.diag([1.0, 1.2, 1.5, 1.0])
  ras = _save(str(tmp_path / "ras.nii.gz"), vol, zooms)
  stored = np.transpose(vol[::-1, :, :], (2, 0, 1))
  x = vol.shape[0]
  m = np.array([[0, -1, 0, x - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
  other = _save(str(tmp_path / "other.nii.gz"), stored, zooms @ m)
  assert nib.aff2axcodes(nib.load(other).affine) != ("R", "A", "S")
  img = nib.load(other)
  shape, vox = volumes.canonical_geometry(img)
  canon = nib.as_closest_canonical(img)
  assert shape == canon.shape == vol.shape
  np.testing.assert_allclose(vox, canon.header.get_zooms())
  a = volumes.VolumeSliceSource([{"path": ras, "id": "a"}], SIZE, (0.0, 1.0))
  b = volumes.VolumeSliceSource([{"path": other, "id": "b"}], SIZE, (0.0, 1.0))
  assert len(a) == len(b) == 10
  for i in (0, 4, 9):
    np.testing.assert_allclose(a[i], b[i], atol=1e-5)
  # Radiological view: the anterior-right marker lands in the top-left corner.
  view = volumes.axial_view(vol, 3)
  assert view.shape == (14, 12)
  assert np.all(view[:3, :3] == 5.0) and np.all(view[3:, 3:] < 5.0)


def test_coronal_and_sagittal_views_are_radiological():
  # A marker in the superior-anterior-right corner of a RAS+ volume: superior is up in both
  # views, the patient's right on the coronal view's left, anterior on the sagittal's left.
  vol = np.zeros((12, 14, 10), np.float32)
  vol[-3:, -3:, -3:] = 5.0
  for plane, k, shape in (("coronal", 13, (10, 12)), ("sagittal", 11, (10, 14))):
    axis, view_fn = volumes.PLANES[plane].axis, volumes.PLANES[plane].view
    assert volumes.plane_depth(vol.shape, plane) == vol.shape[axis]
    view = view_fn(vol, k)
    assert view.shape == shape
    assert np.all(view[:3, :3] == 5.0) and np.all(view[3:, :] == 0) and np.all(view[:, 3:] == 0)
  # The closed forms: coronal img[r, c] = vol[X-1-c, k, Z-1-r]; sagittal vol[k, Y-1-c, Z-1-r].
  rnd = _noise_volume()
  X, Y, Z = rnd.shape
  r, c = np.mgrid[0:Z, 0:X]
  np.testing.assert_array_equal(volumes.PLANES["coronal"].view(rnd, 5),
                                rnd[X - 1 - c, 5, Z - 1 - r])
  r, c = np.mgrid[0:Z, 0:Y]
  np.testing.assert_array_equal(volumes.PLANES["sagittal"].view(rnd, 4),
                                rnd[4, Y - 1 - c, Z - 1 - r])
  assert volumes.slice_key("a", 7, "coronal") == "a/y007"
  assert volumes.slice_key("a", 7, "sagittal") == "a/x007"
  assert volumes.slice_key("a", 7) == "a/z007"
  with pytest.raises(ValueError, match="unknown plane 'oblique'"):
    volumes.slice_image(rnd, (1.0, 1.0, 1.0), 0, SIZE, plane="oblique")


def test_every_plane_keeps_a_ball_round():
  # A ball of radius 40 mm on 0.8 x 2.5 x 2.0 mm voxels: round in every plane's image.
  zooms = (0.8, 2.5, 2.0)
  shape = (200, 80, 100)
  axes = [(np.arange(n) + 0.5) * d - n * d / 2 for n, d in zip(shape, zooms)]
  ball = ((axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2
           + axes[2][None, None, :] ** 2) <= 40 ** 2).astype(np.float32) * 100
  for plane in volumes.PLANES:
    k = shape[volumes.PLANES[plane].axis] // 2
    x = volumes.slice_image(ball, zooms, k, SIZE, spacing_mm=1.0, plane=plane)
    inside = x > (x.min() + x.max()) / 2
    h, w = inside.any(1).sum(), inside.any(0).sum()
    assert abs(h - 80) <= 2 and abs(w - 80) <= 2, (plane, h, w)


def test_anisotropic_voxels_keep_a_disc_round(tmp_path):
  # A disc of radius 40 mm sampled on 0.8 x 2.5 mm voxels (160 x 200 mm field of view).
  dx, dy = 0.8, 2.5
  nx, ny = 200, 80
  xs, ys = (np.arange(nx) + 0.5) * dx - 80, (np.arange(ny) + 0.5) * dy - 100
  disc = (xs[:, None] ** 2 + ys[None, :] ** 2 <= 40 ** 2).astype(np.float32)
  vol = np.repeat(disc[:, :, None], 4, axis=2) * 100
  path = _save(str(tmp_path / "disc.nii.gz"), vol, np.diag([dx, dy, 3.0, 1.0]))

  def extent(x):
    inside = x > (x.min() + x.max()) / 2
    return inside.any(1).sum(), inside.any(0).sum()

  fit = volumes.VolumeSliceSource([{"path": path}], SIZE, (0.5, 0.5))[0]
  s = min(SIZE[0] / (ny * dy), SIZE[1] / (nx * dx))  # pixels per mm
  h, w = extent(fit)
  assert abs(h - w) <= 1 and abs(h - 80 * s) <= 1.5
  fixed = volumes.VolumeSliceSource([{"path": path}], SIZE, (0.5, 0.5), spacing_mm=2.0)[0]
  assert all(abs(e - 40) <= 1 for e in extent(fixed))


def _touch(path):
  return _save(path, _noise_volume((6, 6, 6)))


def test_find_ixi(tmp_path):
  root = str(tmp_path)
  for name in ("IXI002-Guys-0828-T1", "IXI002-Guys-0828-T2", "IXI012-HH-1211-PD",
               "IXI013-IOP-0001-MRA", "notixi"):
    _touch(os.path.join(root, name.split("-")[-1], name + ".nii.gz"))
  recs = volumes.find_ixi(root)
  assert [r["id"] for r in recs] == ["IXI012-HH-1211-PD", "IXI002-Guys-0828-T1",
                                     "IXI002-Guys-0828-T2"]  # sorted by path: PD/, T1/, T2/
  assert [(r["subject"], r["site"], r["sequence"]) for r in recs] == [
      ("IXI012", "HH", "PD"), ("IXI002", "Guys", "T1"), ("IXI002", "Guys", "T2")]
  assert [r["id"] for r in volumes.find_ixi(root, sequences=("T1",))] == [
      "IXI002-Guys-0828-T1"]
  assert volumes.find_volumes(root)[0] == "ixi"
  src = volumes.VolumeSliceSource(recs, SIZE, (0.5, 0.5))
  assert src.keys == ["IXI012-HH-1211-PD/z003", "IXI002-Guys-0828-T1/z003",
                      "IXI002-Guys-0828-T2/z003"]
  assert list(src.meta["site"]) == ["HH", "Guys", "Guys"]


def test_ixi_demographics(tmp_path):
  root = str(tmp_path)
  _touch(os.path.join(root, "IXI002-Guys-0828-T1.nii.gz"))
  _touch(os.path.join(root, "IXI012-HH-1211-T1.nii.gz"))
  (tmp_path / "IXI.xls").write_bytes(b"not really excel")
  # Without pandas (or an .xls engine, or with a broken file) demographics are ignored.
  with mock.patch.dict(sys.modules, {"pandas": None}):
    recs = volumes.find_ixi(root)
  assert len(recs) == 2 and "age" not in recs[0]
  rows = [{"IXI_ID": 2, "SEX_ID (1=m, 2=f)": 2, "AGE": float("nan")},
          {"IXI_ID": 2, "SEX_ID (1=m, 2=f)": 2, "AGE": 35.8},
          {"IXI_ID": 12, "SEX_ID (1=m, 2=f)": 1, "AGE": 61.0}]
  table = types.SimpleNamespace(to_dict=lambda orient: rows)
  fake = types.SimpleNamespace(read_excel=lambda path: table)
  with mock.patch.dict(sys.modules, {"pandas": fake}):
    recs = volumes.find_ixi(root)
  assert [(r["subject"], r["age"], r["sex"]) for r in recs] == [
      ("IXI002", 35.8, "F"), ("IXI012", 61.0, "M")]
  src = volumes.VolumeSliceSource(recs, SIZE, (0.5, 0.5))
  assert src.meta["age"].dtype == np.float64 and list(src.meta["sex"]) == ["F", "M"]


def test_find_corr_legacy_and_bids(tmp_path):
  root = str(tmp_path)
  for rel in ("RawData/NYU_1/0025001/session_1/anat_1/anat.nii.gz",
              "RawData/NYU_1/0025001/session_2/anat_1/anat.nii.gz",
              "RawData/IPCAS_1/0025010/session_1/anat_2/anat.nii.gz",
              "RawData/IPCAS_1/0025010/session_1/rest_1/rest.nii.gz"):
    _touch(os.path.join(root, rel))
  recs = volumes.find_corr(root)
  assert [(r["id"], r["site"], r["subject"], r["session"], r["run"]) for r in recs] == [
      ("0025010-ses1-run2", "IPCAS_1", "0025010", "1", "2"),
      ("0025001-ses1-run1", "NYU_1", "0025001", "1", "1"),
      ("0025001-ses2-run1", "NYU_1", "0025001", "2", "1")]
  assert volumes.find_volumes(root)[0] == "corr"

  bids = str(tmp_path / "bids")
  for rel in ("NYU_2/sub-0025011/ses-1/anat/sub-0025011_ses-1_run-1_T1w.nii.gz",
              "NYU_2/sub-0025011/ses-1/anat/sub-0025011_ses-1_run-2_T1w.nii.gz",
              "NYU_2/sub-0025012/ses-2/anat/sub-0025012_ses-2_T1w.nii.gz",
              "NYU_2/sub-0025012/ses-2/func/sub-0025012_ses-2_task-rest_bold.nii.gz"):
    _touch(os.path.join(bids, rel))
  recs = volumes.find_corr(bids)
  assert [(r["id"], r["site"], r["sequence"]) for r in recs] == [
      ("0025011-ses1-run1", "NYU_2", "T1w"), ("0025011-ses1-run2", "NYU_2", "T1w"),
      ("0025012-ses2", "NYU_2", "T1w")]
  assert volumes.find_volumes(bids) == ("corr", recs)


def test_find_folder_and_empty(tmp_path):
  root = str(tmp_path)
  for rel in ("b/2.nii.gz", "a.nii", "b/1.nii.gz", ".hidden/x.nii.gz"):
    _touch(os.path.join(root, rel))
  recs = volumes.find_folder(root)
  assert [r["id"] for r in recs] == ["a", "b/1", "b/2"]
  assert volumes.find_volumes(root)[0] == "folder"
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(fileio.InputError, match=re.escape(str(empty)) + ".*no NIfTI"):
    volumes.find_volumes(str(empty))
  with pytest.raises(fileio.InputError, match=re.escape(str(empty)) + ".*'ixi'"):
    volumes.find_volumes(str(empty), "ixi")
  with pytest.raises(fileio.InputError, match="folder not found"):
    volumes.find_volumes(str(tmp_path / "nope"))
  with pytest.raises(fileio.InputError, match="unknown volume layout"):
    volumes.find_volumes(root, "adni")


def test_bad_volumes_name_the_file(tmp_path):
  garbage = tmp_path / "garbage.nii.gz"
  garbage.write_bytes(os.urandom(300))
  with pytest.raises(fileio.InputError, match=re.escape(str(garbage)) + ".*not a readable"):
    volumes.VolumeSliceSource([{"path": str(garbage)}])

  nan = _noise_volume()
  nan[2, 3, :] = np.nan
  nan_path = _save(str(tmp_path / "nan.nii.gz"), nan)
  src = volumes.VolumeSliceSource([{"path": nan_path}], SIZE, (0.5, 0.5))
  with pytest.raises(fileio.InputError, match=re.escape(nan_path) + ".*slice 5.*non-finite"):
    images.load_all(src, progress=False)

  flat_path = _save(str(tmp_path / "flat.nii.gz"), np.full((8, 8, 8), 3, np.uint8))
  src = volumes.VolumeSliceSource([{"path": flat_path}], SIZE, (0.5, 0.5))
  with pytest.raises(fileio.InputError, match=re.escape(flat_path) + ".*constant"):
    src[0]

  four = _save(str(tmp_path / "four.nii.gz"), np.zeros((6, 6, 6, 2), np.float32))
  with pytest.raises(fileio.InputError, match=re.escape(four) + ".*3-D"):
    volumes.VolumeSliceSource([{"path": four}])
  single = _save(str(tmp_path / "single.nii.gz"), _noise_volume()[..., None])
  assert volumes.VolumeSliceSource([{"path": single}], SIZE, (0.5, 0.5))[0].shape == SIZE

  # A valid header followed by truncated data: fails when the data is read.
  whole = _save(str(tmp_path / "whole.nii"), _noise_volume((40, 40, 40)))
  truncated = str(tmp_path / "truncated.nii.gz")
  with open(whole, "rb") as f, gzip.open(truncated, "wb") as g:
    g.write(f.read()[:5000])
  src = volumes.VolumeSliceSource([{"path": truncated}], SIZE, (0.5, 0.5))
  with pytest.raises(fileio.InputError, match=re.escape(truncated)):
    src[0]

  with pytest.raises(fileio.InputError, match="duplicated key 'x'"):
    volumes.VolumeSliceSource([{"path": single, "id": "x"}, {"path": nan_path, "id": "x"}])
  with pytest.raises(fileio.InputError, match="no volumes"):
    volumes.VolumeSliceSource([])
