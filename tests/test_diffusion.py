"""Tests of ldm_jax.diffusion against numpy closed forms (MONAI's formulas in float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion, unet

T, B0, B1 = 1000, 0.0015, 0.0205


def _abar_numpy(num_steps=T, b0=B0, b1=B1):
  return np.cumprod(1 - np.linspace(np.sqrt(b0), np.sqrt(b1), num_steps) ** 2)


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _oracle(schedule, x0):
  """An apply_fn that predicts the exact noise of x_t around the known clean x0."""
  def apply_fn(params, x_t, t, context):
    del params, context
    a = schedule.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    s = schedule.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return (x_t - a * x0) / s
  return apply_fn


def test_scaled_linear_schedule_matches_closed_form():
  s = diffusion.make_schedule(T, B0, B1, "scaled_linear")
  abar = _abar_numpy()
  got = np.asarray(s.alphas_cumprod)
  assert s.num_steps == T and got.dtype == np.float32
  np.testing.assert_allclose(got, abar, atol=1e-6, rtol=0)
  assert np.all(np.diff(got) < 0)
  assert np.all((got > 0) & (got < 1))
  np.testing.assert_allclose(float(s.betas[0]), B0, rtol=1e-6)
  np.testing.assert_allclose(float(s.betas[-1]), B1, rtol=1e-6)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  betas = 1 - abar / abar_prev
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod_prev), abar_prev, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.sqrt_alphas_cumprod), np.sqrt(abar), atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.sqrt_one_minus_alphas_cumprod), np.sqrt(1 - abar),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.posterior_variance),
                             betas * (1 - abar_prev) / (1 - abar), rtol=1e-4, atol=1e-9)
  assert float(s.posterior_variance[0]) == 0.0


def test_linear_and_cosine_kinds():
  lin = diffusion.make_schedule(100, 1e-4, 2e-2, "linear")
  np.testing.assert_allclose(np.asarray(lin.betas), np.linspace(1e-4, 2e-2, 100), rtol=1e-6)
  cos = diffusion.make_schedule(100, kind="cosine", cosine_s=0.008)
  f = np.cos((np.arange(101) / 100 + 0.008) / 1.008 * np.pi / 2) ** 2
  abar = np.asarray(cos.alphas_cumprod)
  # Uncapped steps follow alpha-bar(t) = f(t + 1) / f(0) (the last step's beta is capped).
  np.testing.assert_allclose(abar[:-1], (f[1:] / f[0])[:-1], atol=1e-6)
  assert np.all(np.diff(abar) < 0) and float(cos.betas.max()) <= 0.999 + 1e-6
  np.testing.assert_allclose(abar, np.cumprod(np.asarray(cos.alphas, np.float64)), rtol=1e-5)
  with pytest.raises(ValueError, match="unknown kind"):
    diffusion.make_schedule(kind="sigmoid")
  with pytest.raises(ValueError, match=r"\(0, 1\)"):
    diffusion.make_schedule(10, 0.0, 0.5, "linear")


def test_q_sample_closed_form():
  s = diffusion.make_schedule()
  abar = _abar_numpy()
  x0, noise = _normal(0, (3, 6, 5, 2)), _normal(1, (3, 6, 5, 2))
  got0 = np.asarray(diffusion.q_sample(s, x0, jnp.zeros(3, jnp.int32), noise))
  np.testing.assert_allclose(got0, x0 * np.sqrt(abar[0]) + noise * np.sqrt(1 - abar[0]),
                             atol=1e-6)
  assert np.abs(got0 - x0).max() < 0.2  # t = 0 is nearly clean
  t = np.array([5, 499, 999])
  got = np.asarray(jax.jit(diffusion.q_sample)(s, x0, t, noise))
  want = (np.sqrt(abar[t])[:, None, None, None] * x0
          + np.sqrt(1 - abar[t])[:, None, None, None] * noise)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_ddim_timesteps():
  ts = diffusion.ddim_timesteps(1000, 50)
  assert ts.shape == (50,) and ts[0] == 980 and ts[-1] == 0
  assert np.all(np.diff(ts) == -20)
  np.testing.assert_array_equal(diffusion.ddim_timesteps(10, 3, steps_offset=1), [7, 4, 1])
  with pytest.raises(ValueError, match="num_inference_steps"):
    diffusion.ddim_timesteps(10, 11)
  with pytest.raises(ValueError, match="steps_offset"):
    diffusion.ddim_timesteps(10, 5, steps_offset=2)


def test_ddim_step_eta0_is_deterministic_and_exact_with_true_noise():
  s = diffusion.make_schedule()
  x0, noise = _normal(2, (2, 4, 4, 3)), _normal(3, (2, 4, 4, 3))
  t, prev = jnp.array([500, 300]), jnp.array([480, 280])
  x_t = diffusion.q_sample(s, x0, t, noise)
  step = jax.jit(diffusion.ddim_step)
  x_prev, pred_x0 = step(s, noise, t, prev, x_t)
  again, _ = step(s, noise, t, prev, x_t)
  np.testing.assert_array_equal(np.asarray(x_prev), np.asarray(again))
  np.testing.assert_allclose(np.asarray(pred_x0), x0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(x_prev),
                             np.asarray(diffusion.q_sample(s, x0, prev, noise)), atol=1e-5)
  # Past step 0 alpha-bar_prev is 1 (MONAI's set_alpha_to_one): the step returns pred x0.
  x_last, _ = diffusion.ddim_step(s, noise, t, t - 520, x_t)
  np.testing.assert_allclose(np.asarray(x_last), x0, atol=1e-5)


def test_ddim_step_eta_adds_monai_variance():
  s = diffusion.make_schedule()
  abar = _abar_numpy()
  shape = (2, 64, 64, 4)
  x_t, eps = _normal(4, shape), _normal(5, shape)
  t, prev = 600, 580
  x_prev, _ = diffusion.ddim_step(s, eps, t, prev, x_t, eta=1.0, rng=jax.random.key(0))
  # MONAI's DDIMScheduler.step in float64.
  sigma = np.sqrt((1 - abar[prev]) / (1 - abar[t]) * (1 - abar[t] / abar[prev]))
  x0 = (x_t - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
  det = np.sqrt(abar[prev]) * x0 + np.sqrt(1 - abar[prev] - sigma ** 2) * eps
  z = (np.asarray(x_prev, np.float64) - det) / sigma
  assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
  with pytest.raises(ValueError, match="rng"):
    diffusion.ddim_step(s, eps, t, prev, x_t, eta=0.5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sample_with_oracle_returns_x0(eta):
  s = diffusion.make_schedule()
  x0 = jnp.asarray(_normal(6, (2, 8, 6, 3)))
  out = diffusion.ddim_sample(_oracle(s, x0), None, s, (2, 8, 6, 3), jax.random.key(1),
                              num_inference_steps=50, eta=eta)
  assert out.shape == (2, 8, 6, 3)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-4)


def test_ddim_sample_passes_context_and_timesteps():
  s = diffusion.make_schedule(100)
  seen = []

  def apply_fn(params, x_t, t, context):
    assert t.shape == (x_t.shape[0],) and t.dtype == jnp.int32
    seen.append(context.shape)
    return params * x_t + context.sum()

  out = diffusion.ddim_sample(apply_fn, jnp.float32(0.1), s, (3, 4, 4, 1), jax.random.key(2),
                              num_inference_steps=5, context=jnp.ones((3, 1, 6)))
  assert seen == [(3, 1, 6)]  # traced once: the loop is one scan
  assert out.shape == (3, 4, 4, 1) and np.isfinite(np.asarray(out)).all()


def test_ddim_sample_matches_monai_loop_in_numpy():
  """The scan equals MONAI's Python sampling loop (step from t to t - T // n) in float64."""
  s = diffusion.make_schedule()
  abar = _abar_numpy()
  x_T = _normal(12, (2, 5, 4, 3))
  model = lambda x_t, t, xp: 0.3 * x_t + xp.sin(t / 100.0)  # any smooth non-oracle model
  apply_fn = lambda p, x_t, t, c: model(x_t, t.reshape(-1, 1, 1, 1).astype(jnp.float32), jnp)
  got = diffusion.ddim_sample(apply_fn, None, s, (2, 5, 4, 3), jax.random.key(0),
                              num_inference_steps=10, x_T=jnp.asarray(x_T))
  x = x_T.astype(np.float64)
  for t in range(900, -1, -100):
    eps = model(x, t, np)
    a_prev = abar[t - 100] if t - 100 >= 0 else 1.0
    x0 = (x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
    x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
  np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="x_T"):
    diffusion.ddim_sample(apply_fn, None, s, (2, 5, 4, 3), jax.random.key(0),
                          num_inference_steps=10, x_T=jnp.zeros((1, 5, 4, 3)))


