"""Axial 2-D slices from 3-D brain MRI volumes (NIfTI), as DeepSSIM's images.

DeepSSIM audits 2-D axial slices of brain MRI (IXI and CoRR in the paper). This module finds
the volumes of a data set (`LAYOUTS`: IXI, CoRR legacy and BIDS, any folder of NIfTI files)
and turns them into an image source of z-scored axial slices of one fixed size.
Longer than most modules because each data-set layout and the orientation conventions
below belong with the slicing they feed.

Conventions (every slice of every data set comes out the same way):
* Volumes are reoriented to RAS+ (`nib.as_closest_canonical`): axis 0 left -> Right,
  axis 1 posterior -> Anterior, axis 2 inferior -> Superior; slice k is `vol[:, :, k]` of
  the canonical volume (k counts from the bottom).
* The 2-D image is the standard radiological axial view: rows run anterior (top) to
  posterior (bottom), columns the patient's right (left of the image) to left. That is
  `img[r, c] = vol[X - 1 - c, Y - 1 - r, k]`.
* Physical size is respected: the slice's voxel sizes (mm) are taken from the affine, the
  slice is resampled to square pixels and fitted (whole head visible, aspect kept, centred,
  padded with the slice minimum) into (H, W), or, with `spacing_mm`, put on a fixed grid of
  `spacing_mm` mm per pixel (centred, padded or cropped). See images.resample.
* Slices are taken from a central band of the axial extent (`band`, fractions of the number
  of slices), where the brain is; then z-scored.
* Keys are "<id>/z<k:03d>", id being the record's unique id (IXI: the file name without
  extension, e.g. IXI002-Guys-0828-T1; CoRR: <subject>-ses<N>-run<K>; folder: the relative
  path without extension) and k the canonical axial index.
* A slice that is constant or holds NaN/inf cannot be z-scored: reading it raises InputError
  naming the file and the slice (it means a broken volume, not something to skip quietly).
"""

import logging
import math
import numbers
import os
import re
import threading
from typing import Callable, Mapping, NamedTuple, Sequence

import nibabel as nib
import numpy as np

from deepssim_jax import fileio
from deepssim_jax.data import images

_NII_RE = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


def _strip_nii(name: str) -> str:
  return _NII_RE.sub("", name)


def _check_root(root: str) -> str:
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise fileio.InputError(f"{root}: folder not found")
  return root


