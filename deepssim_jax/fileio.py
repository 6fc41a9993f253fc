"""Atomic, validated file I/O shared by every job.

Every output is written to a temporary file in the destination folder and moved into
place with os.replace, so a killed job never leaves a half-written file behind and
nothing written earlier is lost. Readers validate what they read and name the file and
the problem in their errors. (Named fileio, not io, so that the standard library's io stays
importable under its own name.)
"""

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import tempfile
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np


def _read_umask() -> int:
  mask = os.umask(0o022)  # the only way to read it; set back at once (at import time)
  os.umask(mask)
  return mask


_UMASK = _read_umask()


class InputError(ValueError):
  """Bad user input: the message names the file and the problem."""


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[io.IOBase]:
  """Opens a temporary file beside `path`; on success moves it over `path`."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                             dir=folder)
  try:
    # mkstemp creates 0600 files; give the output the permissions open() would have.
    os.chmod(tmp, 0o666 & ~_UMASK)
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  with atomic_open(path, "w", encoding="utf-8") as f:
    f.write(text)


def write_bytes(path: str, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_json(path: str, obj) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def json_ready(x):
  """A JSON-ready copy: mappings with str keys, sequences and arrays as lists, numpy
  scalars as Python numbers, NaN/inf as None (JSON has neither)."""
  if isinstance(x, Mapping):
    return {str(k): json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [json_ready(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def write_npz(path: str, **arrays) -> None:
  with atomic_open(path, "wb") as f:
    np.savez(f, **arrays)


def write_npy(path: str, array: np.ndarray) -> None:
  with atomic_open(path, "wb") as f:
    np.save(f, array)


def write_csv(path: str, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
  """Writes a CSV with a header, atomically. Floats are written with repr precision."""
  with atomic_open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(columns)
    for row in rows:
      w.writerow([_fmt(v) for v in row])


def _fmt(v):
  if isinstance(v, (float, np.floating)):
    return repr(float(v))
  if isinstance(v, np.generic):
    return v.item()
  return v


def read_csv(path: str, required: Sequence[str] = ()) -> dict[str, list[str]]:
  """Reads a CSV into a dict of columns (strings), checking required columns exist.

  Raises:
    InputError: the file is missing or empty, or lacks a required column.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InputError(f"{path}: file not found")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    try:
      header = [h.strip() for h in next(reader)]
    except StopIteration:
      raise InputError(f"{path}: empty CSV (no header)") from None
    rows = [r for r in reader if r]
  missing = [c for c in required if c not in header]
  if missing:
    raise InputError(f"{path}: missing column(s) {missing}; found {header}")
  for i, r in enumerate(rows):
    if len(r) != len(header):
      raise InputError(f"{path}: line {i + 2} has {len(r)} fields, expected {len(header)}")
  return {h: [r[j] for r in rows] for j, h in enumerate(header)}


def float_column(path: str, table: Mapping[str, list[str]], name: str) -> np.ndarray:
  """Parses a float column, naming the file, column and line of a bad value."""
  out = np.empty(len(table[name]), np.float64)
  for i, v in enumerate(table[name]):
    try:
      out[i] = float(v)
    except ValueError:
      raise InputError(f"{path}: column {name!r} line {i + 2}: not a number: {v!r}") from None
  if not np.all(np.isfinite(out)):
    bad = int(np.flatnonzero(~np.isfinite(out))[0])
    raise InputError(f"{path}: column {name!r} line {bad + 2}: non-finite value {out[bad]}")
  return out


def fingerprint(*parts) -> str:
  """A short, stable hash of strings/bytes/arrays (for data and checkpoint fingerprints)."""
  h = hashlib.sha256()
  for p in parts:
    if isinstance(p, np.ndarray):
      h.update(str((p.dtype, p.shape)).encode())
      h.update(np.ascontiguousarray(p).tobytes())
    elif isinstance(p, bytes):
      h.update(p)
    else:
      h.update(str(p).encode())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- image keys
# The PyTorch reference names an image `<uid>___<name>` (its parent folder, three
# underscores, its PNG file name without .png: extract_image_identifier in its
# src/utils/utils.py), in its pair table, test_set.csv and matrix index files; this project
# names the same image `<uid>/<name>` (deepssim_jax.data.images). Every lookup of a given key
# among image ids compares canonical keys, so the reference's files are read as they are and
# either spelling works on either side.

REFERENCE_SEP = "___"


def canonical_key(key) -> str:
  """Our spelling of an image key: `<uid>___<name>` -> `<uid>/<name>` (at the first `___`,
  as the reference's get_image_path splits it); any other key as it is. A '.png' suffix is
  kept: it is part of neither spelling, so a key carrying it names no image."""
  key = str(key)
  uid, sep, name = key.partition(REFERENCE_SEP)
  return f"{uid}/{name}" if sep else key


def reference_key(key) -> str:
  """The reference's spelling of a key: `<uid>/<name>` -> `<uid>___<name>` at the last '/'
  (uid = the folder holding the image, name = its file name, as the reference derives
  them); a key without '/' as it is. canonical_key undoes it."""
  key = canonical_key(key)
  uid, sep, name = key.rpartition("/")
  return f"{uid}{REFERENCE_SEP}{name}" if sep else key


def key_positions(ids: Sequence[str], origin: str) -> dict[str, int]:
  """{canonical key: row} of a set's ids, so that a key in either spelling finds its row.

  A repeated id keeps its last row (as a plain dict of the ids would).

  Raises:
    InputError: two different ids name one image ('a/b' and 'a___b'): a key would be
      ambiguous. The message names `origin` (the set or file) and both ids.
  """
  pos, spelled = {}, {}
  for i, k in enumerate(np.asarray(ids).tolist()):
    k = str(k)
    c = canonical_key(k)
    if spelled.setdefault(c, k) != k:
      raise InputError(f"{origin}: ids {spelled[c]!r} and {k!r} name the same image")
    pos[c] = i
  return pos


def require_path(path: str, what: str, hint: str) -> str:
  """Returns `path` if it exists, else stops with what to download and where to put it."""
  if path and os.path.exists(path):
    return path
  raise SystemExit(f"{what}: {path or '(not set)'} does not exist.\n{hint}")
