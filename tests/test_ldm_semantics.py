"""The reference's LDM semantics as options, and what they rest on: intensity scaling,
symmetric latent padding (against MONAI's DivisiblePad), subject-level validation splits,
validation losses and best checkpoints for both trainers, EMA weights, text conditioning,
mixed precision, and a latent cache keyed on what it depends on.

Tiny networks on small demo slices (conftest.py gives 4 fake CPU devices).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepssim_jax import fileio
from ldm_jax import (common, diffusion, generate, input_pipeline, train_autoencoder,
                     train_diffusion)
from test_ldm_train import ae_config, close_trees, dm_config, one_device

HEADS = 4  # the demo set of test_ldm_train's DEMO: 4 heads x 2 slices


# ----------------------------------------------------------------------------- pure parts


def test_symmetric_padding_equals_monai_divisible_pad():
  monai_transforms = pytest.importorskip("monai.transforms")
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  for h, w in ((34, 28), (33, 27), (36, 28), (5, 9)):
    x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    ours, hw = diffusion.pad_to_multiple(x, 4, "symmetric")
    pad = monai_transforms.DivisiblePad(k=4)  # its default method: symmetric
    theirs = np.stack([pad(torch.from_numpy(np.moveaxis(xi, -1, 0))).numpy() for xi in x])
    np.testing.assert_array_equal(np.asarray(ours), np.moveaxis(theirs, 1, -1))
    # the inverse (MONAI's DivisiblePad.inverse: the centre crop) gives the latent back
    np.testing.assert_array_equal(np.asarray(diffusion.crop_to(ours, hw, "symmetric")), x)
    end, _ = diffusion.pad_to_multiple(x, 4, "end")
    np.testing.assert_array_equal(np.asarray(diffusion.crop_to(end, hw, "end")), x)
  padded, _ = diffusion.pad_to_multiple(np.ones((1, 34, 28, 1)), 4, "symmetric")
  assert float(padded[0, 0].sum()) == 0 and float(padded[0, -1].sum()) == 0  # one row each
  with pytest.raises(ValueError, match="latent padding"):
    diffusion.pad_to_multiple(x, 4, "centre")


def test_minmax_intensity_equals_monai_scale_intensity_of_the_raw_slice():
  monai_transforms = pytest.importorskip("monai.transforms")
  rng = np.random.default_rng(1)
  raw = rng.gamma(2.0, 300.0, size=(3, 20, 16)).astype(np.float32)  # scanner units
  z = (raw - raw.mean((1, 2), keepdims=True)) / raw.std((1, 2), keepdims=True)
  ours = input_pipeline.scale_intensity(z, "minmax")
  theirs = np.stack([np.asarray(monai_transforms.ScaleIntensity(minv=0.0, maxv=1.0)(r[None]))[0]
                     for r in raw])
  np.testing.assert_allclose(ours, theirs, atol=2e-6)
  assert ours.min() == 0 and ours.max() == 1
  np.testing.assert_array_equal(input_pipeline.scale_intensity(z, "zscore"), z)
  with pytest.raises(ValueError, match="data.intensity"):
    input_pipeline.scale_intensity(z, "percentile")


def test_valid_subjects_hold_out_whole_heads_stably():
  keys = [f"head{h}/z{z:03d}" for h in range(10) for z in range(5)]
  held = input_pipeline.valid_subjects(keys, 0.2, seed=3)
  assert len(held) == 2 and held <= {f"head{h}" for h in range(10)}
  # stable under reordering and under adding other subjects' records
  assert input_pipeline.valid_subjects(keys[::-1], 0.2, seed=3) == held
  assert input_pipeline.valid_subjects(keys, 0.2, seed=4) != held or len(held) == 10
  assert input_pipeline.valid_subjects(keys, 0.0, seed=3) == set()
  assert input_pipeline.valid_subjects(["a/z1", "a/z2"], 0.5, seed=0) == set()  # one subject
  with pytest.raises(ValueError, match="valid_fraction"):
    input_pipeline.valid_subjects(keys, 1.0, seed=0)


def _text_files(tmp_path, keys, dim=8, bad=None):
  rows = []
  for i, k in enumerate(keys):
    name = f"cap{i}.npz"
    arr = np.linspace(-1, 1, dim, dtype=np.float32) * (i + 1)
    if bad == "key" and i == 1:
      np.savez(tmp_path / name, emb=arr)
    elif bad == "size" and i == 1:
      np.savez(tmp_path / name, data=arr[:-1])
    elif bad == "nan" and i == 1:
      np.savez(tmp_path / name, data=np.full(dim, np.nan, np.float32))
    else:
      np.savez(tmp_path / name, data=arr[None])  # (1, D), as a saved embedding may be
    rows.append([k, name])
  path = str(tmp_path / "captions.csv")
  fileio.write_csv(path, ["key", "caption_emb_path"], rows[:-1] if bad == "row" else rows)
  return path


def test_text_embeddings_read_as_one_context_token_and_bad_files_are_named(tmp_path):
  keys = ["a/z1", "a/z2", "b/z1"]
  path = _text_files(tmp_path, keys)
  ctx = input_pipeline.read_text_embeddings(path, keys)
  assert ctx.shape == (3, 1, 8) and ctx.dtype == np.float32
  np.testing.assert_allclose(ctx[2, 0], np.linspace(-1, 1, 8) * 3, rtol=1e-6)
  for bad, msg in (("key", "no array 'data'"), ("size", "7 values"), ("nan", "non-finite"),
                   ("row", "no row for training image 'b/z1'")):
    d = tmp_path / bad
    d.mkdir()
    with pytest.raises(fileio.InputError, match=msg):
      input_pipeline.read_text_embeddings(_text_files(d, keys, bad=bad), keys)
  (tmp_path / "cap0.npz").write_bytes(b"not an archive")
  with pytest.raises(fileio.InputError, match="cap0.npz"):
    input_pipeline.read_text_embeddings(path, keys)


def test_ema_update_and_mixed_precision_step():
  config = dm_config(cond="none")
  config.train.ema_decay = 0.9
  model = train_diffusion.make_unet(config, 1)
  x0 = np.random.default_rng(0).normal(size=(4, 16, 16, 1)).astype(np.float32)
  batch = {"mu": x0, "sigma": np.zeros_like(x0)}
  state = train_diffusion.create_state(config, model, x0.shape[1:], jax.random.key(0))
  close_trees(state.ema_params, state.params, atol=0)
  p0 = jax.device_get(state.params)
  fn = train_diffusion.make_train_step(config, train_diffusion.make_schedule(config))
  state, m = fn(state, batch, jax.random.key(1))
  expected = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, p0, jax.device_get(state.params))
  close_trees(state.ema_params, expected, atol=1e-7)
  assert train_diffusion.weights_of(config)(state) is state.ema_params

  # bfloat16 compute: same loss to bfloat16 precision, float32 weights and loss
  # (the float32 step from the same initial state and key is the one above: m)
  config.train.mixed_precision = True
  bf = train_diffusion.make_unet(config, 1)
  assert bf.dtype == jnp.bfloat16
  s16 = train_diffusion.create_state(config, bf, x0.shape[1:], jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
  m32 = m
  _, m16 = fn(s16, batch, jax.random.key(1))
  assert m16["loss"].dtype == jnp.float32
  np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=0.05)


# ----------------------------------------------------------------------------- runs


def _logged(wd, key):
  t = fileio.read_csv(os.path.join(wd, "metrics.csv"))
  return [(int(s), float(v)) for s, v in zip(t["step"], t.get(key, [])) if v != ""]


def test_autoencoder_validation_and_best_checkpoint(tmp_path):
  config = ae_config()
  config.data.valid_fraction = 0.25            # one of the four heads
  config.train.valid_every_steps = 2
  # one checkpoint, one log row, no reconstruction grids: what this test reads
  config.train.update(checkpoint_every_steps=4, log_every_steps=4, sample_every_steps=0)
  wd = str(tmp_path / "ae")
  train_records = input_pipeline.load_records(config, wd)
  valid_records = input_pipeline.load_records(config, wd, "valid")
  subjects = lambda r: {input_pipeline.subject_of(k) for k in r["keys"]}
  assert len(subjects(valid_records)) == 1 and not subjects(valid_records) & subjects(
      train_records)
  assert 0.0 <= train_records["images"].min() and train_records["images"].max() <= 1.0
  out = train_autoencoder.train_and_evaluate(config, wd)
  logged = _logged(wd, "valid_loss")
  assert [s for s, _ in logged] == [2, 4]
  best_step, best = min(logged, key=lambda r: r[1])
  _, params, _, data = train_autoencoder.load_autoencoder(wd, one_device(), "best")
  assert data["step"] == best_step and data["valid_loss"] == pytest.approx(best)
  # the validation loss of the restored best weights is the logged one
  fn = train_autoencoder.make_valid_fn(config, valid_records["images"], one_device())
  state = {"g": out["state"]["g"].replace(params=params)}
  assert fn(state) == pytest.approx(best, rel=1e-5)
  _, latest, _, data = train_autoencoder.load_autoencoder(wd, one_device(), "latest")
  assert data["step"] == 4
  close_trees(latest, out["state"]["g"].params, atol=0)
  shutil.rmtree(os.path.join(wd, "best"))  # as a run without a validation split
  with pytest.raises(fileio.InputError, match="no best-validation"):
    train_autoencoder.load_autoencoder(wd, one_device(), "best")


def test_diffusion_validation_ema_best_and_generation_from_best(tmp_path):
  config = dm_config(cond="covariates")
  config.data.valid_fraction = 0.25
  config.train.valid_every_steps = 2
  config.train.ema_decay = 0.5
  config.generate.checkpoint = "best"
  # one checkpoint, one log row, no sample grid (generation below samples)
  config.train.update(checkpoint_every_steps=4, log_every_steps=4, sample_every_steps=0)
  wd = str(tmp_path / "dm")
  out = train_diffusion.train(config, wd)
  logged = _logged(wd, "valid_loss")
  assert [s for s, _ in logged] == [2, 4]
  run = train_diffusion.prepare(config, wd, one_device())
  assert len(run["valid"]["keys"]) == 2 and run["latents"]["valid_mu"].shape[0] == 2
  weights, step = train_diffusion.load_unet(wd, config, run, one_device(), "best")
  best_step, best = min(logged, key=lambda r: r[1])
  assert step == best_step
  fn = train_diffusion.make_valid_fn(config, run, one_device())
  assert fn(out["state"].replace(ema_params=weights)) == pytest.approx(best, rel=1e-5)
  latest, _ = train_diffusion.load_unet(wd, config, run, one_device(), "latest")
  close_trees(latest, out["state"].ema_params, atol=0)  # the EMA, not the raw weights
  res = generate.generate(config, wd, out_dir=str(tmp_path / "gen"))
  assert res["record"]["checkpoint_kind"] == "best" and res["record"]["ema"]
  assert res["record"]["checkpoint"] == common.params_fingerprint(weights)
  assert len(res["written"]) == 6  # training records only

  # switching EMA off in this workdir is refused before anything is written
  config.train.ema_decay = 0.0
  before = open(os.path.join(wd, "config.json")).read()
  with pytest.raises(fileio.InputError, match="EMA"):
    train_diffusion.train(config, wd)
  assert open(os.path.join(wd, "config.json")).read() == before


def test_text_conditioned_diffusion_trains_and_generates(tmp_path):
  config = dm_config(cond="text")
  config.train.num_steps = 2
  config.train.sample_every_steps = 0  # no sample grid: generation below samples
  config.generate.num_samples = 1
  keys = input_pipeline.load_records(config, str(tmp_path / "dm"))["keys"]
  config.data.text_csv = _text_files(tmp_path, keys, dim=12)
  out = train_diffusion.train(config, str(tmp_path / "dm"))
  assert out["step"] == 2
  # the cross-attention context has the embedding's width
  k = [p for p in jax.tree_util.tree_flatten_with_path(out["state"].params)[0]
       if "attn2" in jax.tree_util.keystr(p[0]) and "to_k" in jax.tree_util.keystr(p[0])]
  assert k and all(v.shape[0] == 12 for _, v in k)
  res = generate.generate(config, str(tmp_path / "dm"), out_dir=str(tmp_path / "gen"))
  assert len(res["written"]) == len(keys)
  config.data.text_csv = ""
  with pytest.raises(fileio.InputError, match="text_csv"):
    train_diffusion.contexts(config, {"keys": keys}, str(tmp_path))


def test_latent_cache_rebuilds_when_the_autoencoder_or_settings_change(tmp_path):
  ae = ae_config()
  ae.train.num_steps = 2
  ae.train.sample_every_steps = 0  # no reconstruction grids: not what this test reads
  ae_wd = str(tmp_path / "ae")
  train_autoencoder.train_and_evaluate(ae, ae_wd)
  config = dm_config(cond="none")
  config.data.image_size = ae.data.image_size
  config.autoencoder.kind = "kl"
  config.autoencoder.workdir = ae_wd
  config.train.num_steps = 2
  config.train.sample_every_steps = 0
  wd = str(tmp_path / "dm")
  train_diffusion.train(config, wd)
  path = os.path.join(wd, "latents.npz")

  def cached():
    with np.load(path) as z:
      return z["mu"].copy(), json.loads(str(z["key"]))

  mu1, key1 = cached()
  assert mu1.shape[1:] == (8, 8, 3) and key1["pad_mode"] == "symmetric"
  assert key1["scale_factor"] == 1.0 and not key1["sample"]

  # the same autoencoder workdir trained further: other weights, same path. This run's
  # checkpoints were trained on the old latents: refused, the cache left as it was.
  ae.train.num_steps = 4
  train_autoencoder.train_and_evaluate(ae, ae_wd)
  with pytest.raises(fileio.InputError, match="out of date.*first_stage"):
    train_diffusion.train(config, wd)
  np.testing.assert_array_equal(cached()[0], mu1)

  # a fresh workdir holding that stale cache, and a new scale factor: rebuilt
  config.latent.scale_factor = 2.0
  wd2 = str(tmp_path / "dm2")
  os.makedirs(wd2)
  with open(path, "rb") as src, open(os.path.join(wd2, "latents.npz"), "wb") as dst:
    dst.write(src.read())
  train_diffusion.train(config, wd2)
  with np.load(os.path.join(wd2, "latents.npz")) as z:
    mu2, key2 = z["mu"], json.loads(str(z["key"]))
  assert "step4" in key2["first_stage"] and key2["scale_factor"] == 2.0
  stage = train_diffusion.first_stage(config, one_device())
  records = input_pipeline.load_records(config, wd2)
  mu, _ = train_diffusion.encode_all(stage, records["images"], 8, one_device())
  np.testing.assert_allclose(mu2, 2.0 * np.asarray(diffusion.pad_to_multiple(
      mu, 4, "symmetric")[0]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(mu2, 2.0 * mu1)
