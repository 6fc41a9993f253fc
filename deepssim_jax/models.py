"""The DeepSSIM embedder: a ConvNeXt backbone and a small head whose cosine predicts SSIM.

The backbone is the torchvision / Facebook ConvNeXt, layer for layer (stem 4x4/4 conv +
LayerNorm; per stage a LayerNorm + 2x2/2 conv downsampling, then blocks of depthwise 7x7
conv -> LayerNorm -> Dense 4x -> exact GELU -> Dense -> layer scale -> residual), so that
ImageNet weights can be imported parameter for parameter and ConvNeXt-Base has the same
87,564,416 backbone parameters as `torchvision.models.convnext_base().features`. There is
no final LayerNorm: the DeepSSIM head normalises the pooled features with BatchNorm.

Parameter tree (what `freeze_mask` selects by path):
  params/backbone/stem/{conv, norm}
  params/backbone/stages_i/downsample/{norm, conv}   (i >= 1)
  params/backbone/stages_i/block_j/{dwconv, norm, pwconv1, pwconv2, layer_scale}
  params/head/{hidden, embed}, batch_stats/head/bn
The downsampling layer in front of stage i belongs to stage i (torchvision's features[2i]),
so "freeze the first N stages" freezes exactly torchvision's features[0 : 2N] (N >= 1).

Why several depthwise-conv implementations: XLA:CPU runs a grouped convolution
(`feature_group_count = channels`) and especially its gradients far below the machine's
speed, while the same arithmetic written as shifted multiply-adds fuses into one loop.
Every implementation uses the same (7, 7, 1, C) kernel and (C,) bias, so checkpoints are
interchangeable; `depthwise_impl` only changes how XLA computes it.
"""

import functools
from typing import Any, Callable, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Array = jax.Array

LN_EPS = 1e-6  # torchvision / Facebook ConvNeXt LayerNorm epsilon.
BN_EPS = 1e-5  # torch.nn.BatchNorm1d defaults: eps 1e-5, momentum 0.1 (flax: 0.9).
BN_MOMENTUM = 0.9


# --------------------------------------------------------------------------- depthwise conv

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


# --------------------------------------------------------------------------- ConvNeXt

def gelu(x: Array, approximate: bool = False) -> Array:
  """GELU; exact is x/2 (1 + erf(x / sqrt 2)), the formula torch.nn.GELU evaluates.

  jax.nn.gelu(approximate=False) goes through erfc, which XLA:CPU evaluates ~2.5x slower
  than erf; the erf form is what the reference computes, so nothing is lost.
  """
  if approximate:
    return jax.nn.gelu(x, approximate=True)
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


_dense = functools.partial(nn.Dense, kernel_init=nn.initializers.truncated_normal(0.02))


class PatchConv(nn.Module):
  """k x k conv with stride k and VALID padding, as space-to-depth + one matmul.

  Same parameters as nn.Conv(features, (k, k), strides=(k, k), padding="VALID")
  ({kernel: (k, k, C_in, C_out), bias}), same values; XLA:CPU runs the matmul form at its
  matmul rate, the strided convolution several times slower.
  """
  features: int
  patch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.patch
    b, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.truncated_normal(0.02),
                        (k, k, c, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    ho, wo = h // k, w // k
    x = x[:, :ho * k, :wo * k].reshape(b, ho, k, wo, k, c)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5)).reshape(b, ho, wo, k * k * c)
    y = jnp.dot(x.astype(self.dtype), kernel.reshape(k * k * c, self.features).astype(self.dtype))
    return y + bias.astype(self.dtype)


