"""The Python API: load a DeepSSIM model and score images, from a script or a notebook.

    import deepssim_jax
    model = deepssim_jax.load("builtin")            # or "runs/x:best", "runs/x:latest:1200"
    s = model.score("a.png", "b.png")               # one float: cosine of the embeddings
    S = model.similarity(train_images, synth_images)  # (N, M)
    top = model.nearest(synth_images, train_images, k=5)  # streamed exact top-k
    deepssim_jax.classify(s)                        # 'Different' | 'Similar' | 'Duplicate'

Images are given as a numpy array ((H, W) or (N, H, W), any intensity scale), as PNG files,
as NIfTI volumes (their axial slices in the model's band) or as folders of either. They are
prepared as training prepared them: non-finite or constant images are refused by name,
NIfTI slices are read in RAS+ radiological view with their physical aspect, every image is
resampled to the model's size (aspect kept, centred, padded with its minimum) and z-scored.
Embedding runs in fixed-size batches sharded over all devices, jit-compiled once per image
size (deepssim_jax.embed.embed_array).

Model specs (`load`): "builtin" (the model shipped in deepssim_jax/pretrained/, see its
MODEL_CARD.md), a training workdir with the checkpoint to use ("<dir>:best",
"<dir>:latest", "<dir>:latest:<step>"; "<dir>" alone is its best), a folder written by
`python -m deepssim_jax.convert`, or an exported model file (`.npz`, see
deepssim_jax.pretrained).
"""

import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from deepssim_jax import (align as align_lib, embed as embed_lib, evaluate, fileio, jobs,
                          match as match_lib, parallel, pretrained, runs)
from deepssim_jax.data import images as images_lib
from deepssim_jax.data import volumes as volumes_lib

Images = Union[np.ndarray, str, os.PathLike, Sequence[Union[str, os.PathLike]]]
NIFTI_SUFFIXES = (".nii", ".nii.gz")


# ----------------------------------------------------------------------------- reading


def _is_nifti(path: str) -> bool:
  return path.lower().endswith(NIFTI_SUFFIXES)


def image_source(path: str, size: Sequence[int], band: Sequence[float] = (0.35, 0.65),
                 num_slices: Optional[int] = None):
  """A random-access image source (keys, __getitem__ -> z-scored (H, W)) over a PNG file,
  a NIfTI volume (its axial slices in `band`; num_slices evenly spaced, None: all), or a
  folder holding PNGs (recursively, keys are relative paths) or NIfTI volumes.

  Raises:
    fileio.InputError: a missing path, a folder with neither PNG nor NIfTI files (or both), a
      file that is neither.
  """
  path = os.fspath(path)
  size = tuple(int(s) for s in size)
  if os.path.isdir(path):
    names = [f.lower() for _, _, fs in os.walk(path) for f in fs]
    has_png = any(n.endswith(".png") for n in names)
    has_nii = any(n.endswith(NIFTI_SUFFIXES) for n in names)
    if has_png and has_nii:
      raise fileio.InputError(f"{path}: holds both PNG and NIfTI files; give one kind per "
                          "folder")
    if has_png:
      return images_lib.folder_source(path, size, recursive=True)
    if has_nii:
      _, records = volumes_lib.find_volumes(path, "folder")
      return volumes_lib.VolumeSliceSource(records, size, band, num_slices)
    raise fileio.InputError(f"{path}: no .png, .nii or .nii.gz files found")
  if not os.path.exists(path):
    raise fileio.InputError(f"{path}: file not found")
  if path.lower().endswith(".png"):
    key = os.path.splitext(os.path.basename(path))[0]
    return images_lib.PngSource([key], [path], size, origin=path)
  if _is_nifti(path):
    return volumes_lib.VolumeSliceSource([{"path": path}], size, band, num_slices)
  raise fileio.InputError(f"{path}: not a PNG or NIfTI file (.png, .nii, .nii.gz)")


