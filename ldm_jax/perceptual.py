r"""Perceptual terms of the autoencoder loss, chosen by name (a dict of builders).

`make(name, **kwargs)` returns `loss(x, y) -> scalar` for channels-last image batches
(B, H, W, C):

* "ssim" (default): 1 - SSIM(x, y), dm-pix's SSIM (Gaussian 11 x 11, sigma 1.5) with the
  data range of the target batch; a structural term that stands in for the perceptual
  network when its weights are not at hand.
* "lpips_squeeze" (`weights=` a converted .npz): the reference's term. DeepSSIM's LDM uses
  MONAI's `PerceptualLoss(spatial_dims=2, network_type="squeeze")`, which for 2-D images is
  `torch.mean(lpips.LPIPS(net="squeeze")(x, y))` with normalize=False: the images go in
  as they are ([0, 1] in the reference, although LPIPS was calibrated on [-1, 1]) and a
  grey image is broadcast to 3 channels by LPIPS's ScalingLayer. We reproduce it exactly:
  ScalingLayer, torchvision's SqueezeNet 1.1 features tapped after the same 7 layers as
  `lpips.pretrained_networks.squeezenet`, channel unit-normalisation, squared differences,
  the linear 1 x 1 heads (no bias; their dropout is the identity in eval mode), spatial
  mean, sum over the 7 layers, mean over the batch.
* "none": 0.

Weights of "lpips_squeeze" come from two PyTorch files that cannot be downloaded here:
torchvision's ImageNet `squeezenet1_1-*.pth` (the user brings it) and LPIPS's linear heads,
`lpips/weights/v0.1/squeeze.pth`, which ships inside the `lpips` wheel. Convert them once:

    python -m ldm_jax.perceptual --squeezenet=squeezenet1_1-b8a52dc0.pth \
        [--lpips=/path/to/lpips/weights/v0.1/squeeze.pth] --out=lpips_squeeze.npz
    python -m ldm_jax.main --config=configs/ldm_ixi_autoencoder.py ... \
        --config.loss.perceptual=lpips_squeeze \
        --config.loss.perceptual_kwargs.weights=lpips_squeeze.npz

Without --lpips the copy inside the installed `lpips` package is used. The squeezenet file
may also be spelled as LPIPS's own trunk (`net.slice{s}.{i}.*`); torchvision's ImageNet
classifier (`classifier.*`) is dropped. Unknown, missing and mis-shaped keys are errors
that name the key and the file.

The .npz holds one float32 array per parameter of `LPIPSSqueeze`, keyed by its Flax path
under "params" joined with "/" (torch key it comes from in brackets; conv kernels are HWIO,
transposed from torch's OIHW):

  features/conv0/{kernel (3, 3, 3, 64), bias (64,)}            [features.0.{weight,bias}]
  features/fire{i}/{squeeze,expand1x1,expand3x3}/{kernel, bias}
      for i in 3, 4, 6, 7, 9, 10, 11, 12 (torchvision's `features` index)
                                            [features.{i}.{squeeze,...}.{weight,bias}]
  lin{k}/kernel (C_k, 1), k = 0..6, C = 64, 128, 256, 384, 384, 512, 512
                                            [lin{k}.model.1.weight (1, C_k, 1, 1)]

torch is imported only by the converter (through deepssim_jax.convert.read_state_dict).
The converter stays in this file, which makes it longer than most: its rows are the
network's parameters (`weight_shapes`), so network, .npz layout and converter change together.
"""

import functools
import importlib.util
import os
import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import dm_pix as pix
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import traverse_util

from deepssim_jax import convert, fileio

LossFn = Callable[[jax.Array, jax.Array], jax.Array]

# ----------------------------------------------------------------------------- ssim, none


def ssim_loss(**unused) -> LossFn:
  def loss(x, y):
    rng = jax.lax.stop_gradient(jnp.max(y) - jnp.min(y))
    return 1.0 - jnp.mean(pix.ssim(x, y, max_val=jnp.maximum(rng, 1e-6)))
  return loss


def no_loss(**unused) -> LossFn:
  return lambda x, y: jnp.zeros((), jnp.float32)


# ----------------------------------------------------------------------------- network

# torchvision squeezenet1_1().features, by index: 0 conv 3->64 (k3, s2) and 1 ReLU, max-pools
# at 2, 5, 8, Fire modules (squeeze, expand1x1, expand3x3 channels) elsewhere.
FIRES = {3: (16, 64, 64), 4: (16, 64, 64), 6: (32, 128, 128), 7: (32, 128, 128),
         9: (48, 192, 192), 10: (48, 192, 192), 11: (64, 256, 256), 12: (64, 256, 256)}