class NormConv(nn.Module):
  """Non-overlapping k x k stride-k conv with a channel LayerNorm before or after it.

  The stem is conv -> norm (k = 4); a downsampling layer is norm -> conv (k = 2).
  """
  features: int
  patch: int
  norm_first: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")
    conv = PatchConv(self.features, self.patch, self.dtype, name="conv")
    return conv(norm(x)) if self.norm_first else norm(conv(x))


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (torchvision "row" mode)."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class ConvNeXtBlock(nn.Module):
  """dwconv 7x7 -> LayerNorm -> Dense 4C -> GELU -> Dense C -> layer scale -> + input."""
  dim: int
  drop_path: float = 0.0
  layer_scale_init: float = 1e-6
  depthwise_impl: str = "auto"
  gelu_approximate: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    y = DepthwiseConv(self.dim, 7, self.depthwise_impl, self.dtype, name="dwconv")(x)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(y)
    y = _dense(4 * self.dim, dtype=self.dtype, name="pwconv1")(y)
    y = gelu(y, self.gelu_approximate)
    y = _dense(self.dim, dtype=self.dtype, name="pwconv2")(y)
    gamma = self.param("layer_scale", nn.initializers.constant(self.layer_scale_init),
                       (self.dim,), jnp.float32)
    y = y * gamma.astype(self.dtype)
    y = DropPath(self.drop_path, name="drop_path")(y, train)
    return x + y


class ConvNeXtStage(nn.Module):
  """Optional downsampling (LayerNorm + 2x2 stride-2 conv) followed by `depth` blocks."""
  dim: int
  depth: int
  downsample: bool
  drop_paths: Tuple[float, ...]
  layer_scale_init: float = 1e-6
  depthwise_impl: str = "auto"
  gelu_approximate: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if self.downsample:
      x = NormConv(self.dim, 2, norm_first=True, dtype=self.dtype, name="downsample")(x)
    for j in range(self.depth):
      x = ConvNeXtBlock(self.dim, self.drop_paths[j], self.layer_scale_init,
                        self.depthwise_impl, self.gelu_approximate, self.dtype,
                        name=f"block_{j}")(x, train)
    return x


class ConvNeXt(nn.Module):
  """ConvNeXt feature extractor (torchvision `convnext_*().features`), NHWC in and out.

  Attributes:
    depths: blocks per stage.
    dims: channels per stage.
    drop_path_rate: stochastic-depth rate of the last block; block k of K gets
      rate * k / (K - 1) as in torchvision (whose convnext_base default is 0.5).
    layer_scale_init: initial value of the per-channel residual scale.
    dtype: compute dtype (parameters stay float32).
    depthwise_impl: key of DEPTHWISE_IMPLS; changes speed only, never parameters.
    gelu_approximate: tanh GELU instead of the exact erf GELU of the reference.
  """
  depths: Sequence[int]
  dims: Sequence[int]
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-6
  dtype: Any = jnp.float32
  depthwise_impl: str = "auto"
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False, all_stages: bool = False):
    """(B, H, W, 3) -> the last stage's (B, h, w, F), or with all_stages every stage's output."""
    if len(self.depths) != len(self.dims):
      raise ValueError(f"depths {tuple(self.depths)} and dims {tuple(self.dims)} differ in length")
    x = x.astype(self.dtype)
    x = NormConv(self.dims[0], 4, norm_first=False, dtype=self.dtype, name="stem")(x)
    rates = drop_path_rates(self.depths, self.drop_path_rate)
    start, outs = 0, []
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      x = ConvNeXtStage(dim, depth, i > 0, tuple(rates[start:start + depth]),
                        self.layer_scale_init, self.depthwise_impl, self.gelu_approximate,
                        self.dtype, name=f"stages_{i}")(x, train)
      outs.append(x)
      start += depth
    return outs if all_stages else x


def drop_path_rates(depths: Sequence[int], rate: float) -> list:
  """Per-block stochastic-depth rates: block k of K gets rate * k / (K - 1) (torchvision)."""
  total = sum(depths)
  return [rate * k / max(total - 1, 1) for k in range(total)]


ConvNeXtAtto = functools.partial(ConvNeXt, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
ConvNeXtTiny = functools.partial(ConvNeXt, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
ConvNeXtSmall = functools.partial(ConvNeXt, depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))
ConvNeXtBase = functools.partial(ConvNeXt, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024))


# --------------------------------------------------------------------------- DeepSSIM