def _nifti_files(root: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    out += [os.path.join(dirpath, f) for f in filenames
            if _NII_RE.search(f) and not f.startswith(".")]
  return sorted(out)


# ----------------------------------------------------------------------------------------
# Discovery: (root) -> list of records, each a dict with at least path, id, subject,
# sequence, session, site. An empty list means "not this layout".

_IXI_RE = re.compile(r"^(IXI\d+)-([A-Za-z]+)-(\d+)-(T1|T2|PD|MRA|DTI-\d+)\.nii(\.gz)?$")


def find_ixi(root: str, sequences: Sequence[str] = ("T1", "T2", "PD"),
             demographics: str | None = None) -> list[dict]:
  """Finds IXI volumes, IXI###-<Site>-####-<T1|T2|PD>.nii.gz, anywhere under root.

  Args:
    root: the IXI folder.
    sequences: which sequences to keep.
    demographics: path of IXI.xls (default <root>/IXI.xls if present). It is read only if
      pandas and an .xls engine (xlrd) are importable, adding `age` and `sex` to records;
      otherwise it is ignored with a log line.

  Returns:
    records (path, id = file name without extension, subject = IXI###, site, sequence,
    session = '') sorted by path.
  """
  root = _check_root(root)
  records = []
  for path in _nifti_files(root):
    m = _IXI_RE.match(os.path.basename(path))
    if m and m.group(4) in sequences:
      records.append({"path": path, "id": _strip_nii(os.path.basename(path)),
                      "subject": m.group(1), "site": m.group(2), "sequence": m.group(4),
                      "session": ""})
  if demographics is None and os.path.isfile(os.path.join(root, "IXI.xls")):
    demographics = os.path.join(root, "IXI.xls")
  if records and demographics:
    _add_ixi_demographics(records, demographics)
  return records


def _add_ixi_demographics(records: list[dict], path: str) -> None:
  """Adds age (years, NaN if unknown) and sex ('M'/'F'/'') from IXI.xls, if readable."""
  try:
    import pandas as pd  # pylint: disable=g-import-not-at-top
    rows = pd.read_excel(path).to_dict("records")
  except Exception as e:  # pylint: disable=broad-except
    logging.info("%s: demographics ignored (needs pandas with an .xls engine such as xlrd: "
                 "%s)", path, e)
    return
  cols = {str(c).strip().upper(): c for c in (rows[0] if rows else {})}
  id_col, age_col = cols.get("IXI_ID"), cols.get("AGE")
  sex_col = next((c for u, c in cols.items() if u.startswith("SEX")), None)
  if id_col is None:
    logging.warning("%s: no IXI_ID column; demographics ignored", path)
    return
  info = {}
  for row in rows:
    try:
      sid = int(row[id_col])
    except (TypeError, ValueError):
      continue
    age = row.get(age_col) if age_col is not None else None
    age = float(age) if isinstance(age, numbers.Real) and age == age else None
    sex = {1: "M", 2: "F"}.get(row[sex_col], "") if sex_col is not None else ""
    if sid not in info or (info[sid][0] is None and age is not None):
      info[sid] = (age, sex)  # IXI.xls repeats some ids; keep the first with an age.
  for r in records:
    age, sex = info.get(int(r["subject"][3:]), (None, ""))
    r["age"] = float("nan") if age is None else age
    r["sex"] = sex


_CORR_LEGACY_RE = re.compile(r"^session_(\w+)$")
_CORR_ANAT_RE = re.compile(r"^anat_(\w+)$")
_BIDS_T1_RE = re.compile(
    r"^sub-([A-Za-z0-9]+)(?:_ses-([A-Za-z0-9]+))?(?:_acq-[A-Za-z0-9]+)?"
    r"(?:_run-([A-Za-z0-9]+))?_T1w\.nii(\.gz)?$")


def find_corr(root: str) -> list[dict]:
  """Finds CoRR T1 volumes, legacy or BIDS, anywhere under root.

  Legacy: RawData/<site>/<subid>/session_<N>/anat_<K>/anat.nii.gz.
  BIDS: <site>/sub-<id>/ses-<N>/anat/sub-<id>_ses-<N>[_run-<K>]_T1w.nii.gz.

  Returns:
    records (path, id = <subject>-ses<N>-run<K>, subject, site, session, run,
    sequence = 'T1w') sorted by path.
  """
  root = _check_root(root)
  records = []
  for path in _nifti_files(root):
    parts = os.path.relpath(path, root).split(os.sep)
    name = parts[-1]
    if name.lower() in ("anat.nii.gz", "anat.nii") and len(parts) >= 4:
      ses, anat = _CORR_LEGACY_RE.match(parts[-3]), _CORR_ANAT_RE.match(parts[-2])
      if not (ses and anat):
        continue
      subject, site = parts[-4], parts[-5] if len(parts) >= 5 else ""
      session, run = ses.group(1), anat.group(1)
    elif m := _BIDS_T1_RE.match(name):
      subject, session, run = m.group(1), m.group(2) or "", m.group(3) or ""
      pos = [i for i, p in enumerate(parts[:-1]) if p == f"sub-{subject}"]
      site = parts[pos[-1] - 1] if pos and pos[-1] >= 1 else ""
    else:
      continue
    uid = subject + (f"-ses{session}" if session else "") + (f"-run{run}" if run else "")
    records.append({"path": path, "id": uid, "subject": subject, "site": site,
                    "session": session, "run": run, "sequence": "T1w"})
  return records


def find_folder(root: str) -> list[dict]:
  """Finds every .nii / .nii.gz under root, recursively, sorted by path.

  Returns:
    records (path, id = relative path without extension, subject = id, sequence, session,
    site = '').
  """
  root = _check_root(root)
  records = []
  for path in _nifti_files(root):
    uid = _strip_nii(os.path.relpath(path, root)).replace(os.sep, "/")
    records.append({"path": path, "id": uid, "subject": uid, "sequence": "", "session": "",
                    "site": ""})
  return records


LAYOUTS: dict[str, Callable[[str], list[dict]]] = {
    "ixi": find_ixi, "corr": find_corr, "folder": find_folder}


def find_volumes(root: str, layout: str = "auto") -> tuple[str, list[dict]]:
  """Finds the volumes of a data set.

  Args:
    root: the data set's folder.
    layout: a LAYOUTS name, or 'auto': IXI if IXI files are found, else CoRR, else folder.

  Returns:
    (layout name, records).

  Raises:
    InputError: root missing, an unknown layout, or no volume found.
  """
  root = _check_root(root)
  if layout == "auto":
    for name in ("ixi", "corr", "folder"):
      records = LAYOUTS[name](root)
      if records:
        logging.info("%s: %d volume(s), %s layout", root, len(records), name)
        return name, records
    raise fileio.InputError(f"{root}: no NIfTI (.nii / .nii.gz) files found")
  if layout not in LAYOUTS:
    raise fileio.InputError(f"unknown volume layout {layout!r}; expected auto or one of "
                        f"{sorted(LAYOUTS)}")
  records = LAYOUTS[layout](root)
  if not records:
    raise fileio.InputError(f"{root}: no volumes of the {layout!r} layout found")
  return layout, records


# ----------------------------------------------------------------------------------------
# Reading volumes and slices.


def open_volume(path: str) -> nib.Nifti1Image:
  """Opens a NIfTI (header only) and checks it is 3-D (or 4-D with one volume).

  Raises:
    InputError: unreadable or not a volume.
  """
  try:
    img = nib.load(path)
  except FileNotFoundError:
    raise fileio.InputError(f"{path}: file not found") from None
  except Exception as e:  # pylint: disable=broad-except
    raise fileio.InputError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") \
        from None
  shape = img.shape
  if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
    raise fileio.InputError(f"{path}: expected a 3-D volume (or 4-D with one volume), got "
                        f"shape {shape}")
  if min(shape[:3]) < 2:
    raise fileio.InputError(f"{path}: volume of shape {shape} is too small")
  return img


def canonical_geometry(img) -> tuple[tuple[int, int, int], np.ndarray]:
  """(shape, voxel sizes in mm) of the RAS+ reoriented volume, without reading the data."""
  ornt = nib.io_orientation(img.affine)
  shape, zooms = [0] * 3, np.zeros(3)
  vox = nib.affines.voxel_sizes(img.affine)
  for i in range(3):
    shape[int(ornt[i, 0])] = img.shape[i]
    zooms[int(ornt[i, 0])] = vox[i]
  return tuple(shape), zooms


def load_canonical(path: str, img=None) -> tuple[np.ndarray, np.ndarray]:
  """Reads a volume as float32 RAS+ (nib.as_closest_canonical).

  Returns:
    (data (X, Y, Z) float32, voxel sizes (3,) in mm).

  Raises:
    InputError: unreadable (e.g. truncated) data.
  """
  img = open_volume(path) if img is None else img
  try:
    if len(img.shape) == 4:
      img = img.slicer[..., 0]
    canon = nib.as_closest_canonical(img)
    data = canon.get_fdata(dtype=np.float32, caching="unchanged")
  except fileio.InputError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise fileio.InputError(f"{path}: cannot read the image data ({type(e).__name__}: {e})") \
        from None
  return data, nib.affines.voxel_sizes(canon.affine)


def axial_view(vol: np.ndarray, k: int) -> np.ndarray:
  """Slice k of a RAS+ volume as a radiological axial view: anterior up, patient right on
  the image's left. Returns (Y, X)."""
  return vol[::-1, ::-1, k].T


class Plane(NamedTuple):
  """A plane of a RAS+ volume: the axis slice k indexes, the radiological view of slice k,
  the (row, column) axes of that view (whose voxel sizes are the pixel's), and the letter
  of its slice keys (the index along R, A, S)."""
  axis: int
  view: Callable[[np.ndarray, int], np.ndarray]
  view_axes: tuple[int, int]
  letter: str


# Coronal: superior up, patient right on the image's left, (Z, X); sagittal: superior up,
# anterior on the image's left, (Z, Y).
PLANES = {
    "axial": Plane(2, axial_view, (1, 0), "z"),
    "coronal": Plane(1, lambda vol, k: vol[::-1, k, ::-1].T, (2, 0), "y"),
    "sagittal": Plane(0, lambda vol, k: vol[k, ::-1, ::-1].T, (2, 1), "x"),
}


def _plane(plane: str) -> Plane:
  if plane not in PLANES:
    raise ValueError(f"unknown plane {plane!r}; known: {sorted(PLANES)}")
  return PLANES[plane]


def plane_depth(vol_shape: Sequence[int], plane: str) -> int:
  """How many slices a volume of vol_shape has in `plane`."""
  return int(vol_shape[_plane(plane).axis])


def slice_image(vol: np.ndarray, zooms: Sequence[float], k: int,
                size: Sequence[int] = (136, 112), spacing_mm: float | None = None,
                name: str = "volume", plane: str = "axial") -> np.ndarray:
  """The z-scored (H, W) image of slice k of a RAS+ volume (axial unless `plane` says).

  Args:
    vol: (X, Y, Z) RAS+ data.
    zooms: voxel sizes (mm) of vol.
    k: index along the plane's axis (axial: Z).
    size: (H, W).
    spacing_mm: None fits the slice into (H, W); a number puts it on a fixed grid of that
      many mm per pixel.
    name: for error messages (the file).
    plane: 'axial', 'coronal' or 'sagittal' (PLANES: radiological views).

  Raises:
    InputError: a constant or non-finite slice.
  """
  p = _plane(plane)
  view = p.view(vol, k)
  row_axis, col_axis = p.view_axes
  where = f"{name}: {plane} slice {k}"
  images.check_not_constant(view, where)
  x = images.resample(view, size, pixel_mm=(zooms[row_axis], zooms[col_axis]), mode="fit",
                      spacing_mm=spacing_mm)
  return images.zscore(x, where)


def band_slices(depth: int, band: Sequence[float] = (0.35, 0.65), num_slices: int | None = None,
                stride: int = 1) -> list[int]:
  """Axial indices in the central band of a volume of `depth` slices.

  The band holds the indices k with lo * (depth - 1) <= k <= hi * (depth - 1) (or, if none,
  the one nearest to its middle). `stride` keeps every stride-th of them; then `num_slices`,
  if set, picks that many evenly spaced (all of them if the band holds fewer).
  """
  lo, hi = band
  if not 0 <= lo <= hi <= 1:
    raise ValueError(f"band must satisfy 0 <= lo <= hi <= 1, got {band}")
  if stride < 1:
    raise ValueError(f"stride must be >= 1, got {stride}")
  first, last = math.ceil(lo * (depth - 1) - 1e-9), math.floor(hi * (depth - 1) + 1e-9)
  ks = list(range(first, last + 1))[::stride]
  if not ks:
    ks = [math.floor((lo + hi) / 2 * (depth - 1) + 0.5)]  # the nearest slice
  if num_slices is not None and num_slices < len(ks):
    if num_slices < 1:
      raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    pick = np.round(np.linspace(0, len(ks) - 1, num_slices)).astype(int)
    ks = [ks[i] for i in pick]
  return ks


def slice_key(uid: str, k: int, plane: str = "axial") -> str:
  return f"{uid}/{_plane(plane).letter}{k:03d}"


class VolumeSliceSource:
  """Image source of z-scored axial slices of NIfTI volumes (see the module docstring).

  Opens every volume's header when built (and again after unpickling), so bad files fail
  early, and computes the slice list from the canonical geometry without reading data.
  Reading item i loads its volume (RAS+, float32) and keeps the last `cache_volumes`
  volumes, so reading in key order reads each volume once. Safe to call from several
  threads; picklable (the cache and file handles are not pickled).

  Attributes:
    keys: "<id>/z<k:03d>" per slice, volumes in record order, slices ascending.
    meta: columns slice (int) and every record field (path, id, subject, sequence, ...).
  """

  def __init__(self, records: Sequence[Mapping], size: Sequence[int] = (136, 112),
               band: Sequence[float] = (0.35, 0.65), num_slices: int | None = None,
               stride: int = 1, spacing_mm: float | None = None, cache_volumes: int = 1):
    """Args:
      records: dicts with at least `path` (from LAYOUTS); `id` (default: subject[-sequence],
        else the file name) must be unique. A record may carry `slices` (a list of axial
        indices) to override the band.
      size: (H, W) of the images.
      band, num_slices, stride: which axial slices (see band_slices).
      spacing_mm: None fits each slice into (H, W); a number fixes mm per pixel.
      cache_volumes: how many decoded volumes to keep in memory.

    Raises:
      InputError: no records, duplicated ids, or an unreadable / non-volume file.
    """
    if not records:
      raise fileio.InputError("VolumeSliceSource: no volumes given")
    self.records = [dict(r) for r in records]
    for r in self.records:
      if "id" not in r:
        subj = r.get("subject") or _strip_nii(os.path.basename(r["path"]))
        r["id"] = subj + (f"-{r['sequence']}" if r.get("sequence") else "")
    images.check_unique([r["id"] for r in self.records], [r["path"] for r in self.records],
                        "VolumeSliceSource")
    self.size = (int(size[0]), int(size[1]))
    self.band, self.num_slices, self.stride = tuple(band), num_slices, stride
    self.spacing_mm = spacing_mm
    self.cache_volumes = max(int(cache_volumes), 1)
    self._open()
    self.keys, self._index = [], []
    meta = {"slice": []}
    fields = [f for f in dict.fromkeys(f for r in self.records for f in r) if f != "slices"]
    for f in fields:
      meta[f] = []
    for j, (r, img) in enumerate(zip(self.records, self._imgs)):
      depth = canonical_geometry(img)[0][2]
      ks = r.get("slices")
      if ks is None:
        ks = band_slices(depth, self.band, self.num_slices, self.stride)
      for k in ks:
        if not 0 <= k < depth:
          raise fileio.InputError(f"{r['path']}: slice {k} outside the volume's {depth} axial "
                              "slices")
        self.keys.append(slice_key(r["id"], int(k)))
        self._index.append((j, int(k)))
        meta["slice"].append(int(k))
        for f in fields:
          meta[f].append(r.get(f))
    self.meta = images.meta_columns(meta, len(self.keys))

  def _open(self):
    self._imgs = [open_volume(r["path"]) for r in self.records]
    self._cache = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    for k in ("_imgs", "_cache", "_lock"):
      state.pop(k)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self.keys)

  def volume(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """(RAS+ float32 data, voxel sizes) of record j, through the cache."""
    with self._lock:
      hit = self._cache.pop(j, None)
      if hit is not None:
        self._cache[j] = hit  # most recently used last
        return hit
    vol = load_canonical(self.records[j]["path"], self._imgs[j])
    with self._lock:
      self._cache[j] = vol
      while len(self._cache) > self.cache_volumes:
        self._cache.pop(next(iter(self._cache)))
    return vol

  def __getitem__(self, i: int) -> np.ndarray:
    j, k = self._index[i]
    data, zooms = self.volume(j)
    return slice_image(data, zooms, k, self.size, self.spacing_mm, self.records[j]["path"])