def test_ddpm_step_matches_monai_posterior():
  s = diffusion.make_schedule()
  abar = _abar_numpy()
  betas = np.linspace(np.sqrt(B0), np.sqrt(B1), T) ** 2
  shape = (2, 64, 64, 4)
  x_t, eps = _normal(7, shape), _normal(8, shape)
  t = 400
  step = jax.jit(diffusion.ddpm_step)
  a = np.asarray(step(s, eps, t, x_t, jax.random.key(0)))
  np.testing.assert_array_equal(a, np.asarray(step(s, eps, t, x_t, jax.random.key(0))))
  assert np.abs(a - np.asarray(step(s, eps, t, x_t, jax.random.key(1)))).max() > 1e-3
  # MONAI's DDPMScheduler.step (fixed_small, no clipping) in float64.
  x0 = (x_t - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
  mean = (np.sqrt(abar[t - 1]) * betas[t] / (1 - abar[t]) * x0
          + np.sqrt(1 - betas[t]) * (1 - abar[t - 1]) / (1 - abar[t]) * x_t)
  std = np.sqrt((1 - abar[t - 1]) / (1 - abar[t]) * betas[t])
  z = (a - mean) / std
  assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
  # At t = 0 there is no noise and the true noise gives back x0.
  x0_true = _normal(9, (2, 4, 4, 3))
  x_0 = diffusion.q_sample(s, x0_true, 0, eps[:, :4, :4, :3])
  out = diffusion.ddpm_step(s, eps[:, :4, :4, :3], jnp.zeros(2, jnp.int32), x_0,
                            jax.random.key(3))
  np.testing.assert_allclose(np.asarray(out), x0_true, atol=1e-5)


def test_ddpm_loss_oracle_beats_zero_model_and_has_gradients():
  s = diffusion.make_schedule()
  x0 = jnp.asarray(_normal(10, (4, 8, 8, 3)))
  ctx = jnp.ones((4, 1, 6))
  oracle = _oracle(s, x0)

  def zero(params, x_t, t, context):
    assert context is ctx and t.shape == (4,)
    return jnp.zeros_like(x_t)

  rng = jax.random.key(4)
  l_oracle = float(diffusion.ddpm_loss(oracle, None, s, x0, rng))
  l_zero = float(diffusion.ddpm_loss(zero, None, s, x0, rng, context=ctx))
  assert np.isfinite(l_oracle) and np.isfinite(l_zero)
  assert l_oracle < 1e-6 and 0.7 < l_zero < 1.3  # E[noise^2] = 1
  # A one-parameter model: the gradient matches the closed form d/dw mean((w x_t - n)^2).
  lin = lambda w, x_t, t, c: w * x_t
  loss, grad = jax.value_and_grad(diffusion.ddpm_loss, argnums=1)(lin, 0.5, s, x0, rng)
  assert np.isfinite(float(loss)) and np.isfinite(float(grad)) and float(grad) != 0.0
  assert float(diffusion.ddpm_loss(lin, 0.5, s, x0, jax.random.key(5))) != float(loss)


def test_pad_and_crop_round_trip():
  x = _normal(11, (2, 34, 28, 3))
  padded, hw = diffusion.pad_to_multiple(x, 4)
  assert padded.shape == (2, 36, 28, 3) and hw == (34, 28)
  assert np.all(np.asarray(padded)[:, 34:] == 0)
  np.testing.assert_array_equal(np.asarray(diffusion.crop_to(padded, hw)), x)
  p8, _ = diffusion.pad_to_multiple(x, 8)
  assert p8.shape == (2, 40, 32, 3) and np.all(np.asarray(p8)[:, :, 28:] == 0)
  with pytest.raises(ValueError, match="multiple"):
    diffusion.pad_to_multiple(x, 0)
  with pytest.raises(ValueError, match="crop"):
    diffusion.crop_to(x, (40, 28))


def test_ddim_sample_with_tiny_unet():
  model = unet.DiffusionModelUNet_tiny(channels=(16, 32), attention_levels=(False, True),
                                       num_head_channels=(0, 16))
  x = jnp.zeros((2, 8, 8, 3))
  t = jnp.zeros((2,), jnp.int32)
  # Random parameters from the abstract shapes: compiling model.init would cost ~14 s here.
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, t)
  rng = np.random.default_rng(14)
  params = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
                        abstract)
  apply_fn = lambda p, x_t, t, c: model.apply(p, x_t, t)
  s = diffusion.make_schedule()
  x_T = jnp.asarray(_normal(13, (2, 8, 8, 3)))
  out = diffusion.ddim_sample(apply_fn, params, s, (2, 8, 8, 3), jax.random.key(1),
                              num_inference_steps=3, x_T=x_T)
  assert out.shape == (2, 8, 8, 3) and np.isfinite(np.asarray(out)).all()
  assert np.abs(np.asarray(out) - np.asarray(x_T)).max() > 1e-3
