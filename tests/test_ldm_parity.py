"""Parity of ldm_jax's networks, weight converter and samplers with MONAI's (PyTorch, CPU).

Every comparison runs MONAI 1.6's torch network and ours on the same float32 input with the
same random weights: MONAI's network is built with the reference's settings (DeepSSIM's
src/diffusion/networks.py; `num_channels` is MONAI 1.6's `channels`), every parameter is
redrawn from a fixed seed (MONAI starts some layers at zero, which would hide them), and
ldm_jax.convert carries the weights over. Differences are reported as max |ours - MONAI| and
that over max |MONAI| ("rel"); the numbers measured on 2 CPU cores are in each test and
printed (pytest -s). The file takes ~1.5 min on 2 busy cores (the CLI test ~15 s, the
full-size UNet ~12 s); torch runs one thread (xdist runs two files at once).
"""

import functools
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("einops")  # MONAI's attention blocks need it
monai = pytest.importorskip("monai")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from deepssim_jax import fileio  # noqa: E402
from ldm_jax import autoencoder, convert, diffusion, discriminator, monai_keys, unet  # noqa: E402
from monai.inferers import DiffusionInferer  # noqa: E402
from monai.networks import nets  # noqa: E402
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler  # noqa: E402

torch.set_num_threads(1)  # pytest-xdist runs two test files at once on 2 cores

# The reference's networks (MONAI Generative 0.2.3 arguments, MONAI 1.6 names).
AE_REF = dict(spatial_dims=2, in_channels=1, out_channels=1, latent_channels=3,
              channels=(64, 128, 128), num_res_blocks=2, norm_num_groups=32, norm_eps=1e-6,
              attention_levels=(False, False, False), with_encoder_nonlocal_attn=False,
              with_decoder_nonlocal_attn=False)
DISC_REF = dict(spatial_dims=2, num_layers_d=3, channels=32, in_channels=1, out_channels=1)
UNET_REF = dict(spatial_dims=2, in_channels=3, out_channels=3, num_res_blocks=2,
                channels=(256, 512, 768), attention_levels=(False, True, True),
                norm_num_groups=32, norm_eps=1e-6, resblock_updown=True,
                num_head_channels=(0, 512, 768), transformer_num_layers=1)
COND = dict(with_conditioning=True, cross_attention_dim=6)  # the 6 covariates
# The reference also passes upcast_attention=True (attention in float32 under autocast):
# nothing to do in float32, and ldm_jax does not offer it.
UNET_MONAI_ONLY = dict(upcast_attention=True)
# Same structure, narrow.
UNET_SMALL = dict(UNET_REF, channels=(32, 64, 64), num_head_channels=(0, 32, 64),
                  norm_num_groups=8)
AE_SMALL_ATTN = dict(AE_REF, channels=(16, 32, 32), norm_num_groups=8, num_res_blocks=1,
                     attention_levels=(False, False, True), with_encoder_nonlocal_attn=True,
                     with_decoder_nonlocal_attn=True)

LATENT = (2, 3, 36, 28)  # the reference's padded latents, NCHW


def _randomize(net, seed: int):
  """Redraws every parameter and BatchNorm statistic of a torch network, in place."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if p.ndim >= 2:  # weights: unit-variance outputs
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
      elif name.endswith("weight"):  # norm scales
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for name, b in net.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
  return net


def _monai(cls, seed: int, **kw):
  """A MONAI network with random weights (built on the meta device: no default init)."""
  with torch.device("meta"):
    net = cls(**kw)
  net = net.to_empty(device="cpu")
  for name, b in net.named_buffers():
    if name.endswith("num_batches_tracked"):
      b.zero_()
  return _randomize(net, seed).eval()


def _nhwc(t) -> jnp.ndarray:
  return jnp.asarray(np.moveaxis(np.asarray(t), 1, -1))


def _nchw(x) -> np.ndarray:
  return np.moveaxis(np.asarray(x), -1, 1)


def _compare(ours, theirs, what: str, tol: float = 1e-5):
  """Asserts max |ours - theirs| / max |theirs| <= tol; returns (max abs, rel)."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
  diff = float(np.abs(ours - theirs).max())
  rel = diff / max(float(np.abs(theirs).max()), 1e-30)
  print(f"{what}: max abs diff {diff:.2e}, rel {rel:.2e} (max |MONAI| "
        f"{np.abs(theirs).max():.2e})")
  assert rel <= tol, f"{what}: max abs diff {diff:.3g}, rel {rel:.3g} > {tol}"
  return diff, rel