class DeepSSIM(nn.Module):
  """Grey image -> L2-normalised embedding whose pairwise cosine regresses SSIM.

  Attributes:
    backbone: a ConvNeXt (maps (B, H, W, 3) -> (B, h, w, F); `all_stages=True` gives every
      stage's output).
    head: "wacv" (the paper's: global average pool of the last stage -> Head) or "gem"
      (DeepSSIM++: GeM pooling of each stage, concatenated -> GemHead).
    embed_dim: embedding size.
    hidden_dim: width of the head's hidden layer (0 with "gem": (sum of dims + embed) // 2,
      the reference's funnel, 848 for ConvNeXt-Tiny).
    dropout: dropout rate of the head (active only when train=True).
    bn_momentum / bn_epsilon: BatchNorm running-average momentum (flax convention) and eps.
  """
  backbone: nn.Module
  head: str = "wacv"
  embed_dim: int = 256
  hidden_dim: int = 512
  dropout: float = 0.33
  bn_momentum: float = BN_MOMENTUM
  bn_epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Embeds a batch.

    Args:
      x: (B, H, W) or (B, H, W, 1) z-scored grey images.
      train: BatchNorm uses and updates batch statistics, dropout and drop-path are on
        (needs a 'dropout' rng and mutable 'batch_stats').

    Returns:
      (B, embed_dim) float32 embeddings of unit L2 norm.
    """
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1:
      raise ValueError(f"expected grey images (B, H, W) or (B, H, W, 1), got shape {x.shape}")
    x = jnp.repeat(x, 3, axis=-1)
    if self.head == "wacv":
      x = self.backbone(x, train=train)
      x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      x = Head(self.embed_dim, self.hidden_dim, self.dropout, self.bn_momentum,
               self.bn_epsilon, name="head")(x, train)
    elif self.head == "gem":
      x = GemHead(self.embed_dim, self.hidden_dim, self.dropout, name="head")(
          self.backbone(x, train=train, all_stages=True), train)
    else:
      raise ValueError(f"unknown head {self.head!r}; choose one of {HEADS}")
    return l2_normalize(x)


HEADS = ("wacv", "gem")


class BatchNorm1d(nn.Module):
  """torch.nn.BatchNorm1d over (B, C): normalises with the biased batch variance, but its
  running variance is updated with the unbiased one (n / (n - 1)), as torch does (flax's
  BatchNorm uses the biased one for both). Same variables as nn.BatchNorm: params
  {scale, bias}, batch_stats {mean, var}; momentum in flax's convention (0.9 = torch's 0.1).
  """
  use_running_average: bool
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      x32 = x.astype(jnp.float32).reshape(-1, c)
      n = x32.shape[0]
      mean = jnp.mean(x32, axis=0)
      var = jnp.mean(jnp.square(x32 - mean), axis=0)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(x.dtype)


class Head(nn.Module):
  """BatchNorm -> Dense hidden -> exact GELU -> Dropout -> Dense embed (pooled features in)."""
  embed_dim: int = 256
  hidden_dim: int = 512
  dropout: float = 0.33
  bn_momentum: float = BN_MOMENTUM
  bn_epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = BatchNorm1d(not train, self.bn_momentum, self.bn_epsilon, name="bn")(x)
    x = _dense(self.hidden_dim, name="hidden")(x)
    x = gelu(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return _dense(self.embed_dim, name="embed")(x)


def gem_pool(x: Array, p: Array, eps: float = 1e-6) -> Array:
  """Generalised mean over H, W: mean(clip(x, eps)^p)^(1/p); p = 1 is the average, p -> inf
  the maximum (Radenovic et al. 2018). (B, H, W, C) -> (B, C), computed in float32."""
  x = jnp.maximum(x.astype(jnp.float32), eps)
  return jnp.mean(x ** p, axis=(1, 2)) ** (1.0 / p)


class GemHead(nn.Module):
  """DeepSSIM++'s head: a learnable-p GeM per stage, concatenated -> LayerNorm -> Dense
  hidden -> exact GELU -> Dropout -> Dense embed."""
  embed_dim: int = 256
  hidden_dim: int = 0
  dropout: float = 0.1
  gem_p: float = 3.0
  gem_eps: float = 1e-6
  ln_epsilon: float = 1e-5  # torch.nn.LayerNorm's default

  @nn.compact
  def __call__(self, stages: Sequence[Array], train: bool) -> Array:
    pooled = []
    for i, s in enumerate(stages):
      p = self.param(f"gem_{i}", nn.initializers.constant(self.gem_p), (1,), jnp.float32)
      pooled.append(gem_pool(s, p, self.gem_eps))
    x = jnp.concatenate(pooled, axis=-1)
    hidden = self.hidden_dim or (x.shape[-1] + self.embed_dim) // 2
    x = nn.LayerNorm(epsilon=self.ln_epsilon, name="norm")(x)
    x = _dense(hidden, name="hidden")(x)
    x = gelu(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return _dense(self.embed_dim, name="embed")(x)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """Rows divided by their L2 norm (torch.nn.functional.normalize semantics)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine(e1: Array, e2: Array) -> Array:
  """Row-wise cosine similarity of two batches of embeddings: (B, D), (B, D) -> (B,)."""
  return jnp.sum(l2_normalize(e1) * l2_normalize(e2), axis=-1)


