"""ResNet-50 copy-detection baselines the DeepSSIM paper compares with (torchvision layout).

Two heads on one trunk (bottleneck blocks [3, 4, 6, 3], stride on the 3x3 conv as
torchvision v1.5, BatchNorm in inference mode with running stats, eps 1e-5), NHWC:

  gem_proj  SSCD / UMS-SSCD (Pizzi et al. 2022): GeM pooling (p=3, eps 1e-6), a linear
            projection, L2 normalisation.
  dar       Dar et al. 2025 (the reference's DarFeatureExtractor): a 1-channel 7x7 stem,
            global average pooling, torchvision's `fc` replaced by Linear(2048, 128), L2
            normalisation (the reference's `fc_end` is never used for embeddings).

This file knows nothing of torch; `load_state_dict` maps a torchvision-format state dict
(numpy arrays, from convert.read_state_dict) onto our variables, naming missing, unexpected
and mis-shaped keys.
"""

import functools
import re
from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepssim_jax import convert, fileio

BN_EPS = 1e-5
_BN = functools.partial(nn.BatchNorm, use_running_average=True, momentum=0.9, epsilon=BN_EPS)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (expansion 4), stride on conv2."""
  width: int
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False)
    y = nn.relu(_BN(name="bn1")(conv(self.width, (1, 1), name="conv1")(x)))
    y = conv(self.width, (3, 3), (self.stride, self.stride), padding=((1, 1), (1, 1)),
             name="conv2")(y)
    y = nn.relu(_BN(name="bn2")(y))
    y = _BN(name="bn3")(conv(self.width * 4, (1, 1), name="conv3")(y))
    if self.downsample:
      x = conv(self.width * 4, (1, 1), (self.stride, self.stride), name="downsample_conv")(x)
      x = _BN(name="downsample_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet trunk plus an embedding head.

  Attributes:
    head: "gem_proj" (SSCD) or "dar".
    embed_dim: the head's output size (SSCD 512, Dar 128).
    stages: bottleneck blocks per stage ([3, 4, 6, 3]: ResNet-50).
    gem_p, gem_eps: GeM's exponent and clamp (gem_proj only).
  """
  head: str = "gem_proj"
  embed_dim: int = 512
  stages: Sequence[int] = (3, 4, 6, 3)
  gem_p: float = 3.0
  gem_eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    """(N, H, W, C) -> (N, embed_dim) L2-normalised embeddings (C is the stem's input)."""
    x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, name="conv1")(x)
    x = nn.relu(_BN(name="bn1")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for s, n in enumerate(self.stages):
      for i in range(n):
        x = Bottleneck(64 * 2**s, stride=2 if (i == 0 and s > 0) else 1, downsample=i == 0,
                       name=f"layer{s + 1}_{i}")(x)
    if self.head == "gem_proj":
      x = jnp.mean(jnp.maximum(x, self.gem_eps) ** self.gem_p, axis=(1, 2)) ** (1 / self.gem_p)
    elif self.head == "dar":
      x = jnp.mean(x, axis=(1, 2))
    else:
      raise ValueError(f"unknown head {self.head!r}; choose gem_proj or dar")
    x = nn.Dense(self.embed_dim, name="fc")(x)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


SSCD = functools.partial(ResNet, head="gem_proj", embed_dim=512)
Dar = functools.partial(ResNet, head="dar", embed_dim=128)

# ----------------------------------------------------------------------------- torch keys

# (torch key pattern, our path template, transform). Groups in the pattern fill the template.
_OIHW = lambda w: np.transpose(w, (2, 3, 1, 0))
_T = lambda w: np.transpose(w)
_ID = lambda w: w
_CONV = r"(conv1|layer\d\.\d+\.conv\d|layer\d\.\d+\.downsample\.0)"
_NORM = r"(bn1|layer\d\.\d+\.bn\d|layer\d\.\d+\.downsample\.1)"
KEY_TABLE = [
    (_CONV + r"\.weight", ("params", "{0}", "kernel"), _OIHW),
    (_NORM + r"\.weight", ("params", "{0}", "scale"), _ID),
    (_NORM + r"\.bias", ("params", "{0}", "bias"), _ID),
    (_NORM + r"\.running_mean", ("batch_stats", "{0}", "mean"), _ID),
    (_NORM + r"\.running_var", ("batch_stats", "{0}", "var"), _ID),
    (r"fc\.weight", ("params", "fc", "kernel"), _T),
    (r"fc\.bias", ("params", "fc", "bias"), _ID),
]
# Keys a known source holds that no embedding uses (Dar's classifier, BN step counters).
IGNORED = re.compile(r"(fc_end\..*|.*num_batches_tracked)")
PREFIXES = ("model.", "backbone.", "module.")


def _our_name(torch_name: str) -> Tuple[str, ...]:
  """'layer1.0.downsample.0' -> ('layer1_0', 'downsample_conv')."""
  parts = torch_name.split(".")
  if parts[0].startswith("layer"):
    sub = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(
        ".".join(parts[2:]), ".".join(parts[2:]))
    return (f"{parts[0]}_{parts[1]}", sub)
  return (torch_name,)


def map_keys(state: Dict[str, np.ndarray]) -> Tuple[Dict[Tuple[str, ...], np.ndarray], list]:
  """({our flat path: array}, [torch keys no row matched or of the wrong rank])."""
  keys = [k for k in state if not IGNORED.fullmatch(k)]
  for p in PREFIXES:  # the reference's Dar wraps the trunk as `model`, SSCD as `backbone`
    if keys and all(k.startswith(p) for k in keys):
      state = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
      keys = [k[len(p):] for k in keys]
      break
  out, unknown = {}, []
  for k in keys:
    for pat, path, f in KEY_TABLE:
      m = re.fullmatch(pat, k)
      if m:
        name = _our_name(m.group(1)) if m.groups() else ()
        path = tuple(s for t in path for s in ((name if t == "{0}" else (t,))))
        a = np.asarray(state[k], np.float32)
        try:
          out[path] = f(a)
        except ValueError:  # a transpose of the wrong rank
          unknown.append(f"{k} (shape {a.shape})")
        break
    else:
      unknown.append(k)
  return out, unknown


def load_state_dict(model: ResNet, state: Dict[str, np.ndarray], in_channels: int,
                    source: str = "state dict") -> dict:
  """Our variables (params, batch_stats) from a torchvision-format state dict.

  Raises:
    InputError: naming keys the table does not know, missing keys and shape mismatches.
  """
  target = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 64, 64, in_channels))))
  mapped, unknown = map_keys(state)
  if unknown:
    raise fileio.InputError(f"{source}: keys not in a ResNet-50, or of the wrong rank: "
                            f"{sorted(unknown)[:8]}")
  return convert.fill(target, mapped, source)


def load(path: str, model: ResNet, in_channels: int, torchscript: bool = False) -> dict:
  """Variables from a .pth (torch.load(weights_only=True)) or, with torchscript=True, a
  TorchScript file (loading one runs its code)."""
  return load_state_dict(model, convert.read_state_dict(path, torchscript), in_channels, path)