def _normal(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _variables(kind, net, model):
  return monai_keys.from_monai(kind, net.state_dict(), monai_keys.abstract_variables(kind, model))


def _assert_same_state(a, b):
  assert set(a) == set(b), sorted(set(a) ^ set(b))[:8]
  for k in a:
    assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- networks


def test_reference_settings_are_ldm_jax_defaults():
  assert convert.monai_kwargs("autoencoder", autoencoder.AutoencoderKL_ref()) == AE_REF
  disc = convert.monai_kwargs("discriminator", discriminator.PatchDiscriminator_ref())
  assert {k: disc[k] for k in DISC_REF} == DISC_REF
  assert disc["kernel_size"] == 4 and disc["last_conv_kernel_size"] is None
  got = convert.monai_kwargs("unet", unet.DiffusionModelUNet_ref(**COND))
  assert got == {**UNET_REF, **COND}


def test_autoencoder_matches_monai_at_reference_size():
  """2 x 1 x 136 x 112 images. Measured (max abs diff, rel): z_mu 6.0e-6, 1.7e-6; z_sigma
  2.5e-5, 2.8e-6; decode 1.3e-5, 2.5e-6. Float32 on CPU does not get the absolute difference
  under 1e-5 for outputs of magnitude 5-9 (an ulp of 8 is 1e-6); the relative one is."""
  net = _monai(nets.AutoencoderKL, 0, **AE_REF)
  model = autoencoder.AutoencoderKL(**AE_REF)
  v = _variables("autoencoder", net, model)
  x = _normal(1, (2, 1, 136, 112))
  with torch.no_grad():
    mu, sigma = net.encode(torch.from_numpy(x))
    rec = net.decode(mu)
  f_enc = jax.jit(lambda v, x: model.apply(v, x, method="encode"))
  f_dec = jax.jit(lambda v, z: model.apply(v, z, method="decode"))
  o_mu, o_sigma = f_enc(v, _nhwc(x))
  _compare(_nchw(o_mu), mu, "autoencoder z_mu")
  _compare(_nchw(o_sigma), sigma, "autoencoder z_sigma")
  _compare(_nchw(f_dec(v, _nhwc(mu.numpy()))), rec, "autoencoder decode")


def test_autoencoder_with_attention_matches_monai():
  """Attention at the last level and the non-local blocks (not in the reference's settings).
  Measured: z_mu 3.1e-6, rel 9.6e-7; z_sigma 2.2e-6, 7.7e-7; decode 5.1e-6, 1.0e-6."""
  net = _monai(nets.AutoencoderKL, 2, **AE_SMALL_ATTN)
  model = autoencoder.AutoencoderKL(**AE_SMALL_ATTN)
  v = _variables("autoencoder", net, model)
  x = _normal(3, (2, 1, 32, 24))
  with torch.no_grad():
    mu, sigma = net.encode(torch.from_numpy(x))
    rec = net.decode(mu)
  o_mu, o_sigma = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(v, _nhwc(x))
  _compare(_nchw(o_mu), mu, "autoencoder+attn z_mu")
  _compare(_nchw(o_sigma), sigma, "autoencoder+attn z_sigma")
  o_rec = jax.jit(lambda v, z: model.apply(v, z, method="decode"))(v, _nhwc(mu.numpy()))
  _compare(_nchw(o_rec), rec, "autoencoder+attn decode")


def test_discriminator_matches_monai_in_eval_and_train_mode():
  """Every layer's output, with running statistics (eval) and batch statistics (train).

  Measured (max abs diff, rel): eval <= 4.8e-6, 2.5e-6 per layer; train <= 1.1e-5, 2.2e-6.
  The running statistics after the train step: means equal (rel <= 6.8e-8); variances differ
  as documented in discriminator.py (flax averages the biased batch variance, torch the
  unbiased one) and agree once that is accounted for (rel <= 8.1e-8).
  """
  net = _monai(nets.PatchDiscriminator, 4, **DISC_REF)
  model = discriminator.PatchDiscriminator(**DISC_REF)
  v = _variables("discriminator", net, model)
  assert set(v) == {"params", "batch_stats"}
  x = _normal(5, (2, 1, 136, 112))
  with torch.no_grad():
    ref = net(torch.from_numpy(x))
  outs = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, _nhwc(x))
  assert len(outs) == len(ref) == 5
  for i, (o, r) in enumerate(zip(outs, ref)):
    _compare(_nchw(o), r, f"discriminator eval layer {i}")

  old = {k: t.clone() for k, t in net.state_dict().items()}
  net.train()
  with torch.no_grad():
    ref = net(torch.from_numpy(x))
  outs, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      v, _nhwc(x))
  for i, (o, r) in enumerate(zip(outs, ref)):
    _compare(_nchw(o), r, f"discriminator train layer {i}")
  for i in range(3):
    ours = updated["batch_stats"][f"layer_{i}"]["norm"]
    n = np.prod(outs[i + 1].shape[:-1])  # values per channel the batch variance is over
    mean, var = (net.state_dict()[f"{i}.adn.N.running_{s}"].numpy() for s in ("mean", "var"))
    old_var = old[f"{i}.adn.N.running_var"].numpy()
    _compare(ours["mean"], mean, f"discriminator running_mean {i}")
    biased = 0.9 * old_var + (var - 0.9 * old_var) * (n - 1) / n
    _compare(ours["var"], biased, f"discriminator running_var {i} (biased)")


