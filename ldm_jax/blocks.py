"""Building blocks MONAI's generative networks share, in flax: the autoencoder's and the UNet's.

MONAI builds AutoencoderKL and DiffusionModelUNet from the same pieces, and matching both layer
for layer means matching those pieces once: PyTorch's default initialisers (uniform
+-1/sqrt(fan_in) for weights and biases, so a run from scratch starts where the reference's
does), torch-style `conv` and `dense` inside compact modules, GroupNorm on channels-last input,
MONAI's multi-head attention (SABlock / CrossAttentionBlock) and SpatialAttentionBlock,
nearest-neighbour upsampling and the checks MONAI's constructors make on their arguments.
ldm_jax/autoencoder.py and ldm_jax/unet.py import them from here; the layers only one network
has (AEKLResBlock, ResnetBlock, the transformer) stay in that network's file.
"""

import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import kernels

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
  return kernels.Conv(features, (kernel_size,) * nd, strides=(strides,) * nd,
                      padding=tuple(padding), use_bias=use_bias, kernel_init=kinit,
                      bias_init=binit, dtype=dtype, name=name)(x)


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
  return kernels.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, name=name)(x)


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
