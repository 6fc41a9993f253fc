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

The blocks' 7x7 depthwise convolution comes from `depthwise.py`, in the form named by
`depthwise_impl`; every form has the same parameters, so checkpoints are interchangeable.

Compute dtype (`make_model(dtype=...)`, config.model.dtype: one of COMPUTE_DTYPES): the
backbone computes in it; parameters are float32 whatever it is, and pooling, both heads
(the BatchNorm statistics included), the L2 normalisation and so the embeddings and any
loss on their cosines are float32. The dtype changes speed and the last bits only, never
the parameter tree, so one checkpoint serves every dtype.

The file is longer than most because it is one idea, the embedder's network: the ConvNeXt
layers, the two heads, the registry of sizes and the freeze masks over their parameter tree.
"""

import functools
from typing import Any, Callable, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from deepssim_jax import depthwise, geometry

Array = jax.Array

LN_EPS = 1e-6  # torchvision / Facebook ConvNeXt LayerNorm epsilon.
BN_EPS = 1e-5  # torch.nn.BatchNorm1d defaults: eps 1e-5, momentum 0.1 (flax: 0.9).
BN_MOMENTUM = 0.9

# Compute dtypes a model can run in (config.model.dtype); parameters are always float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(dtype: Any) -> Any:
  """The jnp dtype of a compute dtype name ('float32' | 'bfloat16') or dtype.

  Raises:
    ValueError: any other dtype (float16 is not offered: bfloat16 has float32's range and
      trains without loss scaling).
  """
  try:
    as_dtype = dtype if isinstance(dtype, str) else jnp.dtype(dtype)
  except TypeError:
    as_dtype = None
  for name, dt in COMPUTE_DTYPES.items():
    if as_dtype == name or (not isinstance(as_dtype, str) and as_dtype == jnp.dtype(dt)):
      return dt
  raise ValueError(f"compute dtype {dtype!r}: expected one of {list(COMPUTE_DTYPES)}")


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
    y = depthwise.DepthwiseConv(self.dim, 7, self.depthwise_impl, self.dtype,
                                 name="dwconv")(x)
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
    depthwise_impl: key of depthwise.DEPTHWISE_IMPLS; changes speed only, never parameters.
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
    grid: ("grid" head, ours) the last stage average-pooled over a (rows, columns) grid of
      regions and flattened into the paper's Head, so the embedding keeps where features
      are, as SSIM, a mean of local comparisons, does.
  """
  backbone: nn.Module
  head: str = "wacv"
  grid: Sequence[int] = (2, 2)
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
      (B, embed_dim) float32 embeddings of unit L2 norm (float32 whatever the backbone's
      compute dtype: pooling, head and normalisation are float32).
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
    elif self.head == "grid":
      x = grid_pool(self.backbone(x, train=train).astype(jnp.float32), self.grid)
      x = Head(self.embed_dim, self.hidden_dim, self.dropout, self.bn_momentum,
               self.bn_epsilon, name="head")(x.reshape(x.shape[0], -1), train)
    else:
      raise ValueError(f"unknown head {self.head!r}; choose one of {HEADS}")
    return l2_normalize(x.astype(jnp.float32))


HEADS = ("wacv", "gem", "grid")


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


def grid_pool(x: Array, grid: Sequence[int]) -> Array:
  """(B, H, W, C) -> (B, gh, gw, C): the mean over each of a gh x gw grid of regions, rows
  [floor(i H / gh), ceil((i + 1) H / gh)) as torch's AdaptiveAvgPool2d cuts them."""
  h, w = x.shape[1:3]
  if grid[0] > h or grid[1] > w:
    raise ValueError(f"grid {tuple(grid)} is finer than the last stage's {h} x {w} map")
  return jnp.moveaxis(geometry.area_resize(jnp.moveaxis(x, -1, 1), grid), 1, -1)


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
               hidden_dim: int = 512, dropout: float = 0.33, dtype: Any = "float32",
               grid: Sequence[int] = (2, 2), **backbone_overrides) -> DeepSSIM:
  """Builds DeepSSIM with a named backbone.

  Args:
    name: key of MODELS.
    head, embed_dim, hidden_dim, dropout, grid: head fields (see DeepSSIM).
    dtype: compute dtype, a key of COMPUTE_DTYPES (or its jnp dtype); the backbone computes
      in it, the head of either kind ("wacv", "gem") in float32 (module docstring).
    **backbone_overrides: ConvNeXt fields (depths, dims, drop_path_rate, depthwise_impl,
      gelu_approximate, layer_scale_init).

  Returns:
    An unbound DeepSSIM module.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  return DeepSSIM(MODELS[name](dtype=compute_dtype(dtype), **backbone_overrides), head=head,
                  embed_dim=embed_dim, hidden_dim=hidden_dim, dropout=dropout,
                  grid=tuple(grid))


class Ensemble(nn.Module):
  """Several DeepSSIM networks of one architecture scored as one (ours).

  The embedding is the concatenation of the members' unit embeddings divided by sqrt(K):
  it has unit norm, and the cosine of two such embeddings is the mean of the K members'
  cosines. So stores, matching, evaluation and the audit use an ensemble as they use one
  network. Members are trained separately (e.g. from different seeds) and joined by
  `python -m deepssim_jax.pretrained --workdir=A --workdir=B`; their parameters are the
  subtrees members_0, members_1, ...

  Attributes:
    members: the K (>= 2) DeepSSIM modules, one architecture.
  """
  members: Sequence[DeepSSIM]

  @property
  def backbone(self) -> nn.Module:
    """The members' (shared) backbone architecture."""
    return self.members[0].backbone

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    es = [m(x, train) for m in self.members]
    return jnp.concatenate(es, axis=-1) / jnp.sqrt(float(len(es)))


def members(model: nn.Module, variables: dict) -> list[tuple[nn.Module, dict]]:
  """The (module, variables) of each network of a model: an Ensemble's members (their
  subtrees members_0, members_1, ...), or the one network itself."""
  if not isinstance(model, Ensemble):
    return [(model, variables)]
  return [(m, {col: tree[f"members_{i}"] for col, tree in variables.items()})
          for i, m in enumerate(model.members)]


def with_dtype(model: nn.Module, dtype: Any) -> nn.Module:
  """The same DeepSSIM or Ensemble (same parameter tree) computing in another dtype."""
  if isinstance(model, Ensemble):
    return model.clone(members=tuple(with_dtype(m, dtype) for m in model.members))
  return model.clone(backbone=model.backbone.clone(dtype=compute_dtype(dtype)))


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