def _unet_io(seed: int, batch: int = 2):
  x = _normal(seed, (batch,) + LATENT[1:])
  t = np.array([999, 17, 500, 0][:batch])
  context = _normal(seed + 1, (batch, 1, 6))
  return x, t, context


@pytest.mark.parametrize("cond", [False, True], ids=["unconditioned", "covariates"])
def test_small_unet_matches_monai(cond):
  """Reference structure, narrow (channels 32, 64, 64), latents 2 x 3 x 36 x 28. Measured:
  2.9e-6, rel 1.1e-6 (unconditioned: SpatialAttentionBlock); 3.3e-6, rel 1.6e-6 (covariates:
  SpatialTransformer with cross-attention to a (B, 1, 6) context)."""
  kw = {**UNET_SMALL, **(COND if cond else {})}
  net = _monai(nets.DiffusionModelUNet, 6, **kw, **UNET_MONAI_ONLY)
  model = unet.DiffusionModelUNet(**kw)
  v = _variables("unet", net, model)
  x, t, context = _unet_io(7)
  context = context if cond else None
  with torch.no_grad():
    ref = net(torch.from_numpy(x), torch.from_numpy(t),
              None if context is None else torch.from_numpy(context))
  out = jax.jit(model.apply)(v, _nhwc(x), jnp.asarray(t),
                             None if context is None else jnp.asarray(context))
  _compare(_nchw(out), ref, f"small unet ({'covariates' if cond else 'unconditioned'})")


def test_full_size_unet_matches_monai():
  """The reference's conditioned UNet (183,981,059 + cross-attention parameters), batch 1.
  Measured: max abs diff 7.7e-6, rel 4.2e-6 (~12 s on 2 cores: building and running the
  torch network, converting, compiling ours)."""
  kw = {**UNET_REF, **COND}
  net = _monai(nets.DiffusionModelUNet, 8, **kw, **UNET_MONAI_ONLY)
  model = unet.DiffusionModelUNet_ref(**COND)
  v = _variables("unet", net, model)
  x, t, context = _unet_io(9, batch=1)
  with torch.no_grad():
    ref = net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context))
  del net
  out = jax.jit(model.apply)(v, _nhwc(x), jnp.asarray(t), jnp.asarray(context))
  _compare(_nchw(out), ref, "full-size unet (covariates)")


