"""Tests of ldm_jax's networks against MONAI's architecture and independent numpy formulas.

Parameter counts of the reference-size networks come from jax.eval_shape (nothing is
allocated); forward passes use the tiny variants with random parameters drawn in numpy, so
only the forward pass is compiled. Where a real initialisation or a random draw is needed the
key is an "rbg" key: XLA compiles threefry's normal/uniform sampling several times slower on
CPU.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import autoencoder, blocks, discriminator, unet

# MONAI 1.6 with the reference's settings (counted in PyTorch).
AE_PARAMS = 3_129_960
DISC_PARAMS = 693_665
UNET_PARAMS = 183_981_059


def _key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl="rbg")


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _random_like(abstract, seed: int, scale: float = 0.1):
  """Random float32 arrays with the shapes of an abstract parameter tree."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), jnp.float32),
                      abstract)


def test_reference_parameter_counts_equal_monai():
  key = jax.random.key(0)
  ae = jax.eval_shape(autoencoder.AutoencoderKL_ref().init, key, jnp.zeros((1, 136, 112, 1)))
  disc = jax.eval_shape(discriminator.PatchDiscriminator_ref().init, key,
                        jnp.zeros((1, 136, 112, 1)))
  net = jax.eval_shape(unet.DiffusionModelUNet_ref().init, key, jnp.zeros((1, 36, 28, 3)),
                       jnp.zeros((1,)))
  assert _count(ae["params"]) == AE_PARAMS
  assert _count(disc["params"]) == DISC_PARAMS
  assert set(disc["batch_stats"]) == {"layer_0", "layer_1", "layer_2"}
  assert _count(net["params"]) == UNET_PARAMS


def test_conditioned_unet_count_matches_monai_layer_list():
  # With conditioning MONAI swaps each SpatialAttentionBlock (GroupNorm, biased q/k/v, out_proj)
  # for a SpatialTransformer (GroupNorm, 1x1 proj_in/proj_out, 3 LayerNorms, unbiased self- and
  # cross-attention q/k/v + biased out_proj, GEGLU feed-forward C -> 8C -> C).
  d = 6
  sa = lambda c: 2 * c + 4 * (c * c + c)
  st = lambda c: (2 * c + 2 * (c * c + c) + 3 * 2 * c + (3 * c * c + c * c + c)
                  + (c * c + 2 * d * c + c * c + c) + (c * 8 * c + 8 * c + 4 * c * c + c))
  # Attention blocks: level 2 (512): 2 down + 3 up; level 3 (768): 2 down + 1 middle + 3 up.
  expected = UNET_PARAMS + 5 * (st(512) - sa(512)) + 6 * (st(768) - sa(768))
  net = unet.DiffusionModelUNet_ref(with_conditioning=True, cross_attention_dim=d)
  shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 36, 28, 3)),
                          jnp.zeros((1,)), jnp.zeros((1, 1, d)))
  assert _count(shapes["params"]) == expected


@pytest.mark.parametrize("dim", [8, 7])
def test_timestep_embedding_closed_form(dim):
  t = np.array([0.0, 1.0, 17.0, 999.0, 250.5])
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
  want = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  if dim % 2:
    want = np.concatenate([want, np.zeros((len(t), 1))], axis=1)
  got = unet.get_timestep_embedding(jnp.asarray(t), dim)
  assert got.shape == (len(t), dim)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)
  with pytest.raises(ValueError, match="1-d"):
    unet.get_timestep_embedding(jnp.zeros((2, 1)), dim)


