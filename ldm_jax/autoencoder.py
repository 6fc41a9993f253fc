"""KL autoencoder of the latent diffusion model: MONAI 1.6's AutoencoderKL, layer for layer.

The latent diffusion model DeepSSIM audits was built with MONAI's generative networks. Its
first stage compresses a 1 x 136 x 112 slice into a 3 x 34 x 28 latent (two stride-2
downsamplings) and decodes it back. Matching MONAI's architecture exactly (same layers, same
order, same parameter count: 3,129,960 with the reference's settings) keeps our trained
models comparable with the reference's and lets MONAI/PyTorch weights be imported: submodule
names follow MONAI's state-dict keys with "." replaced by "_" (encoder.blocks.3.conv1 ->
encoder/blocks_3/conv1). Tensors are NHWC (NDHWC in 3D), flax's convention.

MONAI details kept on purpose (they differ from the original LDM code):
- No SiLU between the encoder's (and decoder's) final GroupNorm and its output conv.
- Downsampling pads one zero row/column at the END of each spatial axis, then a 3x3 stride-2
  conv without padding (136 -> 68 -> 34).
- encode returns (z_mu, z_sigma) with z_sigma = exp(clip(log_var, -30, 20) / 2), log_var from
  its own 1x1 conv (quant_conv_log_sigma); decode applies post_quant_conv first.
- Initialisation is PyTorch's default (uniform +-1/sqrt(fan_in) for weights and biases),
  so a run from scratch starts where the reference's does.

The pieces it shares with the UNet (PyTorch-style initialisers, `conv`, `group_norm`,
`SpatialAttentionBlock`) live in ldm_jax/blocks.py; the autoencoder's own blocks
(AEKLResBlock, AEKLDownsample, AEKLUpsample) are here.
"""

import functools
import itertools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax import kernels
from ldm_jax.blocks import (SpatialAttentionBlock, check_channels, conv, group_norm, per_level,
                            torch_bias_init, torch_kernel_init, upsample_nearest)

Dtype = Any


class AEKLResBlock(nn.Module):
  """MONAI's AEKLResBlock: two (GroupNorm, SiLU, 3x3 conv) plus a 1x1 shortcut if widths differ."""
  out_channels: int
  norm_num_groups: int
  norm_eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gn = functools.partial(group_norm, num_groups=self.norm_num_groups, eps=self.norm_eps,
                           dtype=self.dtype)
    h = conv(nn.silu(gn(x, name="norm1")), self.out_channels, 3, name="conv1", dtype=self.dtype)
    h = conv(nn.silu(gn(h, name="norm2")), self.out_channels, 3, name="conv2", dtype=self.dtype)
    if x.shape[-1] != self.out_channels:
      x = conv(x, self.out_channels, 1, name="nin_shortcut", dtype=self.dtype)
    return x + h


class AEKLDownsample(nn.Module):
  """MONAI's AEKLDownsample: zero-pad one at the end of each spatial axis, 3x3 stride-2 conv."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = x.ndim - 2
    return conv(x, x.shape[-1], 3, strides=2, padding=((0, 1),) * nd, name="conv",
                dtype=self.dtype)


class AEKLUpsample(nn.Module):
  """MONAI's Upsample(mode="nontrainable", interp_mode="nearest", scale 2, post_conv=3x3 conv)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv(upsample_nearest(x), x.shape[-1], 3, name="postconv", dtype=self.dtype)


class Encoder(nn.Module):
  """MONAI's autoencoderkl.Encoder; submodules are named blocks_<i> as MONAI's blocks.<i>."""
  channels: Sequence[int]
  out_channels: int
  num_res_blocks: Sequence[int]
  norm_num_groups: int
  norm_eps: float
  attention_levels: Sequence[bool]
  with_nonlocal_attn: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    idx = itertools.count()
    name = lambda: f"blocks_{next(idx)}"
    res = functools.partial(AEKLResBlock, norm_num_groups=self.norm_num_groups,
                            norm_eps=self.norm_eps, dtype=self.dtype)
    attn = functools.partial(SpatialAttentionBlock, norm_num_groups=self.norm_num_groups,
                             norm_eps=self.norm_eps, dtype=self.dtype)
    h = conv(x, self.channels[0], 3, name=name(), dtype=self.dtype)
    for i, ch in enumerate(self.channels):
      for _ in range(self.num_res_blocks[i]):
        h = res(ch, name=name())(h)
        if self.attention_levels[i]:
          h = attn(name=name())(h)
      if i != len(self.channels) - 1:
        h = AEKLDownsample(dtype=self.dtype, name=name())(h)
    if self.with_nonlocal_attn:
      h = res(self.channels[-1], name=name())(h)
      h = attn(name=name())(h)
      h = res(self.channels[-1], name=name())(h)
    h = group_norm(h, self.norm_num_groups, self.norm_eps, name=name(), dtype=self.dtype)
    return conv(h, self.out_channels, 3, name=name(), dtype=self.dtype)


