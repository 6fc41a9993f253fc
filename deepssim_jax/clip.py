"""SemDeDup baseline: open_clip's CLIP image tower in Flax, its converter and its input.

The DeepSSIM reference (src/extractors/semdedup.py, src/factories/semdedup.py,
src/datasets/semdedup.py, src/scorers/semdedup.py) embeds each 8-bit PNG slice with an
open_clip model, `create_model_from_pretrained(<--model_path>)` then `encode_image`, feeds it
the transform open_clip returns with the model, and scores a pair by the cosine of the two
embeddings: < 0.97 Different, >= 0.99905 Duplicate, Similar between (REFERENCE_THRESHOLDS).
It names no model: `--model_path` is whatever open_clip name its user passed (an
`hf-hub:<repo>` or `local-dir:<folder>`; open_clip-torch 3.2.0). DEFAULT_MODEL is therefore
our choice, not the reference's; every standard open_clip ViT fits (PRESETS, infer_config).

CLIPVision is open_clip's VisionTransformer as its ViT-* configs build it: conv1 patch
embedding without bias, class token, learned positional embedding, ln_pre, pre-norm blocks
(ln_1, multi-head attention with a fused in_proj, ln_2, c_fc, GELU or QuickGELU, c_proj),
ln_post on the class token, `proj`; LayerNorm eps 1e-5. No layer scale, attentional pooling
or patch dropout (their keys are named as unknown by the converter). act: "gelu" (exact, the
LAION / DataComp weights) or "quick_gelu" (x * sigmoid(1.702 x): OpenAI's weights, open_clip's
`-quickgelu` names): a state dict cannot tell the two apart.

preprocess maps our z-scored (n, H, W) images to what the reference fed CLIP:
  1. min-max to 0..255 per image and, with quantize (default), rounded to integers: the
     reference reads 8-bit PNGs (the project's convention for them: tests/test_fsim.py);
  2. grey repeated to RGB (its PIL .convert('RGB')); its dataset's MONAI augmentations run
     only with its --augment (p 0.8) and are not mirrored here;
  3. open_clip's eval transform for 'shortest' resize mode: torchvision Resize(S) on the PIL
     image (shortest side to S, the other int(S * long / short), PIL bicubic: Keys a = -0.5,
     half-pixel centres, the kernel widened when shrinking, truncated and renormalised at the
     borders, width pass then height pass, each rounded half-up to uint8 and clipped), then
     CenterCrop(S) (offsets int(round((h - S) / 2))), /255, (x - mean) / std with OpenAI's
     CLIP mean and std.
Measured against torchvision + PIL on vendored slices (tests/test_clip.py): from the same
8-bit image, equal to float32 rounding (< 1e-6) at 136x112 (the reference's slice size, an
exact 2x upscale), 150x130 and 250x300 (a shrink); from z-scored slices, our 8-bit rounding of
the min-max scaled image (float32) and a float64 one split a few near-tie pixels (10 of 200704
at 150x130, none at the other two), which then differ by one 8-bit step, 1/255/std.
"""

import functools
import math
from typing import Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepssim_jax import convert, fileio, fsim
from deepssim_jax.clip_keys import infer_config, map_keys

REFERENCE_THRESHOLDS = (0.97, 0.99905)  # the reference's SemDeDupEmbeddingScorer.classify
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_*
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LN_EPS = 1e-5

# open_clip model configs (model_configs/<name>.json): the image tower's sizes.
PRESETS = {
    "ViT-B-32": dict(width=768, layers=12, heads=12, patch_size=32, image_size=224, embed_dim=512),
    "ViT-B-16": dict(width=768, layers=12, heads=12, patch_size=16, image_size=224, embed_dim=512),
    "ViT-L-14": dict(width=1024, layers=24, heads=16, patch_size=14, image_size=224, embed_dim=768),
}
DEFAULT_MODEL = "ViT-B-32"
WEIGHTS = ("open_clip_pytorch_model.bin or open_clip_model.safetensors of an open_clip ViT-B-32 "
           "(default: huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K, open_clip's "
           "ViT-B-32 pretrained='laion2b_s34b_b79k'; OpenAI's weights, "
           "timm/vit_base_patch32_clip_224.openai, need act='quick_gelu'). The reference "
           "names no model: its --model_path is any open_clip name (hf-hub:<repo>)")


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


