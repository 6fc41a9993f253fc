"""Tests for deepssim_jax.data.demo: the embedded demo sets and their PNG layout."""

import collections
import re

import numpy as np
import pytest
from skimage.metrics import structural_similarity
from skimage.transform import rotate

from deepssim_jax import fileio
from deepssim_jax.data import demo
from deepssim_jax.data import images
from deepssim_jax.data import volumes

SIZE = (136, 112)
SMALL = dict(slices_per_head=3, num_copies=4, num_neighbours=3, num_other=2,
             heldout_per_head=1)


@pytest.fixture(scope="module")
def sets():
  return demo.demo_sets(SIZE, seed=0)


def _ssim(a, b):
  return structural_similarity(a, b, data_range=float(a.max() - a.min()))


def test_counts_shapes_keys(sets):
  training, synthetic, heldout = sets["training"], sets["synthetic"], sets["heldout"]
  assert training["images"].shape == (48,) + SIZE
  assert synthetic["images"].shape == (24 + 24 + 8,) + SIZE
  assert heldout["images"].shape == (16,) + SIZE
  for bank in (training, synthetic, heldout):
    assert bank["images"].dtype == np.float32
    assert len(set(bank["keys"])) == len(bank["keys"])
    for col in bank["meta"].values():
      assert len(col) == len(bank["keys"])
    np.testing.assert_allclose(bank["images"].mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(bank["images"].std(axis=(1, 2)), 1, atol=1e-5)
  assert collections.Counter(training["meta"]["subject"]) == {
      h: 12 for h, _, _ in demo.TRAIN_HEADS}
  assert all(re.fullmatch(r"[a-z0-9]+/z\d{3}", k) for k in training["keys"])
  assert not set(heldout["keys"]) & set(training["keys"])


def test_labels_and_sources_consistent(sets):
  train_keys = set(sets["training"]["keys"])
  meta = sets["synthetic"]["meta"]
  assert collections.Counter(meta["kind"]) == {"copy": 24, "neighbour": 24, "other": 8}
  for kind, label, src, subject in zip(meta["kind"], meta["label"], meta["source_key"],
                                       meta["subject"]):
    assert label == demo.LABELS[kind]
    if kind == "other":
      assert src == "" and subject == demo.OTHER_HEAD[0]
    else:
      assert src in train_keys and src.split("/")[0] == subject
  # The synthetic set is shuffled: kinds are interleaved, not in blocks.
  assert len(set(meta["kind"][:24])) > 1


def test_neighbours_are_new_slices_near_their_source(sets):
  meta = sets["synthetic"]["meta"]
  train_keys = set(sets["training"]["keys"])
  seen = set()
  for kind, src, subject, k, off in zip(meta["kind"], meta["source_key"], meta["subject"],
                                        meta["slice"], meta["offset_mm"]):
    if kind != "neighbour":
      continue
    key = volumes.slice_key(subject, k)
    assert key not in train_keys and key not in seen
    seen.add(key)
    assert 2.0 <= off <= 4.0
  assert len(seen) == 24
  heldout = set(sets["heldout"]["keys"])
  assert not heldout & seen


def test_ground_truth_is_sensible_by_ssim(sets):
  training, synthetic = sets["training"], sets["synthetic"]
  index = {k: i for i, k in enumerate(training["keys"])}
  meta = synthetic["meta"]
  neighbour, other = [], []
  for x, kind, src, how in zip(synthetic["images"], meta["kind"], meta["source_key"],
                               meta["augment"]):
    if kind == "neighbour":
      neighbour.append(_ssim(training["images"][index[src]], x))
    elif kind == "other":
      other.append(max(_ssim(t, x) for t in training["images"]))
    elif how == "none":
      np.testing.assert_allclose(x, training["images"][index[src]], atol=1e-5)
  # Neighbours resemble their source far more than the unseen head resembles anything.
  assert np.median(neighbour) > 0.7 and min(neighbour) > max(other)
  assert max(other) < 0.6


def test_extra_planes_add_training_images_only():
  planes = (("coronal", 0.3, 0.65), ("sagittal", 0.25, 0.75))
  base = demo.demo_sets(SIZE, seed=3, **SMALL)
  more = demo.demo_sets(SIZE, seed=3, extra_planes=planes, extra_slices_per_head=2, **SMALL)
  n_axial = len(base["training"]["keys"])
  t = more["training"]
  # The axial training slices come first and are unchanged; then 2 per plane and head.
  np.testing.assert_array_equal(t["keys"][:n_axial], base["training"]["keys"])
  np.testing.assert_array_equal(t["images"][:n_axial], base["training"]["images"])
  assert collections.Counter(t["meta"]["plane"]) == {"axial": n_axial, "coronal": 8,
                                                    "sagittal": 8}
  extra = t["keys"][n_axial:]
  assert all(re.fullmatch(r"[a-z0-9]+/[xy]\d{3}", k) for k in extra)
  # Each extra image is that plane's slice of its head, in the plane's band.
  i = n_axial + 1  # the first head's second coronal slice
  head = str(t["meta"]["subject"][i])
  path = f"{demo.MRI_DIR}/{head}-T1.nii.gz"
  vol, zooms = volumes.load_canonical(path)
  k = int(t["meta"]["slice"][i])
  assert t["keys"][i] == volumes.slice_key(head, k, "coronal")
  assert k == volumes.band_slices(vol.shape[1], (0.3, 0.65), 2)[1]
  np.testing.assert_array_equal(t["images"][i], volumes.slice_image(
      vol, zooms, k, SIZE, None, path, "coronal"))
  # Copies, neighbours, other-head and held-out images are exactly those without them.
  for name in ("synthetic", "heldout"):
    np.testing.assert_array_equal(more[name]["images"], base[name]["images"])
    for col, values in base[name]["meta"].items():
      np.testing.assert_array_equal(more[name]["meta"][col], values)
  with pytest.raises(ValueError, match="extra_planes: the axial slices"):
    demo.demo_sets(SIZE, extra_planes=(("axial", 0.1, 0.2),), **SMALL)


def test_copies_are_augmented_sources():
  s = demo.demo_sets(SIZE, seed=1, num_copies=6, p_flip=0.5, p_rotate=1.0, p_gamma=1.0,
                     **{k: v for k, v in SMALL.items() if k != "num_copies"})
  training, synthetic = s["training"], s["synthetic"]
  index = {k: i for i, k in enumerate(training["keys"])}
  meta = synthetic["meta"]
  copies = 0
  for x, kind, src, how, angle, gamma in zip(synthetic["images"], meta["kind"],
                                             meta["source_key"], meta["augment"],
                                             meta["angle"], meta["gamma"]):
    if kind != "copy":
      continue
    copies += 1
    assert 0 < abs(angle) <= 0.17 and 0.5 <= gamma <= 1.5
    t = training["images"][index[src]].astype(np.float64)
    ref = ((t - t.min()) / (t.max() - t.min())) ** gamma
    for axis in (0, 1):
      if f"flip{axis}" in how:
        ref = np.flip(ref, axis)
    ref = rotate(ref, np.rad2deg(angle), order=1, mode="edge")  # independent rotation
    np.testing.assert_allclose(x, images.zscore(ref), atol=1e-4)
  assert copies == 6


def test_counts_are_arguments_and_seeded():
  a = demo.demo_sets(SIZE, seed=3, **SMALL)
  assert len(a["training"]["keys"]) == 3 * 4
  assert collections.Counter(a["synthetic"]["meta"]["kind"]) == {
      "copy": 4, "neighbour": 3, "other": 2}
  assert len(a["heldout"]["keys"]) == 4
  b = demo.demo_sets(SIZE, seed=3, **SMALL)
  np.testing.assert_array_equal(a["synthetic"]["images"], b["synthetic"]["images"])
  c = demo.demo_sets(SIZE, seed=4, **SMALL)
  assert list(c["synthetic"]["meta"]["source_key"]) != list(
      a["synthetic"]["meta"]["source_key"])
  small = demo.demo_sets((64, 48), seed=3, **dict(SMALL, heldout_per_head=0))
  assert small["training"]["images"].shape == (12, 64, 48) and small["heldout"] is None
  with pytest.raises(ValueError, match="slices_per_head=500"):
    demo.demo_sets(SIZE, **dict(SMALL, slices_per_head=500))


def test_more_images_than_distinct_slices_are_augmented_repeats():
  # The other head's band holds 11 slices; 12 training slices per head leave a limited pool
  # of neighbours. Beyond them: augmented repeats (p_flip=1: never an exact duplicate).
  s = demo.demo_sets(SIZE, seed=5, slices_per_head=12, num_copies=1, num_neighbours=150,
                     num_other=15, heldout_per_head=0, p_flip=1.0)
  meta = s["synthetic"]["meta"]
  assert collections.Counter(meta["kind"]) == {"copy": 1, "neighbour": 150, "other": 15}
  for kind in ("neighbour", "other"):
    rows = [(str(su), int(k), str(a)) for su, k, a, kd in zip(
        meta["subject"], meta["slice"], meta["augment"], meta["kind"]) if kd == kind]
    plain = [(su, k) for su, k, a in rows if a == "none"]
    repeats = [(su, k) for su, k, a in rows if a != "none"]
    assert len(set(plain)) == len(plain) and repeats
    assert set(repeats) <= set(plain)
    assert all("flip0" in a and "flip1" in a for _, _, a in rows if a != "none")
  assert sum(1 for a, kd in zip(meta["augment"], meta["kind"])
             if kd == "other" and a == "none") == 11
  assert set(meta["label"][meta["kind"] == "neighbour"]) == {2}


def test_write_demo_layout_round_trip(tmp_path):
  root = str(tmp_path / "layout")
  out = demo.write_demo_layout(root, size=SIZE, seed=2, **SMALL)
  sets = out["sets"]
  assert out["num_training"] == 12 and out["num_generated"] == 9
  training, generated = images.find_reference_layout(root, SIZE)
  assert len(training) == 12 and len(generated) == 9
  assert sorted(training.keys) == sorted(
      f"{demo.layout_uid(k)}/training" for k in sets["training"]["keys"])
  labels = fileio.read_csv(out["labels"], ("real_key", "synth_key", "label"))
  assert sorted(labels["synth_key"]) == sorted(generated.keys)
  for real, synth in zip(labels["real_key"], labels["synth_key"]):
    assert real.split("/")[0] == synth.split("/")[0]
  # Images come back as written, up to 8-bit quantisation.
  bank = images.load_all(generated, progress=False)
  demo_index = {k: i for i, k in enumerate(sets["synthetic"]["keys"])}
  for synth, demo_key, label, kind in zip(labels["synth_key"], labels["demo_key"],
                                          labels["label"], labels["kind"]):
    x = sets["synthetic"]["images"][demo_index[demo_key]]
    got = bank["images"][generated.keys.index(synth)]
    step = float(x.max() - x.min()) / 255
    assert np.abs(got - x).max() <= 0.6 * step + 1e-3
    assert int(label) == demo.LABELS[kind]
  with pytest.raises(fileio.InputError, match=re.escape(root) + ".*empty"):
    demo.write_demo_layout(root, **SMALL)