def prepare_array(x: np.ndarray, size: Sequence[int], name: str = "images") -> np.ndarray:
  """(H, W) or (N, H, W) array of any intensity scale -> (N, *size) z-scored float32.

  Raises:
    fileio.InputError: wrong rank, an empty stack, a NaN/inf or a constant image (by index).
  """
  x = np.asarray(x)
  if x.ndim == 2:
    x = x[None]
  if x.ndim != 3:
    raise fileio.InputError(f"{name}: expected an (H, W) image or an (N, H, W) stack, got "
                        f"shape {x.shape}")
  if len(x) == 0:
    raise fileio.InputError(f"{name}: no images (shape {x.shape})")
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise fileio.InputError(f"{name}: expected real numbers, got dtype {x.dtype}")
  size = tuple(int(s) for s in size)
  out = np.empty((len(x), *size), np.float32)
  for i, img in enumerate(x):
    where = f"{name}[{i}]" if len(x) > 1 else name
    images_lib.check_not_constant(img, where)
    if img.shape != size:
      img = images_lib.resample(img, size)
    out[i] = images_lib.zscore(img, where)
  return out


def _is_paths(x) -> bool:
  if isinstance(x, (str, os.PathLike)):
    return True
  return isinstance(x, (list, tuple)) and bool(x) and isinstance(x[0], (str, os.PathLike))


