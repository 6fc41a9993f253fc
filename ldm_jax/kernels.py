"""Convolution and GroupNorm forms that XLA:CPU runs faster than its own, same maths.

Profiled against PyTorch / oneDNN on the reference's autoencoder (2-core Xeon, batch 16 of
136 x 112, bench/profile_cpu.py), two operations were far slower in XLA:CPU than in torch:

- a convolution's **kernel gradient**: XLA:CPU computes it as a convolution whose "kernel" is
  the whole output map, about 7x the time of the forward convolution (oneDNN: about 1x;
  measured 579 ms against a forward of 81 ms and torch's 86 ms at 16 x 136 x 112, 64 -> 64).
  `conv_general_dilated` keeps XLA's forward and input gradient and computes the kernel
  gradient as one matmul per image between the input's k x k shifted windows and the output
  gradient (a custom VJP), accumulated over the batch by a scan, so that one image's windows
  at a time are materialised. Same sums, float32 accumulation. Measured 180 ms there (3.2x
  XLA's own; still 2.1x torch's: the window copies and the matmul's small output).
- **GroupNorm**: flax's GroupNorm reduces over a (B, H, W, G, C/G) view (80 ms forward at
  that shape, torch 18 ms). `group_norm_apply` sums each channel over the spatial axes (a
  reduction along the major axis), folds channels into groups, and applies the
  normalisation as one per-channel scale and shift (two-pass variance); its gradient is the
  closed form (one reduction pass, one elementwise pass). Measured 30 ms forward, 55 ms
  forward + backward (flax 86, torch 41).

`conv_general_dilated` takes the kernel-gradient form only where it was measured faster:
on CPU (`conv_impl(backend)`); GPUs and TPUs keep their convolution libraries' (cuDNN's,
the TPU's) gradients. `GroupNorm` is plain jnp reductions on every backend.
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

_DN = ("NHWC", "HWIO", "NHWC")
# "auto" (per backend), "xla" (lax.conv_general_dilated's own gradient), "patches" (ours).
# Tests set it to compare the two forms on whole networks.
CONV_IMPL = "auto"


def conv_impl(backend: str) -> str:
  """The kernel-gradient form "auto" picks: ours on CPU, the library's elsewhere."""
  return "patches" if backend == "cpu" else "xla"


def _conv(x, k, strides, padding):
  return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_DN)


def kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
  """d(sum(g * conv(x, k))) / dk for a 2-D NHWC / HWIO convolution, as patch matmuls.

  The padded input is transposed once to (B, C, H, W); then, one image at a time (a scan),
  its kh * kw shifted (strided) windows are stacked into a (kh * kw * C, Ho * Wo) matrix whose
  product with the image's (Ho * Wo, O) output gradient is that image's kernel gradient.

  Args:
    x: (B, H, W, C) convolution input.
    g: (B, Ho, Wo, O) gradient of the convolution output.
    kernel_shape: (kh, kw, C, O).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)), non-negative.

  Returns:
    (kh, kw, C, O) kernel gradient in x's dtype (accumulated in float32).
  """
  kh, kw, c, o = kernel_shape
  _, ho, wo, _ = g.shape
  sh, sw = strides
  xt = jnp.transpose(jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0))),
                     (0, 3, 1, 2))

  def one(acc, xg):
    xb, gb = xg                                                  # (C, Hp, Wp), (Ho, Wo, O)
    windows = [lax.slice(xb, (0, i, j), (c, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1),
                         (1, sh, sw)) for i in range(kh) for j in range(kw)]
    patches = jnp.stack(windows).reshape(kh * kw * c, ho * wo)
    return acc + jnp.dot(patches, gb.reshape(ho * wo, o),
                         preferred_element_type=jnp.float32), None

  dk = lax.scan(one, jnp.zeros((kh * kw * c, o), jnp.float32), (xt, g))[0]
  return dk.reshape(kernel_shape).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_patches(x, k, strides, padding):
  return _conv(x, k, strides, padding)


def _conv_patches_fwd(x, k, strides, padding):
  return _conv(x, k, strides, padding), (x, k)


def _conv_patches_bwd(strides, padding, res, g):
  x, k = res
  dx = jax.vjp(lambda x_: _conv(x_, k, strides, padding), x)[1](g)[0]
  return dx, kernel_grad(x, g, k.shape, strides, padding)


