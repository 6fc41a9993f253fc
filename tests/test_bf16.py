"""bfloat16 compute: DeepSSIM training and embedding (config.model.dtype) and the LDM's DDIM
sampling (train.mixed_precision) against float32 from the same weights and inputs.

Parameters, optimizer state, the loss and embeddings stay float32; the gaps to float32 are
bounded by tolerances set at 3-5x the gaps measured on CPU (XLA:CPU, 4 fake devices), each
noted where it is set. conftest.py gives 4 fake CPU devices.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepssim_jax import api, config_lib, embed, fileio, jobs, models, store, train, validate
from deepssim_jax.data import demo, write_png
from ldm_jax import diffusion, generate, train_diffusion
from test_ldm_train import dm_config
from test_train import SIZE, _step_fn, smooth_images, tiny_config

# |loss_bf16 - loss_f32| of one train step of the tiny paper-head model from the same
# params, batch and key: measured 7.8e-4 (loss 0.247).
LOSS_TOL = 3e-3
# max |cos_bf16 - cos_f32| over all pairs of 27 real and demo-copied slices, built-in
# model: measured 3.2e-3 (cosines spanning 0.01 .. 1).
COSINE_TOL = 1.2e-2
# max |z_bf16 - z_f32| / max |z_f32| after 4 DDIM steps of the tiny UNet (perturbed
# weights, so that its zero-initialised output layer predicts noise): measured 4.2e-3.
DDIM_TOL = 2e-2


def _is_f32(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype,
                                                                jnp.floating)]
  return bool(leaves) and all(jnp.asarray(x).dtype == jnp.float32 for x in leaves)


def test_train_step_bf16_close_to_f32_with_float32_state():
  real = smooth_images(12, 0)
  synth = smooth_images(12, 1)
  rng = np.random.default_rng(0)
  ia, ib = rng.integers(0, 12, 8), rng.integers(0, 12, 8)
  target = rng.uniform(0, 1, 8).astype(np.float32)
  batch = {"image_a": real[ia], "image_b": synth[ib], "ssim": target}
  out = {}
  for dt in ("float32", "bfloat16"):
    config = tiny_config()
    config.model.dtype = dt  # the paper's head (wacv): mean pool + BatchNorm projection
    state = train.create_train_state(config, jax.random.key(0), SIZE, 100)
    assert state.apply_fn.__self__.backbone.dtype == models.COMPUTE_DTYPES[dt]
    new, m = _step_fn(config)(state, batch, jax.random.key(1))
    assert _is_f32(new.params) and _is_f32(new.opt_state) and _is_f32(new.batch_stats)
    assert m["loss"].dtype == jnp.float32 and np.isfinite(float(m["loss"]))
    out[dt] = (state, new, float(m["loss"]))
  (s32, n32, l32), (s16, n16, l16) = out["float32"], out["bfloat16"]
  for a, b in zip(jax.tree.leaves(s32.params), jax.tree.leaves(s16.params)):
    np.testing.assert_array_equal(a, b)  # the dtype never changes the initial weights
  assert l16 != l32  # bfloat16 did compute (a dtype lost on the way gives equal losses)
  assert abs(l16 - l32) <= LOSS_TOL, (l16, l32)
  # the BatchNorm running statistics are float32 and close (its input is pooled in float32)
  for a, b in zip(jax.tree.leaves(n32.batch_stats), jax.tree.leaves(n16.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05)


def test_bf16_embeddings_of_real_slices_unit_float32_and_close():
  m32 = api.load("builtin")
  m16 = dataclasses.replace(m32, model=models.with_dtype(m32.model, "bfloat16"))
  assert embed.compute_dtype(m16.model) == "bfloat16"
  assert embed.compute_dtype(m32.model) == "float32"
  sets = demo.demo_sets(size=m32.image_size, slices_per_head=3, num_copies=6,
                        num_neighbours=6, num_other=3)
  x = np.concatenate([sets["training"]["images"], sets["synthetic"]["images"]])
  e32, e16 = m32.embed(x), m16.embed(x)
  assert e16.dtype == np.float32 == e32.dtype and e16.shape == e32.shape
  np.testing.assert_allclose(np.linalg.norm(e16, axis=1), 1.0, atol=1e-5)
  # the module's own output is float32 too, not only embed_array's host copy
  raw = m16.model.apply(m16.variables, jnp.asarray(x[:2]), train=False)
  assert raw.dtype == jnp.float32
  c32, c16 = e32 @ e32.T, e16 @ e16.T
  assert c32.max() - c32.min() > 0.5  # the pairs span a range of cosines
  assert not np.array_equal(e16, e32)  # bfloat16 did compute
  assert np.abs(c16 - c32).max() <= COSINE_TOL, np.abs(c16 - c32).max()


def test_ddim_sampling_bf16_close_to_f32():
  config = dm_config(cond="none")
  m32 = train_diffusion.make_unet(config, 1)
  config.train.mixed_precision = True
  m16 = train_diffusion.make_unet(config, 1)
  assert m16.dtype == jnp.bfloat16 and m32.dtype == jnp.float32
  shape = (2, *config.data.image_size, 1)
  params = jax.jit(m32.init)(jax.random.key(0), jnp.zeros(shape),
                             jnp.zeros((2,), jnp.int32))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(9), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  schedule = train_diffusion.make_schedule(config)
  x_T = jax.random.normal(jax.random.key(3), shape)
  z = {}
  for name, model in (("f32", m32), ("bf16", m16)):
    z[name] = np.asarray(diffusion.ddim_sample(
        train_diffusion.make_apply(model), params, schedule, shape, jax.random.key(5),
        num_inference_steps=4, x_T=x_T))
    assert z[name].dtype == np.float32 and np.isfinite(z[name]).all()
  gap = np.abs(z["bf16"] - z["f32"]).max() / np.abs(z["f32"]).max()
  assert 0 < gap <= DDIM_TOL, gap


def test_generation_record_names_bf16_compute():
  config = dm_config(cond="none")
  run = {"records": {"images": np.zeros((2, 4, 4), np.float32), "keys": ["a/z1", "b/z1"]},
         "stage": {"fingerprint": "stage"}, "latents": {"scale": 1.0}}
  rec32 = generate.generation_record(config, run, 4, "weights")
  assert "compute_dtype" not in rec32  # float32 records stay as they were before the field
  config.train.mixed_precision = True
  rec16 = generate.generation_record(config, run, 4, "weights")
  # bfloat16 samples are not continued in float32, nor the other way round
  assert generate.generation_changes(rec32, rec16) == ["compute_dtype: '<unset>' -> 'bfloat16'"]
  assert generate.generation_changes(rec16, rec32) == ["compute_dtype: 'bfloat16' -> '<unset>'"]


def test_unknown_compute_dtype_is_refused_by_name():
  config = tiny_config()
  config.model.dtype = "float16"
  want = r"config.model.dtype must be one of \['float32', 'bfloat16'\], got 'float16'"
  with pytest.raises(validate.ConfigError, match=want):
    validate.check_deepssim(config, "train")
  with pytest.raises(validate.ConfigError, match=want):
    train.model_from_config(config)
  with pytest.raises(ValueError, match="compute dtype 'float16'"):
    models.make_model("convnext_atto", dtype="float16")
  # the legacy form (model.overrides.dtype) still works, and may not contradict the field
  config.model.dtype = "float32"
  config.model.overrides.dtype = "bfloat16"
  assert train.model_dtype(config) == "bfloat16"
  assert train.model_from_config(config).backbone.dtype == jnp.bfloat16
  config.model.dtype = "bfloat16"
  config.model.overrides.dtype = "float32"
  with pytest.raises(validate.ConfigError, match="disagree"):
    train.model_from_config(config)
  validate.check_deepssim(tiny_config(), "train")  # the default passes


def test_run_begun_with_legacy_overrides_dtype_resumes_with_the_field(tmp_path):
  wd = tmp_path / "run"
  (wd / "checkpoints" / "latest" / "10").mkdir(parents=True)  # a workdir with checkpoints
  legacy = tiny_config()
  del legacy.model["dtype"]  # a config.json written before the field existed (ixi_pp)
  legacy.model.overrides.dtype = "bfloat16"
  (wd / "config.json").write_text(legacy.to_json_best_effort())
  config = tiny_config()
  config.model.dtype = "bfloat16"  # configs/ixi_pp.py now
  train.check_model_unchanged(str(wd), config)  # the same compute dtype: resumes
  with pytest.raises(fileio.InputError, match="model.dtype: 'bfloat16' -> 'float32'"):
    train.check_model_unchanged(str(wd), tiny_config())
  saved = json.loads((wd / "config.json").read_text())
  assert saved["model"]["overrides"]["dtype"] == "bfloat16"  # untouched


def test_embed_store_records_compute_dtype(tmp_path):
  folder = tmp_path / "pngs"
  for i, img in enumerate(smooth_images(6, 3)):
    write_png(str(folder / f"img{i}.png"), img)
  config = tiny_config()
  config.data.real = config_lib.source_config("pngs", str(folder))
  config.embed.sets = ("real",)
  model = train.model_from_config(config)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *SIZE)), train=False))(
      jax.random.key(0))
  ck = {"model": model, "variables": variables, "step": 0, "which": "best",
        "run": str(tmp_path), "fingerprint": jobs.weights_fingerprint(variables)}
  ck16 = {**ck, "model": models.with_dtype(model, "bfloat16")}
  config.embed.dir = str(tmp_path / "a")
  r = jobs.embed_job(config, str(tmp_path), ck=ck)["real"]
  fp32 = store.read_index(r["folder"])["meta"]["fingerprint"]
  # float32 adds nothing to the hash: stores written before it was recorded still match
  keys = np.asarray(r["ids"], dtype=str)
  assert fp32 == fileio.fingerprint(ck["fingerprint"], os.path.abspath(str(folder)), keys,
                                    tuple(config.data.image_size), "float32")
  with pytest.raises(fileio.InputError, match="compute_dtype 'float32' -> 'bfloat16'"):
    jobs.embed_job(config, str(tmp_path), ck=ck16)
  config.embed.dir = str(tmp_path / "b")
  r16 = jobs.embed_job(config, str(tmp_path), ck=ck16)["real"]
  assert store.read_index(r16["folder"])["meta"]["fingerprint"] != fp32
  with pytest.raises(fileio.InputError, match="compute_dtype 'bfloat16' -> 'float32'"):
    jobs.embed_job(config, str(tmp_path), ck=ck)
  assert jobs.embed_job(config, str(tmp_path), ck=ck16)["real"]["written"] == 0  # reused
  _, e16 = store.load_store(r16["folder"], source_ids=r16["ids"])
  assert e16.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(e16, axis=1), 1.0, atol=1e-5)
