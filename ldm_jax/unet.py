"""Noise-prediction UNet of the latent diffusion model: MONAI 1.6's DiffusionModelUNet in flax.

The reference's second stage is MONAI's DiffusionModelUNet on 3 x 36 x 28 latents (the
autoencoder's 3 x 34 x 28, zero-padded). We reproduce it layer for layer: with the reference's
settings it has exactly 183,981,059 parameters, MONAI's count. Submodule names follow MONAI's
state-dict keys: the block path flattened with "_" at the top (down_blocks.1.attentions.0 ->
down_blocks_1_attentions_0, time_embed.0 -> time_embed_0, out.2 -> out_2), then nested as in
MONAI (.../attn/to_q, .../conv1), so PyTorch weights map over one to one (MONAI's Convolution
adds a ".conv" level that flax does not have). Tensors are channels-last (B, H, W, C).

Structure (MONAI's, itself diffusers'):
- t -> sinusoidal embedding [cos | sin] of width channels[0] -> Linear, SiLU, Linear (4x).
- conv_in; down blocks: per level num_res_blocks x (ResnetBlock [+ attention]), then a
  downsampler (a ResnetBlock with 2x2 average pooling when resblock_updown, else a 3x3
  stride-2 conv), none at the last level; every output is kept as a skip.
- middle: ResnetBlock, attention, ResnetBlock.
- up blocks: per level num_res_blocks + 1 x (concat a skip, ResnetBlock [+ attention]), then
  an upsampler (ResnetBlock with nearest x2 when resblock_updown, else nearest x2 + conv).
- out: GroupNorm, SiLU, 3x3 conv (zero-initialised).
Attention is MONAI's SpatialAttentionBlock (GroupNorm + self-attention, biased q/k/v) when
with_conditioning is False, and its SpatialTransformer (GroupNorm, 1x1 proj_in, transformer
blocks of self-attention, cross-attention to the context and a GEGLU feed-forward, each
pre-LayerNorm and residual, 1x1 proj_out zero-initialised) when it is True. ResnetBlock's conv2
and the output conv start at zero (MONAI's zero_module), so a fresh UNet predicts zero.

Not offered (the reference uses none): class embeddings, ControlNet residuals, cross-attention
dropout, upcast_attention, include_fc=False, use_combined_linear (same maths), flash attention.
"""

import functools
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.blocks import (MultiHeadAttention, SpatialAttentionBlock, check_channels, conv,
                            dense, group_norm, per_level, upsample_nearest)

Dtype = Any


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int,
                           max_period: float = 10000.0) -> jax.Array:
  """MONAI's get_timestep_embedding (DDPM's sinusoidal embedding, cosines first).

  With half = embedding_dim // 2 and f_i = exp(-ln(max_period) * i / half), i < half, the
  embedding of t is [cos(t f_0) .. cos(t f_{half-1}), sin(t f_0) .. sin(t f_{half-1})], with a
  zero appended when embedding_dim is odd.

  Args:
    timesteps: (B,) timesteps (integer or float).
    embedding_dim: output width.
    max_period: sets the lowest frequency.

  Returns:
    (B, embedding_dim) float32 embedding.
  """
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must be a 1-d array, got shape {timesteps.shape}")
  half = embedding_dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if embedding_dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def avg_pool2x(x: jax.Array) -> jax.Array:
  """torch AvgPool(kernel_size=2, stride=2) (floor) on channels-last input."""
  nd = x.ndim - 2
  return nn.avg_pool(x, (2,) * nd, strides=(2,) * nd, padding="VALID")


class ResnetBlock(nn.Module):
  """MONAI's DiffusionUNetResnetBlock: GroupNorm, SiLU, [up/down], conv, + Linear(SiLU(temb)),
  GroupNorm, SiLU, conv (zero-initialised), + skip (1x1 conv if widths differ)."""
  out_channels: int
  up: bool = False
  down: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    gn = functools.partial(group_norm, num_groups=self.norm_num_groups, eps=self.norm_eps,
                           dtype=self.dtype)
    h = nn.silu(gn(x, name="norm1"))
    if self.up:
      x, h = upsample_nearest(x), upsample_nearest(h)
    elif self.down:
      x, h = avg_pool2x(x), avg_pool2x(h)
    h = conv(h, self.out_channels, 3, name="conv1", dtype=self.dtype)
    temb = dense(nn.silu(emb), self.out_channels, name="time_emb_proj", dtype=self.dtype)
    h = h + temb.reshape((temb.shape[0],) + (1,) * (h.ndim - 2) + (temb.shape[-1],))
    h = nn.silu(gn(h, name="norm2"))
    h = conv(h, self.out_channels, 3, name="conv2", zero_init=True, dtype=self.dtype)
    if x.shape[-1] != self.out_channels:
      x = conv(x, self.out_channels, 1, name="skip_connection", dtype=self.dtype)
    return x + h


