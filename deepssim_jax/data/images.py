"""2-D image sources: PNG layouts, resampling, z-scoring and in-memory image banks.

DeepSSIM compares grey-scale 2-D images of one fixed size, each z-scored ((x - mean) / std).
This module holds the pieces every reader shares and the PNG readers:

* `resample`: pure-numpy separable linear resampling with anti-aliasing (the same kernel,
  pixel-centre convention and weight normalisation as `jax.image.scale_and_translate` with
  method 'linear'), that keeps the physical aspect ratio: pixels of any size in mm are mapped
  onto a square output grid and the result is centred and padded (or cropped) to (H, W).
  It is numpy on purpose: grain runs image sources in worker processes, which must not start
  JAX (on a GPU host each worker would grab accelerator memory).
* `zscore`: the project's one z-score, applied before SSIM, before the network and after
  augmentation: numpy on the host (a constant or non-finite image is an error naming it,
  `check_not_constant`), or the same formula traced under jit (`xp=jax.numpy`, std floored
  at `ZSCORE_EPS`), so this module itself never imports JAX.
* Image sources: random-access objects with `keys` (unique, stable order), `__len__`,
  `__getitem__(i) -> float32 (H, W)` z-scored image and `meta` (dict of per-image numpy
  columns). `PngSource` reads PNG files; `find_reference_layout`, `manifest_source` and
  `folder_source` build them from the reference generation layout
  (`<root>/<uid>/training.png`, `<root>/<uid>/gen-<i>.png`), a CSV manifest or a flat folder.
  Sources are picklable and thread-safe (grain workers).
* Banks: `load_all` materialises a source as a dict(keys, images, meta); `save_bank` /
  `load_bank` cache it as one atomic .npz.
* `write_png`: writes an image as an 8-bit min-max scaled PNG (the reference layout).

It is longer than ~400 lines because it holds every JAX-free piece the 2-D readers share
(grain workers import it without JAX): resampling, the z-score and its checks, PNG sources
and banks. The bank helpers (`load_all`, `save_bank`, `load_bank`) could move to a module of
their own if it grows further.
"""

import concurrent.futures
import io
import logging
import os
import re
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from deepssim_jax import fileio

RESIZE_MODES = ("fit", "stretch", "error")
_EPS32 = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------------------
# Resampling and normalisation.


def _weights(n_in: int, n_out: int, scale: float, translation: float) -> np.ndarray:
  """Linear-kernel resampling matrix (n_out, n_in); rows of uncovered outputs are zero.

  Output pixel i (centre i + 0.5) samples the input at (i + 0.5 - translation) / scale - 0.5
  (input pixel centres at integers). When downsampling (scale < 1) the triangle kernel is
  widened by 1 / scale, which low-pass filters (anti-aliasing); weights are normalised to
  sum to 1, and outputs whose sample lies outside the input get no weight, as in
  jax.image.scale_and_translate.
  """
  inv = 1.0 / scale
  kernel_scale = max(inv, 1.0)
  sample = (np.arange(n_out, dtype=np.float64) + 0.5 - translation) * inv - 0.5
  x = np.abs(sample[:, None] - np.arange(n_in, dtype=np.float64)[None, :]) / kernel_scale
  w = np.maximum(0.0, 1.0 - x)
  total = w.sum(axis=1, keepdims=True)
  w = np.where(np.abs(total) > 1000 * _EPS32, w / np.where(total != 0, total, 1), 0.0)
  covered = (sample >= -0.5) & (sample <= n_in - 0.5)
  return w * covered[:, None]