# --------------------------------------------------------------------------- registry

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "convnext_atto": ConvNeXtAtto,  # tiny test widths, not a published model
    "convnext_tiny": ConvNeXtTiny,
    "convnext_small": ConvNeXtSmall,
    "convnext_base": ConvNeXtBase,
}


def make_model(name: str = "convnext_base", *, head: str = "wacv", embed_dim: int = 256,
               hidden_dim: int = 512, dropout: float = 0.33, **backbone_overrides) -> DeepSSIM:
  """Builds DeepSSIM with a named backbone.

  Args:
    name: key of MODELS.
    head, embed_dim, hidden_dim, dropout: head fields (see DeepSSIM).
    **backbone_overrides: ConvNeXt fields (depths, dims, drop_path_rate, dtype,
      depthwise_impl, gelu_approximate, layer_scale_init).

  Returns:
    An unbound DeepSSIM module.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  return DeepSSIM(MODELS[name](**backbone_overrides), head=head, embed_dim=embed_dim,
                  hidden_dim=hidden_dim, dropout=dropout)


# --------------------------------------------------------------------------- params helpers

def param_count(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs (e.g. from jax.eval_shape)."""
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def _frozen_prefixes(num_frozen_stages: int, num_stages: int) -> Tuple[str, ...]:
  if not 0 <= num_frozen_stages <= num_stages:
    raise ValueError(f"num_frozen_stages must be in [0, {num_stages}], got {num_frozen_stages}")
  if num_frozen_stages == 0:
    return ()
  return ("stem",) + tuple(f"stages_{i}" for i in range(num_frozen_stages))


def freeze_mask(params: Any, num_frozen_stages: int = 2) -> Any:
  """True for trainable leaves, False for the frozen stem and first N backbone stages.

  Stage i includes the downsampling layer in front of it, so N stages frozen equals
  torchvision's features[0 : 2N] frozen. N = 0 freezes nothing (not even the stem). The
  head is never frozen.

  Args:
    params: the 'params' collection of DeepSSIM (or of a bare ConvNeXt), arrays or shapes.
    num_frozen_stages: N in [0, number of stages].

  Returns:
    A pytree of bools with the structure of `params` (for optax.masked).
  """
  flat = traverse_util.flatten_dict(_unfreeze(params))
  stage_keys = {k for path in flat for k in path if k.startswith("stages_")}
  if num_frozen_stages and not stage_keys:
    raise ValueError("freeze_mask: params hold no 'stages_i' subtrees (not a ConvNeXt tree?)")
  if not 0 <= num_frozen_stages <= len(stage_keys):
    raise ValueError(f"num_frozen_stages={num_frozen_stages} outside [0, {len(stage_keys)}] "
                     "(the backbone's number of stages)")
  frozen = _frozen_prefixes(num_frozen_stages, len(stage_keys))

  def trainable(path):
    in_backbone = path[0] == "backbone" or path[0] in ("stem",) or path[0].startswith("stages_")
    body = path[1:] if path[0] == "backbone" else path
    return not (in_backbone and body[0] in frozen)

  return traverse_util.unflatten_dict({p: trainable(p) for p in flat})


def trainable_labels(params: Any, num_frozen_stages: int = 2) -> Any:
  """'train' / 'frozen' labels for optax.multi_transform (see freeze_mask)."""
  return jax.tree.map(lambda t: "train" if t else "frozen",
                      freeze_mask(params, num_frozen_stages))


def _unfreeze(tree):
  return tree.unfreeze() if hasattr(tree, "unfreeze") else dict(tree)