def test_multi_head_attention_matches_numpy():
  b, t, s, c, heads, cc = 2, 5, 3, 8, 2, 4
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, t, c)).astype(np.float32)
  ctx = rng.standard_normal((b, s, cc)).astype(np.float32)
  mod = blocks.MultiHeadAttention(num_heads=heads, qkv_bias=True)
  params = _random_like(jax.eval_shape(mod.init, jax.random.key(0), x, ctx), 1, 0.5)
  got = np.asarray(mod.apply(params, x, ctx))
  p = jax.tree.map(np.asarray, params["params"])
  lin = lambda h, n: h @ p[n]["kernel"] + p[n]["bias"]
  d = c // heads
  split = lambda h: h.reshape(b, -1, heads, d).transpose(0, 2, 1, 3)  # heads outer, as MONAI
  q, k, v = split(lin(x, "to_q")), split(lin(ctx, "to_k")), split(lin(ctx, "to_v"))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = (w @ v).transpose(0, 2, 1, 3).reshape(b, t, c)
  np.testing.assert_allclose(got, lin(out, "out_proj"), rtol=1e-4, atol=1e-5)


def test_geglu_feed_forward_uses_exact_gelu_on_the_second_half():
  x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
  mod = unet.FeedForward(mlp_dim=6)
  params = _random_like(jax.eval_shape(mod.init, jax.random.key(0), x), 2, 1.0)
  p = jax.tree.map(np.asarray, params["params"])
  h = x @ p["linear1"]["kernel"] + p["linear1"]["bias"]
  value, gate = h[:, :6], h[:, 6:]
  gelu = gate * 0.5 * (1 + np.vectorize(math.erf)(gate / np.sqrt(2)))
  want = (value * gelu) @ p["linear2"]["kernel"] + p["linear2"]["bias"]
  np.testing.assert_allclose(np.asarray(mod.apply(params, x)), want, rtol=1e-5, atol=1e-5)


def test_autoencoder_downsample_pads_at_the_end_only():
  x = np.random.default_rng(0).standard_normal((1, 6, 5, 2)).astype(np.float32)
  mod = autoencoder.AEKLDownsample()
  params = _random_like(jax.eval_shape(mod.init, jax.random.key(0), x), 3, 1.0)
  k = np.asarray(params["params"]["conv"]["kernel"])
  bias = np.asarray(params["params"]["conv"]["bias"])
  xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # MONAI AsymmetricPad: (0, 1) per axis
  oh, ow = (xp.shape[1] - 3) // 2 + 1, (xp.shape[2] - 3) // 2 + 1
  want = np.zeros((1, oh, ow, 2), np.float32)
  for i in range(oh):
    for j in range(ow):
      patch = xp[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
      want[0, i, j] = np.einsum("hwc,hwco->o", patch, k) + bias
  got = np.asarray(mod.apply(params, x))
  assert got.shape == (1, 3, 2, 2)  # 6 x 5 -> 3 x 2, as torch
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_autoencoder_shapes_at_reference_resolution():
  model = autoencoder.AutoencoderKL_ref()
  x = jax.ShapeDtypeStruct((2, 136, 112, 1), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  recon, mu, sigma = jax.eval_shape(model.apply, params, x, jax.random.key(1))
  assert mu.shape == sigma.shape == (2, 34, 28, 3)
  assert recon.shape == (2, 136, 112, 1)
  z = jax.ShapeDtypeStruct((2, 34, 28, 3), jnp.float32)
  assert jax.eval_shape(lambda p, z: model.apply(p, z, method=model.decode), params,
                        z).shape == (2, 136, 112, 1)


def test_autoencoder_reparameterisation_and_sigma_clip():
  # Two levels and a small image: the same code path as the reference's, compiled quickly.
  model = autoencoder.AutoencoderKL_tiny(channels=(8, 16), attention_levels=(False, False))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 12, 1)), jnp.float32)
  params = _random_like(jax.eval_shape(model.init, jax.random.key(0), x), 4, 0.1)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  forward = jax.jit(lambda p, x, k: model.apply(p, x, k))
  decode = jax.jit(lambda p, z: model.apply(p, z, method=model.decode))

  recon1, mu, sigma = forward(params, x, k1)
  assert mu.shape == (2, 8, 6, 3) and recon1.shape == x.shape
  np.testing.assert_array_equal(np.asarray(forward(params, x, k1)[0]), np.asarray(recon1))
  assert float(jnp.abs(forward(params, x, k2)[0] - recon1).max()) > 1e-4  # another sample
  z1 = mu + jax.random.normal(k1, mu.shape) * sigma  # MONAI's sampling, z = mu + eps sigma
  np.testing.assert_allclose(np.asarray(decode(params, z1)), np.asarray(recon1), rtol=1e-4,
                             atol=1e-5)
  # z_sigma = exp(clip(log_var, -30, 20) / 2): a huge log-variance bias hits either bound.
  for bias, want in [(1e4, np.exp(10.0)), (-1e4, np.exp(-15.0))]:
    params["params"]["quant_conv_log_sigma"]["bias"] = jnp.full((3,), bias)
    np.testing.assert_allclose(np.asarray(forward(params, x, k1)[2]), want, rtol=1e-5)