def _taps(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The banded matrix w (n_out, n_in) as (indices, weights), both (n_out, T).

  Applying the taps is a small gather and sum: unlike a BLAS matmul it does not slow down
  when many processes share a few cores (OpenBLAS threads oversubscribe them).
  """
  nz = w != 0
  start = np.where(nz.any(1), nz.argmax(1), 0)
  stop = np.where(nz.any(1), w.shape[1] - nz[:, ::-1].argmax(1), 0)
  t = max(int((stop - start).max()), 1)
  idx = start[:, None] + np.arange(t)[None, :]
  inside = idx < stop[:, None]
  idx = np.minimum(idx, w.shape[1] - 1)
  return idx, np.where(inside, np.take_along_axis(w, idx, 1), 0.0).astype(np.float32)


def resample(image: np.ndarray, size: Sequence[int], pixel_mm: Sequence[float] = (1.0, 1.0),
             mode: str = "fit", spacing_mm: float | None = None,
             background: float | None = None) -> np.ndarray:
  """Resamples a 2-D image onto an (H, W) grid of square pixels, keeping physical aspect.

  Args:
    image: (h, w) array.
    size: output (H, W).
    pixel_mm: physical size (rows, cols) of one input pixel, in mm (any unit; only the ratio
      matters unless `spacing_mm` is set).
    mode: 'fit': scale so the whole image fits in (H, W) with square output pixels, centred,
      padding the rest with `background`; 'stretch': scale rows and columns independently to
      fill (H, W) (ignores `pixel_mm`).
    spacing_mm: if set (only with mode 'fit'), the output pixel size in mm instead of the
      fitted one: the image keeps its physical scale and is centred, then padded or cropped.
    background: value of the padding; default the image minimum.

  Returns:
    float32 (H, W).
  """
  image = np.asarray(image)
  if image.ndim != 2:
    raise ValueError(f"resample expects a 2-D image, got shape {image.shape}")
  h, w = image.shape
  out_h, out_w = (int(s) for s in size)
  if mode == "stretch":
    sy, sx = out_h / h, out_w / w
  elif mode == "fit":
    ph, pw = (float(p) for p in pixel_mm)
    if spacing_mm is None:
      s = min(out_h / (h * ph), out_w / (w * pw))  # output pixels per mm
    else:
      s = 1.0 / float(spacing_mm)
    sy, sx = s * ph, s * pw
  else:
    raise ValueError(f"unknown resample mode {mode!r}; expected 'fit' or 'stretch'")
  wy = _weights(h, out_h, sy, (out_h - h * sy) / 2)
  wx = _weights(w, out_w, sx, (out_w - w * sx) / 2)
  (iy, ty), (ix, tx) = _taps(wy), _taps(wx)
  x = image.astype(np.float32)
  rows = np.einsum("ot,otw->ow", ty, x[iy])  # (out_h, w)
  out = np.einsum("ot,hot->ho", tx, rows[:, ix])  # (out_h, out_w)
  cy, cx = wy.any(1), wx.any(1)
  if not (cy.all() and cx.all()):
    bg = float(image.min()) if background is None else float(background)
    out = np.where(cy[:, None] & cx[None, :], out, bg)
  return out.astype(np.float32)


# Floor on the standard deviation in a traced z-score (`zscore(x, xp=jnp)`, inside jit). A
# jitted function cannot raise, so a (near-)constant image there comes out as ~zeros instead
# of NaN/inf; every real image has std >> 1e-6 (they are z-scored on the host first). The host
# z-score uses no floor: a constant image is an error naming it (`check_not_constant`).
ZSCORE_EPS = 1e-6


def _image_names(name, shape) -> list[str]:
  """One name per image: `name` itself for an (H, W) image; for an (N, H, W) stack, the
  names given, or "<name> <i>"."""
  if len(shape) == 2:
    return [str(name)]
  if isinstance(name, (str, os.PathLike)):
    return [f"{name} {i}" for i in range(shape[0])]
  if len(name) != shape[0]:
    raise ValueError(f"{len(name)} names for {shape[0]} images")
  return [str(n) for n in name]


def check_not_constant(image: np.ndarray, name: str | Sequence[str] = "image") -> None:
  """Raises InputError unless every image can be z-scored (the project's rule: an image that
  is constant, holds NaN/inf or is empty is an error that names it, never NaN downstream).

  Called on raw pixels: readers check before resampling, whose rounding could make a
  constant image look slightly non-constant.

  Args:
    image: an image (H, W) or a stack (N, H, W), any real dtype.
    name: what to call the image in errors (a file, a key); for a stack, one name per image
      or a prefix ("<name> <i>").

  Raises:
    InputError: wrong rank, not real-valued, empty, non-finite or constant; for a stack the
      message names the first such image and counts the others.
  """
  x = np.asarray(image)
  label = str(name) if isinstance(name, (str, os.PathLike)) else "images"
  if x.ndim not in (2, 3):
    raise fileio.InputError(f"{label}: expected an image (H, W) or a stack (N, H, W), got "
                            f"shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
          or x.dtype == bool):
    raise fileio.InputError(f"{label}: expected a real-valued image, got dtype {x.dtype}")
  names = _image_names(name, x.shape)
  if x.size == 0:
    raise fileio.InputError(f"{label}: empty image {x.shape}")
  stack = x.reshape(-1, *x.shape[-2:])
  finite = np.isfinite(stack).all(axis=(1, 2))
  with np.errstate(invalid="ignore"):
    const = stack.max(axis=(1, 2)) == stack.min(axis=(1, 2))
  bad = np.flatnonzero(~finite | const)
  if not bad.size:
    return
  i = int(bad[0])
  img = stack[i]
  if not finite[i]:
    kinds = "/".join(k for k, m in (("NaN", np.isnan(img)), ("inf", np.isinf(img))) if m.any())
    n = img.size - int(np.isfinite(img).sum())
    msg = (f"{names[i]}: {n} of {img.size} pixels are {kinds}; an image with non-finite "
           "values cannot be z-scored")
  else:
    msg = (f"{names[i]}: constant image (every pixel is {img.flat[0].item()!r}); its standard "
           "deviation is 0, so it cannot be z-scored and SSIM is undefined")
  if bad.size > 1:
    msg += f" ({bad.size - 1} more image(s) of {len(stack)} likewise)"
  raise fileio.InputError(msg)


def zscore(x, name: str | Sequence[str] = "image", *, xp=np, dtype=np.float32):
  """The z-score of DeepSSIM: (x - mean) / std per image over (H, W), population std.

  The one z-score of the project, applied before SSIM, before the network and after
  augmentation. `xp` picks where it runs; the formula is the same:
  * numpy (host, the default): computed in float64 as the reference's
    (x - x.mean()) / x.std(), after `check_not_constant` (errors name the image);
  * jax.numpy (traced, jittable): no checks, std floored at ZSCORE_EPS.

  Args:
    x: an image (H, W) or a stack (N, H, W); traced: any (..., H, W).
    name: host only: the image's name in errors, or one name per image of a stack.
    xp: numpy or jax.numpy.
    dtype: host only: the dtype of the result (traced results keep x's float dtype).

  Returns:
    The z-scored images, the shape of x.

  Raises:
    InputError: host only: see `check_not_constant`.
  """
  eps = ZSCORE_EPS
  if xp is np:
    check_not_constant(x, name)
    x, eps = np.asarray(x, np.float64), 0.0  # checked: every std > 0
  mean = xp.mean(x, axis=(-2, -1), keepdims=True)
  std = xp.std(x, axis=(-2, -1), keepdims=True)
  z = (x - mean) / xp.maximum(std, eps)
  return z.astype(dtype) if xp is np else z


# ----------------------------------------------------------------------------------------
# PNG sources.


def read_png(path: str) -> np.ndarray:
  """Reads a PNG as a 2-D float32 array of its grey levels (colour images are converted).

  Raises:
    InputError: the file is missing or not a readable image.
  """
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode not in ("L", "I", "I;16", "I;16B", "F"):
        im = im.convert("L")
      return np.asarray(im, dtype=np.float32)
  except FileNotFoundError:
    raise fileio.InputError(f"{path}: file not found") from None
  except (OSError, ValueError, SyntaxError) as e:
    raise fileio.InputError(f"{path}: not a readable image ({e})") from None


def write_png(path: str, image: np.ndarray) -> None:
  """Writes an image as an 8-bit grey PNG, min-max scaled to 0..255, atomically.

  Args:
    path: destination (folders are created).
    image: (H, W) or (H, W, 1) array. A constant image is written as all zeros (with a
      warning): it cannot be min-max scaled, and a reader will refuse it.

  Raises:
    ValueError: wrong shape or non-finite values.
  """
  x = np.asarray(image, np.float64)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != 2:
    raise ValueError(f"{path}: write_png expects an (H, W) image, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{path}: image holds non-finite values")
  lo, hi = x.min(), x.max()
  if hi > lo:
    u8 = np.round((x - lo) / (hi - lo) * 255.0).astype(np.uint8)
  else:
    logging.warning("%s: constant image written as zeros", path)
    u8 = np.zeros(x.shape, np.uint8)
  buf = io.BytesIO()
  Image.fromarray(u8, mode="L").save(buf, format="PNG")
  fileio.write_bytes(path, buf.getvalue())


class PngSource:
  """Random-access image source over PNG files.

  Each item is read with PIL, checked (readable, finite, not constant), resampled to `size`
  when its shape differs, and z-scored. Items hold no open file, so the source is picklable
  and safe to read from several threads.

  Attributes:
    keys: list of unique keys, in a stable order.
    paths: the file of each key.
    size: (H, W) of the images returned, or None to return every image at its own size.
    resize: what to do when a PNG's shape differs from `size`: 'fit' (keep aspect, centre,
      pad with the minimum), 'stretch', or 'error'.
    meta: dict of per-image numpy columns.
  """

  def __init__(self, keys: Sequence[str], paths: Sequence[str],
               size: Sequence[int] | None = (136, 112), resize: str = "fit",
               meta: Mapping[str, Sequence] | None = None, origin: str = ""):
    """Builds the source, checking keys are unique and every file exists.

    Args:
      keys, paths: one key and one file per image.
      size, resize, meta: see the class docstring.
      origin: the folder or manifest the source came from, for error messages.

    Raises:
      InputError: no images, duplicated keys, or a missing file.
    """
    if resize not in RESIZE_MODES:
      raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    self.keys = [str(k) for k in keys]
    self.paths = [os.fspath(p) for p in paths]
    if len(self.keys) != len(self.paths):
      raise ValueError(f"{len(self.keys)} keys but {len(self.paths)} paths")
    where = origin or "PngSource"
    if not self.keys:
      raise fileio.InputError(f"{where}: no images")
    check_unique(self.keys, self.paths, where)
    for p in self.paths:
      if not os.path.isfile(p):
        raise fileio.InputError(f"{p}: file not found (listed by {where})")
    self.size = None if size is None else (int(size[0]), int(size[1]))
    self.resize = resize
    self.meta = meta_columns(meta or {}, len(self.keys))

  def __len__(self) -> int:
    return len(self.keys)

  def __getitem__(self, i: int) -> np.ndarray:
    path = self.paths[i]
    x = read_png(path)
    check_not_constant(x, path)
    if self.size is not None and x.shape != self.size:
      if self.resize == "error":
        raise fileio.InputError(f"{path}: image is {x.shape[0]}x{x.shape[1]}, expected "
                            f"{self.size[0]}x{self.size[1]} (set resize='fit' or 'stretch' "
                            "or the configured image size)")
      x = resample(x, self.size, mode=self.resize)
    return zscore(x, path)


def _natural_key(s: str):
  return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]


_GEN_RE = re.compile(r"^gen-(\d+)\.png$", re.IGNORECASE)


def find_reference_layout(root: str, size: Sequence[int] | None = (136, 112),
                          resize: str = "fit") -> tuple[PngSource, PngSource]:
  """Reads the reference generation layout: `<root>/<uid>/training.png`, `gen-<i>.png`.

  uids are sorted naturally (numbers by value); generated images by their index. A uid
  folder with a training image but no generated ones is kept (a training image nothing was
  generated from); hidden folders and folders with neither are skipped.

  Args:
    root: the layout's folder.
    size, resize: see PngSource.

  Returns:
    (training, generated) sources. Training keys are "<uid>/training" (meta: uid);
    generated keys "<uid>/gen-<i>" with i as written in the file name (meta: uid,
    gen_index, source_key = the training key of the same uid).

  Raises:
    InputError: root missing, no uid folder with images, or a uid with generated images but
      no training.png (the message names the folder).
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise fileio.InputError(f"{root}: folder not found")
  t_keys, t_paths, t_uid = [], [], []
  g_keys, g_paths, g_uid, g_idx = [], [], [], []
  skipped = 0
  for uid in sorted(os.listdir(root), key=_natural_key):
    folder = os.path.join(root, uid)
    if uid.startswith(".") or not os.path.isdir(folder):
      continue
    names = os.listdir(folder)
    gens = sorted(((int(m.group(1)), n) for n in names if (m := _GEN_RE.match(n))))
    has_training = os.path.isfile(os.path.join(folder, "training.png"))
    if gens and not has_training:
      raise fileio.InputError(f"{folder}: {len(gens)} generated image(s) but no training.png "
                          "(every uid folder needs its training image)")
    if not has_training:
      skipped += 1
      continue
    t_keys.append(f"{uid}/training")
    t_paths.append(os.path.join(folder, "training.png"))
    t_uid.append(uid)
    for idx, name in gens:
      g_keys.append(f"{uid}/{name[:-4]}")
      g_paths.append(os.path.join(folder, name))
      g_uid.append(uid)
      g_idx.append(idx)
  if skipped:
    logging.info("%s: skipped %d folder(s) without training.png or gen-<i>.png", root,
                 skipped)
  if not t_keys:
    raise fileio.InputError(f"{root}: no <uid>/training.png found (reference layout expected)")
  if not g_keys:
    raise fileio.InputError(f"{root}: no <uid>/gen-<i>.png found (reference layout expected)")
  training = PngSource(t_keys, t_paths, size, resize, {"uid": t_uid}, origin=root)
  generated = PngSource(g_keys, g_paths, size, resize,
                        {"uid": g_uid, "gen_index": g_idx,
                         "source_key": [f"{u}/training" for u in g_uid]}, origin=root)
  return training, generated


def manifest_source(csv_path: str, size: Sequence[int] | None = (136, 112),
                    resize: str = "fit") -> PngSource:
  """A source from a CSV manifest with columns `key,path` (other columns become meta).

  Relative paths are resolved against the CSV's folder.

  Raises:
    InputError: missing columns, no rows, duplicated keys, or a listed file missing.
  """
  csv_path = os.fspath(csv_path)
  table = fileio.read_csv(csv_path, required=("key", "path"))
  if not table["key"]:
    raise fileio.InputError(f"{csv_path}: manifest has no rows")
  base = os.path.dirname(os.path.abspath(csv_path))
  paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in table["path"]]
  lines = [f"line {i + 2}" for i in range(len(paths))]
  check_unique(table["key"], lines, csv_path)
  for line, p in zip(lines, paths):
    if not os.path.isfile(p):
      raise fileio.InputError(f"{csv_path}: {line}: file not found: {p}")
  meta = {k: v for k, v in table.items() if k not in ("key", "path")}
  return PngSource(table["key"], paths, size, resize, meta, origin=csv_path)


