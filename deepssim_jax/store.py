"""Embedding stores: sharded, resumable, streamable files of (id, embedding) rows.

Embedding 10^5-10^6 images takes hours, so the embedder writes its output one shard at a
time and a restarted job skips the shards already on disk; matching then streams the
store block by block, so memory stays bounded by the block size and never by the store.

Layout of a store folder:
  shard-00000.npz, shard-00001.npz, ...   each with `ids` (unicode strings, (n,)) and
                                          `emb` (float32 or float16, (n, d))
  index.json                              {"format", "status": "complete" | "partial",
                                           "dim", "dtype", "n_rows",
                                           "shards": [{"file", "rows"}], "meta": {...}}
Rows are ordered by shard index, then by position within the shard. Every file is written
atomically (deepssim_jax.io), so a shard that exists is whole; `completed_shards` tells a
resuming writer which ones to skip. `finalize` checks the shards (contiguous numbering,
one dimension and dtype, unique ids) before it marks the store complete; readers refuse a
store that is not complete or whose shards disagree with its index.
"""

import json
import os
import re
import zipfile
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from deepssim_jax import io

INDEX = "index.json"
FORMAT = "deepssim-embedding-store/1"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.npz$")
_DTYPES = ("float32", "float16")


def shard_name(shard_idx: int) -> str:
  return f"shard-{shard_idx:05d}.npz"


def write_shard(folder: str, shard_idx: int, ids: Sequence[str], emb: np.ndarray) -> str:
  """Writes one shard atomically.

  Args:
    folder: the store folder (created if missing).
    shard_idx: the shard number (>= 0); shards are read in this order.
    ids: n unique, non-empty identifiers.
    emb: (n, d) float32 or float16 embeddings (other float dtypes are cast to float32).

  Returns:
    The path of the written shard.
  """
  path = os.path.join(folder, shard_name(int(shard_idx)))
  if int(shard_idx) < 0:
    raise ValueError(f"{path}: negative shard index {shard_idx}")
  ids = np.asarray(ids, dtype=str)
  emb = np.asarray(emb)
  if emb.ndim != 2 or ids.ndim != 1 or len(ids) != len(emb):
    raise ValueError(f"{path}: need ids (n,) and emb (n, d); got {ids.shape} and {emb.shape}")
  if emb.dtype.name not in _DTYPES:
    if not np.issubdtype(emb.dtype, np.floating):
      raise ValueError(f"{path}: embeddings must be floating point, got {emb.dtype}")
    emb = emb.astype(np.float32)
  if not np.all(np.isfinite(emb)):
    raise ValueError(f"{path}: embeddings contain NaN or infinity")
  if len(ids) and (ids == "").any():
    raise ValueError(f"{path}: empty id at row {int(np.flatnonzero(ids == '')[0])}")
  dup = _first_duplicate(ids)
  if dup is not None:
    raise io.InputError(f"{path}: duplicate id {dup!r}")
  io.write_npz(path, ids=ids, emb=emb)
  return path


def _first_duplicate(ids: np.ndarray) -> Optional[str]:
  if len(ids) < 2:
    return None
  s = np.sort(ids)
  hit = np.flatnonzero(s[1:] == s[:-1])
  return str(s[hit[0]]) if len(hit) else None


def _shard_files(folder: str) -> dict[int, str]:
  return {int(m.group(1)): os.path.join(folder, name)
          for name in os.listdir(folder) if (m := _SHARD_RE.match(name))}


def _member_header(zf: zipfile.ZipFile, key: str, path: str) -> tuple[tuple[int, ...], np.dtype]:
  """Reads an .npy member's shape and dtype without reading its data."""
  try:
    with zf.open(key + ".npy") as f:
      version = np.lib.format.read_magic(f)
      read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read(f)
  except KeyError:
    raise io.InputError(f"{path}: not a store shard (no {key!r} array)") from None
  return shape, dtype