POOLS = (2, 5, 8)
# lpips' squeezenet slices end after these indices: relu1 ... relu7.
TAPS = (1, 4, 7, 9, 10, 11, 12)
# lpips.ScalingLayer: (x - shift) / scale, per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
MIN_SIZE = 25  # the smallest H, W for which the third ceil-mode max-pool has a window


def max_pool_ceil(x: jax.Array) -> jax.Array:
  """MaxPool2d(kernel_size=3, stride=2, ceil_mode=True) on NHWC, as torch computes it.

  Ceil mode keeps a last, partial window: the output has ceil((n - 3) / 2) + 1 rows instead
  of floor(...) + 1, so the bottom/right edge is padded with -inf (for this kernel and
  stride every window still starts inside the image, torch's other ceil-mode rule).
  """
  _, h, w, _ = x.shape
  if min(h, w) < 3:
    raise ValueError(f"SqueezeNet max-pool needs feature maps of at least 3 x 3, got "
                     f"{h} x {w}: images must be at least {MIN_SIZE} x {MIN_SIZE}")
  pad = [(0, 0)] + [(0, 2 * (-(-(n - 3) // 2)) + 3 - n) for n in (h, w)] + [(0, 0)]
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pad)


class Fire(nn.Module):
  """SqueezeNet's Fire module: squeeze 1x1 -> ReLU -> [expand 1x1, expand 3x3] -> ReLU."""
  squeeze: int
  expand1x1: int
  expand3x3: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda n, k, name: nn.Conv(n, (k, k), padding=[(k // 2, k // 2)] * 2,
                                      precision=self.precision, name=name)
    s = nn.relu(conv(self.squeeze, 1, "squeeze")(x))
    return jnp.concatenate([nn.relu(conv(self.expand1x1, 1, "expand1x1")(s)),
                            nn.relu(conv(self.expand3x3, 3, "expand3x3")(s))], axis=-1)


class SqueezeNetFeatures(nn.Module):
  """torchvision's squeezenet1_1 `features`, NHWC; returns the 7 LPIPS taps."""
  precision: Any = None

  @nn.compact
  def __call__(self, x) -> Tuple[jax.Array, ...]:
    h = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2), padding="VALID",
                        precision=self.precision, name="conv0")(x))
    taps = [h]
    for i in range(2, 13):
      h = max_pool_ceil(h) if i in POOLS else Fire(*FIRES[i], precision=self.precision,
                                                   name=f"fire{i}")(h)
      if i in TAPS:
        taps.append(h)
    return tuple(taps)


def normalize_channels(f: jax.Array, eps: float = 1e-10) -> jax.Array:
  """lpips.normalize_tensor over the last axis: f / (||f||_2 + eps).

  Same values as lpips; where a location's features are all zero (all ReLUs off) the norm
  is 0 and sqrt's gradient would be inf * 0 = NaN, so the square root is taken only where
  the sum of squares is positive (the value there is 0 either way).
  """
  ss = jnp.sum(f * f, axis=-1, keepdims=True)
  pos = ss > 0
  norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, ss, 1.0)), 0.0)
  return f / (norm + eps)


class LPIPSSqueeze(nn.Module):
  """lpips.LPIPS(net="squeeze", version="0.1") in eval mode: (B,) distances of x and y.

  x, y: (B, H, W, C) with C = 3 or 1 (broadcast against the 3-channel ScalingLayer, as the
  lpips package does), H, W >= MIN_SIZE. The heads are initialised to ones (the
  uncalibrated "lpips=False" baseline); real weights come from `load_weights`.
  """
  precision: Any = None

  @nn.compact
  def __call__(self, x, y) -> jax.Array:
    for a in (x, y):
      if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ValueError(f"LPIPS-squeeze takes (B, H, W, 1 or 3) images, got {a.shape}")
    if x.shape != y.shape:
      raise ValueError(f"LPIPS-squeeze: shapes differ, {x.shape} vs {y.shape}")
    shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
    net = SqueezeNetFeatures(precision=self.precision, name="features")
    fx, fy = net((x - shift) / scale), net((y - shift) / scale)
    total = 0.0
    for k, (a, b) in enumerate(zip(fx, fy)):
      d = (normalize_channels(a) - normalize_channels(b)) ** 2
      head = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.ones,
                      precision=self.precision, name=f"lin{k}")
      total = total + jnp.mean(head(d), axis=(1, 2))[:, 0]
    return total


def abstract_params() -> dict:
  """LPIPSSqueeze's parameter shapes (nothing is computed)."""
  x = jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda: LPIPSSqueeze().init(jax.random.key(0), x, x))["params"]


# ----------------------------------------------------------------------------- weights file


@functools.lru_cache(maxsize=1)
def weight_shapes() -> Dict[str, Tuple[int, ...]]:
  """{.npz key: shape} of every LPIPSSqueeze parameter."""
  return {"/".join(p): tuple(v.shape)
          for p, v in traverse_util.flatten_dict(dict(abstract_params())).items()}


