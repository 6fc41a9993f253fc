"""Depthwise 2-D convolution in several forms that give the same values and gradients.

ConvNeXt's 7x7 depthwise convolution (`feature_group_count = channels`) is the one layer
XLA:CPU runs, and especially differentiates, far below the machine's speed, while the same
arithmetic written another way stays on its fast paths. The forms (keys of DEPTHWISE_IMPLS):
  conv   one grouped XLA convolution: the plain formulation and the reference for the others.
  shift  kh*kw shifted multiply-adds that XLA fuses into one loop, behind a custom VJP (input
         gradient: the same sum with the kernel flipped; kernel gradient: one variadic
         reduction) and a fusion barrier that keeps XLA:CPU's library fusion from splitting it.
  dense  per channel a (HW x HW) matrix over positions, applied with a batched matmul: only
         for maps of a few dozen positions (ConvNeXt's last stages).
  auto   chosen per call from the map size and the backend (`auto_impl`): on CPU "dense" up
         to AUTO_DENSE_MAX_POSITIONS positions and "shift" above; on GPU/TPU "conv", which
         their convolution libraries run natively.
Every form uses the same (kh, kw, 1, C) kernel and (C,) bias, so checkpoints are
interchangeable: `impl` only changes how XLA computes the layer.
"""

import functools
from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _dw_conv(x: Array, kernel: Array) -> Array:
  """Depthwise SAME conv as one grouped XLA convolution (the plain formulation)."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _pad_same(x: Array, kh: int, kw: int) -> Array:
  return jnp.pad(x, ((0, 0), (kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2), (0, 0)))


def _shift_sum(x: Array, taps: Array) -> Array:
  """sum_ij pad(x)[:, i:i+H, j:j+W] * taps[i, j]: one fused elementwise loop in XLA."""
  kh, kw = taps.shape[:2]
  _, h, w, _ = x.shape
  xp = _pad_same(x, kh, kw)
  out = None
  for i in range(kh):
    for j in range(kw):
      term = xp[:, i:i + h, j:j + w, :] * taps[i, j]
      out = term if out is None else out + term
  return out


def _shift_kernel_grad(x: Array, dy: Array, kh: int, kw: int) -> Array:
  """d(loss)/d(taps) of _shift_sum: (kh, kw, C) = sum_bhw pad(x)[shifted] * dy.

  Written as ONE variadic reduction over (H, W) with the kh*kw products as operands, so
  XLA:CPU fuses the shifted reads into a single pass over x and dy (49 separate
  reductions materialise every shifted copy first: ~10x slower), parallel over the batch;
  the per-image partial sums are then added in float32.
  """
  _, h, w, c = x.shape
  xp = _pad_same(x, kh, kw).astype(jnp.float32)
  dy = dy.astype(jnp.float32)
  prods = tuple(xp[:, i:i + h, j:j + w, :] * dy for i in range(kh) for j in range(kw))
  zeros = tuple(jnp.float32(0) for _ in prods)
  sums = jax.lax.reduce(prods, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (1, 2))
  return jnp.stack(sums).sum(axis=1).reshape(kh, kw, c)


def _fusion_barrier(x: Array) -> Array:
  """Identity that XLA:CPU's library (YNNPACK) fusion pass does not absorb.

  XLA:CPU hands each matmul, together with the elementwise ops feeding it, to YNNPACK. It
  pulls the adds of a shifted-sum depthwise conv into the LayerNorm + Dense that follows,
  and every shifted slice then becomes a materialised copy (2x slower ConvNeXt blocks at
  34x28). A reduce_precision to the value's own precision is an exact no-op that the
  library fusion does not take, so the shifted sum stays one loop. Purely a performance
  device: removing it changes no value.
  """
  fi = jnp.finfo(x.dtype)
  return jax.lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


@jax.custom_vjp
def _dw_shift(x: Array, kernel: Array) -> Array:
  """Depthwise SAME conv as shifted multiply-adds, with a hand-written backward pass."""
  return _fusion_barrier(_shift_sum(x, kernel[:, :, 0, :]))


def _dw_shift_fwd(x, kernel):
  return _dw_shift(x, kernel), (x, kernel)


def _dw_shift_bwd(res, dy):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  # The input gradient of a SAME correlation with an odd kernel is the same correlation of
  # dy with the kernel flipped in both spatial axes.
  dx = _fusion_barrier(_shift_sum(dy, kernel[::-1, ::-1, 0, :]).astype(x.dtype))
  dk = _shift_kernel_grad(x, dy, kh, kw)[:, :, None, :].astype(kernel.dtype)
  return dx, dk


_dw_shift.defvjp(_dw_shift_fwd, _dw_shift_bwd)


@functools.lru_cache(maxsize=None)
def _tap_matrix(h: int, w: int, kh: int, kw: int) -> np.ndarray:
  """(kh*kw, (h*w)**2) 0/1 matrix: which tap links output position p to input position q."""
  a = np.zeros((kh * kw, h * w, h * w), np.float32)
  for ph in range(h):
    for pw in range(w):
      for i in range(kh):
        for j in range(kw):
          qh, qw = ph + i - kh // 2, pw + j - kw // 2
          if 0 <= qh < h and 0 <= qw < w:
            a[i * kw + j, ph * w + pw, qh * w + qw] = 1.0
  return a.reshape(kh * kw, -1)


def _dw_dense(x: Array, kernel: Array) -> Array:
  """Depthwise SAME conv as a per-channel (HW x HW) spatial matmul (for small maps).

  For the 8x7 and 4x3 maps of ConvNeXt's last stages the whole conv is, per channel, a dense
  matrix over positions; building it from the taps with one matmul and applying it with a
  batched matmul keeps XLA:CPU on its matmul kernels in the forward AND backward pass.
  Costs (HW / taps) times the direct FLOPs, so only for maps of a few dozen positions.
  """
  b, h, w, c = x.shape
  kh, kw = kernel.shape[:2]
  taps = kernel.reshape(kh * kw, c)
  mats = jnp.dot(taps.T, jnp.asarray(_tap_matrix(h, w, kh, kw), taps.dtype))  # (C, P*Q)
  y = jnp.einsum("cpq,bqc->bpc", mats.reshape(c, h * w, h * w), x.reshape(b, h * w, c))
  return y.reshape(b, h, w, c)


# Largest H*W for which "auto" uses the dense formulation (ConvNeXt stages 3 and 4 at
# 136x112: 56 and 12 positions; stage 2 has 238, where shifted sums win).
AUTO_DENSE_MAX_POSITIONS = 64


def auto_impl(positions: int, backend: str) -> str:
  """The depthwise form "auto" uses: on CPU the dense form for maps of at most
  AUTO_DENSE_MAX_POSITIONS positions and shifted sums above (both measured faster than
  XLA:CPU's grouped convolution); on GPU/TPU the plain grouped convolution, which their
  convolution libraries run natively (cuDNN, the TPU's convolution units) and which no
  measurement there has yet bettered."""
  if backend != "cpu":
    return "conv"
  return "dense" if positions <= AUTO_DENSE_MAX_POSITIONS else "shift"


def _dw_auto(x: Array, kernel: Array) -> Array:
  return DEPTHWISE_IMPLS[auto_impl(x.shape[1] * x.shape[2], jax.default_backend())](x, kernel)


DEPTHWISE_IMPLS: Dict[str, Callable[[Array, Array], Array]] = {
    "conv": _dw_conv,
    "shift": _dw_shift,
    "dense": _dw_dense,
    "auto": _dw_auto,
}


def depthwise_conv(x: Array, kernel: Array, impl: str = "auto") -> Array:
  """Depthwise 2-D convolution (cross-correlation, like torch/flax) with SAME padding.

  Args:
    x: (B, H, W, C) input.
    kernel: (kh, kw, 1, C) taps, odd kh and kw (flax HWIO layout of a C-group conv).
    impl: a key of DEPTHWISE_IMPLS; all give the same values and gradients.

  Returns:
    (B, H, W, C).
  """
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"unknown depthwise_impl {impl!r}; choose one of {sorted(DEPTHWISE_IMPLS)}")
  if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
    raise ValueError(f"depthwise kernel must have odd sizes, got {kernel.shape[:2]}")
  return DEPTHWISE_IMPLS[impl](x, kernel)


class DepthwiseConv(nn.Module):
  """Depthwise conv layer with a bias; same parameters as nn.Conv(feature_group_count=C)."""
  features: int
  kernel_size: int = 7
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.truncated_normal(0.02),
                        (k, k, 1, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    return depthwise_conv(x, kernel, self.impl) + bias