_ACTS = {"gelu": functools.partial(nn.gelu, approximate=False), "quick_gelu": quick_gelu}
_LN = functools.partial(nn.LayerNorm, epsilon=LN_EPS, use_fast_variance=False)


class Attention(nn.Module):
  """torch.nn.MultiheadAttention (batch first, no mask) with its fused q/k/v projection."""
  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    n, t, _ = x.shape
    q, k, v = jnp.split(nn.Dense(3 * self.width, name="in_proj")(x), 3, axis=-1)
    hd = self.width // self.heads
    q, k, v = (a.reshape(n, t, self.heads, hd) for a in (q, k, v))
    w = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(hd), axis=-1)
    y = jnp.einsum("nhqk,nkhd->nqhd", w, v).reshape(n, t, self.width)
    return nn.Dense(self.width, name="out_proj")(y)


class Block(nn.Module):
  """open_clip's ResidualAttentionBlock (pre-norm, mlp_ratio 4)."""
  width: int
  heads: int
  act: str = "gelu"

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.width, self.heads, name="attn")(_LN(name="ln_1")(x))
    y = nn.Dense(4 * self.width, name="c_fc")(_LN(name="ln_2")(x))
    return x + nn.Dense(self.width, name="c_proj")(_ACTS[self.act](y))


class CLIPVision(nn.Module):
  """CLIP image tower: (N, S, S, 3) normalised images -> (N, embed_dim) embeddings,
  L2-normalised when `normalize` (open_clip's encode_image(..., normalize=True))."""
  width: int = 768
  layers: int = 12
  heads: int = 12
  patch_size: int = 32
  image_size: int = 224
  embed_dim: int = 512
  act: str = "gelu"
  normalize: bool = True

  @nn.compact
  def __call__(self, x):
    p, init = self.patch_size, nn.initializers.normal(self.width ** -0.5)
    x = nn.Conv(self.width, (p, p), (p, p), padding="VALID", use_bias=False, name="conv1")(x)
    n, gh, gw, _ = x.shape
    tokens = (self.image_size // p) ** 2 + 1
    if gh * gw + 1 != tokens:
      raise ValueError(f"input {x.shape[1:3]} patches, the positional embedding holds "
                       f"{tokens - 1}: feed {self.image_size}x{self.image_size} images")
    cls = self.param("class_embedding", init, (self.width,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)),
                         x.reshape(n, gh * gw, self.width)], axis=1)
    x = x + self.param("positional_embedding", init, (tokens, self.width))
    x = _LN(name="ln_pre")(x)
    for i in range(self.layers):
      x = Block(self.width, self.heads, self.act, name=f"resblocks_{i}")(x)
    x = _LN(name="ln_post")(x[:, 0]) @ self.param("proj", init, (self.width, self.embed_dim))
    if self.normalize:
      x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x


def make(name: str = DEFAULT_MODEL, act: str = "gelu", **overrides) -> CLIPVision:
  """The CLIPVision of an open_clip model name (PRESETS), e.g. make("ViT-B-16")."""
  if name not in PRESETS:
    raise ValueError(f"unknown CLIP model {name!r}; choose from {sorted(PRESETS)} or build "
                     "CLIPVision(**infer_config(state)) from a state dict")
  if act not in _ACTS:
    raise ValueError(f"unknown act {act!r}; choose from {sorted(_ACTS)}")
  return CLIPVision(**{**PRESETS[name], "act": act, **overrides})


# ----------------------------------------------------------------------------- input


def _center(length: int, size: int) -> int:
  return int(round((length - size) / 2.0))  # torchvision's center_crop (Python's round)


def _bicubic(x: np.ndarray) -> np.ndarray:  # PIL's bicubic_filter, a = -0.5
  x = np.abs(x)
  return np.where(x < 1, (1.5 * x - 2.5) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0))