def flat_weights(params: dict) -> Dict[str, np.ndarray]:
  """{"features/conv0/kernel": array, ...}: the .npz layout of a params tree."""
  return {"/".join(p): np.asarray(v, np.float32)
          for p, v in traverse_util.flatten_dict(dict(params)).items()}


def save_weights(path: str, params: dict) -> None:
  """Writes LPIPSSqueeze params (the tree under "params") as the .npz, atomically."""
  fileio.write_npz(path, **flat_weights(params))


def _check(what: str, unknown: Sequence[str], missing: Sequence[str],
           bad: Sequence[str]) -> None:
  """Raises InputError naming (the first 8 of) each kind of bad key, if any."""
  problems = ([f"unknown keys {list(unknown[:8])}"] if unknown else []) + (
      [f"missing keys {list(missing[:8])}"] if missing else []) + (
      [f"mis-shaped {list(bad[:8])}"] if bad else [])
  if problems:
    raise fileio.InputError(f"{what}: " + "; ".join(problems))


def load_weights(path: str) -> dict:
  """{"params": tree} of LPIPSSqueeze from a converted .npz (module docstring), checked.

  Raises:
    InputError: no such file, or keys unknown / missing / mis-shaped (named).
  """
  if not path or not os.path.isfile(path):
    raise fileio.InputError(f"LPIPS-squeeze weights {path or '(not set)'}: file not found; "
                        "convert them with `python -m ldm_jax.perceptual --squeezenet=... "
                        "--out=...` (see ldm_jax/perceptual.py)")
  if path.endswith((".pth", ".pt")):
    raise fileio.InputError(f"{path}: a PyTorch file; convert it to an .npz first with "
                        "`python -m ldm_jax.perceptual --squeezenet=... --out=...`")
  try:
    with np.load(path) as z:
      arrays = {k: np.asarray(z[k]) for k in z.files}
  except Exception as e:  # pylint: disable=broad-except
    raise fileio.InputError(f"{path}: unreadable .npz ({type(e).__name__}: {e})") from None
  want = weight_shapes()
  _check(f"{path}: not LPIPS-squeeze weights", sorted(set(arrays) - set(want)),
         sorted(set(want) - set(arrays)),
         [f"{k} {arrays[k].shape} (expected {want[k]})" for k in sorted(want)
          if k in arrays and arrays[k].shape != want[k]])
  tree = {tuple(k.split("/")): jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
  return {"params": traverse_util.unflatten_dict(tree)}


# ----------------------------------------------------------------------------- the term


def lpips_squeeze_loss(weights: str = "", precision: Optional[str] = None) -> LossFn:
  """The reference's perceptual term: mean over the batch of LPIPS-squeeze distances.

  Args:
    weights: the converted .npz (module docstring).
    precision: of the convolutions (jax.lax.Precision name, e.g. "highest"); None is the
      backend's default (TF32 on recent GPUs, full float32 on CPU).

  Returns:
    loss(x, y) -> scalar for (B, H, W, 1 or 3) batches.
  """
  variables = load_weights(weights)
  net = LPIPSSqueeze(precision=jax.lax.Precision[precision.upper()] if precision else None)

  def loss(x, y):
    return jnp.mean(net.apply(variables, x, y))
  return loss


PERCEPTUAL = {"ssim": ssim_loss, "lpips_squeeze": lpips_squeeze_loss, "none": no_loss}


def make(name: str, **kwargs) -> LossFn:
  if name not in PERCEPTUAL:
    raise ValueError(f"perceptual loss {name!r}: expected one of {sorted(PERCEPTUAL)}")
  return PERCEPTUAL[name](**kwargs)


# ----------------------------------------------------------------------------- converter

# Foreign weights -> our .npz keys, as data: (torch key, our key, transform).
TRANSFORMS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda w: np.transpose(w, (2, 3, 1, 0)),  # OIHW -> HWIO
    "head": lambda w: np.reshape(w, (w.shape[1], 1)),  # (1, C, 1, 1) -> (C, 1)
    "same": lambda w: w,
}
# ... and the torch shape each transform expects, from ours (for messages).
TORCH_SHAPES: Dict[str, Callable[[Tuple[int, ...]], Tuple[int, ...]]] = {
    "conv": lambda s: (s[3], s[2], s[0], s[1]),
    "head": lambda s: (1, s[0], 1, 1),
    "same": lambda s: s,
}