def test_discriminator_feature_shapes():
  model = discriminator.PatchDiscriminator_ref()
  x = jax.ShapeDtypeStruct((2, 136, 112, 1), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  outs = jax.eval_shape(model.apply, variables, x)
  # torch conv output size: floor((n + 2 p - k) / s) + 1 with k=4, p=1.
  size = lambda n, s: (n + 2 - 4) // s + 1
  h, w, want = 136, 112, []
  for s, c in [(2, 32), (2, 64), (2, 128), (1, 256), (1, 1)]:
    h, w = size(h, s), size(w, s)
    want.append((2, h, w, c))
  assert [o.shape for o in outs] == want  # ends with (2, 15, 12, 1) patch logits


def test_discriminator_init_and_batch_stats():
  model = discriminator.PatchDiscriminator_tiny()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 24, 1)), jnp.float32)
  variables = jax.jit(model.init)(_key(0), x)
  # MONAI's normal_init: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), biases 0.
  p = variables["params"]
  assert abs(float(jnp.std(p["layer_2"]["conv"]["kernel"])) - 0.02) < 0.002
  assert abs(float(jnp.mean(p["layer_2"]["norm"]["scale"])) - 1.0) < 0.01
  assert float(jnp.abs(p["final_conv"]["bias"]).max()) == 0.0
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  outs, updates = step(variables, x)
  # Running mean <- 0.9 mean + 0.1 batch mean (torch momentum 0.1); the batch mean is that of
  # layer_0's conv output, recomputed here from the first feature map.
  conv0 = jax.lax.conv_general_dilated(outs[0], p["layer_0"]["conv"]["kernel"], (2, 2),
                                       ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.asarray(updates["batch_stats"]["layer_0"]["norm"]["mean"]),
                             0.1 * np.asarray(conv0).mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="channels"):
    model.apply(variables, jnp.zeros((1, 32, 32, 3)))


# Two levels (plain, attention) keep the compile short; the reference's three-level shape
# flow (36 x 28 -> 18 x 14 -> 9 x 7 and back) is traced by the parameter-count tests.
_TWO_LEVELS = dict(channels=(16, 32), attention_levels=(False, True), num_head_channels=(0, 16))


def test_unet_tiny_forward_unconditioned():
  model = unet.DiffusionModelUNet_tiny(**_TWO_LEVELS)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 36, 28, 3)), jnp.float32)
  x = jnp.concatenate([x, x])
  t = jnp.array([10, 900])
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, t)
  params = _random_like(abstract, 6, 0.1)
  y = np.asarray(jax.jit(model.apply)(params, x, t))
  assert y.shape == (2, 36, 28, 3)
  assert np.isfinite(y).all()
  assert np.abs(y[0] - y[1]).max() > 1e-4  # same image, different timesteps
  with pytest.raises(ValueError, match="with_conditioning"):
    model.apply(params, x, t, jnp.zeros((2, 1, 6)))