class FeedForward(nn.Module):
  """MONAI's MLPBlock(act="GEGLU"): Linear to 2 x mlp_dim, value * GELU(gate) (exact erf GELU,
  value first), Linear back."""
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(x, 2 * self.mlp_dim, name="linear1", dtype=self.dtype)
    value, gate = jnp.split(h, 2, axis=-1)
    h = value * nn.gelu(gate, approximate=False)
    return dense(h, x.shape[-1], name="linear2", dtype=self.dtype)


class TransformerBlock(nn.Module):
  """MONAI's DiffusionUNetTransformerBlock: pre-LayerNorm self-attention, cross-attention and
  GEGLU feed-forward (4x), each residual. LayerNorm eps is torch's 1e-5."""
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    ln = lambda h, name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)(h)
    attn = functools.partial(MultiHeadAttention, num_heads=self.num_heads,
                             head_dim=self.head_dim, qkv_bias=False, dtype=self.dtype)
    x = attn(name="attn1")(ln(x, "norm1")) + x
    x = attn(name="attn2")(ln(x, "norm2"), context) + x
    return FeedForward(4 * x.shape[-1], dtype=self.dtype, name="ff")(ln(x, "norm3")) + x


class SpatialTransformer(nn.Module):
  """MONAI's SpatialTransformer: x + proj_out(transformer_blocks(proj_in(GroupNorm(x))))."""
  num_heads: int
  head_dim: int
  num_layers: int = 1
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    inner = self.num_heads * self.head_dim
    h = group_norm(x, self.norm_num_groups, self.norm_eps, name="norm", dtype=self.dtype)
    h = conv(h, inner, 1, name="proj_in", dtype=self.dtype)
    h = h.reshape(x.shape[0], -1, inner)
    for i in range(self.num_layers):
      h = TransformerBlock(self.num_heads, self.head_dim, dtype=self.dtype,
                           name=f"transformer_blocks_{i}")(h, context)
    h = h.reshape(x.shape[:-1] + (inner,))
    return conv(h, x.shape[-1], 1, name="proj_out", zero_init=True, dtype=self.dtype) + x