# ----------------------------------------------------------------------------- converter


@pytest.mark.parametrize("kind,cls,kw", [
    ("autoencoder", nets.AutoencoderKL, AE_SMALL_ATTN),
    ("autoencoder", nets.AutoencoderKL, dict(AE_REF, channels=(16, 32, 32), norm_num_groups=8)),
    ("discriminator", nets.PatchDiscriminator, dict(DISC_REF, channels=8)),
    ("unet", nets.DiffusionModelUNet, {**UNET_SMALL, **COND}),
    ("unet", nets.DiffusionModelUNet, dict(UNET_SMALL, resblock_updown=False)),
], ids=["ae-attention", "ae-reference", "discriminator", "unet-covariates", "unet-conv-updown"])
def test_round_trip_monai_ldm_jax_monai_is_exact(kind, cls, kw, tmp_path):
  net = _monai(cls, 10, **kw)
  state = net.state_dict()
  model = {"autoencoder": autoencoder.AutoencoderKL, "discriminator":
           discriminator.PatchDiscriminator, "unet": unet.DiffusionModelUNet}[kind](**kw)
  v = monai_keys.from_monai(kind, state, monai_keys.abstract_variables(kind, model))
  back = monai_keys.to_monai(kind, v)
  _assert_same_state(back, state)
  path = str(tmp_path / "net.pth")
  convert.save_state_dict(path, back)
  _assert_same_state(torch.load(path, weights_only=True), state)
  net.load_state_dict(back)  # strict: MONAI takes it as is
  # Through a file and bare params (the autoencoder and UNet have no other collection).
  again = convert.load(kind, path, model)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), again, v))
  if kind != "discriminator":
    _assert_same_state(monai_keys.to_monai(kind, v["params"]), state)


def _old_style(state: dict) -> dict:
  """MONAI Generative 0.2.x names: the inverse of MONAI's load_old_state_dict renames."""
  out = {}
  for k, t in state.items():
    if ".transformer_blocks." in k:
      k = k.replace(".out_proj.", ".to_out.0.")
    else:
      k = k.replace(".attn.out_proj.", ".proj_attn.")
      for p in ("to_q", "to_k", "to_v"):
        k = k.replace(f".attn.{p}.", f".{p}.")
    out[k.replace(".postconv.", ".conv.")] = t.clone()
  return out


