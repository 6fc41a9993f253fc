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

The helpers here (PyTorch-style initialisers, `conv`, `dense`, `MultiHeadAttention`,
`SpatialAttentionBlock`) are MONAI's shared blocks and are reused by ldm_jax/unet.py.
"""

import functools
import itertools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# torch.nn.Conv*/Linear default: kaiming_uniform(a=sqrt(5)) == uniform(+-1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
  """PyTorch's default bias initialiser, uniform(+-1/sqrt(fan_in)).

  Args:
    fan_in: input features times the kernel's spatial size.

  Returns:
    A flax initialiser.
  """
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(x: jax.Array, features: int, kernel_size: int, *, name: str, strides: int = 1,
         padding: Union[int, Sequence[tuple[int, int]], None] = None, zero_init: bool = False,
         use_bias: bool = True, kernel_init=None, dtype: Dtype = jnp.float32) -> jax.Array:
  """A torch-style convolution (MONAI Convolution(conv_only=True)) inside a compact module.

  Args:
    x: (B, *spatial, C) input.
    features: output channels.
    kernel_size: same size along every spatial axis.
    name: submodule name.
    strides: same stride along every axis.
    padding: int (symmetric, per side, as torch), explicit ((lo, hi), ...) pairs, or None for
      (kernel_size - 1) // 2.
    zero_init: MONAI's zero_module: weights and bias start at zero.
    use_bias: whether the conv has a bias.
    kernel_init: overrides the PyTorch default kernel initialiser.
    dtype: computation dtype.

  Returns:
    (B, *spatial', features).
  """
  nd = x.ndim - 2
  if padding is None:
    padding = (kernel_size - 1) // 2
  if isinstance(padding, int):
    padding = ((padding, padding),) * nd
  fan_in = x.shape[-1] * kernel_size ** nd
  if zero_init:
    kinit, binit = nn.initializers.zeros, nn.initializers.zeros
  else:
    kinit, binit = kernel_init or torch_kernel_init, torch_bias_init(fan_in)
  return nn.Conv(features, (kernel_size,) * nd, strides=(strides,) * nd, padding=tuple(padding),
                 use_bias=use_bias, kernel_init=kinit, bias_init=binit, dtype=dtype,
                 name=name)(x)


def dense(x: jax.Array, features: int, *, name: str, use_bias: bool = True,
          zero_init: bool = False, dtype: Dtype = jnp.float32) -> jax.Array:
  """torch.nn.Linear (PyTorch default initialisation) inside a compact module."""
  if zero_init:
    kinit, binit = nn.initializers.zeros, nn.initializers.zeros
  else:
    kinit, binit = torch_kernel_init, torch_bias_init(x.shape[-1])
  return nn.Dense(features, use_bias=use_bias, kernel_init=kinit, bias_init=binit, dtype=dtype,
                  name=name)(x)


def group_norm(x: jax.Array, num_groups: int, eps: float, *, name: str,
               dtype: Dtype = jnp.float32) -> jax.Array:
  """torch.nn.GroupNorm(num_groups, C, eps, affine=True) on channels-last input."""
  if x.shape[-1] % num_groups:
    raise ValueError(f"GroupNorm {name}: {x.shape[-1]} channels are not divisible by "
                     f"{num_groups} groups")
  return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, name=name)(x)


class MultiHeadAttention(nn.Module):
  """MONAI's SABlock and CrossAttentionBlock (use_combined_linear=False, include_fc=True).

  Separate to_q / to_k / to_v projections to num_heads * head_dim features (heads are the
  outer factor of the feature axis, as MONAI's "b t (l d) -> b l t d"), softmax(q k^T /
  sqrt(head_dim)) v per head, then out_proj back to the input width. Keys and values come from
  `context` when given (cross-attention), else from x (self-attention).

  Attributes:
    num_heads: number of heads.
    head_dim: channels per head; None means input channels // num_heads.
    qkv_bias: whether to_q/to_k/to_v have biases (MONAI: True in SpatialAttentionBlock,
      False in the transformer blocks).
    dtype: computation dtype.
  """
  num_heads: int
  head_dim: Optional[int] = None
  qkv_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    """x: (B, T, C); context: (B, S, Cc) or None. Returns (B, T, C)."""
    c = x.shape[-1]
    if self.head_dim is None and c % self.num_heads:
      raise ValueError(f"{c} channels are not divisible by {self.num_heads} heads")
    head_dim = self.head_dim or c // self.num_heads
    inner = self.num_heads * head_dim
    kv = x if context is None else context
    mk = functools.partial(dense, features=inner, use_bias=self.qkv_bias, dtype=self.dtype)
    q, k, v = mk(x, name="to_q"), mk(kv, name="to_k"), mk(kv, name="to_v")
    split = lambda t: t.reshape(t.shape[:2] + (self.num_heads, head_dim))
    out = jax.nn.dot_product_attention(split(q), split(k), split(v),
                                       scale=head_dim ** -0.5)
    out = out.reshape(x.shape[:2] + (inner,))
    return dense(out, c, name="out_proj", dtype=self.dtype)


class SpatialAttentionBlock(nn.Module):
  """MONAI's SpatialAttentionBlock: x + SelfAttention(GroupNorm(x)) over the flattened grid.

  Attributes:
    num_head_channels: channels per head (None: one head). Must divide the input channels.
    norm_num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon.
    dtype: computation dtype.
  """
  num_head_channels: Optional[int] = None
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, *spatial, C). Returns the same shape."""
    c = x.shape[-1]
    if self.num_head_channels is not None and c % self.num_head_channels:
      raise ValueError(f"{c} channels are not divisible by num_head_channels="
                       f"{self.num_head_channels}")
    heads = c // self.num_head_channels if self.num_head_channels else 1
    h = group_norm(x, self.norm_num_groups, self.norm_eps, name="norm", dtype=self.dtype)
    h = h.reshape(x.shape[0], -1, c)
    h = MultiHeadAttention(num_heads=heads, qkv_bias=True, dtype=self.dtype, name="attn")(h)
    return h.reshape(x.shape) + x


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  """torch nn.Upsample(scale_factor=factor, mode="nearest") on channels-last input."""
  for axis in range(1, x.ndim - 1):
    x = jnp.repeat(x, factor, axis=axis)
  return x


def per_level(value: Union[int, Sequence[int]], levels: int, what: str) -> tuple[int, ...]:
  """MONAI's ensure_tuple_rep: an int becomes one value per level; a sequence is checked."""
  if isinstance(value, (int, np.integer)):
    return (int(value),) * levels
  value = tuple(value)
  if len(value) != levels:
    raise ValueError(f"{what} has {len(value)} entries but channels has {levels} levels")
  return value


def check_channels(name: str, channels: Sequence[int], attention_levels: Sequence[bool],
                   norm_num_groups: int) -> None:
  """The checks MONAI's constructors make, as ValueErrors naming the network."""
  if any(c % norm_num_groups for c in channels):
    raise ValueError(f"{name}: every entry of channels {tuple(channels)} must be a multiple of "
                     f"norm_num_groups={norm_num_groups}")
  if len(channels) != len(attention_levels):
    raise ValueError(f"{name}: channels {tuple(channels)} and attention_levels "
                     f"{tuple(attention_levels)} must have the same length")


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
    conv1x1 = lambda: nn.Conv(lc, (1,) * self.spatial_dims, kernel_init=torch_kernel_init,
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