class DiffusionModelUNet(nn.Module):
  """MONAI's DiffusionModelUNet (Rombach et al. 2022; Pinaya et al. 2022), channels-last.

  Defaults are MONAI 1.6's.

  Attributes:
    spatial_dims: 2 or 3.
    in_channels: input channels.
    out_channels: output channels.
    num_res_blocks: residual blocks per level (int or one per level); the up path has one more.
    channels: output channels of each level.
    attention_levels: whether each level has attention after each residual block.
    norm_num_groups: GroupNorm groups (must divide every entry of channels).
    norm_eps: GroupNorm epsilon.
    resblock_updown: down/upsample with residual blocks (else strided conv / nearest + conv).
    num_head_channels: channels per attention head (int or one per level; ignored at levels
      without attention).
    with_conditioning: cross-attention to a context (SpatialTransformer) instead of
      self-attention (SpatialAttentionBlock) at the attention levels.
    transformer_num_layers: transformer blocks per SpatialTransformer.
    cross_attention_dim: context feature width; required iff with_conditioning.
    remat: rematerialise each block's activations in the backward pass (saves memory).
    dtype: computation dtype (parameters stay float32).
  """
  spatial_dims: int = 2
  in_channels: int = 1
  out_channels: int = 1
  num_res_blocks: Union[int, Sequence[int]] = (2, 2, 2, 2)
  channels: Sequence[int] = (32, 64, 64, 64)
  attention_levels: Sequence[bool] = (False, False, True, True)
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  resblock_updown: bool = False
  num_head_channels: Union[int, Sequence[int]] = 8
  with_conditioning: bool = False
  transformer_num_layers: int = 1
  cross_attention_dim: Optional[int] = None
  remat: bool = False
  dtype: Dtype = jnp.float32

  def _check(self):
    check_channels("DiffusionModelUNet", self.channels, self.attention_levels,
                   self.norm_num_groups)
    if self.with_conditioning and self.cross_attention_dim is None:
      raise ValueError("DiffusionModelUNet: with_conditioning=True needs cross_attention_dim")
    if self.cross_attention_dim is not None and not self.with_conditioning:
      raise ValueError("DiffusionModelUNet: cross_attention_dim needs with_conditioning=True")
    levels = len(self.channels)
    return (per_level(self.num_res_blocks, levels, "num_res_blocks"),
            per_level(self.num_head_channels, levels, "num_head_channels"))

  @nn.compact
  def __call__(self, x: jax.Array, timesteps: jax.Array,
               context: Optional[jax.Array] = None) -> jax.Array:
    """Predicts the noise (or whatever it was trained for) of x at `timesteps`.

    Args:
      x: (B, *spatial, in_channels); each spatial size divisible by 2^(levels - 1).
      timesteps: (B,) timesteps (a scalar is broadcast to the batch).
      context: (B, S, cross_attention_dim) conditioning, only with with_conditioning
        (MONAI feeds (B, 1, D) covariates). Without it a conditioned UNet's cross-attention
        attends to x itself, as MONAI's does (which works only where cross_attention_dim
        equals the level's width).

    Returns:
      (B, *spatial, out_channels).
    """
    nrb, nhc = self._check()
    if x.ndim != self.spatial_dims + 2 or x.shape[-1] != self.in_channels:
      raise ValueError(f"DiffusionModelUNet expects (batch, {self.spatial_dims} spatial axes, "
                       f"{self.in_channels} channels), got shape {x.shape}")
    if context is not None and not self.with_conditioning:
      raise ValueError("DiffusionModelUNet: a context was given but with_conditioning=False")
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (x.shape[0],))
    ch = tuple(self.channels)
    levels = len(ch)

    res_cls = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    res = functools.partial(res_cls, norm_num_groups=self.norm_num_groups,
                            norm_eps=self.norm_eps, dtype=self.dtype)
    sa_cls, st_cls = SpatialAttentionBlock, SpatialTransformer
    if self.remat:
      sa_cls, st_cls = nn.remat(sa_cls), nn.remat(st_cls)

    def attn(h, head_channels, name):
      c = h.shape[-1]
      if not head_channels or c % head_channels:
        raise ValueError(f"DiffusionModelUNet: num_head_channels={head_channels} must divide the "
                         f"{c} channels of every attention level")
      norm = dict(norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps, dtype=self.dtype)
      if self.with_conditioning:
        return st_cls(num_heads=c // head_channels, head_dim=head_channels,
                      num_layers=self.transformer_num_layers, name=name, **norm)(h, context)
      return sa_cls(num_head_channels=head_channels, name=name, **norm)(h)

    t_emb = get_timestep_embedding(timesteps, ch[0]).astype(self.dtype)
    emb = dense(t_emb, 4 * ch[0], name="time_embed_0", dtype=self.dtype)
    emb = dense(nn.silu(emb), 4 * ch[0], name="time_embed_2", dtype=self.dtype)

    h = conv(x, ch[0], 3, name="conv_in", dtype=self.dtype)
    skips = [h]
    for i in range(levels):
      p = f"down_blocks_{i}_"
      for j in range(nrb[i]):
        h = res(ch[i], name=p + f"resnets_{j}")(h, emb)
        if self.attention_levels[i]:
          h = attn(h, nhc[i], p + f"attentions_{j}")
        skips.append(h)
      if i < levels - 1:
        if self.resblock_updown:
          h = res(ch[i], down=True, name=p + "downsampler")(h, emb)
        else:
          h = conv(h, ch[i], 3, strides=2, padding=1, name=p + "downsampler_op",
                   dtype=self.dtype)
        skips.append(h)

    h = res(ch[-1], name="middle_block_resnet_1")(h, emb)
    h = attn(h, nhc[-1], "middle_block_attention")
    h = res(ch[-1], name="middle_block_resnet_2")(h, emb)

    for i in range(levels):
      level = levels - 1 - i
      p = f"up_blocks_{i}_"
      for j in range(nrb[level] + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(ch[level], name=p + f"resnets_{j}")(h, emb)
        if self.attention_levels[level]:
          h = attn(h, nhc[level], p + f"attentions_{j}")
      if i < levels - 1:
        if self.resblock_updown:
          h = res(ch[level], up=True, name=p + "upsampler")(h, emb)
        else:
          h = conv(upsample_nearest(h), ch[level], 3, name=p + "upsampler_postconv",
                   dtype=self.dtype)
    assert not skips, "every skip connection is consumed"

    h = nn.silu(group_norm(h, self.norm_num_groups, self.norm_eps, name="out_0",
                           dtype=self.dtype))
    return conv(h, self.out_channels, 3, name="out_2", zero_init=True, dtype=self.dtype)


# The reference's settings (brAIn-science/DeepSSIM's LDM, MONAI's DiffusionModelUNet):
# 183,981,059 parameters unconditioned.
# Conditioned on the 6 covariates: DiffusionModelUNet_ref(with_conditioning=True,
# cross_attention_dim=6), fed context of shape (B, 1, 6).
DiffusionModelUNet_ref = functools.partial(
    DiffusionModelUNet, spatial_dims=2, in_channels=3, out_channels=3, num_res_blocks=2,
    channels=(256, 512, 768), attention_levels=(False, True, True),
    num_head_channels=(0, 512, 768), norm_num_groups=32, norm_eps=1e-6, resblock_updown=True,
    transformer_num_layers=1)

# Same topology, narrow: for tests and CPU demos.
DiffusionModelUNet_tiny = functools.partial(
    DiffusionModelUNet_ref, channels=(16, 32, 32), num_head_channels=(0, 16, 32),
    norm_num_groups=8, num_res_blocks=1)