@pytest.mark.parametrize("kind,cls,kw", [
    ("autoencoder", nets.AutoencoderKL, AE_SMALL_ATTN),
    ("autoencoder", nets.AutoencoderKL, dict(AE_REF, channels=(16, 32, 32), norm_num_groups=8)),
    ("unet", nets.DiffusionModelUNet, {**UNET_SMALL, **COND}),
    ("unet", nets.DiffusionModelUNet, dict(UNET_SMALL, resblock_updown=False)),
], ids=["ae-attention", "ae-reference", "unet-covariates", "unet-attention-conv-updown"])
def test_old_monai_generative_keys_convert_through_load_old_state_dict(kind, cls, kw, tmp_path):
  net = _monai(cls, 11, **kw)
  state = net.state_dict()
  old = _old_style(state)
  assert old.keys() != state.keys()  # even without attention: upsampling conv -> postconv
  assert monai_keys.is_old_style(kind, old) and not monai_keys.is_old_style(kind, state)
  model = {"autoencoder": autoencoder.AutoencoderKL, "unet": unet.DiffusionModelUNet}[kind](**kw)
  target = monai_keys.abstract_variables(kind, model)
  with pytest.raises(fileio.InputError, match="MONAI Generative"):
    monai_keys.from_monai(kind, old, target)
  path = str(tmp_path / "old.pth")
  torch.save(old, path)
  same = lambda a, b: jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))
  # MONAI's own renaming copies proj_attn into out_proj.
  assert same(convert.load(kind, path, model, proj_attn="copy"),
              monai_keys.from_monai(kind, state, target))
  # By default the proj_attn that MONAI Generative 0.2.x defines but never applies becomes an
  # identity out_proj (what the old network computed; checked against the `generative` 0.2.3
  # sources: autoencoder and unconditioned UNet rel <= 2.4e-6, MONAI's copy rel 0.89).
  identity = dict(state)
  for k in state:
    if ".attn.out_proj." in k and ".transformer_blocks." not in k:
      identity[k] = torch.eye(len(state[k])) if k.endswith("weight") else torch.zeros_like(state[k])
  got = convert.load(kind, path, model)
  assert same(got, monai_keys.from_monai(kind, identity, target))
  _assert_same_state(monai_keys.to_monai(kind, got), identity)
  changed = [k for k in state if not torch.equal(identity[k], state[k])]
  assert bool(changed) == any(".proj_attn." in k for k in old)
  # MONAI's method would keep random weights for a key the file lacks; ours refuses.
  lacking = dict(old)
  dropped = next(k for k in lacking if k.endswith("conv2.conv.weight"))
  del lacking[dropped]
  with pytest.raises(fileio.InputError, match=dropped.replace(".", r"\.")):
    convert.upgrade_old_keys(kind, lacking, model, source="old.pth")
  with pytest.raises(fileio.InputError, match="unknown.*extra\\.weight"):
    convert.upgrade_old_keys(kind, {**old, "extra.weight": torch.zeros(1)}, model)
  with pytest.raises(fileio.InputError, match=dropped.replace(".", r"\.") + r": file \(1, 2\)"):
    convert.upgrade_old_keys(kind, {**old, dropped: torch.zeros(1, 2)}, model)


def test_unknown_missing_and_misshaped_keys_are_named(tmp_path):
  kw = {**UNET_SMALL, **COND}
  net = _monai(nets.DiffusionModelUNet, 12, **kw)
  model = unet.DiffusionModelUNet(**kw)
  target = monai_keys.abstract_variables("unet", model)
  state = dict(net.state_dict())
  key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  path = str(tmp_path / "unknown.pth")
  torch.save({**state, "time_embed.4.weight": torch.zeros(3, 3)}, path)
  with pytest.raises(fileio.InputError, match=r"unknown key.*time_embed\.4\.weight") as e:
    convert.load("unet", path, model)
  assert str(e.value).startswith(path)
  cases = {
      "missing": ({k: t for k, t in state.items() if k != key}, key.replace(".", r"\.")),
      "mis-shaped": ({**state, key: torch.zeros(64, 7)},
                     key.replace(".", r"\.") + r": file \(64, 7\) vs model \(64, 6\)"),
  }
  for what, (bad, pattern) in cases.items():
    with pytest.raises(fileio.InputError, match=f"^net.pth: .*{what} key.*{pattern}"):
      monai_keys.from_monai("unet", bad, target, source="net.pth")
  # A discriminator's weights are not a UNet's; a UNet's cross-attention has its context width.
  with pytest.raises(fileio.InputError, match="unknown key.*missing key"):
    monai_keys.from_monai("unet", _monai(nets.PatchDiscriminator, 0, **DISC_REF).state_dict(),
                       target)
  other = unet.DiffusionModelUNet(**UNET_SMALL, with_conditioning=True, cross_attention_dim=5)
  with pytest.raises(fileio.InputError, match=r"mis-shaped.*attn2\.to_k"):
    monai_keys.from_monai("unet", state, monai_keys.abstract_variables("unet", other))