def shard_info(path: str) -> dict[str, Any]:
  """Shape information of one shard, read from the file headers only.

  Returns:
    {"rows": n, "dim": d, "dtype": "float32" | "float16"}.

  Raises:
    InputError: the file is missing, unreadable, or not a valid shard.
  """
  if not os.path.isfile(path):
    raise io.InputError(f"{path}: shard file not found")
  try:
    with zipfile.ZipFile(path) as zf:
      id_shape, id_dtype = _member_header(zf, "ids", path)
      emb_shape, emb_dtype = _member_header(zf, "emb", path)
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    raise io.InputError(f"{path}: unreadable shard ({e})") from None
  if len(emb_shape) != 2 or len(id_shape) != 1 or id_shape[0] != emb_shape[0]:
    raise io.InputError(f"{path}: need ids (n,) and emb (n, d); got {id_shape} and {emb_shape}")
  if id_dtype.kind != "U":
    raise io.InputError(f"{path}: ids must be strings, got {id_dtype}")
  if emb_dtype.name not in _DTYPES:
    raise io.InputError(f"{path}: emb dtype {emb_dtype} is not one of {_DTYPES}")
  return {"rows": int(emb_shape[0]), "dim": int(emb_shape[1]), "dtype": emb_dtype.name}


def _read_index(folder: str) -> Optional[dict]:
  path = os.path.join(folder, INDEX)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      index = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise io.InputError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(index, dict) or index.get("format") != FORMAT:
    raise io.InputError(f"{path}: not an embedding-store index (format != {FORMAT!r})")
  return index


def completed_shards(folder: str, fingerprint: Optional[str] = None) -> list[int]:
  """The shard numbers already written and valid, for a resuming writer to skip.

  Args:
    folder: the store folder (a missing folder has no shards).
    fingerprint: the model/checkpoint fingerprint of the resuming writer. If the folder's
      index carries a different `meta["fingerprint"]`, its shards were computed by another
      model and must not be mixed in: InputError.

  Returns:
    Sorted shard numbers whose files exist and whose headers are valid (atomic writes mean
    an existing file is complete; an unreadable one is treated as not done).
  """
  if not os.path.isdir(folder):
    return []
  index = _read_index(folder)
  if fingerprint is not None and index is not None:
    old = index.get("meta", {}).get("fingerprint")
    if old is not None and old != fingerprint:
      raise io.InputError(
          f"{os.path.join(folder, INDEX)}: store was written with fingerprint {old!r}, not "
          f"{fingerprint!r}; use a new folder or delete this one")
  done = []
  for idx, path in sorted(_shard_files(folder).items()):
    try:
      shard_info(path)
    except io.InputError:
      continue
    done.append(idx)
  return done


def finalize(folder: str, meta: Mapping[str, Any], complete: bool = True) -> dict:
  """Checks the shards and writes index.json.

  Args:
    folder: the store folder.
    meta: free-form metadata recorded in the index; put the model/checkpoint fingerprint
      under "fingerprint" (completed_shards checks it).
    complete: True once every shard is written. False records progress (status
      "partial"): readers refuse the store, resuming writers still see the fingerprint.

  Returns:
    The index written.

  Raises:
    InputError: missing folder; (when complete) no shards, a gap in the shard numbers,
      dimensions or dtypes that differ across shards, or an id present twice.
  """
  if not os.path.isdir(folder):
    raise io.InputError(f"{folder}: store folder not found")
  files = _shard_files(folder)
  infos = {i: shard_info(p) for i, p in sorted(files.items())}
  if complete:
    if not infos:
      raise io.InputError(f"{folder}: no shard files (shard-00000.npz, ...)")
    missing = sorted(set(range(max(infos) + 1)) - set(infos))
    if missing:
      raise io.InputError(f"{folder}: incomplete store, missing shard(s) "
                          f"{[shard_name(i) for i in missing[:5]]}")
  dim = dtype = None
  first = None
  for i, info in infos.items():
    if dim is None:
      dim, dtype, first = info["dim"], info["dtype"], files[i]
    elif info["dim"] != dim:
      raise io.InputError(f"{files[i]}: embedding dimension {info['dim']} differs from "
                          f"{dim} in {first}")
    elif info["dtype"] != dtype:
      raise io.InputError(f"{files[i]}: dtype {info['dtype']} differs from {dtype} in {first}")
  if complete:
    seen: dict[str, int] = {}
    for i in infos:
      with np.load(files[i], allow_pickle=False) as z:
        ids = z["ids"]
      dup = _first_duplicate(ids)
      if dup is not None:
        raise io.InputError(f"{files[i]}: duplicate id {dup!r}")
      for key in ids.tolist():
        j = seen.setdefault(key, i)
        if j != i:
          raise io.InputError(f"{folder}: duplicate id {key!r} in {shard_name(j)} and "
                              f"{shard_name(i)}")
  index = {
      "format": FORMAT,
      "status": "complete" if complete else "partial",
      "dim": dim,
      "dtype": dtype,
      "n_rows": int(sum(v["rows"] for v in infos.values())),
      "shards": [{"file": shard_name(i), "rows": v["rows"]} for i, v in infos.items()],
      "meta": dict(meta),
  }
  io.write_json(os.path.join(folder, INDEX), index)
  return index


