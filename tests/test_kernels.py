"""ldm_jax.kernels: the CPU kernel-gradient convolution and the GroupNorm, against XLA's own
gradient, torch's GroupNorm and MONAI's autoencoder gradients."""

import math

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax import autoencoder, kernels, unet

DN = ("NHWC", "HWIO", "NHWC")


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((3, 17, 13, 5), (3, 3, 5, 7), (1, 1), ((1, 1), (1, 1))),    # MONAI's 3x3 conv
    ((2, 16, 12, 4), (3, 3, 4, 6), (2, 2), ((0, 1), (0, 1))),    # MONAI's Downsample
    ((2, 16, 14, 3), (4, 4, 3, 8), (2, 2), ((1, 1), (1, 1))),    # PatchDiscriminator
    ((2, 9, 7, 6), (1, 1, 6, 3), (1, 1), ((0, 0), (0, 0))),      # quant convs
    ((2, 10, 8, 3), (5, 3, 3, 2), (1, 2), ((2, 0), (1, 3))),     # anything else
])
def test_kernel_grad_equals_xla_gradient(shape, kernel, strides, padding):
  x, k = _normal(0, shape), _normal(1, kernel)
  conv = lambda x, k: lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN)
  y, vjp = jax.vjp(conv, x, k)
  g = _normal(2, y.shape)
  want = vjp(g)[1]
  got = kernels.kernel_grad(x, g, kernel, strides, padding)
  assert got.shape == want.shape and got.dtype == want.dtype
  assert _rel(got, want) < 2e-6


def test_conv_general_dilated_forms_give_the_same_values_and_gradients(monkeypatch):
  x, k = _normal(0, (2, 12, 10, 4)), _normal(1, (3, 3, 4, 6))
  args = ((2, 2), ((0, 1), (0, 1)))
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k, *args, dimension_numbers=DN)))
  want = jax.value_and_grad(loss(lax.conv_general_dilated), argnums=(0, 1))(x, k)
  monkeypatch.setattr(kernels, "CONV_IMPL", "patches")
  got = jax.value_and_grad(loss(kernels.conv_general_dilated), argnums=(0, 1))(x, k)
  assert _rel(got[0], want[0]) < 1e-6
  for a, b in zip(got[1], want[1]):
    assert _rel(a, b) < 2e-6
  # the custom gradient is in the jaxpr: the form really was taken
  assert "custom_vjp" in str(jax.make_jaxpr(loss(kernels.conv_general_dilated))(x, k))
  # what the form does not cover goes to lax itself: 3-D, dilation, groups, string padding
  x3, k3 = _normal(3, (1, 6, 5, 4, 2)), _normal(4, (3, 3, 3, 2, 3))
  dn3 = ("NDHWC", "DHWIO", "NDHWC")
  for a, kw in [((x3, k3, (1, 1, 1), ((1, 1),) * 3), dict(dimension_numbers=dn3)),
                ((x, k, (1, 1), "SAME"), dict(dimension_numbers=DN)),
                ((x, k, (1, 1), ((2, 2), (2, 2))), dict(dimension_numbers=DN, rhs_dilation=(2, 2))),
                ((x, _normal(5, (3, 3, 2, 6)), (1, 1), ((1, 1), (1, 1))),
                 dict(dimension_numbers=DN, feature_group_count=2))]:
    f = lambda k_: jnp.sum(kernels.conv_general_dilated(a[0], k_, *a[2:], **kw) ** 2)
    assert "custom_vjp" not in str(jax.make_jaxpr(f)(a[1]))
    f_ref = lambda k_: jnp.sum(lax.conv_general_dilated(a[0], k_, *a[2:], **kw) ** 2)
    assert _rel(jax.grad(f)(a[1]), jax.grad(f_ref)(a[1])) < 1e-6


def test_conv_form_per_backend():
  assert kernels.conv_impl("cpu") == "patches"
  assert kernels.conv_impl("gpu") == kernels.conv_impl("tpu") == "xla"


def test_kernel_grad_in_bfloat16_accumulates_in_float32():
  x, k = _normal(0, (4, 16, 12, 8)), _normal(1, (3, 3, 8, 8))
  pad = ((1, 1), (1, 1))
  g = _normal(2, (4, 16, 12, 8))
  want = kernels.kernel_grad(x, g, k.shape, (1, 1), pad)
  got = kernels.kernel_grad(x.astype(jnp.bfloat16), g.astype(jnp.bfloat16), k.shape, (1, 1), pad)
  assert got.dtype == jnp.bfloat16
  # bf16 inputs (8-bit mantissa, relative error 2^-9 each) summed in float32, then rounded
  assert _rel(got, want) < 2e-2


def test_group_norm_matches_torch_values_and_gradients():
  torch = pytest.importorskip("torch")
  x = _normal(0, (3, 9, 7, 12), 2.0) + 1.5
  scale, bias = 1 + _normal(1, (12,), 0.1), _normal(2, (12,), 0.1)
  w = _normal(3, x.shape)
  f = lambda x, s, b: jnp.sum(w * kernels.group_norm_apply(x, s, b, 4, 1e-6))
  ours = jax.value_and_grad(f, argnums=(0, 1, 2))(x, scale, bias)
  tx, ts, tb = (torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True)
                for a in (np.moveaxis(np.asarray(x), -1, 1), scale, bias))
  out = torch.nn.functional.group_norm(tx, 4, ts, tb, 1e-6)
  loss = (torch.tensor(np.moveaxis(np.asarray(w), -1, 1), dtype=torch.float64) * out).sum()
  loss.backward()
  assert abs(float(ours[0]) - loss.item()) < 1e-4 * max(1.0, abs(loss.item()))
  assert _rel(ours[1][0], np.moveaxis(tx.grad.numpy(), 1, -1)) < 1e-5
  assert _rel(ours[1][1], ts.grad.numpy()) < 1e-5
  assert _rel(ours[1][2], tb.grad.numpy()) < 1e-5