def test_cli_converts_old_keys_and_exports_monai(tmp_path):
  """python -m ldm_jax.convert: an old-style .pth -> our .npz and a MONAI 1.6 .pth."""
  kw = dict(autoencoder.AutoencoderKL_tiny.keywords)
  kw = {k: kw[k] for k in AE_REF}
  net = _monai(nets.AutoencoderKL, 13, **kw)
  state = net.state_dict()
  src, npz, pth = (str(tmp_path / n) for n in ("old.pth", "ae.npz", "ae.pth"))
  torch.save(_old_style(state), src)
  r = subprocess.run([sys.executable, "-m", "ldm_jax.convert", "--kind=autoencoder",
                      f"--from={src}", f"--to={npz}", f"--to_monai={pth}",
                      "--model=AutoencoderKL_tiny"], capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  _assert_same_state(torch.load(pth, weights_only=True), state)
  _assert_same_state(monai_keys.to_monai("autoencoder", convert.load_npz(npz)), state)


# ----------------------------------------------------------------------------- diffusion


def _tiny_conditioned_unet(seed: int):
  kw = {**UNET_SMALL, **COND, "channels": (16, 32, 32), "num_head_channels": (0, 16, 32),
        "num_res_blocks": 1}
  net = _monai(nets.DiffusionModelUNet, seed, **kw, **UNET_MONAI_ONLY)
  model = unet.DiffusionModelUNet(**kw)
  return net, model, _variables("unet", net, model)


def _apply(model):
  return lambda params, x, t, c: model.apply(params, x, t, c)


def test_ddpm_training_loss_equals_monai():
  """DDPMScheduler(1000, scaled_linear_beta 0.0015 -> 0.0205) + DiffusionInferer + mse_loss
  vs ddpm_loss_from on the same latents, noise, timesteps and covariates.
  Measured: alpha-bar max abs diff 2.4e-7 (MONAI computes it in float32, ours in float64),
  loss 2.4e-7, rel 1.5e-7."""
  sched = DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta",
                        beta_start=0.0015, beta_end=0.0205)
  ours = diffusion.make_schedule(1000, 0.0015, 0.0205, "scaled_linear")
  _compare(ours.alphas_cumprod, sched.alphas_cumprod.numpy(), "alphas_cumprod", tol=1e-5)
  net, model, v = _tiny_conditioned_unet(14)
  x0, t, context = _unet_io(15, batch=4)
  noise = _normal(16, x0.shape)
  with torch.no_grad():
    pred = DiffusionInferer(sched)(inputs=torch.from_numpy(x0), diffusion_model=net,
                                   noise=torch.from_numpy(noise),
                                   timesteps=torch.from_numpy(t),
                                   condition=torch.from_numpy(context))
    loss = torch.nn.functional.mse_loss(pred.float(), torch.from_numpy(noise)).item()
  loss_fn = jax.jit(functools.partial(diffusion.ddpm_loss_from, _apply(model)))
  got = loss_fn(v, ours, _nhwc(x0), _nhwc(noise), jnp.asarray(t), jnp.asarray(context))
  _compare(float(got), loss, "ddpm loss")


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_ddim_sampling_loop_equals_monai(spacing):
  """50 DDIM steps, eta 0, clip_sample False, from the same x_T, with the converted UNet.

  "leading": the timesteps of MONAI Generative 0.2.3 (the reference's sampler) and MONAI
  <= 1.5, 980 ... 0 (set on MONAI 1.6's scheduler, whose step() is unchanged); "linspace":
  MONAI 1.6's own set_timesteps, 999, 979, 958, ... 0. Measured on the final latents (up to
  ~350 in magnitude: a random UNet's noise estimates are far from the truth): max abs diff
  3.1e-4, rel 9.1e-7 (leading); 4.6e-4, rel 1.2e-6 (linspace).
  """
  sched = DDIMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta",
                        beta_start=0.0015, beta_end=0.0205, clip_sample=False)
  sched.set_timesteps(50)
  if spacing == "leading":
    sched.timesteps = torch.from_numpy(np.arange(50)[::-1].copy() * 20)
  np.testing.assert_array_equal(sched.timesteps.numpy(),
                                diffusion.ddim_timesteps(1000, 50, spacing=spacing))
  net, model, v = _tiny_conditioned_unet(17)
  x_T, _, context = _unet_io(18)
  z, c = torch.from_numpy(x_T), torch.from_numpy(context)
  with torch.no_grad():
    for t in sched.timesteps:
      eps = net(z, torch.full((z.shape[0],), int(t)), c)
      z, _ = sched.step(eps, t, z)
  s = diffusion.make_schedule(1000, 0.0015, 0.0205, "scaled_linear")
  got = diffusion.ddim_sample(_apply(model), v, s, (2, 36, 28, 3), jax.random.key(0),
                              num_inference_steps=50, eta=0.0, context=jnp.asarray(context),
                              x_T=_nhwc(x_T), spacing=spacing)
  _compare(_nchw(got), z.numpy(), f"ddim 50 steps ({spacing})")