def read_index(folder: str) -> dict:
  """The index of a complete store, with its shard files checked against it.

  Raises:
    InputError: missing folder or index, a partial store, or a shard that is missing or
      disagrees with the index (rows, dimension, dtype).
  """
  if not os.path.isdir(folder):
    raise io.InputError(f"{folder}: store folder not found")
  index = _read_index(folder)
  path = os.path.join(folder, INDEX)
  if index is None:
    raise io.InputError(f"{path}: not found; the store is incomplete (finalize was not run)")
  if index.get("status") != "complete":
    raise io.InputError(f"{path}: store status is {index.get('status')!r}, not 'complete'")
  for s in index["shards"]:
    info = shard_info(os.path.join(folder, s["file"]))
    if info["rows"] != s["rows"]:
      raise io.InputError(f"{os.path.join(folder, s['file'])}: {info['rows']} rows, the "
                          f"index says {s['rows']}")
    if info["dim"] != index["dim"] or info["dtype"] != index["dtype"]:
      raise io.InputError(f"{os.path.join(folder, s['file'])}: ({info['dim']}, "
                          f"{info['dtype']}) differs from the index ({index['dim']}, "
                          f"{index['dtype']})")
  return index


def load_store(folder: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole store into memory (for small stores; stream big ones).

  Returns:
    ids: (n,) unicode array; emb: (n, d) in the store's dtype.
  """
  index = read_index(folder)
  ids, embs = [], []
  for s in index["shards"]:
    with np.load(os.path.join(folder, s["file"]), allow_pickle=False) as z:
      ids.append(z["ids"])
      embs.append(z["emb"])
  ids = np.concatenate(ids) if ids else np.zeros((0,), str)
  emb = (np.concatenate(embs) if embs else np.zeros((0, index["dim"] or 0), index["dtype"]))
  dup = _first_duplicate(ids)
  if dup is not None:
    raise io.InputError(f"{folder}: duplicate id {dup!r}")
  return ids, emb


def iter_store_blocks(folder: str, block_rows: int,
                      index: Optional[dict] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Streams a store as consecutive blocks of `block_rows` rows (the last may be shorter).

  Memory is bounded by one shard plus one block. Blocks cross shard boundaries, so the
  block size is independent of how the store was sharded.

  Args:
    folder: a complete store.
    block_rows: rows per block (> 0).
    index: the store's index if already read (read_index), to skip re-checking.

  Yields:
    (ids (m,), emb (m, d)) in the store's dtype, m == block_rows except for the last.
  """
  if block_rows <= 0:
    raise ValueError(f"block_rows must be positive, got {block_rows}")
  index = read_index(folder) if index is None else index
  pend_ids: list[np.ndarray] = []
  pend_emb: list[np.ndarray] = []
  pending = 0
  for s in index["shards"]:
    with np.load(os.path.join(folder, s["file"]), allow_pickle=False) as z:
      ids, emb = z["ids"], z["emb"]
    start = 0
    while start < len(ids):
      take = min(block_rows - pending, len(ids) - start)
      pend_ids.append(ids[start:start + take])
      pend_emb.append(emb[start:start + take])
      pending += take
      start += take
      if pending == block_rows:
        yield _join(pend_ids, pend_emb)
        pend_ids, pend_emb, pending = [], [], 0
    del ids, emb
  if pending:
    yield _join(pend_ids, pend_emb)


def _join(ids, emb):
  if len(ids) == 1:
    return ids[0], emb[0]
  return np.concatenate(ids), np.concatenate(emb)
