"""ldm_jax trainers and generation: steps lower their losses, 4 devices equal 1, duplication,
covariates, perceptual terms, resumption of training and of generation, the CLI's checks.

Tiny networks on 32 x 32 demo slices (conftest.py gives 4 fake CPU devices).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from deepssim_jax import fileio, parallel
from deepssim_jax.data import demo_sets
from ldm_jax import (common, config_lib, generate, input_pipeline, perceptual,
                     train_autoencoder, train_diffusion)

SIZE = (32, 32)     # autoencoder tests (its patch discriminator needs >= 32)
DM_SIZE = (16, 16)  # diffusion tests (pixel space)
DEMO = dict(slices_per_head=2, num_copies=1, num_neighbours=1, num_other=1,
            heldout_per_head=0)


def ae_config():
  c = config_lib.autoencoder_config()
  c.data.image_size = SIZE
  c.data.train.part = "real"
  c.data.demo.update(DEMO)
  c.model.name = "AutoencoderKL_tiny"
  c.disc.name = "PatchDiscriminator_tiny"
  c.optim.learning_rate = 1e-3
  c.optim.d_learning_rate = 1e-3
  c.train.batch_size = 4
  c.train.effective_batch_size = 8
  c.train.num_epochs = 0
  c.train.num_steps = 4
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 2
  c.train.sample_every_steps = 2
  return c


def dm_config(cond="covariates"):
  c = config_lib.diffusion_config()
  c.data = ae_config().data
  c.data.image_size = DM_SIZE
  c.autoencoder.kind = "identity"
  c.model.name = "DiffusionModelUNet_tiny"
  c.cond.kind = cond
  c.duplication.mode = "low"
  c.optim.learning_rate = 1e-3
  c.train.batch_size = 4
  c.train.num_epochs = 0
  c.train.num_steps = 4
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 2
  c.train.sample_every_steps = 4
  c.train.num_grid_samples = 8  # = generate.batch_size: one compiled sampler
  c.sample.num_inference_steps = 4
  c.generate.num_samples = 2
  c.generate.batch_size = 8
  return c


@pytest.fixture(scope="module")
def images():
  return demo_sets(size=SIZE, seed=0, **DEMO)["training"]["images"]


def one_device():
  return parallel.make_mesh(jax.devices()[:1])


def close_trees(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


# ----------------------------------------------------------------------------- pure parts


def test_duplication_counts_follow_ranges(tmp_path):
  ranges = dict(config_lib.diffusion_config().duplication.ranges)
  for mode, (lo, hi) in (("none", (1, 1)), ("low", (1, 4)), ("high", (1, 14))):
    k = input_pipeline.duplication_counts(2000, mode, ranges, seed=3)
    assert k.min() == lo and k.max() == hi  # every value of the range is drawn
    assert set(np.unique(k)) == set(range(lo, hi + 1))
    np.testing.assert_array_equal(k, input_pipeline.duplication_counts(2000, mode, ranges, 3))
    assert len(input_pipeline.expand(k)) == k.sum()
  assert not np.array_equal(input_pipeline.duplication_counts(50, "high", ranges, 0),
                            input_pipeline.duplication_counts(50, "high", ranges, 1))
  with pytest.raises(ValueError, match="duplication"):
    input_pipeline.duplication_counts(5, "extreme", ranges, 0)
  path = str(tmp_path / "dup.csv")
  input_pipeline.write_duplication_csv(path, ["a/z1", "b/z2"], np.array([3, 1]))
  t = fileio.read_csv(path, required=("key", "uid", "count"))
  assert t["uid"] == ["a-z1", "b-z2"] and t["count"] == ["3", "1"]


def test_batch_indices_are_a_seeded_stream():
  a = np.concatenate([common.batch_indices(10, 4, 7, s) for s in range(5)])
  perm0 = np.random.default_rng((7, 0)).permutation(10)
  np.testing.assert_array_equal(a[:10], perm0)  # epoch 0 is one permutation
  assert sorted(a[10:20]) == list(range(10))
  np.testing.assert_array_equal(common.batch_indices(3, 8, 1, 2),
                                common.batch_indices(3, 8, 1, 2))


def test_covariates_synthetic_csv_roundtrip(tmp_path, images):
  keys = [f"head{i % 2}/z{i:03d}" for i in range(len(images))]
  cov = input_pipeline.synthetic_covariates(keys, images, seed=0)
  again = input_pipeline.synthetic_covariates(keys, images, seed=0)
  for c in input_pipeline.COVARIATES:
    np.testing.assert_array_equal(cov[c], again[c])
  assert np.all(cov["age"][0::2] == cov["age"][0])  # one age per head
  fr = cov["csf"] + cov["wm"] + cov["gm"]
  np.testing.assert_allclose(fr, 1.0, atol=1e-9)
  path = str(tmp_path / "cov.csv")
  input_pipeline.write_covariates_csv(path, keys, cov)
  got = input_pipeline.read_covariates(path, keys[::-1])
  np.testing.assert_allclose(got[-1], [cov[c][0] for c in input_pipeline.COVARIATES],
                             rtol=1e-6)
  fileio.write_csv(path, ["key", *input_pipeline.COVARIATES], [["a", 40, "F", "T2", .2, .5, .3]])
  np.testing.assert_allclose(input_pipeline.read_covariates(path, ["a"])[0],
                             [40, 1, 1, .2, .5, .3], rtol=1e-6)
  with pytest.raises(fileio.InputError, match="no row"):
    input_pipeline.read_covariates(path, ["b"])


def test_perceptual_terms(tmp_path, images):
  """The autoencoder's perceptual term, as the loss computes it and as the trainer adds it.

  The terms: 0 on identical batches, strictly growing with the amplitude of one noise
  pattern, finite gradients; LPIPS-squeeze is symmetric and the batch mean of the network's
  distances under the .npz's weights (a random trunk and random heads; parity with the
  lpips package is tests/test_perceptual.py's). The trainer: a step's `perceptual` metric is
  LPIPS-squeeze of (its reconstruction, the images), computed here from those weights, and
  loss_g adds it times loss.perceptual_weight; each image's validation loss is l1_weight L1
  + perceptual_weight (1 - SSIM(reconstruction, image), the image's data range) + kl_weight
  KL. Missing weights are refused.
  """
  x = jnp.asarray(images[:4, ..., None], jnp.float32)
  rng = np.random.default_rng(0)
  noise = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  net = perceptual.LPIPSSqueeze()
  params = dict(jax.jit(net.init)(jax.random.key(0), x, x)["params"])
  for k in [k for k in params if k.startswith("lin")]:  # init's heads are ones
    params[k] = {"kernel": jnp.asarray(rng.uniform(0.2, 2.0, params[k]["kernel"].shape),
                                       jnp.float32)}
  path = str(tmp_path / "lpips_squeeze.npz")
  perceptual.save_weights(path, params)
  dist = jax.jit(lambda a, b: net.apply({"params": params}, a, b))  # (B,) distances
  lpips_fn = jax.jit(perceptual.make("lpips_squeeze", weights=path))
  ssim_fn = jax.jit(perceptual.make("ssim"))
  for fn in (lpips_fn, ssim_fn):
    assert abs(float(fn(x, x))) < 1e-5
    grow = [float(fn(x + s * noise, x)) for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert grow[0] > 1e-4 and np.all(np.diff(grow) > 0), grow
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda a: fn(a, x))(x + 0.1 * noise))))
  y = x + 0.1 * noise
  np.testing.assert_allclose(float(lpips_fn(y, x)), np.mean(np.asarray(dist(y, x))), rtol=1e-5)
  np.testing.assert_allclose(float(lpips_fn(x, y)), float(lpips_fn(y, x)), rtol=1e-5)

  # One training step with LPIPS-squeeze, weighted 0.37 (not the default 0.1, not 1).
  config = ae_config()
  config.loss.perceptual = "lpips_squeeze"
  config.loss.perceptual_kwargs.weights = path
  config.loss.perceptual_weight = 0.37
  state = train_autoencoder.create_state(config, jax.random.key(0))
  g_params = jax.device_get(state["g"].params)  # the step donates the state
  _, m = train_autoencoder.make_train_step(config)(state, {"image": x}, jax.random.key(1))
  m = jax.device_get(m)
  ae = train_autoencoder.make_autoencoder(config.model)
  # The step's reparameterised reconstruction: its rng folded with step 0.
  recon = ae.apply({"params": g_params}, x, jax.random.fold_in(jax.random.key(1), 0))[0]
  want = float(np.mean(np.asarray(dist(recon, x))))
  assert want > 1e-3
  np.testing.assert_allclose(m["l1"], np.mean(np.abs(np.asarray(recon - x))), rtol=1e-5)
  np.testing.assert_allclose(m["perceptual"], want, rtol=1e-5)
  w = config.loss
  np.testing.assert_allclose(m["loss_g"], w.l1_weight * m["l1"] + 0.37 * want
                             + w.kl_weight * m["kl"] + m["adv_weight"] * m["adv_g"], rtol=1e-5)

  # The validation loss with the default term, SSIM, whose data range is the target's: the
  # order of (reconstruction, image) matters. A stand-in autoencoder whose reconstructions
  # resemble the images with a smaller range (an untrained one gives 1 - SSIM ~ 1 either way).
  def fake_ae(variables, a):
    z_mu = a[:, ::4, ::4]
    return 0.6 * a + 0.1 + 0.05 * variables["params"]["n"], z_mu, 0.5 + 0.2 * z_mu

  w = ae_config().loss
  w.perceptual_weight = 0.37
  fake = {"n": noise[:1]}
  got = jax.jit(lambda p, a: train_autoencoder.valid_losses(
      p, a, apply_fn=fake_ae, loss=w, perceptual_fn=ssim_fn))(fake, x)
  for i in range(len(x)):
    xi = x[i:i + 1]
    r, mu, sigma = fake_ae({"params": fake}, xi)
    ssim_term, swapped = float(ssim_fn(r, xi)), float(ssim_fn(xi, r))
    assert abs(ssim_term - swapped) > 1e-3, (ssim_term, swapped)
    var = np.square(np.asarray(sigma, np.float64))
    kl = 0.5 * np.sum(np.square(np.asarray(mu, np.float64)) + var - np.log(var) - 1.0)
    np.testing.assert_allclose(got[i], w.l1_weight * np.mean(np.abs(np.asarray(r - xi)))
                               + 0.37 * ssim_term + w.kl_weight * kl, rtol=1e-5)
  with pytest.raises(fileio.InputError, match="not found"):
    perceptual.make("lpips_squeeze", weights=str(tmp_path / "missing.npz"))


# ----------------------------------------------------------------------------- steps


def _ae_run(config, batch, mesh, steps):
  """Metrics of every step, and the first step's accumulated gradients and BN statistics."""
  state = parallel.replicate(train_autoencoder.create_state(config, jax.random.key(0)), mesh)
  fn = train_autoencoder.make_train_step(config)
  rows, first = [], None
  for _ in range(steps):
    state, m = fn(state, parallel.shard_batch(batch, mesh), jax.random.key(1))
    rows.append(jax.device_get(m))
    if first is None:  # fetched now: the next step donates these buffers
      first = jax.device_get({"g": state["g"].opt_state.acc_grads,
                              "d": state["d"].opt_state.acc_grads,
                              "stats": state["d"].batch_stats})
  return state, rows, first


def test_autoencoder_step_lowers_loss_and_4_devices_equal_1(images):
  config = ae_config()  # 4 images per step, 8 per update (optax.MultiSteps)
  batch = {"image": images[:4, ..., None]}
  s4, rows4, first4 = _ae_run(config, batch, parallel.make_mesh(), 12)
  _, rows1, first1 = _ae_run(config, batch, one_device(), 1)
  assert rows4[-1]["l1"] < 0.85 * rows4[0]["l1"]
  assert rows4[-1]["loss_g"] < rows4[0]["loss_g"]
  assert int(s4["g"].step) == 12
  for k in ("loss_g", "l1", "kl", "loss_d", "grad_norm_g", "grad_norm_d"):
    np.testing.assert_allclose(rows4[0][k], rows1[0][k], rtol=1e-4, atol=1e-6)
  # the accumulated gradients (MultiSteps, before its first update) and the BatchNorm
  # statistics of the global batch: equal on 4 devices and on 1
  close_trees(first4, first1, atol=1e-6)


def test_diffusion_step_lowers_loss_and_4_devices_equal_1(images):
  config = dm_config()
  model = train_diffusion.make_unet(config, 1)
  sched = train_diffusion.make_schedule(config)
  x0 = images[:4].reshape(4, 16, 2, 16, 2).mean((2, 4))[..., None]  # 16 x 16
  ctx = np.tile(np.linspace(0, 1, 6, dtype=np.float32), (4, 1, 1))
  ctx[:, 0, 0] = np.arange(4) / 4
  batch = {"mu": x0, "sigma": np.zeros_like(x0), "context": ctx}

  def run(mesh, steps, measure):
    fn = train_diffusion.make_train_step(config, sched)
    b = parallel.shard_batch(batch, mesh)

    def at_step0(s):  # a copy of the state with step 0 (an int32 array: one compiled step)
      return parallel.replicate(jax.device_get(s).replace(step=np.int32(0)), mesh)

    def loss_at_step0(s):  # the loss at step 0's timesteps and noise (a throwaway update)
      return float(fn(at_step0(s), b, jax.random.key(1))[1]["loss"])

    state = at_step0(train_diffusion.create_state(config, model, x0.shape[1:],
                                                  jax.random.key(0)))
    before = loss_at_step0(state) if measure else None
    rows = []
    for _ in range(steps):
      state, m = fn(state, b, jax.random.key(1))
      rows.append(jax.device_get(m))
    return rows, before, loss_at_step0(state) if measure else None

  rows4, before, after = run(parallel.make_mesh(), 20, measure=True)
  rows1, _, _ = run(one_device(), 20, measure=False)
  assert after < 0.7 * before
  # Same trajectory: losses and gradient norms at every step. (Parameters are not compared
  # elementwise: Adam's first steps move even parameters whose gradient is rounding noise,
  # e.g. conv biases before GroupNorm, by +-lr whatever the noise's sign.)
  for k in ("loss", "grad_norm"):
    np.testing.assert_allclose([r[k] for r in rows4], [r[k] for r in rows1], rtol=2e-4)


# ----------------------------------------------------------------------------- runs


def test_autoencoder_run_resumes_after_interruption(tmp_path):
  config = ae_config()
  # The uninterrupted reference run: only its final state is read, so it checkpoints, logs
  # and writes reconstructions once, at the end (none of that changes the trained state).
  ref = ae_config()
  ref.train.update(checkpoint_every_steps=4, log_every_steps=4, sample_every_steps=0)
  full = train_autoencoder.train_and_evaluate(ref, str(tmp_path / "full"))
  assert full["step"] == 4
  config.train.sample_every_steps = 4  # the killed run makes none; the resumed one at step 4
  wd = str(tmp_path / "killed")
  part = train_autoencoder.train_and_evaluate(config, wd, stop_after=3)  # ckpt at step 2
  assert part["step"] == 3
  resumed = train_autoencoder.train_and_evaluate(config, wd)
  assert resumed["step"] == 4
  close_trees(resumed["state"]["g"].params, full["state"]["g"].params, atol=1e-6)
  close_trees(resumed["state"]["d"].params, full["state"]["d"].params, atol=1e-6)
  for name in ("loss.png", "metrics.csv", "config.json", "samples/recon-000004.png"):
    assert os.path.isfile(os.path.join(wd, name)), name
  steps = fileio.read_csv(os.path.join(wd, "metrics.csv"))["step"]
  assert steps == ["2", "4"]
  # the trained autoencoder loads for the diffusion stage
  model, params, cfg, data = train_autoencoder.load_autoencoder(wd, one_device())
  assert data["step"] == 4 and cfg.model.name == "AutoencoderKL_tiny"
  z_mu, _ = model.apply({"params": params}, jnp.zeros((1, *SIZE, 1)), method="encode")
  assert z_mu.shape == (1, SIZE[0] // 4, SIZE[1] // 4, 3)


def test_diffusion_run_resumes_and_generation_layout_resumes(tmp_path):
  config = dm_config()
  # The uninterrupted reference run: only its final state and counts are read, so it
  # checkpoints and logs once and draws no sample grid (none of that changes the state).
  ref = dm_config()
  ref.train.update(checkpoint_every_steps=4, log_every_steps=4, sample_every_steps=0)
  full = train_diffusion.train(ref, str(tmp_path / "full"))
  wd = str(tmp_path / "run")
  part = train_diffusion.train(config, wd, stop_after=3)
  assert part["step"] == 3
  resumed = train_diffusion.train(config, wd)
  assert resumed["step"] == 4
  close_trees(resumed["state"].params, full["state"].params, atol=1e-6)
  dup = fileio.read_csv(os.path.join(wd, "duplication.csv"), required=("key", "uid", "count"))
  counts = np.asarray(dup["count"], int)
  assert len(counts) == 8 and counts.min() >= 1 and counts.max() <= 4
  np.testing.assert_array_equal(counts, full["counts"])
  cov = fileio.read_csv(os.path.join(wd, "covariates.csv"), required=input_pipeline.COVARIATES)
  assert len(cov["key"]) == 8
  for name in ("loss.png", "samples/samples-000004.png", "latents.npz"):
    assert os.path.isfile(os.path.join(wd, name)), name

  # generation: 8 records x 2 samples in batches of 8; killed after one batch
  out = str(tmp_path / "generated")
  first = generate.generate(config, wd, out_dir=out, stop_after=1)
  assert len(first["written"]) == 4 and first["skipped"] == 0
  done = {u: os.path.getmtime(os.path.join(out, u, "gen-1.png")) for u in first["written"]}
  second = generate.generate(config, wd, out_dir=out)
  assert second["skipped"] == 4 and len(second["written"]) == 4
  uids = sorted(os.listdir(out))
  assert len(uids) == 8
  for u in uids:
    assert sorted(os.listdir(os.path.join(out, u))) == ["gen-0.png", "gen-1.png",
                                                        "training.png"]
    with Image.open(os.path.join(out, u, "gen-0.png")) as im:
      assert im.mode == "L" and im.size == (DM_SIZE[1], DM_SIZE[0])
      px = np.asarray(im)
      assert px.min() == 0 and px.max() == 255  # min-max scaled
  for u, t in done.items():  # complete uids were skipped, not rewritten
    assert os.path.getmtime(os.path.join(out, u, "gen-1.png")) == t


def test_main_stops_with_download_instructions():
  import importlib.util  # pylint: disable=g-import-not-at-top
  from ldm_jax import main  # pylint: disable=g-import-not-at-top
  root = os.path.join(os.path.dirname(__file__), "..", "configs")
  for name in ("ldm_ixi_autoencoder", "ldm_ixi_diffusion"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    with pytest.raises(SystemExit, match="brain-development.org"):
      main.check_data(config)
  for name in ("ldm_demo_autoencoder", "ldm_demo_diffusion"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    main.check_data(mod.get_config())  # embedded data: nothing to download
