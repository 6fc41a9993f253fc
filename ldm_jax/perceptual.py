"""Perceptual terms of the autoencoder loss, chosen by name (a dict of builders).

The reference uses MONAI's LPIPS-squeeze perceptual loss, whose pretrained weights cannot
be fetched here. So the term is pluggable: `PERCEPTUAL[name](**kwargs)` returns
`loss(x, y) -> scalar` for channels-last image batches (B, H, W, C):

* "ssim" (default): 1 - SSIM(x, y), dm-pix's SSIM (Gaussian 11 x 11, sigma 1.5) with the
  data range of the target batch; a structural term that stands in for the perceptual
  network.
* "features": an LPIPS-style distance in a feature network loaded from a local .npz
  (`weights=`). File format: conv{i}_w (kh, kw, cin, cout, HWIO) and conv{i}_b (cout,)
  for i = 0, 1, ...; optional conv{i}_stride (int, default 1), lin{i} (cout,) non-negative
  channel weights (default 1/cout), and mean / std (cin,) input normalisation. Each conv is
  followed by ReLU; the features after every layer are unit-normalised over channels, and
  the loss is sum_i mean_hw sum_c lin_i[c] (f_i(x) - f_i(y))^2. A grey image is repeated to
  the first conv's cin channels. Convert LPIPS/VGG/squeeze weights to this layout (e.g. from
  a PyTorch state dict: transpose OIHW -> HWIO) to reproduce the reference's term.
* "none": 0.
"""

import os
from typing import Callable

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from deepssim_jax import io

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def ssim_loss(**unused) -> LossFn:
  def loss(x, y):
    rng = jax.lax.stop_gradient(jnp.max(y) - jnp.min(y))
    return 1.0 - jnp.mean(pix.ssim(x, y, max_val=jnp.maximum(rng, 1e-6)))
  return loss


def load_feature_net(path: str) -> dict:
  """Reads a feature network .npz (module docstring) into numpy arrays, checked."""
  if not path or not os.path.isfile(path):
    raise io.InputError(f"perceptual weights {path or '(not set)'}: file not found (an .npz "
                        "of conv{i}_w / conv{i}_b, see ldm_jax/perceptual.py)")
  with np.load(path) as z:
    arrays = {k: np.asarray(z[k]) for k in z.files}
  layers, i = [], 0
  while f"conv{i}_w" in arrays:
    w = arrays[f"conv{i}_w"].astype(np.float32)
    if w.ndim != 4:
      raise io.InputError(f"{path}: conv{i}_w must be (kh, kw, cin, cout), got {w.shape}")
    if layers and w.shape[2] != layers[-1]["w"].shape[3]:
      raise io.InputError(f"{path}: conv{i}_w takes {w.shape[2]} channels, the previous layer "
                          f"gives {layers[-1]['w'].shape[3]}")
    b = arrays.get(f"conv{i}_b", np.zeros(w.shape[3])).astype(np.float32)
    lin = arrays.get(f"lin{i}", np.full(w.shape[3], 1.0 / w.shape[3])).astype(np.float32)
    if b.shape != (w.shape[3],) or lin.shape != (w.shape[3],):
      raise io.InputError(f"{path}: conv{i}_b / lin{i} must have {w.shape[3]} entries")
    layers.append({"w": w, "b": b, "lin": lin,
                   "stride": int(arrays.get(f"conv{i}_stride", 1))})
    i += 1
  if not layers:
    raise io.InputError(f"{path}: no conv0_w array (see ldm_jax/perceptual.py for the format)")
  cin = layers[0]["w"].shape[2]
  return {"layers": layers, "mean": arrays.get("mean", np.zeros(cin)).astype(np.float32),
          "std": arrays.get("std", np.ones(cin)).astype(np.float32)}


def feature_loss(weights: str = "", **unused) -> LossFn:
  net = load_feature_net(weights)
  cin = net["layers"][0]["w"].shape[2]

  def features(x):
    if x.shape[-1] != cin:
      x = jnp.repeat(x[..., :1], cin, axis=-1)
    h = (x - net["mean"]) / net["std"]
    outs = []
    for layer in net["layers"]:
      s = layer["stride"]
      h = jax.lax.conv_general_dilated(h, layer["w"], (s, s), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      h = jax.nn.relu(h + layer["b"])
      outs.append(h)
    return outs

  def loss(x, y):
    total = 0.0
    for fx, fy, layer in zip(features(x), features(y), net["layers"]):
      nx = fx / (jnp.sqrt(jnp.sum(fx ** 2, -1, keepdims=True)) + 1e-10)
      ny = fy / (jnp.sqrt(jnp.sum(fy ** 2, -1, keepdims=True)) + 1e-10)
      total = total + jnp.mean(jnp.sum(layer["lin"] * (nx - ny) ** 2, -1))
    return total
  return loss


def no_loss(**unused) -> LossFn:
  return lambda x, y: jnp.zeros((), jnp.float32)


PERCEPTUAL = {"ssim": ssim_loss, "features": feature_loss, "none": no_loss}


def make(name: str, **kwargs) -> LossFn:
  if name not in PERCEPTUAL:
    raise ValueError(f"perceptual loss {name!r}: expected one of {sorted(PERCEPTUAL)}")
  return PERCEPTUAL[name](**kwargs)