def test_group_norm_module_is_flax_groupnorm():
  """Same parameters (names, shapes, dtypes, initial values) and outputs as nn.GroupNorm,
  in float32 and with bf16 compute; a channel count the groups do not divide is refused
  by the blocks' group_norm."""
  x = _normal(0, (2, 6, 5, 16), 3.0) + 2.0
  ours, theirs = kernels.GroupNorm(4, 1e-6), nn.GroupNorm(4, epsilon=1e-6)
  v = ours.init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), v) == jax.tree.map(
      lambda a: (a.shape, a.dtype), theirs.init(jax.random.key(0), x))
  v = jax.tree.map(lambda a: a + _normal(1, a.shape, 0.1), v)
  assert _rel(ours.apply(v, x), theirs.apply(v, x)) < 1e-5
  b16 = kernels.GroupNorm(4, 1e-6, dtype=jnp.bfloat16).apply(v, x.astype(jnp.bfloat16))
  assert b16.dtype == jnp.bfloat16 and _rel(b16, theirs.apply(v, x)) < 2e-2


def _loss_and_grads(model, v, *inputs):
  def loss(params):
    out = model.apply({**v, "params": params}, *inputs)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(jnp.sin(out))
  return jax.jit(jax.value_and_grad(loss))(v["params"])


@pytest.mark.parametrize("net", ["autoencoder", "unet"])
def test_networks_give_the_same_gradients_with_either_conv_form(net, monkeypatch):
  if net == "autoencoder":
    model = autoencoder.AutoencoderKL_tiny()
    inputs = (_normal(0, (2, 16, 12, 1)),)
  else:
    model = unet.DiffusionModelUNet_tiny(in_channels=3, out_channels=3)
    inputs = (_normal(0, (2, 8, 8, 3)), jnp.array([3, 700]))
  v = model.init(jax.random.key(0), *inputs)
  monkeypatch.setattr(kernels, "CONV_IMPL", "xla")
  want = _loss_and_grads(model, v, *inputs)
  monkeypatch.setattr(kernels, "CONV_IMPL", "patches")
  got = _loss_and_grads(model, v, *inputs)
  assert abs(float(got[0]) - float(want[0])) <= 1e-5 * max(1.0, abs(float(want[0])))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[1]),
                          jax.tree_util.tree_leaves(want[1])):
    assert _rel(a, b) < 1e-4, jax.tree_util.keystr(path)


def test_autoencoder_gradients_match_monai():
  """Parameter gradients of MONAI's AutoencoderKL (torch autograd, float64) and ours (the CPU
  kernel-gradient form), same random weights, carried over by the weight converter."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("einops")
  nets = pytest.importorskip("monai.networks.nets")
  from ldm_jax import monai_keys
  kw = dict(spatial_dims=2, in_channels=1, out_channels=1, latent_channels=3,
            channels=(8, 16, 16), num_res_blocks=1, norm_num_groups=8, norm_eps=1e-6,
            attention_levels=(False, False, False), with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False)
  torch.manual_seed(0)
  net = nets.AutoencoderKL(**kw).double()
  with torch.no_grad():
    for p in net.parameters():  # MONAI starts some layers at zero; redraw all
      p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()) if p.ndim > 1
              else 0.1 * torch.randn_like(p))
  x = np.asarray(_normal(1, (2, 1, 16, 12)), np.float64)
  mu, _ = net.encode(torch.from_numpy(x))
  loss = torch.sin(net.decode(mu)).sum()
  loss.backward()
  model = autoencoder.AutoencoderKL(**kw)
  shapes = monai_keys.abstract_variables("autoencoder", model)
  as_f32 = lambda d: {k: t.detach().float() for k, t in d.items()}
  v = monai_keys.from_monai("autoencoder", as_f32(net.state_dict()), shapes)
  grads_monai = monai_keys.from_monai(
      "autoencoder", as_f32({n: torch.zeros_like(p) if p.grad is None else p.grad
                     for n, p in net.named_parameters()}), shapes)

  def f(params):
    return jnp.sum(jnp.sin(model.apply({"params": params}, jnp.moveaxis(x, 1, -1).astype(
        jnp.float32), method="reconstruct")))
  value, grads = jax.jit(jax.value_and_grad(f))(v["params"])
  assert abs(float(value) - loss.item()) < 1e-4 * max(1.0, abs(loss.item()))
  flat_ours = dict(jax.tree_util.tree_leaves_with_path(grads))
  flat_theirs = jax.tree_util.tree_leaves_with_path(grads_monai["params"])
  assert len(flat_ours) == len(flat_theirs)
  # relative to each gradient, or to a thousandth of the largest for those that vanish
  # (a conv bias right before a GroupNorm has gradient 0: float32 gives 1e-7, float64 1e-16).
  # Measured: <= 7e-6 for every kernel, 1.2e-4 for the output convs' biases (sums over every
  # output position, with cancellation: float32 against torch's float64)
  floor = 1e-3 * max(float(np.abs(np.asarray(t)).max()) for _, t in flat_theirs)
  for path, theirs in flat_theirs:
    scale = max(float(np.abs(np.asarray(theirs)).max()), floor)
    diff = float(np.abs(np.asarray(flat_ours[path]) - np.asarray(theirs)).max())
    assert diff <= 5e-4 * scale, (jax.tree_util.keystr(path), diff, scale)
