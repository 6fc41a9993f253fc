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
import shutil
import tempfile
from typing import Any, Iterable, Iterator, Mapping, Sequence

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


def replace_folder(folder: str, files: Mapping[str, Any], marker: str) -> str:
  """Replaces `folder` atomically with a folder holding exactly `files`: all or nothing.

  The files are written into a fresh temporary folder beside `folder` (named
  `.<name>.XXXXXXXX`, what deepssim_jax.workdir cleans up after a kill), which then takes
  its place by rename; the previous folder is removed only after the new one is in place,
  and is put back if the rename fails. A writer that raises leaves the previous folder (or
  none) untouched.

  Args:
    folder: the output folder.
    files: {file name: str (text) | bytes | callable(path) that writes the file}.
    marker: a file name that marks a previous output of the same writer. An existing folder
      is replaced only if it is empty or holds `marker`, so a mistyped path never deletes
      someone's folder.

  Returns:
    The folder's absolute path.

  Raises:
    InputError: `folder` is a file, or a non-empty folder without `marker`.
  """
  folder = os.path.abspath(folder)
  if os.path.exists(folder):
    if not os.path.isdir(folder):
      raise InputError(f"{folder}: exists and is not a folder")
    if os.listdir(folder) and not os.path.exists(os.path.join(folder, marker)):
      raise InputError(f"{folder}: not empty and not a previous output (no {marker}); "
                       "refusing to replace it")
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(folder) + ".", dir=parent)
  old = None
  try:
    for name, content in files.items():
      path = os.path.join(tmp, name)
      if callable(content):
        content(path)
      elif isinstance(content, bytes):
        write_bytes(path, content)
      else:
        write_text(path, content)
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; give what mkdir would
    if os.path.exists(folder):
      old = tmp + ".old"
      os.rename(folder, old)
    os.rename(tmp, folder)
  except BaseException:
    if old and os.path.exists(old) and not os.path.exists(folder):
      os.rename(old, folder)  # put the previous folder back
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old:
    shutil.rmtree(old, ignore_errors=True)
  return folder


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


def key_rows(ids: Sequence[str], keys: Sequence[str], origin: str, *, csv_file: str = "",
             missing: int | None = None) -> np.ndarray:
  """Rows of `keys` among a set's `ids`: the one key lookup of both packages.

  Keys and ids match in either spelling, ours `<uid>/<name>` or the reference's
  `<uid>___<name>` (canonical_key), on either side, so the reference's pair tables, test sets
  and matrices are read as they are. An id repeated as it is keeps its last row (as a plain
  dict of the ids would).

  Args:
    ids: the set's ids, one per row (an image set's keys, a store's ids, a file's rows).
    keys: the keys to find.
    origin: names the set (and its file or store) in the messages.
    csv_file: the CSV file `keys` were read from, one per row after its header; a missing
      key's message then starts with the file and names the key's row.
    missing: the row given to a key that is not among the ids; None refuses such a key.

  Returns:
    (len(keys),) int64 rows.

  Raises:
    InputError: two different ids name one image ('a/b' and 'a___b': a key would be
      ambiguous), named with `origin`; or a key is not among the ids and `missing` is None,
      named with `origin` (and its file and row, given `csv_file`).
  """
  ids = [str(k) for k in np.asarray(ids).tolist()]
  pos, spelled = {}, {}
  for i, k in enumerate(ids):
    c = canonical_key(k)
    if spelled.setdefault(c, k) != k:
      raise InputError(f"{origin}: ids {spelled[c]!r} and {k!r} name the same image")
    pos[c] = i
  out = np.empty(len(keys), np.int64)
  for j, k in enumerate(np.asarray(keys).tolist()):
    i = pos.get(canonical_key(k), missing)
    if i is None:
      where = (f"{csv_file}: key {str(k)!r} (row {j + 2}) is not in {origin}" if csv_file
               else f"{origin}: key {str(k)!r} not found")
      raise InputError(f"{where} ({len(ids)} ids, e.g. {ids[:3]})")
    out[j] = i
  return out


def require_path(path: str, what: str, hint: str) -> str:
  """Returns `path` if it exists, else stops with what to download and where to put it."""
  if path and os.path.exists(path):
    return path
  raise SystemExit(f"{what}: {path or '(not set)'} does not exist.\n{hint}")