def _rows() -> Tuple[Tuple[str, str, str], ...]:
  rows = [("features.0.weight", "features/conv0/kernel", "conv"),
          ("features.0.bias", "features/conv0/bias", "same")]
  for i in FIRES:
    for part in ("squeeze", "expand1x1", "expand3x3"):
      rows += [(f"features.{i}.{part}.weight", f"features/fire{i}/{part}/kernel", "conv"),
               (f"features.{i}.{part}.bias", f"features/fire{i}/{part}/bias", "same")]
  rows += [(f"lin{k}.model.1.weight", f"lin{k}/kernel", "head") for k in range(len(TAPS))]
  return tuple(rows)


ROWS = _rows()

# Each source file: how its keys are renamed to the rows' spelling (None: dropped on
# purpose), and which rows it must supply.
SOURCES = {
    "squeezenet": {
        "rename": lambda k: (None if k.startswith("classifier.") else
                             re.sub(r"^net\.slice\d+\.", "features.", k)),
        "rows": lambda torch_key: torch_key.startswith("features."),
    },
    "lpips": {  # NetLinLayer: Sequential(Dropout, Conv) or, without dropout, (Conv,)
        "rename": lambda k: re.sub(r"^(lin\d+)\.model\.0\.weight$", r"\1.model.1.weight", k),
        "rows": lambda torch_key: torch_key.startswith("lin"),
    },
}


def map_state(state: Dict[str, np.ndarray], source: str, path: str) -> Dict[str, np.ndarray]:
  """One source's state dict -> {our .npz key: array}, every key checked.

  Args:
    state: torch key -> array (deepssim_jax.convert.read_state_dict).
    source: a key of SOURCES.
    path: the file, for messages.

  Raises:
    InputError: naming unknown, missing and mis-shaped keys and the file.
  """
  spec, want = SOURCES[source], weight_shapes()
  rows = {t: (ours, kind) for t, ours, kind in ROWS if spec["rows"](t)}
  out, unknown, bad, seen = {}, [], [], set()
  for key, value in state.items():
    if key.endswith("num_batches_tracked"):
      continue
    canon = spec["rename"](key)
    if canon is None:
      continue
    if canon not in rows:
      unknown.append(key)
      continue
    if canon in seen:
      raise fileio.InputError(f"{path}: key {key!r} given twice (as {canon!r})")
    seen.add(canon)
    ours, kind = rows[canon]
    value = np.asarray(value, np.float32)
    expected = TORCH_SHAPES[kind](want[ours])
    if value.shape != expected:
      bad.append(f"{key} {value.shape} (expected {expected})")
      continue
    out[ours] = TRANSFORMS[kind](value)
  _check(f"{path}: not a {source} state dict for LPIPS-squeeze", unknown,
         sorted(t for t in rows if t not in seen), bad)
  return out


def default_lpips_path() -> str:
  """lpips/weights/v0.1/squeeze.pth inside the installed lpips package (not imported)."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise fileio.InputError("no --lpips file given and the lpips package is not installed: "
                        "pip install lpips, or pass --lpips=/path/to/weights/v0.1/squeeze.pth")
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1",
                      "squeeze.pth")
  if not os.path.isfile(path):
    raise fileio.InputError(f"{path}: not in the installed lpips package; pass --lpips=FILE")
  return path


def convert_weights(squeezenet: str, lpips: Optional[str] = None) -> Dict[str, np.ndarray]:
  """The .npz arrays from torchvision's squeezenet1_1 and LPIPS's squeeze heads.

  Args:
    squeezenet: a squeezenet1_1 state dict (.pth; read with torch.load(weights_only=True)).
    lpips: LPIPS's v0.1 squeeze.pth; None takes the installed lpips package's copy.

  Raises:
    InputError: unreadable files, unknown / missing / mis-shaped keys (named, with the file).
  """
  lpips = lpips or default_lpips_path()
  out = {}
  for source, path in (("squeezenet", squeezenet), ("lpips", lpips)):
    out.update(map_state(convert.read_state_dict(path), source, path))
  return out


def _define_flags() -> None:
  # Only when run as a script: the module is imported by the trainer, whose CLI has its own
  # flags, and absl refuses a flag defined twice.
  flags.DEFINE_string("squeezenet", None, "torchvision squeezenet1_1 ImageNet weights (.pth).")
  flags.DEFINE_string("lpips", None, "LPIPS's weights/v0.1/squeeze.pth (default: the copy in "
                      "the installed lpips package).")
  flags.DEFINE_string("out", None, "The .npz to write (config.loss.perceptual_kwargs.weights).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if not f.squeezenet or not f.out:
    raise app.UsageError("--squeezenet=FILE and --out=FILE.npz are required")
  try:
    arrays = convert_weights(f.squeezenet, f.lpips)
  except fileio.InputError as e:
    raise SystemExit(f"perceptual: {e}") from None
  fileio.write_npz(f.out, **arrays)
  logging.info("LPIPS-squeeze weights from %s and %s -> %s", f.squeezenet,
               f.lpips or default_lpips_path(), f.out)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