def test_reference_files_import_into_runs_that_generate_and_export_back(tmp_path):
  """A user with the reference's autoencoder / discriminator / unet files: imported as
  ldm_jax run workdirs (tiny widths, 32 x 32 slices), generated from, exported back
  exactly; an import over a run or with the wrong conditioning is refused."""
  # pylint: disable-next=g-import-not-at-top
  from ldm_jax import generate, train_autoencoder, train_diffusion
  from test_ldm_train import ae_config, dm_config, one_device  # pylint: disable=g-import-not-at-top
  ae_cfg = ae_config()
  ae_model = train_autoencoder.make_autoencoder(ae_cfg.model)
  disc_model = train_autoencoder.make_discriminator(ae_cfg.disc)
  files = {}
  for name, kind, model, seed in (("autoencoder", "autoencoder", ae_model, 11),
                                  ("discriminator", "discriminator", disc_model, 12)):
    net = _monai(type(convert.monai_network(kind, model)), seed,
                 **convert.monai_kwargs(kind, model))
    files[name] = str(tmp_path / f"{name}-ep-7.pth")
    torch.save(net.state_dict(), files[name])
  dm_cfg = dm_config(cond="covariates")
  dm_cfg.data.image_size = ae_cfg.data.image_size
  dm_cfg.autoencoder.kind = "kl"
  dm_cfg.autoencoder.workdir = str(tmp_path / "ae")
  dm_cfg.generate.num_samples = 1
  unet_model = train_diffusion.make_unet(dm_cfg, 3, 6)
  unet_net = _monai(nets.DiffusionModelUNet, 13, **convert.monai_kwargs("unet", unet_model))
  files["unet"] = str(tmp_path / "unet-ep-7.pth")
  torch.save(unet_net.state_dict(), files["unet"])

  convert.import_run(ae_cfg, str(tmp_path / "ae"), files["autoencoder"],
                     files["discriminator"])
  convert.import_run(dm_cfg, str(tmp_path / "dm"), files["unet"])
  _, params, _, data = train_autoencoder.load_autoencoder(str(tmp_path / "ae"), one_device())
  assert data["step"] == 0
  _assert_same_state(monai_keys.to_monai("autoencoder", params), torch.load(files["autoencoder"]))
  res = generate.generate(dm_cfg, str(tmp_path / "dm"), out_dir=str(tmp_path / "gen"))
  assert len(res["written"]) == 8 and res["step"] == 0
  for name, sd in {**convert.export_run(str(tmp_path / "ae")),
                   **convert.export_run(str(tmp_path / "dm"))}.items():
    _assert_same_state(sd, torch.load(files[name]))
  with pytest.raises(fileio.InputError, match="already holds checkpoints"):
    convert.import_run(dm_cfg, str(tmp_path / "dm"), files["unet"])
  dm_cfg.cond.kind = "none"
  with pytest.raises(fileio.InputError, match="conditioned UNet, but config.cond.kind is 'none'"):
    convert.import_run(dm_cfg, str(tmp_path / "dm2"), files["unet"])