class Decoder(nn.Module):
  """MONAI's autoencoderkl.Decoder (nearest-neighbour upsampling + conv, no ConvTranspose)."""
  channels: Sequence[int]
  out_channels: int
  num_res_blocks: Sequence[int]
  norm_num_groups: int
  norm_eps: float
  attention_levels: Sequence[bool]
  with_nonlocal_attn: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    idx = itertools.count()
    name = lambda: f"blocks_{next(idx)}"
    res = functools.partial(AEKLResBlock, norm_num_groups=self.norm_num_groups,
                            norm_eps=self.norm_eps, dtype=self.dtype)
    attn = functools.partial(SpatialAttentionBlock, norm_num_groups=self.norm_num_groups,
                             norm_eps=self.norm_eps, dtype=self.dtype)
    rev_ch = list(reversed(self.channels))
    rev_attn = list(reversed(self.attention_levels))
    rev_nrb = list(reversed(self.num_res_blocks))
    h = conv(z, rev_ch[0], 3, name=name(), dtype=self.dtype)
    if self.with_nonlocal_attn:
      h = res(rev_ch[0], name=name())(h)
      h = attn(name=name())(h)
      h = res(rev_ch[0], name=name())(h)
    for i, ch in enumerate(rev_ch):
      for _ in range(rev_nrb[i]):
        h = res(ch, name=name())(h)
        if rev_attn[i]:
          h = attn(name=name())(h)
      if i != len(rev_ch) - 1:
        h = AEKLUpsample(dtype=self.dtype, name=name())(h)
    h = group_norm(h, self.norm_num_groups, self.norm_eps, name=name(), dtype=self.dtype)
    return conv(h, self.out_channels, 3, name=name(), dtype=self.dtype)


def reparameterize(z_mu: jax.Array, z_sigma: jax.Array, rng: jax.Array) -> jax.Array:
  """MONAI's AutoencoderKL.sampling: z = z_mu + eps * z_sigma, eps ~ N(0, 1).

  Args:
    z_mu: latent mean.
    z_sigma: latent standard deviation, same shape.
    rng: PRNG key.

  Returns:
    A sample of the latent posterior, same shape and dtype as z_mu.
  """
  eps = jax.random.normal(rng, z_sigma.shape, jnp.float32).astype(z_sigma.dtype)
  return z_mu + eps * z_sigma