_conv_patches.defvjp(_conv_patches_fwd, _conv_patches_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """lax.conv_general_dilated, with the patch-matmul kernel gradient where it applies.

  It applies to plain 2-D NHWC / HWIO convolutions (explicit non-negative padding, no
  dilation, no groups, default precision) when the form resolves to "patches"; anything
  else is lax.conv_general_dilated itself. Same signature (flax's `nn.Conv` takes it as
  `conv_general_dilated`).
  """
  impl = conv_impl(jax.default_backend()) if CONV_IMPL == "auto" else CONV_IMPL
  plain = (impl == "patches" and lhs.ndim == 4 and feature_group_count == 1
           and precision is None and not kwargs and not isinstance(padding, str)
           and all(lo >= 0 and hi >= 0 for lo, hi in padding)
           and all(d == 1 for d in tuple(lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1)))
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)
  return _conv_patches(lhs, rhs, tuple(window_strides),
                       tuple((int(lo), int(hi)) for lo, hi in padding))


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
Conv.__doc__ = "flax's nn.Conv (same parameters) with `conv_general_dilated` above."


def _group_mean(s, num_groups, n):
  """(B, C) per-channel sums -> (B, C): the mean over each channel's group (n elements)."""
  b, c = s.shape
  per = c // num_groups
  return jnp.repeat(s.reshape(b, num_groups, per).sum(-1) / n, per, axis=1)


def _as_rows(x):
  """(B, *spatial, C) -> (B, S, C) float32."""
  return x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)


def _group_norm_fwd(x, scale, bias, num_groups, eps, dtype):
  # Per (batch, channel): the group's mean and 1 / std (two-pass variance); then one scale
  # and shift per channel.
  xf = _as_rows(x)
  n = xf.shape[1] * (x.shape[-1] // num_groups)
  mean = _group_mean(xf.sum(1), num_groups, n)
  inv = lax.rsqrt(_group_mean(jnp.square(xf - mean[:, None]).sum(1), num_groups, n) + eps)
  a = inv * scale
  y = xf * a[:, None] + (bias - mean * a)[:, None]
  return y.reshape(x.shape).astype(dtype), (x, scale, mean, inv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, num_groups, eps, dtype):
  return _group_norm_fwd(x, scale, bias, num_groups, eps, dtype)[0]


def _group_norm_bwd(num_groups, eps, dtype, res, dy):
  # xhat = (x - mean) inv, y = xhat scale + bias:
  #   dbias = sum dy, dscale = sum dy xhat,
  #   dx = inv (dy scale - mean_g(dy scale) - xhat mean_g(dy scale xhat)),
  # with mean_g over a group's positions and channels: one reduction pass, one elementwise.
  x, scale, mean, inv = res
  xf, dyf = _as_rows(x), _as_rows(dy)
  n = xf.shape[1] * (x.shape[-1] // num_groups)
  xhat = (xf - mean[:, None]) * inv[:, None]
  s1, s2 = dyf.sum(1), (dyf * xhat).sum(1)                     # (B, C)
  m1, m2 = _group_mean(s1 * scale, num_groups, n), _group_mean(s2 * scale, num_groups, n)
  dx = inv[:, None] * (dyf * scale - m1[:, None] - xhat * m2[:, None])
  return dx.reshape(x.shape).astype(x.dtype), s2.sum(0), s1.sum(0)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm_apply(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
                     eps: float, dtype: Optional[Dtype] = None) -> jax.Array:
  """torch.nn.GroupNorm on channels-last input: statistics in float32, two-pass variance,
  and a closed-form gradient (one reduction pass and one elementwise pass).

  Args:
    x: (B, *spatial, C), C divisible by num_groups.
    scale, bias: (C,) affine parameters (float32).
    num_groups: groups of C / num_groups consecutive channels.
    eps: added to the variance.
    dtype: output dtype (default x's).

  Returns:
    The normalised x, same shape.
  """
  return _group_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32), num_groups,
                     float(eps), jnp.dtype(dtype or x.dtype))


class GroupNorm(nn.Module):
  """flax's nn.GroupNorm parameters ("scale", "bias"; float32) with `group_norm_apply`."""
  num_groups: int
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return group_norm_apply(x, scale, bias, self.num_groups, self.epsilon,
                            self.dtype or jnp.promote_types(x.dtype, jnp.float32))
