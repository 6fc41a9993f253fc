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
  """Depthwise SAME conv as one grouped XLA convolution (the reference formulation)."""
  c = x.shape[-1]
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def _dw_shift(x: Array, kernel: Array) -> Array:
  """Depthwise SAME conv as a sum of k*k shifted copies of the padded input times a tap."""
  kh, kw = kernel.shape[:2]
  _, h, w, _ = x.shape
  ph, pw = kh // 2, kw // 2
  xp = jnp.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
  out = None
  for i in range(kh):
    for j in range(kw):
      term = xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


DEPTHWISE_IMPLS: Dict[str, Callable[[Array, Array], Array]] = {
    "conv": _dw_conv,
    "shift": _dw_shift,
}


def depthwise_conv(x: Array, kernel: Array, impl: str = "shift") -> Array:
  """Depthwise 2-D convolution with SAME padding, stride 1.

  Args:
    x: (B, H, W, C) input.
    kernel: (kh, kw, 1, C) taps (flax/HWIO layout of a grouped conv with C groups).
    impl: a key of DEPTHWISE_IMPLS.

  Returns:
    (B, H, W, C), identical (to float rounding) for every impl.
  """
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"unknown depthwise_impl {impl!r}; choose one of {sorted(DEPTHWISE_IMPLS)}")
  return DEPTHWISE_IMPLS[impl](x, kernel)


class DepthwiseConv(nn.Module):
  """Depthwise conv layer with a bias; same parameters as nn.Conv(feature_group_count=C)."""
  features: int
  kernel_size: int = 7
  impl: str = "shift"
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

_dense = functools.partial(nn.Dense, kernel_init=nn.initializers.truncated_normal(0.02))
_conv = functools.partial(nn.Conv, kernel_init=nn.initializers.truncated_normal(0.02),
                          padding="VALID")


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
    conv = _conv(self.features, (self.patch, self.patch), strides=(self.patch, self.patch),
                 dtype=self.dtype, name="conv")
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
  depthwise_impl: str = "shift"
  gelu_approximate: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    y = DepthwiseConv(self.dim, 7, self.depthwise_impl, self.dtype, name="dwconv")(x)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(y)
    y = _dense(4 * self.dim, dtype=self.dtype, name="pwconv1")(y)
    y = nn.gelu(y, approximate=self.gelu_approximate)
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
  depthwise_impl: str = "shift"
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
  depthwise_impl: str = "shift"
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if len(self.depths) != len(self.dims):
      raise ValueError(f"depths {tuple(self.depths)} and dims {tuple(self.dims)} differ in length")
    x = x.astype(self.dtype)
    x = NormConv(self.dims[0], 4, norm_first=False, dtype=self.dtype, name="stem")(x)
    total = sum(self.depths)
    rates = [self.drop_path_rate * k / max(total - 1, 1) for k in range(total)]
    start = 0
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      x = ConvNeXtStage(dim, depth, i > 0, tuple(rates[start:start + depth]),
                        self.layer_scale_init, self.depthwise_impl, self.gelu_approximate,
                        self.dtype, name=f"stages_{i}")(x, train)
      start += depth
    return x


ConvNeXtAtto = functools.partial(ConvNeXt, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
ConvNeXtTiny = functools.partial(ConvNeXt, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
ConvNeXtSmall = functools.partial(ConvNeXt, depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))
ConvNeXtBase = functools.partial(ConvNeXt, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024))


# --------------------------------------------------------------------------- DeepSSIM

class DeepSSIM(nn.Module):
  """Grey image -> L2-normalised embedding whose pairwise cosine regresses SSIM.

  Attributes:
    backbone: a ConvNeXt (any module mapping (B, H, W, 3) -> (B, h, w, F) with a `train` arg).
    embed_dim: embedding size.
    hidden_dim: width of the head's hidden layer.
    dropout: dropout rate of the head (active only when train=True).
    bn_momentum / bn_epsilon: BatchNorm running-average momentum (flax convention) and eps.
  """
  backbone: nn.Module
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
    x = self.backbone(x, train=train)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = Head(self.embed_dim, self.hidden_dim, self.dropout, self.bn_momentum, self.bn_epsilon,
             name="head")(x, train)
    return l2_normalize(x)


class Head(nn.Module):
  """BatchNorm -> Dense hidden -> exact GELU -> Dropout -> Dense embed (pooled features in)."""
  embed_dim: int = 256
  hidden_dim: int = 512
  dropout: float = 0.33
  bn_momentum: float = BN_MOMENTUM
  bn_epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, name="bn")(x)
    x = _dense(self.hidden_dim, name="hidden")(x)
    x = nn.gelu(x, approximate=False)
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


def make_model(name: str = "convnext_base", *, embed_dim: int = 256, hidden_dim: int = 512,
               dropout: float = 0.33, **backbone_overrides) -> DeepSSIM:
  """Builds DeepSSIM with a named backbone.

  Args:
    name: key of MODELS.
    embed_dim, hidden_dim, dropout: head fields.
    **backbone_overrides: ConvNeXt fields (depths, dims, drop_path_rate, dtype,
      depthwise_impl, gelu_approximate, layer_scale_init).

  Returns:
    An unbound DeepSSIM module.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  return DeepSSIM(MODELS[name](**backbone_overrides), embed_dim=embed_dim,
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
  frozen = _frozen_prefixes(num_frozen_stages, max(len(stage_keys), num_frozen_stages))
  if num_frozen_stages and not stage_keys:
    raise ValueError("freeze_mask: params hold no 'stages_i' subtrees (not a ConvNeXt tree?)")

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
