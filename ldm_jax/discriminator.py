"""Patch-GAN discriminator for the autoencoder's adversarial loss: MONAI 1.6's PatchDiscriminator.

The reference trains its KL autoencoder with a least-squares adversarial term from MONAI's
PatchDiscriminator (Pix2PixHD style). Reproducing it layer for layer (693,665 parameters with
num_layers_d=3, channels=32, one input channel) keeps that loss term the reference's. Names
follow MONAI's state dict: initial_conv, "<i>.conv" -> layer_<i>/conv, "<i>.adn.N" ->
layer_<i>/norm, final_conv.

Each hidden layer is MONAI's Convolution with act and norm, whose default ordering "NDA" is
conv -> norm -> dropout -> activation: a k x k conv with padding 1 (stride 2, the
last one stride 1), BatchNorm, LeakyReLU(0.2). The first conv has a bias and no norm; the
hidden convs have no bias; the final conv (kernel `last_conv_kernel_size`, default = kernel)
has a bias and nothing after it. Like MONAI's forward, __call__ returns every layer's output,
the last being the patch logits, so a feature-matching loss can use the rest.

Initialisation follows MONAI's normal_init: conv weights N(0, 0.02), biases 0, BatchNorm
scale N(1, 0.02), offset 0. BatchNorm matches torch's (eps 1e-5, momentum 0.1 = flax 0.9),
except that flax keeps the biased batch variance in its running average (torch: unbiased).
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax import kernels

Dtype = Any


def _normal(mean: float, std: float):
  def init(key, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(key, shape, dtype)
  return init


class _ConvNormAct(nn.Module):
  """MONAI Convolution(act=LeakyReLU, norm=BATCH, bias=False): conv, BatchNorm, dropout, act."""
  features: int
  kernel_size: int
  stride: int
  padding: int
  negative_slope: float
  dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    nd = x.ndim - 2
    h = kernels.Conv(self.features, (self.kernel_size,) * nd, strides=(self.stride,) * nd,
                     padding=((self.padding, self.padding),) * nd, use_bias=False,
                     dtype=self.dtype, kernel_init=_normal(0.0, 0.02), name="conv")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, scale_init=_normal(1.0, 0.02), name="norm")(h)
    if self.dropout:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.leaky_relu(h, self.negative_slope)


class PatchDiscriminator(nn.Module):
  """MONAI's PatchDiscriminator, channels-last.

  Attributes:
    spatial_dims: 2 or 3 (checked against the input).
    channels: filters of the first conv, doubled at every following layer.
    in_channels: image channels.
    out_channels: logit channels.
    num_layers_d: hidden (conv, BatchNorm, LeakyReLU) layers after the first conv.
    kernel_size: kernel of every conv but the last.
    negative_slope: LeakyReLU slope (MONAI: 0.2).
    padding: symmetric padding of the hidden convs (MONAI's PatchDiscriminator default 1;
      MultiScalePatchDiscriminator passes (kernel_size - 1) // 2, the same for kernel 4).
    dropout: dropout rate after each norm (MONAI default 0).
    last_conv_kernel_size: kernel of the final conv; None means kernel_size.
    dtype: computation dtype.
  """
  spatial_dims: int = 2
  channels: int = 32
  in_channels: int = 1
  out_channels: int = 1
  num_layers_d: int = 3
  kernel_size: int = 4
  negative_slope: float = 0.2
  padding: int = 1
  dropout: float = 0.0
  last_conv_kernel_size: Optional[int] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    """Runs the discriminator.

    Args:
      x: (B, *spatial, in_channels) images.
      train: use batch statistics and update `batch_stats` (pass mutable=["batch_stats"]),
        and apply dropout (needs a "dropout" rng when dropout > 0).

    Returns:
      The outputs of initial_conv, layer_0 .. layer_{n-1} and final_conv, in order; the last
      is the (B, *patches, out_channels) logits.
    """
    if x.ndim != self.spatial_dims + 2 or x.shape[-1] != self.in_channels:
      raise ValueError(f"PatchDiscriminator expects (batch, {self.spatial_dims} spatial axes, "
                       f"{self.in_channels} channels), got shape {x.shape}")
    nd = self.spatial_dims
    k = (self.kernel_size,) * nd
    pad = ((self.padding, self.padding),) * nd
    outs = []
    h = kernels.Conv(self.channels, k, strides=(2,) * nd, padding=pad, dtype=self.dtype,
                     kernel_init=_normal(0.0, 0.02), bias_init=nn.initializers.zeros,
                     name="initial_conv")(x)
    if self.dropout:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.leaky_relu(h, self.negative_slope)
    outs.append(h)
    features = self.channels * 2
    for i in range(self.num_layers_d):
      stride = 1 if i == self.num_layers_d - 1 else 2
      h = _ConvNormAct(features, self.kernel_size, stride, self.padding, self.negative_slope,
                       self.dropout, self.dtype, name=f"layer_{i}")(h, train)
      outs.append(h)
      features *= 2
    lk = self.last_conv_kernel_size or self.kernel_size
    lpad = ((lk - 1) // 2,) * 2
    h = kernels.Conv(self.out_channels, (lk,) * nd, padding=(lpad,) * nd, dtype=self.dtype,
                     kernel_init=_normal(0.0, 0.02), bias_init=nn.initializers.zeros,
                     name="final_conv")(h)
    outs.append(h)
    return outs


# The reference's settings (brAIn-science/DeepSSIM's LDM, MONAI's PatchDiscriminator):
# 693,665 parameters.
PatchDiscriminator_ref = functools.partial(
    PatchDiscriminator, spatial_dims=2, num_layers_d=3, channels=32, in_channels=1,
    out_channels=1)

# Narrow, for tests and CPU demos.
PatchDiscriminator_tiny = functools.partial(PatchDiscriminator_ref, channels=8)