def pil_weights(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64 weights of PIL's bicubic resize (Resample.c precompute_coeffs): the
  kernel widened by in/out when shrinking, truncated to the image and renormalised."""
  scale = in_size / out_size
  fscale = max(scale, 1.0)
  support = 2.0 * fscale
  w = np.zeros((out_size, in_size))
  for o in range(out_size):
    c = (o + 0.5) * scale
    lo, hi = max(int(c - support + 0.5), 0), min(int(c + support + 0.5), in_size)
    k = _bicubic((np.arange(lo, hi) - c + 0.5) / fscale)
    w[o, lo:hi] = k / k.sum() if k.sum() != 0 else k
  return w


_BITS = 22  # PIL's PRECISION_BITS for 8-bit images


def _pil_resize(x: jax.Array, axis: int, size: int, quantize: bool) -> jax.Array:
  """One PIL bicubic pass along `axis` (1 or 2 of (n, H, W)). quantize: PIL's 8-bit path,
  bit for bit: fixed-point weights round(w * 2^22) (half away from zero), integer sums,
  (sum + 2^21) >> 22 clipped to 0..255. The products are summed exactly in float32 as two
  dots (weights split into multiples of 2^11 and a rest), so no integer matmul is needed;
  exact while a row has < 64 taps (a shrink by < 16x)."""
  if x.shape[axis] == size:
    return x  # PIL skips a pass whose size does not change
  w = pil_weights(x.shape[axis], size)
  xt = jnp.moveaxis(x, axis, -1)
  dot = lambda m: jnp.moveaxis(jnp.tensordot(xt, jnp.asarray(m.T, jnp.float32), axes=1,
                                             precision=jax.lax.Precision.HIGHEST), -1, axis)
  if not quantize:
    return dot(w)
  kk = np.trunc(w * (1 << _BITS) + np.where(w < 0, -0.5, 0.5))
  hi = np.round(kk / 2048.0)
  s = dot(hi).astype(jnp.int32) * 2048 + dot(kk - 2048.0 * hi).astype(jnp.int32)
  return jnp.clip((s + (1 << (_BITS - 1))) >> _BITS, 0, 255).astype(jnp.float32)


def preprocess(x: jax.Array, image_size: int = 224, quantize: bool = True,
               mean: Sequence[float] = OPENAI_MEAN,
               std: Sequence[float] = OPENAI_STD) -> jax.Array:
  """z-scored (n, H, W) images -> (n, S, S, 3) CLIP input, S = image_size, as the reference
  prepared its PNG slices (the module docstring; jittable, shapes static)."""
  x = fsim.to_uint8_scale(jnp.asarray(x, jnp.float32), rounded=quantize)  # the 8-bit PNG
  h, w = x.shape[1:]
  short, long = min(h, w), max(h, w)
  new_long = int(image_size * long / short)
  nh, nw = (image_size, new_long) if h <= w else (new_long, image_size)
  x = _pil_resize(_pil_resize(x, 2, nw, quantize), 1, nh, quantize)  # width first, as PIL
  top, left = _center(nh, image_size), _center(nw, image_size)
  x = x[:, top:top + image_size, left:left + image_size, None] / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@functools.partial(jax.jit, static_argnames=("model", "quantize"))
def embeddings(variables: dict, model: CLIPVision, images: jax.Array,
               quantize: bool = True) -> jax.Array:
  """z-scored (n, H, W) images -> (n, embed_dim) L2-normalised float32 CLIP embeddings; the
  cosine of two is the reference's SemDeDup score."""
  x = model.clone(normalize=False).apply(variables, preprocess(images, model.image_size,
                                                                quantize))
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- loading


def load_state_dict(model: CLIPVision, state: Dict[str, np.ndarray],
                    source: str = "state dict") -> dict:
  """Our variables from an open_clip state dict (`visual.*` or the tower's own keys).

  Raises:
    InputError: naming keys the table does not know, missing keys and shape mismatches
      (with the sizes the file's shapes describe, when they differ from the model's).
  """
  target = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, model.image_size, model.image_size, 3))))
  mapped, unknown = map_keys(state)
  if unknown:
    raise fileio.InputError(f"{source}: keys not in an open_clip ViT image tower, or of the "
                            f"wrong rank: {sorted(unknown)[:8]}")
  try:
    return convert.fill(target, mapped, source)
  except fileio.InputError as e:
    try:
      found = infer_config(state)
    except fileio.InputError:
      raise e from None
    ours = {k: getattr(model, k) for k in found}
    if {k: v for k, v in found.items() if k != "heads"} != {
        k: v for k, v in ours.items() if k != "heads"}:
      raise fileio.InputError(f"{e}; the file holds a tower of {found}, the model is "
                              f"{ours}") from None
    raise


def load(path: str, model: CLIPVision, torchscript: bool = False) -> dict:
  """Variables from an open_clip checkpoint: .bin/.pt/.pth (torch.load(weights_only=True)),
  .safetensors, or with torchscript=True a TorchScript file (OpenAI's original .pt; loading
  one runs its code)."""
  return load_state_dict(model, convert.read_state_dict(path, torchscript), path)