def folder_source(root: str, size: Sequence[int] | None = (136, 112), resize: str = "fit",
                  recursive: bool = False) -> PngSource:
  """A source over the PNG files of a folder, sorted; keys are the relative paths without
  the extension ('/'-separated).

  Raises:
    InputError: folder missing, no PNG, or two files with one key (e.g. a.png and a.PNG).
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise fileio.InputError(f"{root}: folder not found")
  paths = []
  if recursive:
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      paths += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(".png")]
  else:
    paths = [os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(".png")
             and os.path.isfile(os.path.join(root, f))]
  if not paths:
    raise fileio.InputError(f"{root}: no .png files found")
  paths.sort(key=lambda p: _natural_key(os.path.relpath(p, root)))
  keys = [os.path.relpath(p, root)[:-4].replace(os.sep, "/") for p in paths]
  return PngSource(keys, paths, size, resize, origin=root)


# ----------------------------------------------------------------------------------------
# Helpers shared with the volume reader, and image banks.


def check_unique(keys: Sequence[str], where: Sequence[str], origin: str) -> None:
  """Raises InputError naming `origin` and both places if a key occurs twice."""
  seen = {}
  for k, w in zip(keys, where):
    if k in seen:
      raise fileio.InputError(f"{origin}: duplicated key {k!r} ({seen[k]} and {w})")
    seen[k] = w


def meta_columns(meta: Mapping[str, Sequence], n: int) -> dict[str, np.ndarray]:
  """Turns per-image metadata lists into numpy columns that .npz can hold without pickle.

  All-int columns become int64, numeric ones (None as NaN) float64, the rest unicode
  strings (None as '').
  """
  out = {}
  for name, values in meta.items():
    values = list(values)
    if len(values) != n:
      raise ValueError(f"meta column {name!r} has {len(values)} values, expected {n}")
    num = [v for v in values if v is not None]
    if num and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                   for v in values):
      out[name] = np.asarray(values, np.int64)
    elif num and all(isinstance(v, (int, float, np.integer, np.floating))
                     and not isinstance(v, bool) for v in num):
      out[name] = np.asarray([np.nan if v is None else v for v in values], np.float64)
    else:
      out[name] = np.asarray(["" if v is None else str(v) for v in values], dtype=str)
  return out


def load_all(source, progress: bool = True, num_threads: int = 0) -> dict:
  """Materialises an image source in memory.

  Args:
    source: an image source (keys, __len__, __getitem__, meta).
    progress: show a tqdm progress bar.
    num_threads: read with this many threads (PNG decoding and gzip release the GIL);
      0 reads in order in this thread (best for volume sources, which cache one volume).

  Returns:
    dict(keys=np.array of str (N,), images=float32 (N, H, W), meta=dict of (N,) columns).
  """
  import tqdm  # pylint: disable=g-import-not-at-top

  n = len(source)
  if n == 0:
    raise ValueError("load_all: the source is empty")
  bar = tqdm.tqdm(total=n, disable=not progress, desc="reading images", unit="img")
  images = [None] * n
  if num_threads > 0:
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for i, x in enumerate(pool.map(source.__getitem__, range(n))):
        images[i] = x
        bar.update(1)
  else:
    for i in range(n):
      images[i] = source[i]
      bar.update(1)
  bar.close()
  shapes = {x.shape for x in images}
  if len(shapes) != 1:
    raise fileio.InputError(f"images of different shapes {sorted(shapes)}: set an image size")
  return {"keys": np.asarray(list(source.keys), dtype=str),
          "images": np.stack(images).astype(np.float32, copy=False),
          "meta": {k: np.asarray(v) for k, v in source.meta.items()}}


def save_bank(path: str, bank: Mapping) -> None:
  """Writes a bank (dict keys/images/meta) to one .npz, atomically."""
  arrays = {"keys": np.asarray(bank["keys"], dtype=str),
            "images": np.asarray(bank["images"], np.float32)}
  for k, v in bank.get("meta", {}).items():
    v = np.asarray(v)
    arrays["meta." + k] = v.astype(str) if v.dtype == object else v
  fileio.write_npz(path, **arrays)


def load_bank(path: str) -> dict:
  """Reads a bank written by save_bank.

  Raises:
    InputError: missing or unreadable file, or arrays of inconsistent lengths.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise fileio.InputError(f"{path}: file not found")
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except Exception as e:  # pylint: disable=broad-except
    raise fileio.InputError(f"{path}: not a readable image bank ({e})") from None
  if "keys" not in arrays or "images" not in arrays:
    raise fileio.InputError(f"{path}: not an image bank (needs arrays 'keys' and 'images')")
  keys, images = arrays.pop("keys"), arrays.pop("images")
  if images.ndim != 3 or len(keys) != len(images):
    raise fileio.InputError(f"{path}: {len(keys)} keys for images of shape {images.shape}")
  meta = {k[5:]: v for k, v in arrays.items() if k.startswith("meta.")}
  for k, v in meta.items():
    if len(v) != len(keys):
      raise fileio.InputError(f"{path}: meta column {k!r} has {len(v)} values for {len(keys)} "
                          "images")
  return {"keys": keys, "images": images, "meta": meta}