def test_unet_tiny_forward_conditioned_uses_context():
  model = unet.DiffusionModelUNet_tiny(with_conditioning=True, cross_attention_dim=6,
                                       **_TWO_LEVELS)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 36, 28, 3)), jnp.float32)
  x = jnp.concatenate([x, x])
  t = jnp.array([50, 50])
  context = jnp.asarray(np.random.default_rng(1).standard_normal((2, 1, 6)), jnp.float32)
  params = _random_like(jax.eval_shape(model.init, jax.random.key(0), x, t, context), 7, 0.1)
  assert "transformer_blocks_0" in params["params"]["middle_block_attention"]
  y = np.asarray(jax.jit(model.apply)(params, x, t, context))
  assert y.shape == (2, 36, 28, 3)
  assert np.abs(y[0] - y[1]).max() > 1e-4  # same image and timestep, different covariates


def test_zero_initialised_layers_as_monai():
  # MONAI zero_module: ResnetBlock.conv2 starts at zero, so a fresh block is its skip path.
  block = unet.ResnetBlock(out_channels=8, norm_num_groups=4)
  x, emb = jnp.ones((1, 4, 4, 8)), jnp.ones((1, 16))
  params = jax.jit(block.init)(_key(0), x, emb)
  assert float(jnp.abs(params["params"]["conv2"]["kernel"]).max()) == 0.0
  np.testing.assert_array_equal(np.asarray(jax.jit(block.apply)(params, x, emb)), np.asarray(x))
  # PyTorch default init elsewhere: |w| <= 1/sqrt(fan_in), fan_in = 8 * 3 * 3.
  k = np.asarray(params["params"]["conv1"]["kernel"])
  assert np.abs(k).max() <= 1 / np.sqrt(72) and np.abs(k).max() > 0.8 / np.sqrt(72)


def test_bad_configurations_raise():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="multiple of norm_num_groups"):
    jax.eval_shape(autoencoder.AutoencoderKL(channels=(24, 32), attention_levels=(False, False)
                                             ).init, key, jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="same length"):
    jax.eval_shape(unet.DiffusionModelUNet(channels=(32, 32)).init, key,
                   jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
  with pytest.raises(ValueError, match="cross_attention_dim"):
    jax.eval_shape(unet.DiffusionModelUNet_tiny(with_conditioning=True).init, key,
                   jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))
  with pytest.raises(ValueError, match="num_head_channels"):
    jax.eval_shape(unet.DiffusionModelUNet_tiny(num_head_channels=(0, 12, 32)).init, key,
                   jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))
  with pytest.raises(ValueError, match="1 channels"):
    jax.eval_shape(autoencoder.AutoencoderKL_tiny().init, key, jnp.zeros((1, 8, 8, 3)))


def test_remat_keeps_parameter_names_and_dtype_only_sets_computation():
  key = jax.random.key(0)
  x, t = jnp.zeros((1, 36, 28, 3)), jnp.zeros((1,))
  plain = jax.eval_shape(unet.DiffusionModelUNet_tiny().init, key, x, t)
  remat = jax.eval_shape(unet.DiffusionModelUNet_tiny(remat=True).init, key, x, t)
  assert jax.tree.map(lambda a: a.shape, plain) == jax.tree.map(lambda a: a.shape, remat)
  img = jnp.zeros((1, 16, 16, 1))
  ae_plain = jax.eval_shape(autoencoder.AutoencoderKL_tiny().init, key, img)
  ae_remat = jax.eval_shape(autoencoder.AutoencoderKL_tiny(remat=True).init, key, img)
  assert jax.tree.map(lambda a: a.shape, ae_plain) == jax.tree.map(lambda a: a.shape, ae_remat)
  half = unet.DiffusionModelUNet_tiny(dtype=jnp.bfloat16)
  variables = jax.eval_shape(half.init, key, x, t)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(half.apply, variables, x, t).dtype == jnp.bfloat16