class AutoencoderKL(nn.Module):
  """MONAI's AutoencoderKL (Rombach et al. 2022; Pinaya et al. 2022), channels-last.

  Defaults are MONAI 1.6's. use_convtranspose, include_fc=False, use_combined_linear=True
  and use_flash_attention are not offered (the reference uses none of them; the last two do
  not change the maths); `remat` plays the part of MONAI's use_checkpoint.

  Attributes:
    spatial_dims: 2 or 3.
    in_channels: image channels.
    out_channels: reconstruction channels.
    num_res_blocks: residual blocks per level (int or one per level).
    channels: output channels of each level.
    attention_levels: whether each level has self-attention after each residual block.
    latent_channels: latent channels.
    norm_num_groups: GroupNorm groups (must divide every entry of channels).
    norm_eps: GroupNorm epsilon.
    with_encoder_nonlocal_attn: res-attn-res block at the bottom of the encoder.
    with_decoder_nonlocal_attn: res-attn-res block at the top of the decoder.
    remat: rematerialise the encoder and decoder activations in the backward pass.
    dtype: computation dtype (parameters stay float32).
  """
  spatial_dims: int = 2
  in_channels: int = 1
  out_channels: int = 1
  num_res_blocks: Union[int, Sequence[int]] = (2, 2, 2, 2)
  channels: Sequence[int] = (32, 64, 64, 64)
  attention_levels: Sequence[bool] = (False, False, True, True)
  latent_channels: int = 3
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  with_encoder_nonlocal_attn: bool = True
  with_decoder_nonlocal_attn: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    check_channels("AutoencoderKL", self.channels, self.attention_levels, self.norm_num_groups)
    nrb = per_level(self.num_res_blocks, len(self.channels), "num_res_blocks")
    common = dict(channels=tuple(self.channels), num_res_blocks=nrb,
                  norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps,
                  attention_levels=tuple(self.attention_levels), dtype=self.dtype)
    enc_cls, dec_cls = (nn.remat(Encoder), nn.remat(Decoder)) if self.remat else (Encoder, Decoder)
    self.encoder = enc_cls(out_channels=self.latent_channels,
                           with_nonlocal_attn=self.with_encoder_nonlocal_attn, **common)
    self.decoder = dec_cls(out_channels=self.out_channels,
                           with_nonlocal_attn=self.with_decoder_nonlocal_attn, **common)
    lc = self.latent_channels
    conv1x1 = lambda: kernels.Conv(lc, (1,) * self.spatial_dims, kernel_init=torch_kernel_init,
                                   bias_init=torch_bias_init(lc), dtype=self.dtype)
    self.quant_conv_mu = conv1x1()
    self.quant_conv_log_sigma = conv1x1()
    self.post_quant_conv = conv1x1()

  def _check_input(self, x: jax.Array, channels: int, what: str) -> None:
    if x.ndim != self.spatial_dims + 2 or x.shape[-1] != channels:
      raise ValueError(f"AutoencoderKL.{what} expects (batch, {self.spatial_dims} spatial axes, "
                       f"{channels} channels), got shape {x.shape}")

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image -> posterior mean and standard deviation.

    Args:
      x: (B, H, W[, D], in_channels) images; each spatial size even at every level
        (e.g. a multiple of 4 for three levels) so the decoder restores it exactly.

    Returns:
      (z_mu, z_sigma), each (B, H / 2^(L-1), W / 2^(L-1)[, ...], latent_channels).
    """
    self._check_input(x, self.in_channels, "encode")
    h = self.encoder(x)
    z_mu = self.quant_conv_mu(h)
    z_log_var = jnp.clip(self.quant_conv_log_sigma(h), -30.0, 20.0)
    return z_mu, jnp.exp(z_log_var / 2)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latent (B, h, w[, d], latent_channels) -> reconstruction (B, H, W[, D], out_channels)."""
    self._check_input(z, self.latent_channels, "decode")
    return self.decoder(self.post_quant_conv(z))

  def reconstruct(self, x: jax.Array) -> jax.Array:
    """MONAI's reconstruct: decode(z_mu), no sampling."""
    return self.decode(self.encode(x)[0])

  def encode_stage_2_inputs(self, x: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
    """The diffusion model's input: a posterior sample (or z_mu when rng is None)."""
    z_mu, z_sigma = self.encode(x)
    return z_mu if rng is None else reparameterize(z_mu, z_sigma, rng)

  def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MONAI's forward: encode, sample z = z_mu + eps z_sigma, decode.

    Args:
      x: (B, H, W[, D], in_channels) images.
      rng: PRNG key for the reparameterised sample; None decodes z_mu (deterministic).

    Returns:
      (reconstruction, z_mu, z_sigma).
    """
    z_mu, z_sigma = self.encode(x)
    z = z_mu if rng is None else reparameterize(z_mu, z_sigma, rng)
    return self.decode(z), z_mu, z_sigma


# The reference's settings (brAIn-science/DeepSSIM's LDM, MONAI's AutoencoderKL): 3,129,960
# parameters.
AutoencoderKL_ref = functools.partial(
    AutoencoderKL, spatial_dims=2, in_channels=1, out_channels=1, latent_channels=3,
    channels=(64, 128, 128), num_res_blocks=2, attention_levels=(False, False, False),
    norm_num_groups=32, norm_eps=1e-6, with_encoder_nonlocal_attn=False,
    with_decoder_nonlocal_attn=False)

# Same topology, narrow: for tests and CPU demos.
AutoencoderKL_tiny = functools.partial(
    AutoencoderKL_ref, channels=(8, 16, 16), norm_num_groups=8, num_res_blocks=1)