def read_images(x: Images, size: Sequence[int], band: Sequence[float] = (0.35, 0.65),
                num_slices: Optional[int] = None, name: str = "images",
                num_threads: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """(keys, z-scored (N, *size) images) of an array, a path or a list of paths.

  Array rows are keyed '0', '1', ...; files by their name (a volume's slices as
  '<name>/z<k>'), folders by relative path.
  """
  if not _is_paths(x):
    arr = prepare_array(np.asarray(x), size, name)
    return np.arange(len(arr)).astype(str), arr
  paths = [x] if isinstance(x, (str, os.PathLike)) else list(x)
  if not paths:
    raise fileio.InputError(f"{name}: no images given")
  keys, stacks = [], []
  for p in paths:
    src = image_source(p, size, band, num_slices)
    bank = images_lib.load_all(src, progress=False, num_threads=num_threads)
    keys += list(bank["keys"])
    stacks.append(bank["images"])
  return np.asarray(keys, dtype=str), np.concatenate(stacks, axis=0)


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded DeepSSIM: the flax module, its variables and the config it was trained with.

  Attributes:
    model: the deepssim_jax.models.DeepSSIM module.
    variables: {"params", "batch_stats"}.
    config: the run's ml_collections config (data.image_size, data.real.band, ...).
    spec: what was loaded (the spec given to `load`).
    step: the training step of the checkpoint.
    fingerprint: a hash of the weights (identifies the model in stores and reports).
    batch_size: images per device batch when embedding.
  """
  model: Any
  variables: Any
  config: Any
  spec: str
  step: int
  fingerprint: str
  batch_size: int = 64

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(int(s) for s in self.config.data.image_size)

  @property
  def band(self) -> tuple[float, float]:
    """The axial band whose NIfTI slices the model reads (its training data's)."""
    return tuple(self.config.data.get("real", {}).get("band", (0.35, 0.65)))

  @functools.cached_property
  def embed_fn(self):
    """The jitted embedding function of this model (compiled once per batch shape)."""
    return embed_lib.make_embed_fn(self.model)

  def read(self, x: Images, name: str = "images") -> tuple[np.ndarray, np.ndarray]:
    """(keys, (N, H, W) z-scored images) as the model reads them (read_images)."""
    return read_images(x, self.image_size, self.band, None, name)

  def _read(self, x: Images, name: str) -> np.ndarray:
    return self.read(x, name)[1]

  def embed(self, images: Images, progress: bool = False) -> np.ndarray:
    """(N, D) float32 unit embeddings of images (see the module docstring for inputs).
    Files and folders are read a chunk at a time (embed_source)."""
    if not _is_paths(images):
      return self.embed_read(self._read(images, "images"), progress)
    paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    return np.concatenate([embed_source(self, self.source(p), os.fspath(p), progress=progress)
                           for p in paths], axis=0)

  def embed_read(self, x: np.ndarray, progress: bool = False) -> np.ndarray:
    """(N, D) unit embeddings of (N, H, W) images already read (read(), or a source()'s
    items: checked, resized and z-scored), embedded as they are."""
    return embed_lib.embed_array(self.model, self.variables, x, self.batch_size,
                                 progress=progress, embed_fn=self.embed_fn)

  def source(self, path) -> Any:
    """The images of a file or folder as the model reads them (image_source)."""
    return image_source(path, self.image_size, self.band)

  @property
  def align(self) -> bool:
    """Whether this model scores after rigid registration by default (config.model.align:
    how it was trained); score, similarity and nearest take align=None for it."""
    return bool(self.config.model.get("align", False))

  def _align(self, align: Optional[bool]) -> bool:
    return self.align if align is None else bool(align)

  def _aligned(self, a: np.ndarray, b: np.ndarray, pairs=None) -> np.ndarray:
    return align_lib.aligned_scores(self.embed_read, a, b, pairs=pairs)[0]

  def score(self, a: Images, b: Images, align: Optional[bool] = None) -> float:
    """DeepSSIM of two single images: the cosine of their embeddings; align=True: after b
    is rigidly registered onto a (deepssim_jax.align: flips x rotations up to 9 degrees,
    the candidate whose pixels correlate best), so rotated copies score as copies;
    align=None (the default): the model's own setting (Model.align)."""
    align = self._align(align)
    xa, xb = self._read(a, "a"), self._read(b, "b")
    for name, x in (("a", xa), ("b", xb)):
      if len(x) != 1:
        raise fileio.InputError(f"score: {name} holds {len(x)} images, expected one (use "
                            "similarity() for stacks)")
    if align:
      return float(self._aligned(xa, xb)[0, 0])
    ea, eb = self.embed_read(xa), self.embed_read(xb)
    return float(np.dot(ea[0], eb[0]))

  def similarity(self, a: Images, b: Images, align: Optional[bool] = None) -> np.ndarray:
    """(N, M) DeepSSIM of every image of a against every image of b (align: as in score;
    the images are read into memory and every candidate of b is embedded: 28x the work)."""
    if self._align(align):
      return self._aligned(self._read(a, "a"), self._read(b, "b"))
    ea, eb = self.embed(a), self.embed(b)
    return np.asarray(ea @ eb.T, np.float32)

  def nearest(self, query: Images, reference: Images, k: int = 5,
              align: Optional[bool] = None, rerank: int = 4) -> dict[str, np.ndarray]:
    """The k most similar reference images of each query image (exact, streamed through the
    devices by deepssim_jax.match): {"scores": (N, k) descending, "indices": (N, k) rows of
    the reference, "classes": (N, k) names under the paper's thresholds}. align=True: the
    rerank * k nearest by plain cosine are scored again after alignment (as in score) and
    the best k of them kept (the images are read into memory); None: Model.align."""
    align = self._align(align)
    if align:
      xq, xr = self._read(query, "query"), self._read(reference, "reference")
      eq, er = self.embed_read(xq), self.embed_read(xr)
    else:
      eq, er = self.embed(query), self.embed(reference)
    if not 1 <= k <= len(er):
      raise fileio.InputError(f"nearest: k={k} must be between 1 and the {len(er)} reference "
                          "images")
    if align and rerank < 1:
      raise fileio.InputError(f"nearest: rerank={rerank} must be >= 1")
    if not align:
      scores, idx = match_lib.topk_match(eq, er, k)
    else:  # only the reference images some query kept are transformed and embedded
      idx = align_lib.flip_candidates(self.embed_read, xq, eq, er, k * rerank,
                                      match_lib.topk_match)
      scores, idx = align_lib.rerank(self.embed_read, xq, xr, idx, k)
    return {"scores": scores, "indices": idx, "classes": classify(scores)}

  def explain(self, a: Images, b: Images, score: str = "similarity"
              ) -> tuple[np.ndarray, np.ndarray]:
    """Explanation maps of a pair (deepssim_jax.explain; by default occlusion): for each
    image an (H, W) map in [0, 1] of the regions that make the pair match (score
    "similarity") or differ ("dissimilarity"); exact copies get maps of 0. Settings
    (method, window, stride, stages, eps, max_cosine): explain.default_config()."""
    from deepssim_jax import explain  # pylint: disable=g-import-not-at-top
    xa, xb = self._read(a, "a"), self._read(b, "b")
    if len(xa) != 1 or len(xb) != 1:
      raise fileio.InputError("explain: give one image for a and one for b")
    cfg = explain.default_config()
    ma, mb = explain.pair_maps(self.model, self.variables, xa[0], xb[0], method=cfg.method,
                               score=score, stages=tuple(cfg.stages), window=cfg.window,
                               stride=cfg.stride, eps=cfg.eps, max_cosine=cfg.max_cosine)
    return np.asarray(ma), np.asarray(mb)


def embed_source(model: Model, source, desc: str = "images", chunk: int = 2048,
                 num_threads: int = 4, progress: bool = True) -> np.ndarray:
  """(N, D) embeddings of a random-access image source (image_source), read `chunk` images
  at a time by `num_threads` threads, so memory stays bounded for any set size."""
  n = len(source)
  out = []
  bar = tqdm(total=n, desc=f"embed {desc}", unit="img",
             disable=not (progress and parallel.is_main_process()))
  with concurrent.futures.ThreadPoolExecutor(max(num_threads, 1)) as pool:
    for start in range(0, n, chunk):
      x = np.stack(list(pool.map(source.__getitem__, range(start, min(start + chunk, n)))))
      out.append(embed_lib.embed_array(model.model, model.variables, x, model.batch_size,
                                       progress=False, embed_fn=model.embed_fn))
      bar.update(len(x))
  bar.close()
  return np.concatenate(out, axis=0)


def load(spec: str = "builtin", batch_size: int = 64) -> Model:
  """Loads a model (see the module docstring for specs).

  Raises:
    fileio.InputError: an unknown spec, a folder without checkpoints, a missing step.
  """
  spec = os.fspath(spec)
  if spec == "builtin" or spec.endswith(".npz"):
    path = pretrained.BUILTIN if spec == "builtin" else spec
    config, model, variables, step = pretrained.load(path)
    fingerprint = jobs.weights_fingerprint(variables)
    variables = parallel.replicate(variables, parallel.make_mesh())
    return Model(model, variables, config, spec, step, fingerprint, batch_size)
  try:
    run, _, _ = jobs.parse_checkpoint(spec, "")
    ck_spec = spec
  except ValueError:  # a bare folder: its best checkpoint
    run, ck_spec = spec, f"{spec}:best"
  if not os.path.isdir(run):
    raise fileio.InputError(
        f"model {spec!r}: not 'builtin', an exported .npz, or an existing run folder "
        "('<workdir>:best', '<workdir>:latest[:<step>]', a converted checkpoint folder)")
  if not os.path.isfile(os.path.join(run, "config.json")):
    raise fileio.InputError(f"{run}: no config.json: not a training workdir or a converted "
                        "checkpoint folder")
  ck = jobs.load_checkpoint(ck_spec, run)
  config = runs.load_config(run)
  return Model(ck["model"], ck["variables"], config, spec, ck["step"], ck["fingerprint"],
               batch_size)


def classify(scores, thresholds: Sequence[float] = evaluate.PAPER_THRESHOLDS):
  """The paper's 3-class rule on scores: <= low 'Different', > high 'Duplicate', else
  'Similar'. A scalar gives a str, an array an array of str of its shape."""
  lo, hi = (float(t) for t in thresholds)
  s = np.asarray(scores, np.float64)
  labels = evaluate.classify(s.ravel(), lo, hi).reshape(s.shape)
  shown = np.asarray([evaluate.CLASS_NAMES[c].capitalize() for c in evaluate.LABELS])
  names = shown[labels]  # LABELS are 0, 1, 2: a label is its row
  return str(names) if names.ndim == 0 else names
